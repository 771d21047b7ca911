"""What client and server share: the data set, the partition, the model (no flwr here).

Both sides derive the partition from the same config and seed, so a client's data is the
same wherever it is computed, and the server can publish the partition table.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .config import Config
from .data import ImageData, dataset_info, label_count_table, load_dataset, partition
from .models import Classifier, build_model


def make_model(cfg: Config, model_name: str | None = None) -> Classifier:
    info = dataset_info(cfg.dataset)
    return build_model(model_name or cfg.model, info.in_channels, info.num_classes, info.image_size)


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
