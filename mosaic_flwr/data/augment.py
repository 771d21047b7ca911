"""Training-time augmentation of normalised image batches (CIFAR: the authors' random crop
with padding and horizontal flip), deterministic for a ``torch.Generator``.

The batches the clients train on are already normalised, so the padding is filled with the
normalised value of a black pixel: the same images torchvision's ``RandomCrop(32, padding=4)``
(fill 0) followed by ``Normalize`` gives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mosaic_flwr.data.datasets import DatasetInfo

Augment = Callable[[Tensor, torch.Generator], Tensor]
# ``augment='auto'``: the authors' crop + flip for the 32x32 colour data sets (their code flips
# SVHN too), nothing for the grey 28x28 ones.
AUTO = {"cifar10": "crop-flip", "cifar100": "crop-flip", "svhn": "crop-flip"}
MODES = ("auto", "off", "crop-flip")


def crop_flip(x: Tensor, gen: torch.Generator, *, padding: int = 4, fill: Tensor | None = None,
              flip: bool = True) -> Tensor:
    """Each image of ``x`` ``[B, C, H, W]`` padded by ``padding`` pixels of ``fill`` (per
    channel; default 0), cropped back to H x W at a random offset, and mirrored left-right with
    probability 1/2. Offsets and flips come from ``gen`` (on the CPU), so a seed fixes them
    whatever the device of ``x``."""
    b, c, h, w = x.shape
    p = padding
    padded = x.new_zeros(b, c, h + 2 * p, w + 2 * p) if fill is None else \
        fill.to(x).view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p:p + h, p:p + w] = x
    top = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    mirror = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    cols = left[:, None] + torch.arange(w)[None, :]                       # [B, W]
    cols = torch.where(mirror[:, None], cols.flip(1), cols)
    rows = top[:, None] + torch.arange(h)[None, :]                        # [B, H]
    dev = x.device
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


def augmenter(mode: str, info: DatasetInfo) -> Augment | None:
    """The augmentation ``augment=mode`` gives for data set ``info`` (``None``: none)."""
    if mode not in MODES:
        raise ValueError(f"augment: unknown value {mode!r}; allowed: {list(MODES)}")
    if mode == "auto":
        mode = AUTO.get(info.name, "off")
    if mode == "off":
        return None
    black = -torch.tensor(info.mean) / torch.tensor(info.std)  # a 0 pixel, normalised
    return lambda x, gen: crop_flip(x, gen, padding=4, fill=black)
