"""Client-side training of the authors' unconditional generator (``mosaic.generator='dcgan'``).

The authors' DeGAN-style loop (``utils/degan.py``), on the client's own data:

* D step: ``L_D = BCE(D(x), 1) + BCE(D(G(z)), 0)`` on a real batch and a fake one (two
  forward passes, so D's BatchNorm normalises each batch on its own, as theirs);
* G step: ``L_G = BCE(D(G(z)), 1) + div_weight * sum_k w_k log w_k`` with ``w`` the batch mean
  of ``softmax(f(G(z)))`` (``batch_entropy_term``; their ``d_l = 5``; their entropy and
  inversion terms are off, ``c_l = 0`` and ``inversion_loss=False``);
* Adam 2e-4, betas (0.5, 0.999) for both; ``z ~ N(0, I)``, as many noise vectors as real images.

The guiding classifier ``f``: the paper says the client's local model guides its generator;
the authors' code instead trains a separate ResNet-18 from scratch for 50 epochs for it
(``trainer_init.py``). We follow the paper: the client's freshly trained model (the one it
uploads in the same round) guides it, frozen. Their 200 epochs over the local loader become
``steps`` batches of ``batch_size`` (``mosaic.gen-steps`` / ``mosaic.gen-batch-size``): a CPU run trains far
less. Real batches are drawn uniformly (with replacement) from the client's images, as their
shuffled loader reads every image equally often; every class is used (their ``inc_classes``
bug dropped class 0).

D and G read and write the classifiers' normalised inputs (``DCGANGenerator``'s output
mapping). Differential privacy is not offered here: D has BatchNorm, so per-sample gradients
of its real batch are not defined (``privacy.dp.check_config`` refuses the combination).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mosaic_flwr.data.augment import Augment
from mosaic_flwr.models.generators import sample_unconditional
from mosaic_flwr.core.seeds import mix_seed

from mosaic_flwr.methods.mosaic.generator import batch_entropy_term, guided_training

__all__ = ["DCGAN_BETAS", "DCGAN_DIV_WEIGHT", "DCGAN_LR", "class_coverage", "train_dcgan"]

DCGAN_LR = 2e-4            # the authors' Adam rate for G and D
DCGAN_BETAS = (0.5, 0.999)
DCGAN_DIV_WEIGHT = 5.0     # their d_l


@torch.no_grad()
def class_coverage(generator: nn.Module, classifier: nn.Module, classes, *, n: int = 256, seed: int = 0
                   ) -> dict[str, float]:
    """What an unconditional generator's samples look like to ``classifier``: ``coverage``,
    the share of ``classes`` (the client's) that are the argmax of at least one of ``n`` fresh
    eval-mode samples, and ``held-share``, the share of samples whose argmax is one of them.
    Both models on the same device; their modes are restored."""
    classes = torch.as_tensor(classes).long().flatten().cpu()
    if not len(classes) or n < 1:
        return {"coverage": 0.0, "held-share": 0.0}
    x = sample_unconditional(generator, n, seed=seed)
    was = classifier.training
    classifier.eval()
    try:
        pred = torch.cat([classifier(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).cpu()
    finally:
        classifier.train(was)
    held = torch.isin(pred, classes)
    return {"coverage": float(torch.isin(classes, pred).float().mean()), "held-share": float(held.float().mean())}


def train_dcgan(
    generator: nn.Module,
    discriminator: nn.Module,
    classifier: nn.Module,
    data: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float = DCGAN_LR,
    betas: tuple[float, float] = DCGAN_BETAS,
    div_weight: float = DCGAN_DIV_WEIGHT,
    device: str | torch.device = "cpu",
    seed: int = 0,
    eval_samples: int = 256,
    augment: Augment | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int | None = None,
) -> dict:
    """Train the unconditional ``generator`` (``DCGANGenerator``) in place against
    ``discriminator`` (``DCGANDiscriminator``), guided by the frozen ``classifier``; return
    statistics (see the module docstring for the losses).

    Args:
        generator, discriminator: moved to ``device`` and left there.
        classifier: normalised inputs -> logits; frozen (eval mode, ``requires_grad=False``),
            its mode, flags and device restored afterwards: its weights do not change.
        data: ``[N, C, H, W]`` real images in the classifier's normalised space.
        labels: ``[N]``; only which classes are present is read (for ``coverage``).
        steps: (D step, G step) pairs; 0 only evaluates.
        batch_size: real images and noise vectors per step (>= 2: D's BatchNorm).
        seed: drives the real batches and the noise (CPU RNG, device-independent).
        augment: applied to each real batch (what the classifier was trained on).

    Returns:
        ``steps``, ``seconds``, ``seconds_per_step``; ``d_loss``, ``g_loss``, ``adv``, ``div``:
        means over the last ``max(1, steps // 10)`` steps (NaN when ``steps == 0``);
        ``classes``: the present classes; ``coverage`` and ``held-share`` (``class_coverage``)
        on ``eval_samples`` fresh samples.
    """
    if steps < 0 or batch_size < 2:
        raise ValueError(f"steps must be >= 0 and batch_size >= 2, got {steps}, {batch_size}")
    if data.ndim != 4 or labels.ndim != 1 or len(data) != len(labels):
        raise ValueError(f"data must be [N, C, H, W] and labels [N], got {tuple(data.shape)}, {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("train_dcgan: no data")
    device = torch.device(device)
    t0 = time.perf_counter()
    rng = torch.Generator().manual_seed(int(seed))
    with guided_training(generator, discriminator, classifier, device):
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
        d_params = [p for p in discriminator.parameters() if p.requires_grad]
        opt_d = torch.optim.Adam(d_params, lr=lr, betas=betas)
        ones = torch.ones(batch_size, device=device)
        zeros = torch.zeros(batch_size, device=device)
        window, every = max(1, steps // 10), log_every or max(1, steps // 5)
        hist: dict[str, list[float]] = {k: [] for k in ("d_loss", "g_loss", "adv", "div")}
        classes = torch.unique(labels.long().cpu())
        for step in range(1, steps + 1):
            idx = torch.randint(len(data), (batch_size,), generator=rng)
            x_real = data[idx].to(device, non_blocking=True)
            if augment is not None:
                x_real = augment(x_real, rng)
            z = torch.randn(batch_size, generator.nz, generator=rng).to(device)
            fake = generator(z)

            d_loss = (F.binary_cross_entropy_with_logits(discriminator(x_real), ones)
                      + F.binary_cross_entropy_with_logits(discriminator(fake.detach()), zeros))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

            for p in d_params:  # only G is updated in its step: D's weight gradients are skipped
                p.requires_grad_(False)
            adv = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
            div = batch_entropy_term(classifier(fake))
            g_loss = adv + div_weight * div
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            for p in d_params:
                p.requires_grad_(True)

            if step > steps - window or (log is not None and step % every == 0):
                vals = {k: float(v.detach()) for k, v in (("d_loss", d_loss), ("g_loss", g_loss), ("adv", adv),
                                                          ("div", div))}
                if step > steps - window:
                    for k, v in vals.items():
                        hist[k].append(v)
                if log is not None and step % every == 0:
                    log(f"dcgan step {step}/{steps}: d_loss={vals['d_loss']:.3f} adv={vals['adv']:.3f} "
                        f"div={vals['div']:.3f} ({time.perf_counter() - t0:.1f}s)")
        train_seconds = time.perf_counter() - t0
        cover = class_coverage(generator, classifier, classes, n=eval_samples, seed=mix_seed(int(seed), "coverage"))
    stats = {
        "steps": int(steps),
        "seconds": time.perf_counter() - t0,
        "seconds_per_step": train_seconds / steps if steps else 0.0,
        **{k: (sum(v) / len(v) if v else float("nan")) for k, v in hist.items()},
        "classes": [int(c) for c in classes.tolist()],
        **cover,
    }
    if log is not None:
        log(f"dcgan done: {steps} steps in {stats['seconds']:.1f}s, coverage={stats['coverage']:.3f} "
            f"of classes {stats['classes']}")
    return stats
