"""Training-time augmentation (CIFAR: the authors' random crop with padding 4 + horizontal
flip) on normalised batches: exact against a per-image reference, deterministic for a seed,
off where configured off, and applied where the authors' code applies it."""

from __future__ import annotations

import pytest
import torch

from mosaic_flwr.data import dataset_info
from mosaic_flwr.data.augment import augmenter, crop_flip
from mosaic_flwr.core.training import train_local


def _reference(x, top, left, mirror, padding, fill):
    """torchvision's RandomCrop(padding) + RandomHorizontalFlip, one image at a time."""
    c, h, w = x.shape
    padded = fill.view(c, 1, 1).expand(c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, padding:padding + h, padding:padding + w] = x
    out = padded[:, top:top + h, left:left + w]
    return out.flip(-1) if mirror else out


def test_crop_flip_matches_a_per_image_reference_and_pads_with_normalised_black():
    x = torch.randn(16, 3, 8, 8)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    gen = torch.Generator().manual_seed(5)
    out = crop_flip(x, gen, padding=2, fill=fill)
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    top, left = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    mirror = torch.rand(16, generator=g) < 0.5
    for i in range(16):
        assert torch.equal(out[i], _reference(x[i], top[i], left[i], mirror[i], 2, fill)), i
    assert mirror.any() and (~mirror).any() and (top != 2).any()
    info = dataset_info("cifar10")
    aug = augmenter("crop-flip", info)
    black = (torch.zeros(3) - torch.tensor(info.mean)) / torch.tensor(info.std)
    big = aug(torch.full((64, 3, 32, 32), 5.0), torch.Generator().manual_seed(0))
    border = big[big != 5.0].view(-1)
    assert border.numel() > 0 and set(border.unique().tolist()) <= set(black.tolist())


def test_augmentation_is_deterministic_for_a_seed():
    info = dataset_info("cifar10")
    aug = augmenter("auto", info)
    x = torch.randn(32, 3, 32, 32)
    a = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(2)))


def test_auto_is_crop_flip_for_cifar_and_off_for_the_grey_data_sets():
    assert augmenter("auto", dataset_info("cifar10")) is not None
    assert augmenter("auto", dataset_info("cifar100")) is not None
    for name in ("fmnist", "mnist", "synthetic"):
        assert augmenter("auto", dataset_info(name)) is None
    assert augmenter("off", dataset_info("cifar10")) is None
    assert augmenter("crop-flip", dataset_info("fmnist")) is not None  # on request
    with pytest.raises(ValueError, match="augment: unknown value"):
        augmenter("mixup", dataset_info("cifar10"))


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 10
    return model, x, y


def test_local_training_sees_augmented_batches_only_when_asked():
    seen = []

    def spy(xb, gen):
        seen.append(xb.clone())
        return xb.flip(-1)

    model, x, y = _tiny()
    train_local(model, x, y, steps=3, batch_size=8, seed=3, augment=spy)
    assert len(seen) == 3 and all(b.shape == (8, 3, 32, 32) for b in seen)
    # the batch order does not depend on augmentation: the same batches, with or without it
    order = []
    model, x, y = _tiny()
    train_local(model, x, y, steps=3, batch_size=8, seed=3, augment=lambda xb, g: order.append(xb.clone()) or xb)
    assert all(torch.equal(a, b) for a, b in zip(seen, order))
    # augment=None: the plain run, bit for bit; an identity augmentation changes nothing either
    runs = []
    for aug in (None, lambda xb, g: xb):
        model, x, y = _tiny()
        train_local(model, x, y, steps=3, batch_size=8, seed=3, augment=aug)
        runs.append(model[1].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_a_mosaic_client_augments_where_the_authors_read_their_augmented_loader():
    """Local training batches, the generator's real batches and the prototype images: each
    goes through ``augment`` (the authors' GAN and prototypes read the augmented loader)."""
    from mosaic_flwr.config import build_config
    from mosaic_flwr.methods.mosaic.client import mosaic_client_round
    from mosaic_flwr.core.task import initial_model

    calls = []

    def spy(xb, gen):
        calls.append(len(xb))
        return xb

    cfg = build_config({"dataset": "synthetic", "model": "cnn_small"})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 28, 28, generator=g), torch.arange(40) % 4
    gen = {"steps": 2, "batch-size": 4, "lr": 1e-3, "ce-weight": 1.0, "div-weight": 0.0}
    mosaic_client_round(initial_model(cfg), x, y, dataset_info("synthetic"), train={"steps": 3, "batch_size": 8},
                        seed=1, device=torch.device("cpu"), distill_round=True, proto_k=2, gen=gen, augment=spy)
    assert calls == [40, 8, 8, 8, 4, 4]  # prototypes (all 40 images), 3 SGD batches, 2 generator steps
