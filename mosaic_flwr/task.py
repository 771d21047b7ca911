"""What client and server share: the data set, the partition, the model (no flwr here).

Both sides derive the partition from the same config and seed, so a client's data is the
same wherever it is computed, and the server can publish the partition table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch

from .config import Config, split_list
from .data import ImageData, dataset_info, label_count_table, load_dataset, partition
from .models import MODELS, Classifier, build_model


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


def is_heterogeneous(cfg: Config) -> bool:
    """Whether clients may hold different architectures (several families or widths)."""
    return (len(set(split_list(cfg.client_models))) > 1
            or any(float(c) != 1.0 for c in split_list(cfg.client_capacities)))


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


def initial_model(cfg: Config) -> Classifier:
    """The global model's initial weights, identical for a given seed."""
    torch.manual_seed(cfg.seed)
    return make_model(cfg)


def data_for(cfg: Config) -> tuple[ImageData, ImageData]:
    return load_dataset(cfg.dataset, cfg.data_dir or None, cfg.download)


@lru_cache(maxsize=4)
def _partition_cached(dataset: str, data_dir: str, download: bool, num_partitions: int,
                      method: str, seed: int, alpha: float, min_size: int, cap: bool,
                      classes_per_client: int) -> tuple[np.ndarray, ...]:
    train, _ = load_dataset(dataset, data_dir or None, download)
    return tuple(partition(train.y.numpy(), num_partitions, method=method, seed=seed,
                           alpha=alpha, min_size=min_size, cap=cap,
                           classes_per_client=classes_per_client))


def partitions_for(cfg: Config, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Index arrays of every client's training data (deterministic for the config's seed)."""
    return _partition_cached(cfg.dataset, cfg.data_dir, cfg.download, num_partitions,
                             cfg.partition, cfg.seed, cfg.alpha, cfg.min_partition_size,
                             cfg.partition_cap, cfg.shards_per_client)


def partition_table(cfg: Config, num_partitions: int) -> np.ndarray:
    train, _ = data_for(cfg)
    return label_count_table(train.y.numpy(), list(partitions_for(cfg, num_partitions)),
                             train.info.num_classes)


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


@lru_cache(maxsize=2)
def _test_tensors(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    _, test = data_for(cfg)
    return test.normalized(), test.y


def test_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's test set, for reporting only (never for selection)."""
    return _test_tensors(cfg)
