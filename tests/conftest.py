import functools
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


def fmnist_data():
    """Fashion-MNIST ``(train, test)`` (cached by the loader). The setup installs it, so where
    it is missing the calling test FAILS, with the loader's message naming where it looked;
    no test is ever skipped for it."""
    from mosaic_flwr.data import DatasetNotFoundError, load_dataset
    try:
        return load_dataset("fmnist")
    except DatasetNotFoundError as exc:
        problem = str(exc)
    pytest.fail(f"Fashion-MNIST is missing: {problem}. Run `bash scripts/setup.sh`, which "
                "installs it; tests that need it fail rather than skip.", pytrace=False)


def requires_fmnist(test):
    """Decorator: the test fails (in its call, not at collection) where Fashion-MNIST is missing."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        fmnist_data()
        return test(*args, **kwargs)
    return run


def as_flower_server() -> None:
    """Let this process build Flower messages as the server would (run 1, node 1): Flower
    reads the sender's identity from ``TaskIdentity``, which only a running app sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 0, 1


def started_under(root: Path) -> list[int]:
    """PIDs of live processes whose FLWR_HOME lies under ``root``: every process this test
    starts sets one there, and SuperExec, ServerApp and ClientApp processes inherit it (they
    run detached, in sessions of their own)."""
    marker = f"FLWR_HOME={root}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if state != "Z" and any(var.startswith(marker) for var in environ):
            pids.append(int(entry.name))
    return pids
