import numpy as np
import pytest
import torch

from mosaic_flwr.data import DatasetNotFoundError, dataset_info, load_dataset, normalize
from tests.support import requires_fmnist


@requires_fmnist
def test_fmnist_real_files():
    train, test = load_dataset("fmnist")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert torch.equal(torch.bincount(train.y), torch.full((10,), 6000))
    sub = train.subset(np.arange(2000))
    x = sub.normalized()
    assert x.dtype == torch.float32 and len(sub) == 2000
    # normalised with the data set's statistics: roughly zero mean, unit std
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_fmnist_missing_names_the_paths(tmp_path, monkeypatch):
    import mosaic_flwr.data.datasets as ds
    import mosaic_flwr.data.files as files
    monkeypatch.setattr(files, "DEBIAN_FMNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        ds._load_fmnist(str(tmp_path), False)


def test_torchvision_dataset_missing_is_clear(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"svhn.*" + str(tmp_path)):
        load_dataset("svhn", str(tmp_path), False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"dataset: unknown value 'imagenet'.*allowed"):
        load_dataset("imagenet")


def test_synthetic_is_deterministic_and_normalises():
    a, _ = load_dataset("synthetic")
    info = dataset_info("synthetic")
    x = normalize(a.x[:10], info)
    assert x.shape == (10, 1, 28, 28)
    assert x.min() >= (0 - 0.5) / 0.5 - 1e-6 and x.max() <= (1 - 0.5) / 0.5 + 1e-6
    assert len(torch.unique(a.y)) == 10
