"""A client's privacy ledger: every release it has made from its data, on disk, composed.

Under DP (``mosaic_flwr.privacy.dp``) a client writes down each Gaussian release before it
sends it (its label counts, its prototypes, its generator's DP-SGD, each gate score) as the
mechanism the accountant needs, ``(noise multiplier, sample rate, steps)``. Before a new
release the ledger composes it with everything already written (Opacus's accountant, at the
run's delta) and **refuses** it, with a :class:`BudgetExceeded` that names what was spent,
when the total would pass the budget (``dp.epsilon``). The file survives the client's
restarts, so a release asked for again (a retried round, a restarted SuperNode, a second
run on the same data) is paid again, or refused.

The label counts are the one release a client repeats at no cost: the ledger keeps the noisy
counts it drew, and every later message, in this run or another, sends the same vector.

A ledger belongs to the data it describes: its file name carries the data set, the
partition and a digest of the client's labels. Where it lives is the client's choice: a
SuperNode's ``--node-config ledger-dir=...`` (``scripts/deploy/start_supernode.sh`` sets one
under the node's own folder), which the server cannot change; in simulation, without one, a
folder per run (Flower run id and run name) under the run's ``output-dir`` (simulated clients
are new each run).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["BudgetExceeded", "Ledger", "ledger_name"]

VERSION = 1
SLACK = 1e-6  # relative: a plan calibrated to exactly the budget is not refused by rounding


class BudgetExceeded(RuntimeError):
    """A release that would take a client's composed epsilon past its budget."""


def ledger_name(dataset: str, partition_id: int, num_partitions: int, labels: torch.Tensor) -> str:
    """The ledger's file name for a client's data: data set, partition and a digest of its labels."""
    digest = hashlib.sha256(labels.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:12]
    return f"{dataset}-client-{partition_id}-of-{num_partitions}-{digest}.json"


@dataclass
class Ledger:
    """One client's ledger at ``path`` (read when it exists). ``budget``: the largest total
    epsilon it allows (0: it records and composes, and refuses nothing: a run that gives a
    noise multiplier instead of a target)."""

    path: Path
    budget: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.releases: list[dict[str, Any]] = []
        self.counts: list[int] | None = None
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.releases, self.counts = list(data["releases"]), data.get("counts")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # a ledger that cannot be read cannot say what was spent: nothing more is released
                raise BudgetExceeded(f"privacy ledger {self.path} is unreadable ({exc}); this client "
                                     "releases nothing until it is repaired or removed by its owner") from None

    # ------------------------------------------------------------------ composition
    @staticmethod
    def _mechanism(entry: dict[str, Any]) -> tuple[float, float, int]:
        return float(entry["sigma"]), float(entry["sample-rate"]), int(entry["steps"])

    def epsilon(self, more: Sequence[tuple[float, float, int]] = ()) -> float:
        """The composed epsilon (at the ledger's delta) of every release written, and ``more``."""
        from mosaic_flwr.privacy.dp import epsilon_of
        return epsilon_of([self._mechanism(e) for e in self.releases] + list(more), self.delta, self.accountant)

    def check(self, releases: dict[str, tuple[float, float, int]]) -> float:
        """The total after ``releases`` (``what -> mechanism``); raises ``BudgetExceeded`` when
        it passes the budget. Writes nothing."""
        total = self.epsilon(list(releases.values()))
        if self.budget > 0 and total > self.budget * (1 + SLACK):
            spent = self.epsilon()
            raise BudgetExceeded(
                f"privacy ledger: refusing to release {', '.join(releases)}: this client has spent epsilon "
                f"{spent:.3f} in {len(self.releases)} release(s) on this data, and this one would take it to "
                f"{total:.3f}, past dp.epsilon={self.budget:g} (delta {self.delta:g}); ledger {self.path}")
        return total

    def charge(self, releases: dict[str, tuple[float, float, int]], **about: Any) -> float:
        """Writes ``releases`` down (after ``check``) before they are sent; returns the new total.
        ``about`` (run id, round, ...) is kept with each entry for the client's owner."""
        for what, (sigma, _, _) in releases.items():
            if not (math.isfinite(sigma) and sigma > 0):
                raise ValueError(f"privacy ledger: {what}: a noise multiplier > 0 is needed, got {sigma}")
        total = self.check(releases)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for what, (sigma, rate, steps) in releases.items():
            self.releases.append({"what": what, "sigma": float(sigma), "sample-rate": float(rate),
                                  "steps": int(steps), "at": now, **about})
        self._save(total)
        return total

    # ------------------------------------------------------------------ the noisy counts
    def noisy_counts(self, draw, num_classes: int, sigma: float, **about: Any) -> torch.Tensor:
        """The client's released label counts: the ones already in the ledger, or ``draw()``'s,
        charged as one Gaussian release (``sigma``) and kept for every later message."""
        if self.counts is not None and len(self.counts) == num_classes:
            return torch.tensor(self.counts, dtype=torch.long)
        self.check({"counts": (sigma, 1.0, 1)})
        counts = draw()
        self.counts = [int(c) for c in counts.tolist()]
        self.charge({"counts": (sigma, 1.0, 1)}, **about)
        return counts

    def _save(self, spent: float) -> None:
        from mosaic_flwr.core.results import atomic_write
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": VERSION, "delta": self.delta, "accountant": self.accountant,
                "epsilon-spent": spent, "counts": self.counts, "releases": self.releases}
        atomic_write(self.path, json.dumps(body, indent=1) + "\n", durable=True, private=True)
