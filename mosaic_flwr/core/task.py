"""What client and server share: the data set, the partition, the model (no flwr here).

Both sides derive the partition from the same config and seed, so a client's data is the
same wherever it is computed, and the server can publish the partition table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mosaic_flwr.config import Config, split_list
from mosaic_flwr.data import (DatasetNotFoundError, ImageData, dataset_info, load_dataset, normalize, partition_without,
                   validation_indices)
from mosaic_flwr.models import MODELS, Classifier, build_model
from mosaic_flwr.core.seeds import mix_seed


@dataclass(frozen=True, order=True)
class Arch:
    """A client's architecture: a model family (registry name) at a width ``capacity``."""

    model: str
    capacity: float = 1.0

    def __str__(self) -> str:
        return self.model if self.capacity == 1.0 else f"{self.model}@{self.capacity:g}"


def make_model(cfg: Config, model_name: str | None = None, capacity: float = 1.0) -> Classifier:
    info = dataset_info(cfg.dataset)
    return build_model(model_name or cfg.model, info.in_channels, info.num_classes,
                       info.image_size, width=capacity)


def build_arch(cfg: Config, arch: Arch) -> Classifier:
    return make_model(cfg, arch.model, arch.capacity)


def client_arch(cfg: Config, node_config: Mapping[str, Any]) -> Arch:
    """The architecture a client trains.

    Rule: ``client-models`` and ``client-capacities`` (comma-separated) are assigned
    round-robin by partition id (client ``i`` gets entry ``i mod len``); an empty list means
    ``model`` at full width. A SuperNode may override both with its own ``--node-config``
    keys ``model`` and ``capacity`` (e.g. a phone that can only hold a quarter-width model).
    """
    pid = int(node_config.get("partition-id", 0))
    models = split_list(cfg.client_models) or [cfg.model]
    caps = [float(c) for c in split_list(cfg.client_capacities)] or [1.0]
    model = str(node_config.get("model", models[pid % len(models)]))
    capacity = float(node_config.get("capacity", caps[pid % len(caps)]))
    if model not in MODELS:
        raise ValueError(f"node-config model: unknown value {model!r}; allowed: {sorted(MODELS)}")
    if not 0 < capacity <= 1:
        raise ValueError(f"node-config capacity: {capacity:g} not in (0, 1]")
    return Arch(model, capacity)


def clients_per_round(cfg: Config, num_clients: int) -> int:
    """How many of ``num_clients`` clients a round samples: ``fraction-train`` of them
    (rounded down), at least ``min-train-clients``, at most all of them."""
    return min(num_clients, max(int(num_clients * cfg.fraction_train), min(cfg.min_train_clients, num_clients)))


def initial_model(cfg: Config) -> Classifier:
    """The global model's initial weights, identical for a given seed."""
    torch.manual_seed(cfg.seed)
    return make_model(cfg)


def data_for(cfg: Config) -> tuple[ImageData, ImageData]:
    return load_dataset(cfg.dataset, cfg.data_dir or None, cfg.download)


@lru_cache(maxsize=4)
def _validation_cached(dataset: str, data_dir: str, download: bool, fraction: float,
                       seed: int) -> np.ndarray:
    train, _ = load_dataset(dataset, data_dir or None, download)
    return validation_indices(train.y.numpy(), fraction, seed)


def validation_split(cfg: Config) -> np.ndarray:
    """Indices of the training split held out for validation (``validation-split``; empty
    by default): never partitioned among the clients, never the test set."""
    return _validation_cached(cfg.dataset, cfg.data_dir, cfg.download, cfg.validation_split, cfg.seed)


@lru_cache(maxsize=4)
def _partition_cached(dataset: str, data_dir: str, download: bool, num_partitions: int,
                      method: str, seed: int, alpha: float, min_size: int, cap: bool,
                      classes_per_client: int, val_fraction: float) -> tuple[np.ndarray, ...]:
    train, _ = load_dataset(dataset, data_dir or None, download)
    held_out = _validation_cached(dataset, data_dir, download, val_fraction, seed)
    return tuple(partition_without(train.y.numpy(), held_out, num_partitions, method=method,
                                   seed=seed, alpha=alpha, min_size=min_size, cap=cap,
                                   classes_per_client=classes_per_client))


def partitions_for(cfg: Config, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Index arrays of every client's training data (deterministic for the config's seed;
    the validation split, when there is one, is left out)."""
    return _partition_cached(cfg.dataset, cfg.data_dir, cfg.download, num_partitions,
                             cfg.partition, cfg.seed, cfg.alpha, cfg.min_partition_size,
                             cfg.partition_cap, cfg.shards_per_client, cfg.validation_split)


@lru_cache(maxsize=2)
def _client_tensors(cfg: Config, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = data_for(cfg)
    part = train.subset(partitions_for(cfg, num_partitions)[partition_id])
    return part.normalized(), part.y


def client_data(cfg: Config, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, labels) of one client's partition; cached per process."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id: {partition_id} not in [0, {num_partitions})")
    return _client_tensors(cfg, partition_id, num_partitions)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices of ``labels``, sorted, as even over the classes as they allow (classes
    in order take the remainder; a class with too few takes all it has and the others fill
    in), drawn with ``seed``."""
    if not 0 < n <= len(labels):
        raise ValueError(f"subset of {n} out of {len(labels)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    by_class = [perm[labels[perm] == c] for c in labels.unique(sorted=True)]
    take, left = [0] * len(by_class), n
    while left:  # round-robin over the classes that still have images
        for i, idx in enumerate(by_class):
            if left and take[i] < len(idx):
                take[i] += 1
                left -= 1
    return torch.sort(torch.cat([idx[:k] for idx, k in zip(by_class, take)])).values


def _test_split(cfg: Config):
    """The server's test set: the data set's test split, or ``test-subset`` images of it
    (class-balanced, the same for every run seed)."""
    _, test = data_for(cfg)
    if cfg.test_subset:
        if cfg.test_subset > len(test):
            raise ValueError(f"test-subset: {cfg.test_subset} exceeds the {len(test)} test images of {cfg.dataset}")
        test = test.subset(balanced_subset(test.y, cfg.test_subset, mix_seed("test-subset", cfg.test_subset)))
    return test


@lru_cache(maxsize=2)
def _test_tensors(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    test = _test_split(cfg)
    return test.normalized(), test.y


def test_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's test set, for reporting only (never for selection)."""
    return _test_tensors(cfg)


@lru_cache(maxsize=2)
def _unseen_tensors(dataset: str, data_dir: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _, test = load_dataset(dataset, data_dir or None, download)
    return test.normalized(), test.y


def unseen_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, labels) of the data set's whole test split: the privacy audit's
    unseen images (``privacy-audit``; no client trains on them), read by a client from the
    run's ``data-dir`` like its own data. Cached per process."""
    return _unseen_tensors(cfg.dataset, cfg.data_dir, cfg.download)


@lru_cache(maxsize=2)
def _validation_tensors(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = data_for(cfg)
    part = train.subset(validation_split(cfg))
    return part.normalized(), part.y


def validation_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The benchmark's validation set (``validation-split`` of the training data, which no
    client holds), or ``None`` without one. What benchmarks choose settings on."""
    return _validation_tensors(cfg) if cfg.validation_split > 0 else None


def test_set_fingerprint(cfg: Config) -> str:
    """A short sha256 of the server's test set (images and labels as stored): what says that a
    resumed run reads the same data, wherever ``data-dir`` points."""
    test = _test_split(cfg)
    digest = hashlib.sha256(test.x.numpy().tobytes())
    digest.update(test.y.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- deployment data
# A SuperNode reads its own data; the server never sees it. Either a partition file (written
# by scripts/deploy/make_partitions.py, copied to the node) or a local copy of the data set.
PARTITION_FILE_FORMAT = "mosaic-flwr-partition/1"
MAKE_PARTITIONS = "scripts/deploy/make_partitions.py"


def partition_file(cfg: Config, partition_id: int, num_partitions: int) -> dict[str, Any]:
    """One client's partition as a partition file's content (``torch.save`` it): uint8
    images, int64 labels, the data set's name and the settings that made the partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id: {partition_id} not in [0, {num_partitions})")
    train, _ = data_for(cfg)
    part = train.subset(partitions_for(cfg, num_partitions)[partition_id])
    return {"format": PARTITION_FILE_FORMAT, "dataset": cfg.dataset,
            "x": part.x.contiguous(), "y": part.y.contiguous(),
            "partition-id": partition_id, "num-partitions": num_partitions,
            "partition": cfg.partition, "alpha": float(cfg.alpha), "seed": cfg.seed,
            "min-partition-size": cfg.min_partition_size, "partition-cap": cfg.partition_cap,
            "shards-per-client": cfg.shards_per_client}


def read_partition_file(path: str | Path) -> dict[str, Any]:
    """A partition file's content, checked for its format and ids (not yet its tensors)."""
    where = f"data-file {path}"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{where} not found (copy this node's partition file there; "
                                   f"write it with {MAKE_PARTITIONS})") from None
    except Exception as exc:  # noqa: BLE001  (zip, pickle, EOF errors: all mean "unreadable")
        first = (str(exc).splitlines() or [""])[0].split(". ")[0][:120]
        raise ValueError(f"{where} is not a readable partition file ({type(exc).__name__}: "
                         f"{first})") from None
    if not isinstance(blob, dict) or blob.get("format") != PARTITION_FILE_FORMAT:
        raise ValueError(f"{where} is not a mosaic-flwr partition file (format "
                         f"{PARTITION_FILE_FORMAT!r}; write one with {MAKE_PARTITIONS})")
    try:
        pid, num = int(blob["partition-id"]), int(blob["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: no valid 'partition-id'/'num-partitions'") from None
    if not 0 <= pid < num:
        raise ValueError(f"{where}: partition-id {pid} not in [0, {num})")
    return blob


def _checked_tensors(blob: dict[str, Any], dataset: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition file's (uint8 images, int64 labels), checked against the run's data set."""
    if blob.get("dataset") != dataset:
        raise ValueError(f"{where} holds {blob.get('dataset')!r} data but the run's dataset is {dataset!r}")
    info = dataset_info(dataset)
    x, y = blob.get("x"), blob.get("y")
    shape = (info.in_channels, info.image_size, info.image_size)
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 4
            and tuple(x.shape[1:]) == shape and len(x) > 0):
        raise ValueError(f"{where}: 'x' must be a non-empty uint8 tensor [N, {', '.join(map(str, shape))}], "
                         f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.ndim == 1 and len(y) == len(x)):
        raise ValueError(f"{where}: 'y' must be an int64 tensor [{len(x)}], "
                         f"got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if int(y.min()) < 0 or int(y.max()) >= info.num_classes:
        raise ValueError(f"{where}: labels outside [0, {info.num_classes})")
    return x, y


@lru_cache(maxsize=2)
def _partition_file_tensors(path: str, mtime_ns: int, size: int,
                            dataset: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(normalised images, labels, partition id, num partitions) of a checked partition file;
    ``mtime_ns`` and ``size`` are part of the cache key so a replaced file is read again."""
    blob = read_partition_file(path)
    x, y = _checked_tensors(blob, dataset, f"data-file {path}")
    return normalize(x, dataset_info(dataset)), y, int(blob["partition-id"]), int(blob["num-partitions"])


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(partition id, number of partitions) from a node's config; both are required, in
    deployment too (``start_supernode.sh`` copies them from the node's partition file)."""
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ValueError(f"node-config {missing[0]}: missing; start the SuperNode with --node-config "
                         "\"partition-id=N num-partitions=M\" (and data-file='/path/client-N.pt' or "
                         "data-dir='/path'), e.g. with scripts/deploy/start_supernode.sh")
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (TypeError, ValueError):
        raise ValueError(f"node-config partition-id/num-partitions: integers expected, got "
                         f"{node_config['partition-id']!r}/{node_config['num-partitions']!r}") from None


def node_data(cfg: Config, node_config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, labels) this node trains on; cached per process.

    Where they come from, by the node's config (``flower-supernode --node-config``), which
    always holds ``partition-id`` and ``num-partitions``:

    - ``data-file='/path/client-0.pt'``: a partition file (:func:`partition_file`, written by
      ``scripts/deploy/make_partitions.py``); its data set must be the run's and its ids the
      node config's;
    - otherwise the project's partition of the run's data set (as in simulation), read from
      the node's own ``data-dir`` when its node config has one, else from the run config's.
    """
    pid, num = node_partition(node_config)
    data_file = str(node_config.get("data-file", "") or "")
    if not data_file:
        data_dir = str(node_config.get("data-dir", "") or "")
        if data_dir:
            cfg = cfg.replace(data_dir=str(Path(data_dir).expanduser()))
        return client_data(cfg, pid, num)
    path = Path(data_file).expanduser().resolve()
    if not path.is_file():
        raise DatasetNotFoundError(f"node-config data-file: {path} not found (copy this node's "
                                   f"partition file there; write it with {MAKE_PARTITIONS})")
    stat = path.stat()
    x, y, file_pid, file_num = _partition_file_tensors(str(path), stat.st_mtime_ns, stat.st_size, cfg.dataset)
    if (pid, num) != (file_pid, file_num):
        raise ValueError(f"node-config partition-id={pid} num-partitions={num} but data-file {path} "
                         f"holds partition {file_pid} of {file_num}")
    return x, y
