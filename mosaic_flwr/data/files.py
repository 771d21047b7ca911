"""Where data set files are looked for on disk, and reading IDX files (no torch here: the
loaders (``datasets``) and the fetchers (``fetch``) both read it)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np


DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ENV = "MOSAIC_FLWR_DATA"


def user_data_dir() -> Path:
    """Where data sets live when ``data-dir`` is empty: ``$MOSAIC_FLWR_DATA`` when set, else
    ``${XDG_CACHE_HOME:-~/.cache}/mosaic-flwr/data``. It does not depend on the working
    directory or on where the app's code is (Flower runs a copy of it), so plain
    ``flwr run .`` finds what ``scripts/setup.sh`` put there."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "mosaic-flwr" / "data"


class DatasetNotFoundError(ValueError):
    """A data set is not on disk (and may not or could not be downloaded)."""



# ---------------------------------------------------------------------------- IDX files
def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


def find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def fmnist_search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where Fashion-MNIST IDX files are looked for, in order: under ``data-dir`` (empty:
    :func:`user_data_dir`), then Debian's package."""
    root = Path(data_dir).expanduser() if data_dir else user_data_dir()
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root, DEBIAN_FMNIST_DIR]


def fmnist_location(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory the Fashion-MNIST files would be read from (``None``: not found)."""
    found = find_idx(fmnist_search_dirs(data_dir), "train-images-idx3-ubyte")
    return found.parent if found else None


def mnist_search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where MNIST IDX files are looked for, in order, under ``data-dir`` (empty:
    :func:`user_data_dir`): ``mnist/`` (``scripts/setup.sh --data mnist``), torchvision's
    ``MNIST/raw/``, the folder itself."""
    root = Path(data_dir).expanduser() if data_dir else user_data_dir()
    return [root / "mnist", root / "MNIST" / "raw", root]
