"""Data sets (in-memory uint8 tensors) and deterministic partitioners."""

from mosaic_flwr.data.datasets import (DATASETS, DatasetInfo, DatasetNotFoundError, ImageData, dataset_info,
                       load_dataset, normalize)
from mosaic_flwr.data.partition import (PARTITIONS, PartitionError, label_count_table, partition, partition_without,
                        validation_indices)

__all__ = ["DATASETS", "DatasetInfo", "DatasetNotFoundError", "ImageData", "dataset_info",
           "load_dataset", "normalize", "PARTITIONS", "PartitionError", "label_count_table",
           "partition", "partition_without", "validation_indices"]
