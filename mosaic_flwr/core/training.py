"""Local training and evaluation of classifiers on in-memory tensors (no DataLoader).

Shared by every strategy: FedAvg/FedProx clients, Mosaic's warm-up and fine-tune rounds,
the server's evaluation, and the centralised reference.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mosaic_flwr.data.augment import Augment
from mosaic_flwr.core.seeds import mix_seed


def batches(n: int, batch_size: int, generator: torch.Generator, *, epochs: int = 1,
            steps: int = 0) -> Iterator[torch.Tensor]:
    """Shuffled index batches: ``steps`` batches when > 0 (cycling through epochs), else
    ``epochs`` full passes."""
    total = steps if steps > 0 else epochs * math.ceil(n / batch_size)
    done = 0
    while done < total:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done == total:
                return
            yield perm[start:start + batch_size]
            done += 1


def restriction_scale(present: torch.Tensor, alpha: float) -> torch.Tensor:
    """FedRS's per-class logit multipliers: 1 for the classes in ``present`` (a boolean mask
    over the classes), ``alpha`` for the others."""
    return torch.where(present.bool(), 1.0, float(alpha))


def restricted_logits(logits: torch.Tensor, present: torch.Tensor, alpha: float) -> torch.Tensor:
    """FedRS's restricted softmax input (Li & Zhan, KDD 2021): the logits of the classes
    missing from ``present`` multiplied by ``alpha`` in [0, 1] (1: unchanged, plain FedAvg).
    ``present`` is the client's whole label set (classes it holds any example of), as in the
    paper; the Mosaic authors' code instead takes the classes visible in each batch and
    anneals alpha (0.1 rising to 0.8, see MOSAIC_REFERENCE.md); we follow the paper."""
    return logits * restriction_scale(present, alpha).to(logits)


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1,
                steps: int = 0, batch_size: int = 32, lr: float = 0.01, momentum: float = 0.9,
                weight_decay: float = 0.0, proximal_mu: float = 0.0, seed: int = 0,
                device: torch.device | str = "cpu", augment: Augment | None = None,
                logit_scale: torch.Tensor | None = None,
                extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                ) -> dict[str, float]:
    """SGD on (x, y); with ``proximal_mu > 0`` adds FedProx's (mu/2)||w - w_global||^2,
    w_global being the weights the model holds on entry; ``augment`` transforms each batch
    (its randomness is a stream of its own, so the batch order does not change with it);
    ``logit_scale`` (one factor per class, FedRS's ``restriction_scale``) multiplies the
    logits inside the training loss only; ``extra_loss(model, xb, yb, logits)`` (a method's
    regulariser, e.g. FedGen's) is added to each step's loss. Returns mean loss, steps, seconds."""
    if len(y) == 0:
        raise ValueError("train_local: no training samples")
    device = torch.device(device)
    model.to(device).train()
    if logit_scale is not None:
        logit_scale = logit_scale.to(device)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(mix_seed(seed, "augment"))
    t0, total, count = time.perf_counter(), 0.0, 0
    for idx in batches(len(y), batch_size, gen, epochs=epochs, steps=steps):
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        if augment is not None:
            xb = augment(xb, aug_gen)
        logits = model(xb)
        if logit_scale is not None:
            logits = logits * logit_scale.to(logits.dtype)
        loss = F.cross_entropy(logits, yb)
        if extra_loss is not None:
            loss = loss + extra_loss(model, xb, yb, logits)
        if anchor is not None:
            prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            loss = loss + 0.5 * proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
        count += 1
    return {"train-loss": total / max(count, 1), "steps": count,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 128,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``model(x)`` in eval mode, batched; the logits on the CPU.

    Batches of 128 by default (the clients' scoring: the gate's candidates, the meta logits):
    on one CPU thread, over Fashion-MNIST images, cnn_small, cnn_wide and resnet8 run 1.7 to
    2.4x faster than in batches of 1000, whose activations do not fit in cache. The logits
    do not depend on the batching (eval mode; measured equal bit for bit)."""
    model.to(device).eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def logits_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy of logits against labels."""
    return {"accuracy": (logits.argmax(1) == y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item()}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 128,
             device: torch.device | str = "cpu") -> dict[str, float]:
    return logits_metrics(predict_logits(model, x, batch_size=batch_size, device=device), y)


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 128,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Penultimate features ``model.features(x)`` in eval mode, on the CPU.

    Batches of 128: on one CPU thread ``cnn_small`` runs about twice as fast as in batches of
    1000 (whose activations do not fit in cache)."""
    model.to(device).eval()
    return torch.cat([model.features(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def label_counts(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many examples of each class ``y`` holds (``[num_classes]``)."""
    return torch.bincount(y, minlength=num_classes)
