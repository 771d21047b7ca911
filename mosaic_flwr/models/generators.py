"""Mosaic's one-shot client generators: our class-conditional generator and discriminator
(the default, ``mosaic.generator='conditional'``), and the authors' unconditional DCGAN
(``mosaic.generator='dcgan'``, ``DCGANGenerator`` / ``DCGANDiscriminator``, see their docstrings).

The generator's output lives in the classifiers' *normalised* input space:
``tanh -> (t + 1) / 2`` gives pixels in [0, 1], then ``(x01 - mean) / std`` per channel.
This fixes the reference code's range mismatch (its tanh output in [-1, 1] was fed to
classifiers trained on normalised inputs). ``mean`` and ``std`` are non-persistent
buffers: they are fixed by the data set (server config), not part of the uploaded
state dict, so a client cannot change how its samples are normalised.

Sizes are kept small on purpose: the generator is uploaded once per client and trained
on client CPUs. ``build_generator`` / ``build_discriminator`` choose widths from the data
set's shape; the server rebuilds the same architecture from the same arguments before
loading a client's state dict.

The discriminator stays on the client. It is a projection discriminator
(Miyato & Koyama, 2018) with spectral normalisation and no BatchNorm, so it has no
running statistics and its output for a sample does not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "DCGAN_NZ",
    "GENERATORS",
    "ConditionalDiscriminator",
    "ConditionalGenerator",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "build_discriminator",
    "build_generator",
    "default_sizes",
    "discriminator_for",
    "normalised_range",
    "sample",
    "is_unconditional",
    "sample_unconditional",
]

GENERATORS = ("conditional", "dcgan")  # the ``mosaic.generator`` run-config key
DCGAN_NZ = 100  # the authors' noise size (utils/dcgan_model.py)


def _check_shape(in_channels: int, image_size: int, num_classes: int) -> None:
    if in_channels < 1:
        raise ValueError(f"generator: in_channels must be >= 1, got {in_channels}")
    if image_size < 4 or image_size % 4 != 0:
        raise ValueError(f"generator: image size {image_size} must be a positive multiple of 4")
    if num_classes < 1:
        raise ValueError(f"generator: num_classes must be >= 1, got {num_classes}")


def _stats(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(list(values), dtype=torch.float32).flatten()
    if t.numel() == 1 and channels > 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"generator: {what} has {t.numel()} values for {channels} channels")
    if not torch.isfinite(t).all():
        raise ValueError(f"generator: {what} must be finite")
    return t.view(1, channels, 1, 1)


def _register_normalisation(module: nn.Module, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    """``module.mean`` / ``module.std``: ``[1, C, 1, 1]`` non-persistent buffers (fixed by the
    data set, not uploaded: see the module docstring)."""
    std_t = _stats(std, channels, "std")
    if (std_t <= 0).any():
        raise ValueError("generator: std must be > 0")
    module.register_buffer("mean", _stats(mean, channels, "mean"), persistent=False)
    module.register_buffer("std", std_t, persistent=False)


def normalised_range(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(low, high)`` = ``((0 - mean) / std, (1 - mean) / std)`` as 1-D tensors."""
    m = torch.as_tensor(list(mean), dtype=torch.float32)
    s = torch.as_tensor(list(std), dtype=torch.float32)
    return (0.0 - m) / s, (1.0 - m) / s


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (also DENSE's ``reset_model``): N(0, 0.02) conv/linear weights, N(1, 0.02) BN weights."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: noise ``[B, nz]`` and labels ``[B]`` -> normalised images ``[B, C, S, S]``.

    Architecture (DCGAN-like, channels ``4b -> 2b -> b`` with ``b = base``):
    ``cat(z, embed(y))`` -> linear -> ``(4b, S/4, S/4)`` -> BN, ReLU -> ConvT 4x4 stride 2
    ``(2b, S/2, S/2)`` -> BN, ReLU -> ConvT 4x4 stride 2 ``(b, S, S)`` -> BN, ReLU -> conv 3x3
    -> ``C`` channels -> tanh -> [0, 1] -> ``(x - mean) / std``.
    The label embedding (``embed_dim`` values, N(0, 1) initialised like ``z``) is concatenated
    to ``z``.
    """

    def __init__(
        self,
        num_classes: int,
        out_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        nz: int = 64,
        base: int = 32,
        embed_dim: int = 16,
    ):
        super().__init__()
        _check_shape(out_channels, image_size, num_classes)
        if nz < 1 or base < 1:
            raise ValueError(f"generator: nz and base must be >= 1, got nz={nz}, base={base}")
        self.num_classes = int(num_classes)
        self.out_channels = int(out_channels)
        self.image_size = int(image_size)
        self.nz = int(nz)
        self.base = int(base)
        self.embed_dim = int(embed_dim)
        s0, c0 = image_size // 4, 4 * base
        self._c0, self._s0 = c0, s0

        self.embed = nn.Embedding(num_classes, self.embed_dim)
        self.fc = nn.Linear(self.nz + self.embed_dim, c0 * s0 * s0, bias=False)
        self.net = nn.Sequential(
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c0, 2 * base, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * base),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * base, base, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.Conv2d(base, out_channels, 3, padding=1),
            nn.Tanh(),
        )
        dcgan_init(self)
        nn.init.normal_(self.embed.weight, 0.0, 1.0)  # same scale as z
        _register_normalisation(self, mean, std, out_channels)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(y)], dim=1)
        h = self.fc(h).view(-1, self._c0, self._s0, self._s0)
        t = self.net(h)  # in [-1, 1]
        return ((t + 1.0) * 0.5 - self.mean) / self.std


class ConditionalDiscriminator(nn.Module):
    """Projection discriminator ``D(x, y) -> [B]`` raw scores (higher = more real).

    Spectral-normalised conv stack with LeakyReLU(0.2), no BatchNorm:
    conv 4x4/2 ``(d)`` -> conv 4x4/2 ``(2d)`` -> conv 3x3 ``(4d)`` -> global sum pool ``h``;
    ``D(x, y) = w^T h + <embed(y), h>``. Works on the same (normalised) inputs as the
    classifier. Never uploaded.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, base: int = 32):
        super().__init__()
        _check_shape(in_channels, image_size, num_classes)
        d = int(base)
        self.num_classes = int(num_classes)
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(in_channels, d, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(d, 2 * d, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
            spectral_norm(nn.Conv2d(2 * d, 4 * d, 3, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.linear = spectral_norm(nn.Linear(4 * d, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 4 * d))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def _check_dcgan(channels: int, image_size: int, width: int) -> None:
    if channels < 1:
        raise ValueError(f"dcgan: channels must be >= 1, got {channels}")
    if image_size < 12 or image_size % 4 != 0:
        raise ValueError(f"dcgan: image size {image_size} must be a multiple of 4 and >= 12")
    if width < 1:
        raise ValueError(f"dcgan: width must be >= 1, got {width}")


class DCGANGenerator(nn.Module):
    """The authors' unconditional generator (``utils/dcgan_model.py``): ``G(z)``, noise
    ``[B, nz]`` -> normalised images ``[B, C, S, S]``; no label input.

    ``z`` as a ``1x1`` map -> ConvT 4x4 ``(8w, k0, k0)`` -> ConvT stride 2 ``(4w, S/4)`` ->
    ConvT 4x4 stride 2 ``(2w, S/2)`` -> ConvT 4x4 stride 2 ``(w, S)``, each followed by BN and
    ReLU, no biases -> ConvT 1x1 to ``C`` channels -> tanh, with ``w = width`` (theirs: 64,
    3,573,824 parameters at 32x32x3). At ``S = 32`` (CIFAR) this is exactly theirs
    (``k0 = 4``, the second ConvT 4x4). At ``S = 28`` (MNIST, Fashion-MNIST) the second ConvT
    is 3x3 (``4 -> 7``); in general ``k0 = ceil(S / 8)`` and the second kernel is 4 (``S % 8 == 0``)
    or 3 (``S % 8 == 4``), so no pixel is generated and cropped away.

    Output: ``tanh -> (t + 1) / 2 -> (x - mean) / std``, the classifiers' normalised input
    space, as ``ConditionalGenerator`` (the authors fed the tanh output in [-1, 1] to
    classifiers trained on normalised inputs: ``MOSAIC_REFERENCE.md`` A.4 item 5).
    """

    unconditional = True

    def __init__(self, out_channels: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                 *, width: int = 64, nz: int = DCGAN_NZ):
        super().__init__()
        _check_dcgan(out_channels, image_size, width)
        if nz < 1:
            raise ValueError(f"dcgan: nz must be >= 1, got {nz}")
        self.out_channels, self.image_size = int(out_channels), int(image_size)
        self.nz, self.width = int(nz), int(width)
        w, k0 = self.width, (image_size + 7) // 8
        k1 = 4 if image_size % 8 == 0 else 3

        def up(c_in: int, c_out: int, k: int, stride: int, pad: int) -> list[nn.Module]:
            return [nn.ConvTranspose2d(c_in, c_out, k, stride, pad, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(True)]

        self.net = nn.Sequential(
            *up(self.nz, 8 * w, k0, 1, 0),
            *up(8 * w, 4 * w, k1, 2, 1),
            *up(4 * w, 2 * w, 4, 2, 1),
            *up(2 * w, w, 4, 2, 1),
            nn.ConvTranspose2d(w, out_channels, 1, 1, 0, bias=False),
            nn.Tanh(),
        )
        dcgan_init(self)
        _register_normalisation(self, mean, std, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = self.net(z.view(len(z), self.nz, 1, 1))  # in [-1, 1]
        return ((t + 1.0) * 0.5 - self.mean) / self.std


class DCGANDiscriminator(nn.Module):
    """The authors' unconditional discriminator: ``D(x) -> [B]`` logits (higher = more real).

    Four conv 4x4 stride 2 padding 1 ``(w, 2w, 4w, 8w)`` without biases, LeakyReLU(0.2), BN on
    all but the first; then a conv over the remaining map (2x2 at 32x32: theirs; 1x1 at 28x28)
    to one logit. Their sigmoid is folded into the loss (``binary_cross_entropy_with_logits``
    is sigmoid + BCE, computed stably). It reads the classifiers' normalised inputs. Never uploaded.
    """

    def __init__(self, in_channels: int, image_size: int, *, width: int = 64):
        super().__init__()
        _check_dcgan(in_channels, image_size, width)
        w, layers, size, c_in = int(width), [], int(image_size), int(in_channels)
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False))
            if i:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in, size = c_out, (size + 2 - 4) // 2 + 1
        layers.append(nn.Conv2d(c_in, 1, size, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).squeeze(1)


def default_sizes(in_channels: int, image_size: int) -> dict[str, int]:
    """Default widths for a data set shape: ``nz``, ``embed_dim``, generator ``base`` and
    discriminator ``d_base``.

    Grey-scale images up to 32x32 (MNIST, FMNIST) get the smallest nets (0.29 M generator
    parameters at 28x28, ~40 ms per training step on one CPU thread with ``cnn_small``);
    colour or larger images twice the width (0.82 M at 32x32x3).
    """
    if in_channels == 1 and image_size <= 32:
        return {"nz": 64, "embed_dim": 16, "base": 16, "d_base": 16}
    return {"nz": 64, "embed_dim": 16, "base": 32, "d_base": 32}


def build_generator(
    in_channels: int,
    image_size: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    **kw,
) -> ConditionalGenerator:
    """Generator for a data set shape; ``kw`` (``nz``, ``base``, ``embed_dim``) overrides defaults.

    The server must call this with the same arguments as the client to load its weights.
    """
    _check_shape(in_channels, image_size, num_classes)
    sizes = default_sizes(in_channels, image_size)
    allowed = {"nz", "base", "embed_dim"}
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"generator: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    nz = int(kw.get("nz", sizes["nz"]))
    base = int(kw.get("base", sizes["base"]))
    embed_dim = int(kw.get("embed_dim", sizes["embed_dim"]))
    return ConditionalGenerator(
        num_classes, in_channels, image_size, mean, std, nz=nz, base=base, embed_dim=embed_dim
    )


def generator_for(info, kind: str = "conditional", width: int = 64) -> ConditionalGenerator | DCGANGenerator:
    """The generator for a data set (``DatasetInfo``): the one construction client and server
    share, so the server can load the weights a client uploads. ``kind`` is the ``mosaic.generator``
    key (``GENERATORS``); ``width`` (``mosaic.dcgan-width``) is read by the DCGAN only."""
    if kind == "conditional":
        return build_generator(info.in_channels, info.image_size, info.num_classes, info.mean, info.std)
    if kind == "dcgan":
        return DCGANGenerator(info.in_channels, info.image_size, info.mean, info.std, width=width)
    raise ValueError(f"generator: unknown kind {kind!r}; allowed: {list(GENERATORS)}")


def discriminator_for(info, kind: str = "conditional", width: int = 64
                      ) -> ConditionalDiscriminator | DCGANDiscriminator:
    """The client-side discriminator matching ``generator_for(info, kind, width)``."""
    if kind == "conditional":
        return build_discriminator(info.in_channels, info.image_size, info.num_classes)
    if kind == "dcgan":
        return DCGANDiscriminator(info.in_channels, info.image_size, width=width)
    raise ValueError(f"generator: unknown kind {kind!r}; allowed: {list(GENERATORS)}")


def is_unconditional(generator: nn.Module) -> bool:
    """Whether ``generator`` takes noise only (``G(z)``, the DCGAN), not a class."""
    return bool(getattr(generator, "unconditional", False))


def build_discriminator(
    in_channels: int, image_size: int, num_classes: int, *, base: int | None = None
) -> ConditionalDiscriminator:
    """Discriminator for a data set shape (client-side only)."""
    _check_shape(in_channels, image_size, num_classes)
    if base is None:
        base = default_sizes(in_channels, image_size)["d_base"]
    return ConditionalDiscriminator(num_classes, in_channels, image_size, base=int(base))


@torch.no_grad()
def sample(
    generator: ConditionalGenerator,
    labels: torch.Tensor,
    *,
    seed: int | None = None,
    rng: torch.Generator | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Draw one image per entry of ``labels`` (eval mode, no grad), on the generator's device.

    Noise is drawn on the CPU from ``rng`` (or a fresh ``torch.Generator`` seeded with
    ``seed``; the global RNG when both are ``None``), so a seed gives the same samples on
    any device. The generator's train/eval mode is restored afterwards.
    """
    if is_unconditional(generator):
        raise ValueError("sample: this generator is unconditional (mosaic.generator='dcgan'): it cannot be asked "
                         "for classes; use sample_unconditional")
    if seed is not None and rng is not None:
        raise ValueError("sample: pass seed or rng, not both")
    if seed is not None:
        rng = torch.Generator().manual_seed(int(seed))
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() and (labels.min() < 0 or labels.max() >= generator.num_classes):
        raise ValueError(f"sample: labels must lie in [0, {generator.num_classes})")
    device = next(generator.parameters()).device
    z = torch.randn(labels.numel(), generator.nz, generator=rng)
    was_training = generator.training
    generator.eval()
    try:
        out = [
            generator(z[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))
            for i in range(0, labels.numel(), batch_size)
        ]
    finally:
        generator.train(was_training)
    if not out:
        c, s = generator.out_channels, generator.image_size
        return torch.empty(0, c, s, s, device=device)
    return torch.cat(out)


@torch.no_grad()
def sample_unconditional(
    generator: DCGANGenerator,
    n: int,
    *,
    seed: int | None = None,
    rng: torch.Generator | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """``n`` images of an unconditional generator (eval mode, no grad), on its device; noise
    from ``rng`` / ``seed`` on the CPU as in ``sample``; its train/eval mode is restored."""
    if seed is not None and rng is not None:
        raise ValueError("sample_unconditional: pass seed or rng, not both")
    if n < 0:
        raise ValueError(f"sample_unconditional: n must be >= 0, got {n}")
    if seed is not None:
        rng = torch.Generator().manual_seed(int(seed))
    device = next(generator.parameters()).device
    z = torch.randn(int(n), generator.nz, generator=rng)
    was_training = generator.training
    generator.eval()
    try:
        out = [generator(z[i: i + batch_size].to(device)) for i in range(0, int(n), batch_size)]
    finally:
        generator.train(was_training)
    if not out:
        c, s = generator.out_channels, generator.image_size
        return torch.empty(0, c, s, s, device=device)
    return torch.cat(out)
