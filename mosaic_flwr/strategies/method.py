"""What a strategy declares to the registry (``strategies/__init__.py``): how it runs and the
settings that are its own.

A method's client side, beyond FedAvg's local training, is declared too (``ClientSide``): the
ClientApp's ``train`` handler runs the hooks of the method the run config names, and knows no
method by name.

A method's settings are run-config keys under its name (Flower's nested tables:
``[tool.flwr.app.config.dense]`` in ``pyproject.toml`` holds the defaults, ``--run-config
"dense.gen-steps=100"`` overrides one); ``config.build_config`` casts and validates them like
every other key, and a strategy reads them as ``cfg.of('dense').gen_steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

    ``strategy``: the class (a ``BankStrategy``), built with the ``ServerContext`` and run.
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
