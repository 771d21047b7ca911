"""Client-side training of Mosaic's class-conditional generator (Phase 1, one shot).

``train_generator`` trains ``G(z, y)`` against a projection discriminator ``D(x, y)`` on the
client's own data, guided by the client's frozen classifier, on the classes the client
actually holds (every present class, class 0 included: the reference code's
``inc_classes`` bug dropped class 0).

Loss choices (documented defaults):

* adversarial: hinge loss. ``L_D = E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y'), y'))]``,
  ``L_adv = -E[D(G(z, y'), y')]``. D, G and the classifier all work on normalised inputs.
* guidance: ``ce_weight * CE(f(G(z, y)), y)`` with the frozen classifier ``f``.
* diversity (``diversity="mode_seeking"``, weight ``div_weight=0.3``): the mode-seeking
  term of MSGAN (Mao et al., 2019). Every batch holds pairs ``(z1, y), (z2, y)`` with the
  same label; ``r`` is the mean over pairs of ``mean|G(z1,y) - G(z2,y)| / mean|z1 - z2|``
  and the loss is ``1 / (r + 1e-5)``. The reference code's batch-mean-entropy term (weight 5) is offered as
  ``diversity="batch_entropy"`` (loss ``sum_k w_k log w_k`` with ``w`` the batch-mean
  prediction); with labels requested uniformly it adds little, because CE already spreads
  the predictions over the requested classes, so it is not the default.

Sampling: requested labels are uniform over the client's present classes, so rare classes
are learned as well as common ones; real batches are class-balanced the same way (first
a class uniformly, then one of its images), so D sees the same label mix for real and fake.

This function's defaults (400 steps of 32, Adam 5e-4 with betas (0.5, 0.999) for G and D)
were chosen on FMNIST subsets with ``cnn_small`` guidance on one CPU thread: ~0.04 s/step,
~16 s per client. The app passes its run config instead (``mosaic.gen-steps`` 200 of
``mosaic.gen-batch-size`` 16 by default, the other ``mosaic.gen-*`` keys as above; D's learning rate is
G's): a third of the compute of the 300 steps of 32 it used before (issue 14: the client's
extra work at the distillation round should not exceed its local training over the run),
and more updates at that budget than 100 steps of 32, which lost validation accuracy after
distillation (``bench/results/speed.md`` section 3). Without the diversity term G
collapses (per-pixel spread 0.1-0.4 of the real data's); weight 1.0 makes samples noisier
than real data; 0.1-0.3 keeps the spread at 0.6-0.9 of real. Adam 2e-4 converges more
slowly at this budget. After training, ``fidelity`` is the client's classifier's accuracy on
fresh samples of each present class (a seed derived from ``seed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mosaic_flwr.data.augment import Augment
from mosaic_flwr.models.generators import sample
from mosaic_flwr.core.seeds import mix_seed

if TYPE_CHECKING:
    from mosaic_flwr.privacy.dp import DiscriminatorDP

__all__ = ["DIVERSITY_MODES", "batch_entropy_term", "generator_fidelity", "train_generator"]

DIVERSITY_MODES = ("mode_seeking", "batch_entropy", "none")


class _ClassSampler:
    """Draws dataset indices class-balanced over the present classes, from a CPU RNG."""

    def __init__(self, labels: torch.Tensor):
        labels = labels.long().cpu()
        self.classes, counts = torch.unique(labels, sorted=True, return_counts=True)
        self.order = torch.argsort(labels, stable=True)
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts

    def labels(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """``n`` labels drawn uniformly over the present classes."""
        return self.classes[torch.randint(len(self.classes), (n,), generator=rng)]

    def indices(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` dataset indices (and their labels), a uniform class then a uniform image."""
        k = torch.randint(len(self.classes), (n,), generator=rng)
        offs = (torch.rand(n, generator=rng) * self.counts[k]).long().clamp_max(self.counts[k] - 1)
        return self.order[self.starts[k] + offs], self.classes[k]


def batch_entropy_term(logits: torch.Tensor) -> torch.Tensor:
    """The authors' diversity term ``sum_k w_k log(w_k + 1e-5)``, ``w`` the batch mean of
    ``softmax(logits)``: minus the entropy of the batch's mean prediction (lowest when the
    batch spreads evenly over the classes)."""
    w = F.softmax(logits, dim=1).mean(0)
    return (w * torch.log(w + 1e-5)).sum()


def _freeze(model: nn.Module) -> tuple[bool, list[bool]]:
    state = (model.training, [p.requires_grad for p in model.parameters()])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return state


def _unfreeze(model: nn.Module, state: tuple[bool, list[bool]]) -> None:
    training, flags = state
    model.train(training)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)


@contextmanager
def guided_training(generator: nn.Module, discriminator: nn.Module, classifier: nn.Module, device: torch.device):
    """G and D on ``device`` in train mode, the guiding ``classifier`` frozen (eval mode,
    ``requires_grad=False``) on ``device``; on exit the classifier's device, mode and flags and
    G's and D's modes are restored (G and D stay on ``device``)."""
    generator.to(device)
    discriminator.to(device)
    cls_device = _device_of(classifier)
    cls_state = _freeze(classifier)
    classifier.to(device)
    g_mode, d_mode = generator.training, discriminator.training
    generator.train()
    discriminator.train()
    try:
        yield
    finally:
        classifier.to(cls_device)
        _unfreeze(classifier, cls_state)
        generator.train(g_mode)
        discriminator.train(d_mode)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def generator_fidelity(
    generator: nn.Module,
    classifier: nn.Module,
    classes,
    *,
    per_class: int = 64,
    seed: int = 0,
) -> dict[int, float]:
    """Classifier accuracy on ``per_class`` fresh eval-mode samples of each class in ``classes``.

    Both models must be on the same device; their train/eval modes are restored.
    """
    classes = [int(c) for c in torch.as_tensor(classes).flatten().tolist()]
    if not classes:
        return {}
    labels = torch.tensor(classes).repeat_interleave(per_class)
    x = sample(generator, labels, seed=seed)
    was_training = classifier.training
    classifier.eval()
    try:
        pred = torch.cat([classifier(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)]).cpu()
    finally:
        classifier.train(was_training)
    hit = (pred == labels).float().view(len(classes), per_class).mean(1)
    return {c: float(a) for c, a in zip(classes, hit.tolist())}


def _dp_discriminator_grads(discriminator: nn.Module, d_params: list, x_real: torch.Tensor, y_real: torch.Tensor,
                            fake: torch.Tensor, y_fake: torch.Tensor, dp, expected_batch: float
                            ) -> tuple[float, float]:
    """D's gradient under DP-SGD, left in ``.grad``: the fake half's mean hinge loss by plain
    autograd (no private data; its train-mode forward also advances spectral norm's power
    iteration, a function of the weights only), plus the real half's per-sample gradients
    clipped, summed and noised (``private_grad_sum``), over the expected batch size.
    Returns D's loss (real half over the expected batch size) and the largest per-sample
    gradient norm before clipping."""
    from mosaic_flwr.privacy.dp import per_sample_grads, private_grad_sum
    for p in d_params:
        p.grad = None
    fake_loss = F.relu(1.0 + discriminator(fake, y_fake)).mean()
    fake_loss.backward()
    names = [k for k, p in discriminator.named_parameters() if p.requires_grad]
    by_name = dict(discriminator.named_parameters())
    real_loss, clip_max = 0.0, 0.0
    if len(x_real):
        grads = per_sample_grads(discriminator, lambda s: F.relu(1.0 - s), x_real, y_real)
        with torch.no_grad():
            real_loss = float(F.relu(1.0 - _eval_scores(discriminator, x_real, y_real)).sum()) / expected_batch
    else:
        grads = {k: by_name[k].new_zeros((0, *by_name[k].shape)) for k in names}
    noisy, norms = private_grad_sum(grads, dp.max_grad_norm, dp.noise_multiplier, dp.rng)
    if len(norms):
        clip_max = float(norms.max())
    for k in names:
        p = by_name[k]
        g = noisy[k].to(p.device) / expected_batch
        p.grad = g if p.grad is None else p.grad + g
    return float(fake_loss.detach()) + real_loss, clip_max


def _eval_scores(discriminator: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    was = discriminator.training
    discriminator.eval()
    try:
        return discriminator(x, y)
    finally:
        discriminator.train(was)


def train_generator(
    generator: nn.Module,
    discriminator: nn.Module,
    classifier: nn.Module,
    data: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 5e-4,
    d_lr: float | None = None,
    betas: tuple[float, float] = (0.5, 0.999),
    ce_weight: float = 1.0,
    div_weight: float = 0.3,
    diversity: str = "mode_seeking",
    device: str | torch.device = "cpu",
    seed: int = 0,
    eval_per_class: int = 64,
    log: Callable[[str], None] | None = None,
    log_every: int | None = None,
    augment: Augment | None = None,
    dp: "DiscriminatorDP | None" = None,
) -> dict:
    """Train ``generator`` in place on the client's own classes; return statistics.

    Args:
        generator: ``ConditionalGenerator``; moved to ``device`` and left there.
        discriminator: ``ConditionalDiscriminator``; moved to ``device`` and left there.
        classifier: the client's classifier (normalised inputs -> logits). Frozen during
            training (eval mode, ``requires_grad=False``); its mode, flags and device are
            restored afterwards.
        data: ``[N, C, H, W]`` real images in the classifier's normalised space (any device;
            batches are moved to ``device`` as they are drawn).
        labels: ``[N]`` integer labels; the present classes are ``labels.unique()``.
        steps: number of (D step, G step) pairs; 0 only evaluates.
        batch_size: real and fake images per step (fake ones come in label-sharing pairs,
            so it is rounded up to an even number).
        lr, d_lr, betas: Adam settings for G; D uses ``d_lr`` (default ``lr``).
        ce_weight: weight of the classifier cross-entropy on ``G(z, y)`` vs ``y``.
        div_weight, diversity: the diversity term, see the module docstring.
        device: where to train (``"cpu"``, ``"cuda"``, ...).
        seed: drives noise, label and real-batch sampling (CPU RNG, device-independent).
        eval_per_class: eval-mode samples per present class for the fidelity statistic.
        log: optional callable receiving progress lines (every ``log_every`` steps,
            default ``steps // 5``) and a final line.
        augment: applied to each real batch (the discriminator sees what the classifier was
            trained on, as in the authors' code, whose GAN reads the augmented loader).
        dp: train D under DP-SGD (``mosaic_flwr.privacy.dp``): real batches Poisson-sampled
            at ``dp.sample_rate`` from ``dp.rng`` (secret; augmentation too), the real half of
            D's loss per-sample clipped and noised, fake labels drawn in proportion to
            ``dp.label_weights`` (the noisy counts) over the classes where it is > 0.

    Returns:
        ``steps``, ``seconds``, ``seconds_per_step``; ``d_loss``, ``g_loss``, ``adv``, ``ce``,
        ``div``: means over the last ``max(1, steps // 10)`` steps (NaN when ``steps == 0``);
        ``classes``: the present classes; ``fidelity_per_class``: classifier accuracy on
        fresh generated samples per class; ``fidelity``: their mean.
    """
    if diversity not in DIVERSITY_MODES:
        raise ValueError(f"diversity: unknown value {diversity!r}; allowed: {list(DIVERSITY_MODES)}")
    if steps < 0 or batch_size < 2:
        raise ValueError(f"steps must be >= 0 and batch_size >= 2, got {steps}, {batch_size}")
    if data.ndim != 4 or labels.ndim != 1 or len(data) != len(labels):
        raise ValueError(
            f"data must be [N, C, H, W] and labels [N], got {tuple(data.shape)}, {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("train_generator: no data")
    num_classes = int(generator.num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")

    device = torch.device(device)
    t0 = time.perf_counter()
    rng = torch.Generator().manual_seed(int(seed))
    sampler = _ClassSampler(labels)
    classes = sampler.classes.tolist()
    half = (batch_size + 1) // 2
    if dp is not None:
        weights = dp.label_weights.double().cpu().clamp_min(0)
        if len(weights) != num_classes:
            raise ValueError(f"dp.label_weights: {len(weights)} values for {num_classes} classes")
        classes = torch.nonzero(weights > 0).squeeze(1).tolist()  # the noisy counts, never the true ones
        expected_batch = dp.sample_rate * len(labels)
        clipped_max, real_seen = 0.0, 0

    with guided_training(generator, discriminator, classifier, device):
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
        d_params = [p for p in discriminator.parameters() if p.requires_grad]
        opt_d = torch.optim.Adam(d_params, lr=d_lr if d_lr is not None else lr, betas=betas)
        window = max(1, steps // 10)
        hist: dict[str, list[float]] = {k: [] for k in ("d_loss", "g_loss", "adv", "ce", "div")}
        every = log_every or max(1, steps // 5)

        for step in range(1, steps + 1):
            # One batch of label-sharing noise pairs: rows i and i + half have the same label.
            if dp is None:
                y_half = sampler.labels(half, rng)
                idx, y_real = sampler.indices(2 * half, rng)
            else:  # labels from the noisy counts; real images Poisson-sampled with secret randomness
                y_half = torch.multinomial(weights, half, replacement=True, generator=rng)
                idx = torch.nonzero(torch.rand(len(labels), generator=dp.rng) < dp.sample_rate).squeeze(1)
                y_real = labels[idx].long().cpu()
            y_fake = torch.cat([y_half, y_half]).to(device)
            z = torch.randn(2 * half, generator.nz, generator=rng).to(device)
            x_real = data[idx].to(device, non_blocking=True)
            if augment is not None and len(idx):
                x_real = augment(x_real, rng if dp is None else dp.rng)
            y_real = y_real.to(device)

            fake = generator(z, y_fake)

            if dp is None:
                # D step (hinge), real and fake images in one forward pass (D has no BatchNorm,
                # so a sample's score does not depend on the rest of the batch).
                scores = discriminator(torch.cat([x_real, fake.detach()]), torch.cat([y_real, y_fake]))
                d_loss = F.relu(1.0 - scores[: len(x_real)]).mean() + F.relu(1.0 + scores[len(x_real):]).mean()
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
            else:
                d_loss, norm_max = _dp_discriminator_grads(discriminator, d_params, x_real, y_real, fake.detach(),
                                                           y_fake, dp, expected_batch)
                clipped_max = max(clipped_max, norm_max)
                real_seen += len(idx)
            opt_d.step()

            # G step: adversarial + classifier guidance + diversity. D's weights take no
            # gradient here (only G is updated), so their backward pass is skipped.
            for p in d_params:
                p.requires_grad_(False)
            adv = -discriminator(fake, y_fake).mean()
            logits = classifier(fake)
            ce = F.cross_entropy(logits, y_fake)
            if diversity == "mode_seeking":
                dx = (fake[:half] - fake[half:]).abs().flatten(1).mean(1)
                dz = (z[:half] - z[half:]).abs().mean(1)
                div = 1.0 / ((dx / dz).mean() + 1e-5)
            elif diversity == "batch_entropy":
                div = batch_entropy_term(logits)
            else:
                div = torch.zeros((), device=device)
            g_loss = adv + ce_weight * ce + div_weight * div
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            for p in d_params:
                p.requires_grad_(True)

            if step > steps - window or (log is not None and step % every == 0):
                vals = {"d_loss": d_loss, "g_loss": g_loss, "adv": adv, "ce": ce, "div": div}
                vals = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in vals.items()}
                if step > steps - window:
                    for k, v in vals.items():
                        hist[k].append(v)
                if log is not None and step % every == 0:
                    log(
                        f"generator step {step}/{steps}: d_loss={vals['d_loss']:.3f} "
                        f"adv={vals['adv']:.3f} ce={vals['ce']:.3f} div={vals['div']:.3f} "
                        f"({time.perf_counter() - t0:.1f}s)"
                    )
        train_seconds = time.perf_counter() - t0
        fid = generator_fidelity(generator, classifier, classes, per_class=eval_per_class,
                                 seed=mix_seed(int(seed), "fidelity"))

    stats = {
        "steps": int(steps),
        "seconds": time.perf_counter() - t0,
        "seconds_per_step": train_seconds / steps if steps else 0.0,
        **{k: (sum(v) / len(v) if v else float("nan")) for k, v in hist.items()},
        "classes": [int(c) for c in classes],
        "fidelity_per_class": fid,
        "fidelity": sum(fid.values()) / len(fid),
    }
    if dp is not None:
        stats.update({"dp-real-per-step": real_seen / steps if steps else 0.0,
                      "dp-max-sample-grad-norm": clipped_max})
    if log is not None:
        log(
            f"generator done: {steps} steps in {stats['seconds']:.1f}s, fidelity={stats['fidelity']:.3f} "
            f"over classes {stats['classes']}"
        )
    return stats
