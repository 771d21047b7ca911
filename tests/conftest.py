import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fmnist_available() -> bool:
    from mosaic_flwr.data import DatasetNotFoundError, load_dataset
    try:
        load_dataset("fmnist")
        return True
    except DatasetNotFoundError:
        return False


requires_fmnist = pytest.mark.skipif(
    not fmnist_available(),
    reason="Fashion-MNIST not installed (bash scripts/setup.sh installs it)")
