"""Knowledge distillation from the (meta-fused) expert teacher into the global model.

The loss follows the authors' weighting with one fix: its third term is the true
Jensen-Shannon divergence between the two softmax distributions (the authors' "JSD" mixed
logits instead of probabilities):

    L = a * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - a) * CE(s, argmax t)
        + b * JSD(softmax(s/T), softmax(t/T))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN2 = math.log(2.0)
STUDENT_BN_MODES = ("train", "eval")


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities (terms with ``p = 0`` count 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def jsd(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between ``softmax(p_logits)`` and ``softmax(q_logits)``.

    ``JSD = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``, in nats, averaged over
    every leading (batch) dimension. Symmetric and within ``[0, ln 2]`` up to rounding.
    Computed from log-softmax with ``log m = logsumexp(log p, log q) - ln 2``, so saturated
    logits give neither NaN nor infinity.
    """
    log_p = F.log_softmax(p_logits, dim=-1)
    log_q = F.log_softmax(q_logits, dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - LN2
    return 0.5 * (_kl_from_log_probs(log_p, log_m) + _kl_from_log_probs(log_q, log_m)).mean()


def kd_loss_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    a: float = 0.8,
    b: float = 1.0,
    T: float = 1.0,
) -> dict[str, Tensor]:
    """The KD loss and its unweighted parts (see the module docstring).

    Returns ``{"loss", "kl", "ce", "jsd"}``: ``kl = KL(softmax(t/T) || softmax(s/T))``,
    ``ce = CE(s, argmax t)``, ``jsd = JSD(s/T, t/T)``, each a batch mean, and
    ``loss = a*T^2*kl + (1-a)*ce + b*jsd``. The teacher is a fixed target (detached).
    """
    teacher_logits = teacher_logits.detach()
    log_s = F.log_softmax(student_logits / T, dim=-1)
    log_t = F.log_softmax(teacher_logits / T, dim=-1)
    kl = _kl_from_log_probs(log_t, log_s).mean()
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    divergence = jsd(student_logits / T, teacher_logits / T)
    loss = a * T * T * kl + (1.0 - a) * ce + b * divergence
    return {"loss": loss, "kl": kl, "ce": ce, "jsd": divergence}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    a: float = 0.8,
    b: float = 1.0,
    T: float = 1.0,
) -> Tensor:
    """``a*T^2*KL(t || s) + (1-a)*CE(s, argmax t) + b*JSD(s, t)`` (see ``kd_loss_parts``)."""
    return kd_loss_parts(student_logits, teacher_logits, a=a, b=b, T=T)["loss"]


def distill(
    student: nn.Module,
    teacher: Callable[[Tensor], Tensor],
    sample: Callable[[int], tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float = 1e-4,
    a: float = 0.8,
    b: float = 1.0,
    T: float = 1.0,
    student_bn: str = "eval",
    device: torch.device | str = "cpu",
    log_every: int = 0,
    log: Callable[[str], None] | None = None,
    history_points: int = 100,
) -> dict:
    """Distil ``teacher`` into ``student`` (in place) on synthetic batches.

    Each step draws ``(x, y_requested) = sample(step)``, computes the teacher's logits under
    ``no_grad``, and takes one Adam step on ``kd_loss`` (no weight decay).

    Args:
        student: the model to train (moved to ``device``; its train/eval flag is restored).
        teacher: ``x -> logits``, e.g. the EMA meta model over ``StackedExperts.logits``.
        sample: ``step -> (x, y_requested)``; ``y_requested`` are the labels the
            generators were asked for, used only for the ``teacher_label_agreement`` stat.
            It may return ``(x, y_requested, teacher_logits)`` instead: the teacher's logits
            computed beforehand (so several students can share one teacher pass); then
            ``teacher`` is not called.
        steps: optimisation steps.
        lr: Adam learning rate. Default 1e-4, the authors' value for ResNet-18 on CIFAR-10:
            the student is warm-started from the federated model, and Adam moves every
            weight by about ``lr`` per step whatever the model's size, so 1e-4 over hundreds
            of steps adapts a small CNN as well without erasing what it already knows.
        a, b, T: loss weights and temperature (see the module docstring).
        student_bn: ``"eval"`` (the authors' choice and the default): the student runs in
            eval mode, so BatchNorm keeps its running statistics from real data (gradients
            still flow). ``"train"``: BatchNorm normalises with, and updates its running
            statistics from, the synthetic batches.
        log_every: call ``log`` every this many steps (0: never).
        history_points: at most about this many entries in ``history``.

    Returns:
        stats: ``steps``, ``seconds``, ``history`` (one entry per window of steps: ``step``
        and the window means of ``loss``, ``kl``, ``ce``, ``jsd``, ``agreement``),
        ``initial_agreement`` / ``final_agreement`` (student-teacher argmax agreement over
        the first / last window, measured on each batch before its update), ``final_loss``
        (mean over the last window) and ``teacher_label_agreement`` (how often the
        teacher's argmax is the requested label, over all steps).
    """
    if student_bn not in STUDENT_BN_MODES:
        raise ValueError(f"student_bn: unknown value {student_bn!r}; allowed: {STUDENT_BN_MODES}")
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    start = time.perf_counter()
    device = torch.device(device)
    was_training = student.training
    student.to(device).train(student_bn == "train")
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    window = max(1, math.ceil(steps / max(1, history_points)))
    keys = ("loss", "kl", "ce", "jsd", "agreement")
    sums = dict.fromkeys(keys, 0.0)  # window sums, kept on device (no per-step sync)
    history, label_hits, label_total = [], 0.0, 0
    for step in range(steps):
        batch = sample(step)
        x, y_requested = batch[0].to(device), batch[1]
        if len(batch) == 3:  # precomputed teacher logits (one teacher, several students)
            teacher_logits = batch[2].to(device)
        else:
            with torch.no_grad():
                teacher_logits = teacher(x)
        student_logits = student(x)
        parts = kd_loss_parts(student_logits, teacher_logits, a=a, b=b, T=T)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()

        teacher_labels = teacher_logits.argmax(dim=-1)
        parts["agreement"] = (student_logits.argmax(dim=-1) == teacher_labels).float().mean()
        for key in keys:
            sums[key] = sums[key] + parts[key].detach()
        label_hits = label_hits + (teacher_labels == y_requested.to(device)).sum()
        label_total += y_requested.numel()
        done = step + 1
        if done % window == 0 or done == steps:
            count = done - (history[-1]["step"] if history else 0)
            history.append({"step": done, **{k: float(v) / count for k, v in sums.items()}})
            sums = dict.fromkeys(keys, 0.0)
        if log is not None and log_every > 0 and done % log_every == 0:
            log(
                f"kd step {done}/{steps} loss={parts['loss'].item():.4f} "
                f"agreement={parts['agreement'].item():.3f}"
            )
    student.train(was_training)
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "history": history,
        "initial_agreement": history[0]["agreement"],
        "final_agreement": history[-1]["agreement"],
        "final_loss": history[-1]["loss"],
        "teacher_label_agreement": float(label_hits) / max(1, label_total),
    }
