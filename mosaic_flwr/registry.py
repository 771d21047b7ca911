"""The method registry: run-config ``strategy`` -> its ``Method`` (how it runs, its settings,
its clients' side), and what a method declares to it.

Adding a method: its own file under ``mosaic_flwr/methods/`` (the strategy and a ``Method``),
one line in ``ENTRIES``, and its default settings in ``pyproject.toml``
(``[tool.flwr.app.config.<name>]``). The registry imports a method's module when it is first
asked for the methods, so that ``config`` (which validates every method's settings) and the
methods (which read ``config``) both depend on it and not on each other.

A method's client side, beyond FedAvg's local training, is declared too (``ClientSide``): the
ClientApp's ``train`` handler runs the hooks of the method the run config names, and knows no
method by name.

A method's settings are run-config keys under its name (Flower's nested tables:
``[tool.flwr.app.config.dense]`` in ``pyproject.toml`` holds the defaults, ``--run-config
"dense.gen-steps=100"`` overrides one); ``config.build_config`` casts and validates them like
every other key, and a strategy reads them as ``cfg.of('dense').gen_steps``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

Validator = Callable[[Any], "str | None"]
Setting = tuple[type, "Validator | None"]


@dataclass(frozen=True)
class ClientStep:
    """One plain training round on a client, as a method's client hooks see it: the received
    model (trained in place), the client's data, the round's train config, the client's node
    state (``context.state``: Flower keeps it per node and run across rounds) and the received
    message's content (``content``: every record the server sent, e.g. a method's extra arrays)."""

    model: Any
    x: Any
    y: Any
    num_classes: int
    config: Mapping[str, Any]
    state: Any
    content: Any = None


@dataclass(frozen=True)
class ClientSide:
    """What a method's clients do in a plain training round beyond FedAvg's local training
    (``training.train_local``). ``before``: on the received model (FedBN writes its own
    BatchNorm entries over it); ``train_options``: more ``train_local`` keyword arguments
    (FedRS: ``logit_scale``; a regulariser: ``extra_loss``); ``after``: on the trained model
    before it is sent (FedBN keeps its BatchNorm entries)."""

    before: Callable[[ClientStep], object] | None = None  # (a return value is ignored)
    train_options: Callable[[ClientStep], Mapping[str, Any]] | None = None
    after: Callable[[ClientStep], object] | None = None


@dataclass(frozen=True)
class Method:
    """A strategy as the registry knows it.

    ``strategy``: the class (a ``FedAvgStrategy``), built with the ``ServerContext`` and run.
    ``distils``: the method has the distillation schedule (warm-up rounds, a server-side
    distillation after round ``warmup-rounds``, fine-tune rounds at ``finetune-lr``).
    ``settings``: its own keys (without the ``<name>.`` prefix) -> (type, validator).
    ``check``: cross-key checks on the whole resolved config (raise ``ConfigError``), e.g. a
    method that refuses model heterogeneity says so here, before any training. It reads no
    file: every process that builds the config runs it.
    ``prepare``: what the method's server side reads from disk (e.g. FedDF's transfer set),
    called with the config in the ServerApp's setup, so that a missing file fails there
    (``DatasetNotFoundError``/``ConfigError``: a configuration error) before any client trains.
    ``client``: its clients' hooks around the plain local training (``ClientSide``).
    ``title``: its name as its authors write it (docs; default: the registry name).
    """

    strategy: type
    summary: str
    distils: bool = False
    settings: Mapping[str, Setting] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None
    prepare: Callable[[Any], None] | None = None
    client: ClientSide = ClientSide()
    title: str = ""

    def run(self, sc: Any) -> None:
        self.strategy(sc).run()


# name -> "module:attribute" under mosaic_flwr.methods (imported on first use)
ENTRIES: dict[str, str] = {
    "fedavg": "fedavg:FEDAVG",
    "fedprox": "fedprox:FEDPROX",
    "fedrs": "fedrs:FEDRS",
    "fedbn": "fedbn:FEDBN",
    "mosaic": "mosaic.strategy:MOSAIC",
    "feddf": "feddf:FEDDF",
    "feddf-gen": "feddf:FEDDF_GEN",
    "fedftg": "fedftg:FEDFTG",
    "dfrd": "dfrd:DFRD",
    "dense": "dense:DENSE",
    "fedgen": "fedgen:FEDGEN",
}


@cache
def methods() -> dict[str, Method]:
    """Every registered method, by run-config name (in ``ENTRIES`` order)."""
    out = {}
    for name, entry in ENTRIES.items():
        module, _, attribute = entry.partition(":")
        out[name] = getattr(importlib.import_module(f"mosaic_flwr.methods.{module}"), attribute)
    return out


def get_strategy(name: str) -> Callable[[Any], None]:
    """The runner of method ``name`` (called with the ``ServerContext``)."""
    if name not in ENTRIES:
        raise ValueError(f"strategy: {name!r} is not available; allowed: {sorted(ENTRIES)}")
    return methods()[name].run


def __getattr__(name: str):
    if name == "STRATEGIES":  # the registered methods, by name (a dict; imports them on first use)
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
