"""Classifiers with one interface: ``features(x) -> [B, d]`` and a linear ``head``.

``forward(x) == head(features(x))`` for every model, so the server can score prototypes
(penultimate features) with a model's head alone, as Mosaic's meta model needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """Base class: subclasses build their layers and call ``_make_head``.

    ``channel_blocks`` tells width slicing (``mosaic_flwr.core.submodels``) where one
    channel spans several entries of a dimension: ``{"fc.weight": (1, 49)}`` means dim 1 of
    ``fc.weight`` is the flattened ``[channels, 7, 7]`` output of the last conv layer.
    """

    feature_dim: int
    head: nn.Linear
    channel_blocks: dict[str, tuple[int, int]] = {}

    def _make_head(self, feature_dim: int, num_classes: int) -> None:
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(Classifier):
    """Two 3x3 conv blocks and one hidden layer; ``width`` scales every layer.

    About 0.42 M parameters at width 1 on 28x28x1 input. No normalisation layers, so
    parameter averaging is exact (no running statistics to reconcile).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: float = 1.0):
        super().__init__()
        c1, c2, hidden = (max(1, int(round(w * width))) for w in (32, 64, 128))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        spatial = image_size // 4
        self.fc = nn.Linear(c2 * spatial * spatial, hidden)
        self.channel_blocks = {"fc.weight": (1, spatial * spatial)}
        self._make_head(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(torch.flatten(x, 1)))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _CifarResNet(Classifier):
    """CIFAR-style ResNet of basic blocks: 3x3 stem, no max-pool, global average pool.

    ``planes`` are the stage widths (each stage after the first halves the resolution),
    ``blocks`` the basic blocks per stage; ``width`` scales every channel count.
    """

    def __init__(self, in_channels: int, num_classes: int, planes: tuple[int, ...],
                 blocks: int, width: float = 1.0):
        super().__init__()
        planes = [max(1, int(round(p * width))) for p in planes]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        stages, in_planes = [], planes[0]
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(in_planes, p, stride),
                                        *[_BasicBlock(p, p, 1) for _ in range(blocks - 1)]))
            in_planes = p
        self.stages = nn.ModuleList(stages)
        self._make_head(planes[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            out = stage(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class ResNet18(_CifarResNet):
    """CIFAR-style ResNet-18: stages of 64/128/256/512 channels, two blocks each, 512-d
    features. 11.17 M parameters for 10 classes (as in the authors' code)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: float = 1.0):
        super().__init__(in_channels, num_classes, (64, 128, 256, 512), blocks=2, width=width)


class ResNet8(_CifarResNet):
    """A small CIFAR-style ResNet (as in the KD literature's resnet8): stages of 16/32/64
    channels, one block each, 64-d features; about 78 k parameters. A third architecture
    family (BatchNorm, residual connections, global pooling) cheap enough for CPU runs."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: float = 1.0):
        super().__init__(in_channels, num_classes, (16, 32, 64), blocks=1, width=width)


def _small_cnn(base: float):
    return lambda c, n, s, width=1.0: SmallCNN(c, n, s, width=base * width)


# name -> factory(in_channels, num_classes, image_size, width=1.0); ``width`` scales the
# channels of the named model (width-scaled sub-models, HeteroFL/FedRolex).
MODELS = {
    "cnn_small": _small_cnn(1.0),
    "cnn_wide": _small_cnn(2.0),
    "resnet8": ResNet8,
    "resnet18": ResNet18,
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int,
                width: float = 1.0) -> Classifier:
    """Build a classifier by registry name (``width`` scales its channels); raises
    ``ValueError`` naming the allowed values."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model: unknown value {name!r}; allowed: {sorted(MODELS)}") from None
    if image_size % 4 != 0:
        raise ValueError(f"model: image size {image_size} must be a multiple of 4")
    if not 0 < width <= 1:
        raise ValueError(f"model: width {width} must be in (0, 1]")
    return factory(in_channels, num_classes, image_size, width=width)
