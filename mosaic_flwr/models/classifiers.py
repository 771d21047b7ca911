"""Classifiers with one interface: ``features(x) -> [B, d]`` and a linear ``head``.

``forward(x) == head(features(x))`` for every model, so the server can score prototypes
(penultimate features) with a model's head alone, as Mosaic's meta model needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """Base class: subclasses build ``self.body`` (input -> [B, feature_dim]) and call
    ``_make_head``."""

    feature_dim: int
    head: nn.Linear

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


class ResNet18(Classifier):
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, global average pool, 512-d features.

    11.17 M parameters for 10 classes (as in the authors' code). ``width`` scales channels.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: float = 1.0):
        super().__init__()
        planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        layers, in_planes = [], planes[0]
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(_BasicBlock(in_planes, p, stride), _BasicBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self._make_head(planes[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def _small_cnn(width: float):
    return lambda c, n, s: SmallCNN(c, n, s, width=width)


# name -> factory(in_channels, num_classes, image_size)
MODELS = {
    "cnn_small": _small_cnn(1.0),
    "cnn_wide": _small_cnn(2.0),
    "resnet18": lambda c, n, s: ResNet18(c, n, s),
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> Classifier:
    """Build a classifier by registry name; raises ``ValueError`` naming the allowed values."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model: unknown value {name!r}; allowed: {sorted(MODELS)}") from None
    if image_size % 4 != 0:
        raise ValueError(f"model: image size {image_size} must be a multiple of 4")
    return factory(in_channels, num_classes, image_size)
