"""The strategy registry: run-config ``strategy`` -> its ``Method`` (runner, settings).

Adding a method: its own file (the strategy and a ``METHOD``), one line here, and its
default settings in ``pyproject.toml`` (``[tool.flwr.app.config.<name>]``)."""

from __future__ import annotations

from typing import Callable

from .base import ServerContext
from .baselines import FEDAVG, FEDPROX
from .dense import DENSE
from .dfrd import DFRD
from .fedbn import FEDBN
from .fedftg import FEDFTG
from .fedgen import FEDGEN
from .fedrs import FEDRS
from .method import Method
from .feddf import FEDDF, FEDDF_GEN
from .mosaic import MOSAIC

STRATEGIES: dict[str, Method] = {
    "fedavg": FEDAVG,
    "fedprox": FEDPROX,
    "fedrs": FEDRS,
    "fedbn": FEDBN,
    "mosaic": MOSAIC,
    "feddf": FEDDF,
    "feddf-gen": FEDDF_GEN,
    "fedftg": FEDFTG,
    "dfrd": DFRD,
    "dense": DENSE,
    "fedgen": FEDGEN,
}


def get_strategy(name: str) -> Callable[[ServerContext], None]:
    if name not in STRATEGIES:
        raise ValueError(f"strategy: {name!r} is not available; allowed: {sorted(STRATEGIES)}")
    return STRATEGIES[name].run


__all__ = ["STRATEGIES", "Method", "ServerContext", "get_strategy"]
