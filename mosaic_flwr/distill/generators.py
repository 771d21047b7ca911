"""A class-conditional generator the server trains against the clients' models: the pieces
FedFTG and DFRD share (``methods/fedftg.py``, ``methods/dfrd.py``).

Both methods train, on the server, a generator ``G(z, y)`` (``models.generators``: output in
the classifiers' normalised input space) against a teacher built from the round's client
models (the label-aware ``ClientEnsemble``), alternating with the distillation of that
teacher into the global model: every few KD steps the generator takes a few steps against
the student as it is now, then the student learns on the generator's fresh samples. What
is shared lives here, as plain functions on tensors and modules:

- labels: ``proportional_labels`` (FedFTG: exactly the class proportions of the round's
  label counts, in random order) and ``sampled_labels`` (DFRD: drawn independently from
  those proportions);
- losses: ``fidelity_loss`` (the teacher's cross-entropy on the requested labels),
  ``hardness_loss`` (FedFTG: minus the L1 distance between student and teacher logits),
  ``boundary_mask`` / ``transferability_loss`` (DFRD: minus the KL divergence between
  teacher and student on the samples the teacher classifies as requested and the student
  does not) and ``diversity_loss`` (both: FedGen's noise-to-output distance ratio term);
- ``ema_update`` (DFRD's moving-average copy of the generator);
- ``held_still`` (students as fixed functions while the generator trains through them),
  ``BlockSampler`` (a KD batch source that renews its batch every ``interval`` steps),
  ``generator_steps`` / ``generate`` (train the generator on a fixed batch of noise and
  labels; sample it), ``new_generator`` / ``load_generator`` / ``module_state`` /
  ``check_batch`` / ``Tally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic_flwr.models.generators import ConditionalGenerator, generator_for, sample
from mosaic_flwr.core.seeds import mix_seed

__all__ = ["BlockSampler", "Tally", "boundary_mask", "check_batch", "diversity_loss", "ema_update",
           "fidelity_loss", "generate", "generator_seed", "generator_steps", "hardness_loss", "held_still",
           "load_generator", "module_state", "new_generator", "proportional_labels", "sampled_labels",
           "transferability_loss"]

DIVERSITY_METRICS = ("l1", "l2")


# ----------------------------------------------------------------------------- labels
def _counts(counts: Tensor) -> Tensor:
    counts = torch.as_tensor(counts).flatten()
    if counts.numel() == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("labels: expected non-negative class counts with a positive total")
    return counts


def proportional_labels(counts: Tensor, n: int, rng: torch.Generator) -> Tensor:
    """``n`` labels whose class frequencies are the proportions of ``counts`` (``[C]``), in
    random order (FedFTG's label draw: the authors split ``arange(n)`` at the cumulative
    shares and shuffle). Class ``c`` gets ``floor(n * S_c / S) - floor(n * S_{c-1} / S)``
    labels with ``S_c`` the cumulative count, computed in integers: a class with no example
    never gets one (the authors' float cumulative sum could hand a trailing empty class the
    rounding remainder)."""
    counts = _counts(counts).long()
    if n < 0:
        raise ValueError(f"proportional_labels: n must be >= 0, got {n}")
    bounds = torch.cumsum(counts, 0) * n // counts.sum()
    per_class = torch.diff(bounds, prepend=torch.zeros(1, dtype=torch.long))
    labels = torch.repeat_interleave(torch.arange(len(counts)), per_class)
    return labels[torch.randperm(n, generator=rng)]


def sampled_labels(counts: Tensor, n: int, rng: torch.Generator) -> Tensor:
    """``n`` labels drawn independently with ``P(c) = counts[c] / sum(counts)`` (DFRD's label
    sampling, from the round's clients' label counts)."""
    counts = _counts(counts).double()
    return torch.multinomial(counts / counts.sum(), n, replacement=True, generator=rng)


# ----------------------------------------------------------------------------- losses
def fidelity_loss(teacher_logits: Tensor, y: Tensor) -> Tensor:
    """The teacher's cross-entropy on the requested labels: samples of class ``y`` should
    be what the clients' models call ``y``."""
    return F.cross_entropy(teacher_logits, y)


def hardness_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """FedFTG's hard-sample term: ``-mean |s - t|`` over samples and classes (minimising it
    moves the samples to where student and teacher logits disagree)."""
    return -(student_logits - teacher_logits).abs().mean()


@torch.no_grad()
def boundary_mask(teacher_logits: Tensor, student_logits: Tensor, y: Tensor) -> Tensor:
    """DFRD's ``epsilon``: the samples the teacher classifies as requested (``argmax t = y``)
    and the student does not (``argmax s != y``): near the student's decision boundary,
    still inside the teacher's class."""
    return (teacher_logits.argmax(1) == y) & (student_logits.argmax(1) != y)


def transferability_loss(teacher_logits: Tensor, student_logits: Tensor, y: Tensor, T: float = 1.0) -> Tensor:
    """DFRD's transferability term: ``-(1/B) sum_b eps_b KL(softmax(t_b/T) || softmax(s_b/T))``
    with ``eps = boundary_mask``. Minimising it drives the boundary samples further into the
    region where the student disagrees with the teacher; samples outside the mask add
    nothing (0 when none is on the boundary)."""
    eps = boundary_mask(teacher_logits, student_logits, y).float()
    log_t = F.log_softmax(teacher_logits / T, dim=1)
    log_s = F.log_softmax(student_logits / T, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)
    return -(eps * kl).mean()


def diversity_loss(noise: Tensor, x: Tensor, metric: str = "l1") -> Tensor:
    """FedGen's diversity term (used by FedFTG with ``l1``, DFRD with ``l2``):
    ``exp(-mean_{i,j} d_z(i, j) * d_x(i, j))`` with ``d_z`` the mean squared difference of
    the noise vectors and ``d_x`` the mean absolute (``l1``) or squared (``l2``) difference
    of the outputs, over all pairs of the batch. Small when samples of distant noise are far
    apart."""
    if metric not in DIVERSITY_METRICS:
        raise ValueError(f"diversity_loss: unknown metric {metric!r}; allowed: {DIVERSITY_METRICS}")
    x, noise = x.flatten(1), noise.flatten(1)
    if metric == "l1":
        dx = torch.cdist(x, x, p=1.0) / x.shape[1]
    else:
        dx = torch.cdist(x, x, p=2.0).pow(2) / x.shape[1]
    dz = torch.cdist(noise, noise, p=2.0).pow(2) / noise.shape[1]
    return torch.exp(-(dz * dx).mean())


# ----------------------------------------------------------------------------- modules
def new_generator(info, seed: int, device: torch.device | str = "cpu") -> ConditionalGenerator:
    """The data set's conditional generator (``generator_for``), initialised from ``seed``
    alone (the global RNG is left as it was), in train mode on ``device``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = generator_for(info)
    return generator.to(device).train()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every floating-point entry of the
    state dict (parameters and BatchNorm running statistics; computed exactly as written);
    integer entries (BatchNorm's batch counter) are copied."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay}")
    new = model.state_dict()
    for key, old in ema.state_dict().items():
        value = new[key].detach()
        old.copy_(decay * old + (1.0 - decay) * value if old.is_floating_point() else value)


def module_state(module: nn.Module | None) -> dict[str, Tensor] | None:
    """A CPU copy of a module's state dict (for checkpoints), or ``None``."""
    if module is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_generator(info, state: dict[str, Tensor], device: torch.device | str = "cpu") -> ConditionalGenerator:
    """A generator of the data set with ``state`` loaded (a checkpoint's), on ``device``."""
    generator = new_generator(info, 0, device)
    generator.load_state_dict(state)
    return generator


@contextmanager
def held_still(modules: Iterable[nn.Module]):
    """The modules as fixed functions for the duration: eval mode, no weight gradients
    (gradients still flow to their inputs); their modes and ``requires_grad`` flags are
    restored afterwards."""
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m, _, _ in saved:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


@torch.no_grad()
def check_batch(generator: nn.Module, counts: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """A held-out labelled batch of the generator (eval mode): ``per_class`` samples of
    every class some client holds, from a noise stream of its own (``seed``)."""
    classes = torch.nonzero(torch.as_tensor(counts).flatten() > 0).flatten()
    labels = classes.repeat_interleave(per_class)
    return sample(generator, labels, seed=seed), labels


class BlockSampler:
    """A KD batch source (``sample(step) -> (x, y)``) that renews its batch every
    ``interval`` steps: step ``s`` gets ``make(s // interval)``, made when the block starts
    (the generator trains then, against the students as they are at that step) and reused
    for the rest of the block, as FedFTG's student takes several steps on each batch."""

    def __init__(self, interval: int, make: Callable[[int], tuple[Tensor, Tensor]]):
        if interval < 1:
            raise ValueError(f"BlockSampler: interval must be >= 1, got {interval}")
        self.interval, self.make = int(interval), make
        self.block: int | None = None
        self.batch: tuple[Tensor, Tensor] | None = None

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        block = step // self.interval
        if block != self.block:
            self.batch, self.block = None, block  # let the previous batch go first
            self.batch = self.make(block)
        return self.batch


def generator_seed(seed: int, method: str) -> int:
    """The seed a method's server generator is initialised from (the run seed and the
    method's name: the same generator for every run of that seed)."""
    return mix_seed(seed, method, "server-generator")


def generator_steps(generator: nn.Module, optimizer: torch.optim.Optimizer, z: Tensor, y: Tensor, steps: int,
                    loss_fn: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]],
                    students: Iterable[nn.Module]) -> dict[str, float]:
    """``steps`` optimiser steps of the generator (train mode) on the fixed noise ``z`` and
    labels ``y``: ``loss_fn(G(z, y)) -> (loss, parts)``, with the students held still
    (``held_still``: the teacher is a frozen ``ClientEnsemble`` already). Returns the last
    step's parts (and ``loss``) as floats."""
    parts: dict[str, Tensor] = {}
    generator.train()
    with held_still(list(students)):
        for _ in range(steps):
            loss, parts = loss_fn(generator(z, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            parts = {"loss": loss, **parts}
    return {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def generate(generator: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    """``G(z, y)`` in eval mode (BatchNorm's running statistics), without gradient; the
    generator's mode is restored."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(z, y)
    finally:
        generator.train(was_training)


class Tally:
    """Running means of the generator's loss parts over a round (for the report)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, parts: dict[str, float]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": v / self.count for k, v in self.sums.items()} if self.count else {}
