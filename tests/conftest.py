import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# One intra-op thread, as in the simulation's clients (client-threads=1; every in-process
# client handler sets it anyway): on a shared 2-core machine two spinning threads made the
# small nets of these tests ~10x slower in CPU time (20 SGD steps of cnn_small: 0.4 s -> 3.5 s).
torch.set_num_threads(1)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# scripts/test.sh runs the suite on two pytest-xdist workers (``--dist loadgroup``). Tests that
# start Ray (every Flower simulation, and the Ray cluster of test_ray_cluster: a plain
# ``ray.init()`` joins the newest cluster ``ray start`` made on the machine) run on one worker,
# one at a time; so do the network-namespace deployments (fixed addresses).
SERIAL_GROUPS = {"test_flwr_run": "ray", "test_documented_commands": "ray", "test_reliability": "ray",
                 "test_ray_cluster": "ray", "test_deploy_netns": "netns"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = SERIAL_GROUPS.get(item.module.__name__.rpartition(".")[2])
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


