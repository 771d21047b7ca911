"""The distillation schedule as functions of the run-config values (no imports from the package:
``config`` and ``privacy.dp`` both read it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def gate_until(values: Mapping[str, Any]) -> int:
    """The round after which the look-ahead gate makes its final choice: ``kd.gate-rounds``
    fine-tune rounds after the distillation round (-1: to the end), at most the last round."""
    last, warmup, ahead = int(values["num-server-rounds"]), int(values["warmup-rounds"]), int(values["kd.gate-rounds"])
    return last if ahead < 0 else min(last, warmup + ahead)


def proto_rounds(values: Mapping[str, Any]) -> int:
    """How many rounds, ending at the distillation round, upload prototypes for Mosaic's meta
    model (``mosaic.proto-rounds``; -1: every warm-up round)."""
    n = int(values["mosaic.proto-rounds"])
    return int(values["warmup-rounds"]) if n == -1 else n
