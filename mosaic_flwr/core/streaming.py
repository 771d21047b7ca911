"""Streaming aggregation: running sums that take client models one at a time, so a round's
memory does not grow with the number of replies, and a bounded bank of generators.

``RunningSum`` keeps, per entry of a family's global model, ``sum_i w_i x_i`` and
``sum_i w_i`` in float64 (width-scaled sub-models add into the entries their plan selects,
as ``submodels.masked_average`` does); ``result(base)`` is the weighted mean, cast back to
each entry's dtype, entries nobody held keeping ``base``'s value. ``ClassSums`` is one
``RunningSum`` per class, a client adding its model with weight = its count of the class:
Mosaic's class experts (``experts.build_class_experts``) without holding the clients' models.

Order: the replies arrive in any order. With integer weights (example and label counts) each
product ``w * x`` of a float32 entry is exact in float64, and so is ``sum_i w_i``; only the
float64 additions round, about 2^-29 of a float32 unit, so the float32 result is the same
whatever the order unless the float64 sum falls within that distance of a float32 rounding
boundary (the test reorders replies and compares bit for bit). Exact resume does not depend
on it: a resumed run adds the same replies in the same way.

``GeneratorBank``: at most ``size`` generators per class (``mosaic.generator-bank-size``; 0: every
generator): those of the largest holders of the class, ties by partition id (lower first),
so the bank is a function of what was offered, not of the order. A generator is kept while
it is among the top ``size`` of some class; it is asked only for those classes (its counts
of the others are masked to zero), so each class has at most ``size`` generators and the
memory is at most ``classes x size`` generators, whatever the number of clients.
Unconditional generators (``mosaic.generator='dcgan'``) are kept by the same per-class ranking (a
generator stays while its owner is among the ``size`` largest holders of some class, so every
held class keeps a generator trained on it); the sampler then draws the same number of samples
from each, and the masked counts are not read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mosaic_flwr.core.submodels import IndexPlan, _grid, _sub_shape

StateDict = dict[str, Tensor]


def _equal_states(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Whether two state dicts hold the same keys, dtypes, shapes and values (``torch.equal``:
    NaN equals nothing)."""
    return a is b or (a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a))


class RunningSum:
    """``sum_i w_i x_i`` and ``sum_i w_i`` per entry of a (full-width) state, in float64."""

    def __init__(self) -> None:
        self.total: dict[str, Tensor] = {}
        # per key: a float while every client held the whole tensor, else a float64 tensor
        self.held: dict[str, float | Tensor] = {}
        self.clients = 0

    def __len__(self) -> int:
        return self.clients

    @torch.no_grad()
    def add(self, state: Mapping[str, Tensor], weight: float, plan: IndexPlan | None = None,
            shapes: Mapping[str, Tensor] | None = None) -> None:
        """Add one client's state with ``weight`` (> 0; 0 adds nothing). With a ``plan``
        (a width-scaled sub-model), ``shapes`` (the family's global state) gives the full
        shapes and the state's entries go where the plan says."""
        w = float(weight)
        if not (w >= 0 and w < float("inf")):
            raise ValueError(f"RunningSum.add: weight must be finite and >= 0, got {weight}")
        if w == 0:
            return
        self.clients += 1
        for key, value in state.items():
            v = value.detach().to(torch.float64)
            index = None if plan is None else plan[key]
            if index is None or all(i is None for i in index):
                if key in self.total:
                    self.total[key].add_(v * w)
                else:
                    self.total[key] = v * w
                h = self.held.get(key, 0.0)
                self.held[key] = h + w if isinstance(h, float) else h.add_(w)
                continue
            if shapes is None:
                raise ValueError("RunningSum.add: a sub-model's plan needs the global shapes")
            shape = tuple(shapes[key].shape)
            expected = _sub_shape(index, shape)
            if tuple(v.shape) != expected:
                raise ValueError(f"RunningSum.add: {key!r} has shape {tuple(v.shape)}, its plan expects {expected}")
            if key not in self.total:
                self.total[key] = torch.zeros(shape, dtype=torch.float64)
            h = self.held.get(key, 0.0)
            if isinstance(h, float):
                h = self.held[key] = torch.full(shape, h, dtype=torch.float64)
            grid = _grid(index, shape, torch.device("cpu"))
            self.total[key].index_put_(grid, v * w, accumulate=True)
            h.index_put_(grid, torch.tensor(w, dtype=torch.float64), accumulate=True)

    def merge(self, other: "RunningSum") -> None:
        """Add another sum's clients to this one."""
        for key, t in other.total.items():
            if key in self.total:
                self.total[key].add_(t)
            else:
                self.total[key] = t.clone()
            h, o = self.held.get(key, 0.0), other.held[key]
            if isinstance(h, float) and isinstance(o, float):
                self.held[key] = h + o
            else:
                if isinstance(h, float):
                    h = torch.full(t.shape, h, dtype=torch.float64)
                self.held[key] = h + o
        self.clients += other.clients

    @torch.no_grad()
    def result(self, base: Mapping[str, Tensor]) -> StateDict:
        """The weighted mean per entry in ``base``'s dtypes (integers rounded); entries (or
        whole tensors) nobody held keep ``base``'s value."""
        out = {}
        for key, reference in base.items():
            if key not in self.total:
                out[key] = reference
                continue
            h = self.held[key]
            if isinstance(h, float):
                mean = self.total[key] / h
                if not reference.is_floating_point():
                    mean = mean.round()
                out[key] = mean.to(reference.dtype)
            else:
                mean = self.total[key] / h.clamp_min(torch.finfo(torch.float64).tiny)
                if not reference.is_floating_point():
                    mean = mean.round()
                out[key] = torch.where(h > 0, mean.to(reference.dtype), reference)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "held": self.held, "clients": self.clients}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "RunningSum":
        s = cls()
        s.total, s.held, s.clients = dict(state["total"]), dict(state["held"]), int(state["clients"])
        return s


class ClassSums:
    """One ``RunningSum`` per class: ``add(state, counts)`` adds the state to class ``k``
    with weight ``counts[k]`` (classes the client does not hold get nothing)."""

    def __init__(self, num_classes: int) -> None:
        self.sums = [RunningSum() for _ in range(num_classes)]
        self.counts = torch.zeros(num_classes, dtype=torch.long)

    def add(self, state: Mapping[str, Tensor], counts: Tensor, plan: IndexPlan | None = None,
            shapes: Mapping[str, Tensor] | None = None) -> None:
        counts = torch.as_tensor(counts).long()
        if counts.shape != self.counts.shape or (counts < 0).any():
            raise ValueError(f"ClassSums.add: counts must be [{len(self.sums)}] and >= 0")
        for k in torch.nonzero(counts > 0).flatten().tolist():
            self.sums[k].add(state, float(counts[k]), plan, shapes)
        self.counts += counts

    def merge(self, other: "ClassSums") -> None:
        for mine, theirs in zip(self.sums, other.sums):
            mine.merge(theirs)
        self.counts += other.counts

    def experts(self, previous: Sequence[StateDict] | None, fallback: StateDict,
                base: Mapping[str, Tensor]) -> list[StateDict]:
        """The C class experts: class ``k``'s count-weighted mean (entries none of its
        holders trained keep ``base``'s value); a class nobody added keeps ``previous[k]``,
        or without previous experts ``fallback`` (the round's global model: FedAvg).

        Experts that come out equal (every entry) are one shared (read-only) state dict, as
        ``experts.build_class_experts`` shares classes with the same weight row: at strong
        label skew most classes have a single holder, whose model each of them is exactly
        (``w * x / w`` is exact in float64), and ``StackedExperts`` then evaluates each
        shared dict once instead of once per class."""
        out: list[StateDict] = []
        distinct: list[StateDict] = []
        for k, s in enumerate(self.sums):
            expert = (previous[k] if previous is not None else fallback) if len(s) == 0 else s.result(base)
            same = next((d for d in distinct if _equal_states(d, expert)), None)
            if same is None:
                distinct.append(expert)
            out.append(expert if same is None else same)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [s.state_dict() for s in self.sums], "counts": self.counts}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "ClassSums":
        c = cls(len(state["sums"]))
        c.sums = [RunningSum.from_state(s) for s in state["sums"]]
        c.counts = state["counts"].clone()
        return c


class GeneratorBank:
    """At most ``size`` generators per class (0: unbounded); see the module docstring.

    Entries are keyed by partition id: ``{"counts": [C] long, "state": generator state,
    "prototypes": (features, labels) or None, "node": node id}``."""

    def __init__(self, num_classes: int, size: int = 0) -> None:
        if size < 0:
            raise ValueError("GeneratorBank: size must be >= 0")
        self.num_classes, self.size = num_classes, size
        self.entries: dict[int, dict[str, Any]] = {}
        self.offered = 0

    def copy(self) -> "GeneratorBank":
        """A bank with the same entries (shared, read-only) that can be offered to apart."""
        b = GeneratorBank(self.num_classes, self.size)
        b.entries, b.offered = dict(self.entries), self.offered
        return b

    def top(self) -> dict[int, list[int]]:
        """Class -> the partition ids kept for it (largest count first, then lower id)."""
        out = {}
        for k in range(self.num_classes):
            holders = sorted((pid for pid, e in self.entries.items() if e["counts"][k] > 0),
                             key=lambda pid: (-int(self.entries[pid]["counts"][k]), pid))
            out[k] = holders if self.size == 0 else holders[:self.size]
        return out

    def offer(self, partition_id: int, counts: Tensor, state: StateDict, **extra: Any) -> bool:
        """Offer a client's generator; returns whether it is kept (now)."""
        counts = torch.as_tensor(counts).long().clone()
        if counts.shape != (self.num_classes,):
            raise ValueError(f"GeneratorBank.offer: counts must be [{self.num_classes}]")
        self.offered += 1
        self.entries[int(partition_id)] = {"counts": counts, "state": state, **extra}
        if self.size:
            kept = {pid for pids in self.top().values() for pid in pids}
            self.entries = {pid: e for pid, e in self.entries.items() if pid in kept}
        return int(partition_id) in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def rows(self) -> list[tuple[int, Tensor, dict[str, Any]]]:
        """``(partition id, masked counts [C], entry)`` in partition order: a generator's
        counts are zero for the classes it is not kept for."""
        top = self.top()
        out = []
        for pid in sorted(self.entries):
            e = self.entries[pid]
            mask = torch.tensor([pid in top[k] for k in range(self.num_classes)])
            out.append((pid, torch.where(mask, e["counts"], torch.zeros_like(e["counts"])), e))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "num-classes": self.num_classes, "offered": self.offered,
                "entries": {str(pid): e for pid, e in self.entries.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "GeneratorBank":
        b = cls(int(state["num-classes"]), int(state["size"]))
        b.offered = int(state["offered"])
        b.entries = {int(pid): dict(e) for pid, e in state["entries"].items()}
        return b
