"""What a strategy declares to the registry (``strategies/__init__.py``): how it runs and the
settings that are its own.

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
    """

    strategy: type
    summary: str
    distils: bool = False
    settings: Mapping[str, Setting] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None
    prepare: Callable[[Any], None] | None = None

    def run(self, sc: Any) -> None:
        self.strategy(sc).run()
