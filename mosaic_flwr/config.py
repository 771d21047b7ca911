"""One typed, validated configuration built from Flower's run config (+ a YAML preset).

Flower's run config is flat (``alpha``, ``local-epochs``, ...) and arrives untyped, so all
casting and validation happens here, once. Defaults live in ``pyproject.toml``
(``[tool.flwr.app.config]``); a preset (``preset='fmnist-dir0.1'`` -> ``conf/fmnist-dir0.1.yaml``)
overrides the defaults, and any run-config value that differs from its default overrides the
preset. (So a value set explicitly to its default cannot override a preset: pick a preset
without that key, or set it in your own preset.)
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

STRATEGY_NAMES = ("fedavg", "fedprox", "mosaic", "feddf")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"unknown value {v!r}; allowed: {list(allowed)}"


def _lazy_choice(names: Callable[[], tuple[str, ...]]) -> Callable[[Any], str | None]:
    return lambda v: None if v in names() else f"unknown value {v!r}; allowed: {sorted(names())}"


def _positive(v) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def _non_negative(v) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def _unit_interval(v) -> str | None:
    return None if 0 < v <= 1 else f"must be in (0, 1], got {v}"


def _closed_unit(v) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"


def _datasets():
    from .data import DATASETS
    return DATASETS


def _models():
    from .models import MODELS
    return tuple(MODELS)


def _model_list(v: str) -> str | None:
    names = split_list(v)
    unknown = [n for n in names if n not in _models()]
    return f"unknown model {unknown[0]!r}; allowed: {sorted(_models())}" if unknown else None


def _capacity_list(v: str) -> str | None:
    try:
        caps = [float(c) for c in split_list(v)]
    except ValueError:
        return f"expected comma-separated numbers in (0, 1], got {v!r}"
    bad = [c for c in caps if not 0 < c <= 1]
    return f"capacity {bad[0]:g} not in (0, 1]" if bad else None


def split_list(value: str) -> list[str]:
    """``'a, b,c'`` -> ``['a', 'b', 'c']``; the empty string -> ``[]``."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _partitions():
    from .data import PARTITIONS
    return PARTITIONS


# key -> (python type, validator or None). Defaults come from pyproject.toml.
SPEC: dict[str, tuple[type, Callable[[Any], str | None] | None]] = {
    "preset": (str, None),
    "strategy": (str, _choice(*STRATEGY_NAMES)),
    "dataset": (str, _lazy_choice(_datasets)),
    "data-dir": (str, None),
    "download": (bool, None),
    "partition": (str, _lazy_choice(_partitions)),
    "alpha": (float, _positive),
    "min-partition-size": (int, _positive),
    "partition-cap": (bool, None),
    "shards-per-client": (int, _positive),
    "model": (str, _lazy_choice(_models)),
    # --- model heterogeneity: per-client assignments, round-robin over partition ids
    "client-models": (str, _model_list),
    "client-capacities": (str, _capacity_list),
    "submodel": (str, _choice("fixed", "rolling")),
    "num-server-rounds": (int, _positive),
    "fraction-train": (float, _unit_interval),
    "min-train-clients": (int, _positive),
    "local-epochs": (int, _non_negative),
    "local-steps": (int, _non_negative),
    "batch-size": (int, _positive),
    "lr": (float, _positive),
    "momentum": (float, _closed_unit),
    "weight-decay": (float, _non_negative),
    "proximal-mu": (float, _non_negative),
    "seed": (int, None),
    "output-dir": (str, None),
    "run-name": (str, None),
    "device": (str, _choice(*DEVICES)),
    "eval-batch-size": (int, _positive),
    "client-threads": (int, _positive),
    "server-threads": (int, _non_negative),
    # --- reliability: checkpoints, resume, faults, robust aggregation
    "resume": (str, None),
    "checkpoint": (bool, None),
    "round-timeout": (float, _positive),
    "min-replies": (int, _positive),
    "round-retries": (int, _non_negative),
    "aggregation": (str, _choice("mean", "median", "trimmed-mean")),
    "trim-fraction": (float, lambda v: None if 0 <= v < 0.5 else f"must be in [0, 0.5), got {v}"),
    "max-client-share": (float, _unit_interval),
    # --- Mosaic / FedDF (schedule: warm-up rounds, distillation at the end of the last
    # warm-up round, then fine-tune rounds up to num-server-rounds)
    "warmup-rounds": (int, _positive),
    "finetune-lr": (float, _positive),
    "mosaic-meta": (bool, None),
    "proto-k": (int, _positive),
    "gen-steps": (int, _positive),
    "gen-batch-size": (int, _positive),
    "gen-lr": (float, _positive),
    "gen-ce-weight": (float, _non_negative),
    "gen-div-weight": (float, _non_negative),
    "meta-arch": (str, _choice("transformer", "gating")),
    "meta-data": (str, _choice("auto", "prototypes", "generated", "both", "screened")),
    "meta-samples-per-class": (int, _positive),
    "meta-epochs": (int, _positive),
    "meta-lr": (float, _positive),
    "meta-patience": (int, _positive),
    "meta-holdout": (float, _closed_unit),
    "meta-ema": (float, _closed_unit),
    "kd-steps": (int, _non_negative),
    "kd-batch-size": (int, _positive),
    "kd-lr": (float, _positive),
    "kd-a": (float, _closed_unit),
    "kd-b": (float, _non_negative),
    "kd-temperature": (float, _positive),
    "kd-student-bn": (str, _choice("eval", "train")),
}


def _attr(key: str) -> str:
    return key.replace("-", "_")


@dataclass(frozen=True)
class Config:
    """The resolved configuration (attribute names are the keys with ``_`` for ``-``)."""

    values: Mapping[str, Any] = field(repr=False)

    def __getattr__(self, name: str) -> Any:
        key = name.replace("_", "-")
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def __hash__(self) -> int:  # usable as a cache key
        return hash(tuple(sorted(self.values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and dict(self.values) == dict(other.values)

    def replace(self, **changes: Any) -> "Config":
        merged = dict(self.values)
        merged.update({k.replace("_", "-"): v for k, v in changes.items()})
        preset = merged.pop("preset")
        resolved = build_config(merged, defaults={**merged, "preset": ""})  # preset already applied
        return Config({**resolved.values, "preset": preset})

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def load_defaults(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, Any]:
    """The run-config defaults declared in ``pyproject.toml``."""
    with open(pyproject, "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset: unknown value {name!r}; allowed: {available_presets()}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset: {path} must hold a mapping of run-config keys")
    unknown = sorted(set(data) - set(SPEC))
    if unknown:
        raise ConfigError(f"preset: {path.name} has unknown keys {unknown}")
    return data


def _cast(key: str, value: Any) -> Any:
    typ, _ = SPEC[key]
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None


def build_config(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Config:
    """Merge defaults < preset < explicit run-config values; cast and validate every key."""
    defaults = load_defaults() if defaults is None else dict(defaults)
    unknown = sorted(set(run_config) - set(SPEC))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; known keys: {sorted(SPEC)}")
    missing = sorted(set(SPEC) - set(defaults) - set(run_config))
    if missing:
        raise ConfigError(f"{missing[0]}: no value and no default")
    merged = {k: v for k, v in defaults.items() if k in SPEC}
    preset_name = str(run_config.get("preset", defaults.get("preset", "")))
    if preset_name:
        merged.update(load_preset(preset_name))
    for key, value in run_config.items():
        if key not in defaults or value != defaults[key]:
            merged[key] = value
    merged["preset"] = preset_name
    values = {key: _cast(key, merged[key]) for key in SPEC}
    for key, (_, check) in SPEC.items():
        problem = check(values[key]) if check else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
    if values["strategy"] in ("mosaic", "feddf") and values["warmup-rounds"] > values["num-server-rounds"]:
        raise ConfigError(f"warmup-rounds: {values['warmup-rounds']} exceeds num-server-rounds "
                          f"{values['num-server-rounds']} (distillation happens after the last "
                          "warm-up round)")
    hetero = len(set(split_list(values["client-models"]))) > 1 or any(
        float(c) != 1.0 for c in split_list(values["client-capacities"]))
    if hetero and values["meta-data"] in ("prototypes", "both"):
        raise ConfigError(f"meta-data: {values['meta-data']!r} passes prototypes through every "
                          "expert's head, which needs one architecture at full width; with "
                          "client-models/client-capacities use 'auto', 'generated' or 'screened'")
    return Config(values)


def resolve_device(name: str):
    """``auto`` -> CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use 'auto'")
    return torch.device(name)
