"""Strategy registry: run-config ``strategy`` -> a runner ``fn(ServerContext) -> None``."""

from __future__ import annotations

from typing import Callable

from ..config import STRATEGY_NAMES
from .base import ServerContext
from .baselines import run_fedavg, run_fedprox
from .mosaic import run_feddf, run_mosaic

STRATEGIES: dict[str, Callable[[ServerContext], None]] = {
    "fedavg": run_fedavg,
    "fedprox": run_fedprox,
    "mosaic": run_mosaic,
    "feddf": run_feddf,
}


def get_strategy(name: str) -> Callable[[ServerContext], None]:
    if name not in STRATEGIES:
        available = sorted(STRATEGIES)
        planned = sorted(set(STRATEGY_NAMES) - set(STRATEGIES))
        raise ValueError(f"strategy: {name!r} is not available; allowed: {available}"
                         + (f" (not built yet: {planned})" if name in planned else ""))
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "ServerContext", "get_strategy"]
