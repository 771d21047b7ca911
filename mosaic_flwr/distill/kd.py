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
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic_flwr.distill.teachers import call_teacher

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


class _StudentRun:
    """One student's optimizer and running statistics during ``distill_many``."""

    KEYS = ("loss", "kl", "ce", "jsd", "agreement")

    def __init__(self, student: nn.Module, *, steps: int, lr: float, student_bn: str,
                 device: torch.device, history_points: int):
        self.student, self.steps, self.was_training = student, steps, student.training
        student.to(device).train(student_bn == "train")
        self.optimizer = torch.optim.Adam(student.parameters(), lr=lr)
        self.window = max(1, math.ceil(steps / max(1, history_points)))
        self.sums = dict.fromkeys(self.KEYS, 0.0)  # window sums, kept on device (no per-step sync)
        self.history: list[dict] = []
        self.label_hits, self.label_total = 0.0, 0

    def step(self, step: int, x: Tensor, y_requested: Tensor, teacher_logits: Tensor, *,
             a: float, b: float, T: float) -> dict[str, Tensor]:
        """One Adam step on ``kd_loss`` for batch ``x`` (step number ``step``, from 0)."""
        student_logits = self.student(x)
        parts = kd_loss_parts(student_logits, teacher_logits, a=a, b=b, T=T)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.optimizer.step()

        teacher_labels = teacher_logits.argmax(dim=-1)
        parts["agreement"] = (student_logits.argmax(dim=-1) == teacher_labels).float().mean()
        for key in self.KEYS:
            self.sums[key] = self.sums[key] + parts[key].detach()
        self.label_hits = self.label_hits + (teacher_labels == y_requested.to(x.device)).sum()
        self.label_total += y_requested.numel()
        done = step + 1
        if done % self.window == 0 or done == self.steps:
            count = done - (self.history[-1]["step"] if self.history else 0)
            self.history.append({"step": done, **{k: float(v) / count for k, v in self.sums.items()}})
            self.sums = dict.fromkeys(self.KEYS, 0.0)
        return parts

    def finish(self, seconds: float) -> dict:
        self.student.train(self.was_training)
        history = self.history
        return {
            "steps": self.steps,
            "seconds": seconds,
            "history": history,
            "initial_agreement": history[0]["agreement"],
            "final_agreement": history[-1]["agreement"],
            "final_loss": history[-1]["loss"],
            "teacher_label_agreement": float(self.label_hits) / max(1, self.label_total),
        }


def distill_many(
    students: Mapping[str, nn.Module],
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
    log: Callable[[str, str], None] | None = None,
    history_points: int = 100,
) -> dict[str, dict]:
    """Distil one ``teacher`` into several ``students`` (name -> model, each in place) at once.

    Each step draws one batch, computes the teacher's logits on it once, and takes one step
    of every student (in the mapping's order) on it; then the batch is let go. So memory
    holds one batch and its teacher logits, whatever the number of steps and students.

    A student's result is exactly what ``distill`` gives it alone (the same batches in the
    same order, one ``sample`` call and one teacher pass per step) as long as the students'
    forward passes draw no random numbers (e.g. dropout with ``student_bn="train"``: then
    the global RNG is shared among them step by step).

    Arguments as for ``distill``; ``log`` receives ``(name, line)``. Returns each student's
    statistics (see ``distill``) by name; ``seconds`` is the whole loop's wall time.
    """
    if student_bn not in STUDENT_BN_MODES:
        raise ValueError(f"student_bn: unknown value {student_bn!r}; allowed: {STUDENT_BN_MODES}")
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    if not students:
        raise ValueError("distill: no student")
    start = time.perf_counter()
    device = torch.device(device)
    runs = {name: _StudentRun(s, steps=steps, lr=lr, student_bn=student_bn, device=device,
                              history_points=history_points) for name, s in students.items()}
    for step in range(steps):
        batch = sample(step)
        x, y_requested = batch[0].to(device), batch[1]
        with torch.no_grad():
            teacher_logits = call_teacher(teacher, x, y_requested)
        for name, run in runs.items():
            parts = run.step(step, x, y_requested, teacher_logits, a=a, b=b, T=T)
            done = step + 1
            if log is not None and log_every > 0 and done % log_every == 0:
                log(name, f"kd step {done}/{steps} loss={parts['loss'].item():.4f} "
                          f"agreement={parts['agreement'].item():.3f}")
        del batch, x, y_requested, teacher_logits
    seconds = time.perf_counter() - start
    return {name: run.finish(seconds) for name, run in runs.items()}


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
    ``no_grad``, and takes one Adam step on ``kd_loss`` (no weight decay). (Several
    students of one teacher: ``distill_many``, which this calls with one student.)

    Args:
        student: the model to train (moved to ``device``; its train/eval flag is restored).
        teacher: ``x -> logits``, e.g. the EMA meta model over ``StackedExperts.logits``.
        sample: ``step -> (x, y_requested)``; ``y_requested`` are the labels the
            generators were asked for, used only for the ``teacher_label_agreement`` stat.
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
    return distill_many({"": student}, teacher, sample, steps=steps, lr=lr, a=a, b=b, T=T,
                        student_bn=student_bn, device=device, log_every=log_every,
                        log=None if log is None else lambda _, line: log(line),
                        history_points=history_points)[""]
