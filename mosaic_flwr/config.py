"""One typed, validated configuration built from Flower's run config.

Flower's run config is flat (``alpha``, ``local-epochs``, ...) and arrives untyped, so all
casting and validation happens here, once. Defaults live in ``pyproject.toml``
(``[tool.flwr.app.config]``); Flower merges them with the run's overrides before the apps
see them. Named settings (the files in ``conf/``) are Flower run-config TOML files:
``flwr run . --run-config conf/fmnist-dir0.1.toml``, or with ``scripts/flwr_sim.py``, whose
``--run-config`` takes files and ``key=value`` strings merged in order (later wins), so an
explicit value always beats the file's, even one equal to the default.

Keys are namespaced by their owner: a method's own settings are ``<method>.<key>``
(``Method.settings``; Mosaic's ``mosaic.*``, which feddf-gen and the distillation core read too),
the distillation core's ``kd.*`` (``KD``) and differential privacy's ``dp.*`` (``DP``); the rest
is top-level (``SPEC``). A nested table ``[kd]`` in a file is Flower's ``kd.<key>``; the code reads
``cfg.of('kd').steps``. The names from before the namespaces (``RENAMED``, e.g. ``kd-steps``)
still work for one release, each with one warning (``renamed``).

Every value the validators accept runs: each range is the one the consuming code needs
(``tests/test_config_boundaries.py`` runs every numeric key's boundary values through it).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mosaic_flwr.registry import methods as _methods

PROJECT_ROOT = Path(__file__).resolve().parents[1]

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


def _positive_finite(v) -> str | None:
    return None if 0 < v < math.inf else f"must be > 0 and finite, got {v}"


def _non_negative_finite(v) -> str | None:
    return None if 0 <= v < math.inf else f"must be >= 0 and finite, got {v}"


# RDP's conversion to (epsilon, delta) needs an order above log(1/delta) / epsilon: with
# orders up to 512, epsilon >= 0.1 at delta >= 1e-10 is reachable
DP_MIN_EPSILON = 0.1
DP_MIN_DELTA = 1e-10


def _dp_epsilon(v) -> str | None:
    return None if DP_MIN_EPSILON <= v < math.inf else f"must be in [{DP_MIN_EPSILON}, inf), got {v}"


def _at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def _unit_interval(v) -> str | None:
    return None if 0 < v <= 1 else f"must be in (0, 1], got {v}"


def _closed_unit(v) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"


def _below_one(v) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v}"


SEED_LIMIT = 2**32  # numpy's generators need a seed >= 0; the seed-mixing formulas stay in int64


def _or_minus_one(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """-1 (meaning: the key it stands in for) or a value ``check`` accepts."""
    return lambda v: None if v == -1 else (None if check(v) is None else f"{check(v)} (or -1)")


def _seed(v) -> str | None:
    return None if 0 <= v < SEED_LIMIT else f"must be in [0, 2**32), got {v}"


def _kd_steps(v) -> str | None:
    return None if v >= 1 else (f"must be >= 1, got {v} (Mosaic and FedDF distil for kd.steps steps; "
                                "a run without distillation is strategy='fedavg')")


def _retired_preset(v) -> str | None:  # (preset is no key: ``renamed`` reads it)
    return None if v == "" else (f"presets are run-config files now: instead of preset={v!r} pass "
                                 f"--run-config conf/{v}.toml (with scripts/flwr_sim.py or "
                                 "scripts/run.sh, further --run-config values override the file)")


def strategy_names() -> tuple[str, ...]:
    return tuple(_methods())


def distils(strategy: str) -> bool:
    """Whether ``strategy`` has the distillation schedule (warm-up, distillation, fine-tune)."""
    method = _methods().get(strategy)
    return bool(method and method.distils)


def spec() -> dict[str, tuple[type, Callable[[Any], str | None] | None]]:
    """Every key: ``SPEC``, the namespaced tables (``NAMESPACES``) as ``<namespace>.<key>``, and
    each registered method's own settings as ``<method>.<key>``."""
    out = dict(SPEC)
    for name, table in NAMESPACES.items():
        out.update({f"{name}.{key}": setting for key, setting in table.items()})
    for name, method in _methods().items():
        out.update({f"{name}.{key}": setting for key, setting in method.settings.items()})
    return out


def _datasets():
    from mosaic_flwr.data import DATASETS
    return DATASETS


def _models():
    from mosaic_flwr.models import MODELS
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
    from mosaic_flwr.data import PARTITIONS
    return PARTITIONS


# key -> (python type, validator or None). Defaults come from pyproject.toml.
SPEC: dict[str, tuple[type, Callable[[Any], str | None] | None]] = {
    "strategy": (str, _lazy_choice(strategy_names)),
    "dataset": (str, _lazy_choice(_datasets)),
    "data-dir": (str, None),
    "download": (bool, None),
    "partition": (str, _lazy_choice(_partitions)),
    "alpha": (float, _positive),
    "min-partition-size": (int, _positive),
    "partition-cap": (bool, None),
    "test-subset": (int, _non_negative),
    "validation-split": (float, lambda v: None if 0 <= v <= 0.5 else f"must be in [0, 0.5], got {v}"),
    "shards-per-client": (int, _positive),
    "model": (str, _lazy_choice(_models)),
    # --- model heterogeneity: per-client assignments, round-robin over partition ids
    "client-models": (str, _model_list),
    "client-capacities": (str, _capacity_list),
    "submodel": (str, _choice("fixed", "rolling")),
    "num-server-rounds": (int, _positive),
    "fraction-train": (float, _unit_interval),
    "min-train-clients": (int, _positive),
    # local work: exactly one of the two is > 0 (see check_local_work)
    "local-epochs": (int, _non_negative),
    "local-steps": (int, _non_negative),
    "batch-size": (int, _positive),
    "lr": (float, _positive),
    "momentum": (float, _closed_unit),
    "weight-decay": (float, _non_negative),
    "augment": (str, _choice("auto", "off", "crop-flip")),
    "proximal-mu": (float, _non_negative),
    "seed": (int, _seed),
    "output-dir": (str, None),
    "run-name": (str, None),
    "device": (str, _choice(*DEVICES)),
    "eval-batch-size": (int, _positive),
    "client-threads": (int, _positive),
    "server-threads": (int, _non_negative),
    # --- reliability: checkpoints, resume, faults, robust aggregation
    "resume": (str, None),
    "init-from": (str, None),  # a run directory whose final global model(s) this run starts from
    "checkpoint": (bool, None),
    "round-timeout": (float, _positive),
    "connect-timeout": (float, _positive),
    "straggler-quorum": (float, _unit_interval),
    "straggler-factor": (float, _positive_finite),
    "straggler-floor": (float, _non_negative_finite),
    "reply-max-mb": (float, _positive_finite),
    "min-replies": (int, _positive),
    "round-retries": (int, _non_negative),
    "aggregation": (str, _choice("mean", "median", "trimmed-mean")),
    "trim-fraction": (float, lambda v: None if 0 <= v < 0.5 else f"must be in [0, 0.5), got {v}"),
    "max-client-share": (float, _unit_interval),
    "count-clip": (float, lambda v: None if v == 0 or 1 <= v < math.inf else
                   f"must be 0 (no bound) or a finite number >= 1, got {v}"),
    # --- the distillation schedule (Mosaic, FedDF, ...: warm-up rounds, distillation at the end
    # of the last warm-up round, then fine-tune rounds up to num-server-rounds); the
    # distillation itself is the kd.* keys (KD)
    "warmup-rounds": (int, _positive),
    "finetune-lr": (float, _positive),
    "lr-schedule": (str, _choice("auto", "constant", "step")),
    "lr-step-round": (int, lambda v: None if v == -1 or v >= 1 else
                      f"must be -1 (step after warmup-rounds) or a round >= 1, got {v}"),
    "privacy-audit": (bool, None),  # clients audit their uploads at the distillation round (privacy.json)
    "count-floor": (int, _non_negative),
}

# The shared server-side distillation core's settings (mosaic_flwr/distill/server.py), run-config
# keys kd.<key>: the KD steps, the distillation round's client training (local-*, expert-pass),
# the gate, the teachers' report. Read as cfg.of('kd').steps.
KD: dict[str, tuple[type, Callable[[Any], str | None] | None]] = {
    "steps": (int, _kd_steps),
    "batch-size": (int, _positive),
    "lr": (float, _positive),
    "a": (float, _closed_unit),
    "b": (float, _non_negative),
    "temperature": (float, _positive),
    "student-bn": (str, _choice("eval", "train")),
    "gate": (str, _choice("off", "clients", "validation")),
    "gate-statistic": (str, _choice("pooled", "median")),
    "gate-rounds": (int, lambda v: None if v >= -1 else f"must be -1 (to the end of the run) or >= 0, got {v}"),
    "local-steps": (int, _non_negative),
    "local-batch-size": (int, _non_negative),
    "local-momentum": (float, _or_minus_one(_closed_unit)),
    "local-weight-decay": (float, _or_minus_one(_non_negative_finite)),
    "local-lr": (float, _or_minus_one(_positive)),
    "expert-pass": (bool, None),  # the kd.local-* training is a second pass whose model is the expert
    "report-test-subset": (int, _non_negative),
}

# Differential privacy of Mosaic's client uploads (mosaic_flwr/privacy/dp.py), run-config keys
# dp.<key>: on when dp.epsilon > 0 or dp.noise-multiplier > 0; both 0 (the default): off.
# Read as cfg.of('dp').epsilon.
DP: dict[str, tuple[type, Callable[[Any], str | None] | None]] = {
    "epsilon": (float, lambda v: None if v == 0 or v >= DP_MIN_EPSILON else
                f"must be 0 (no DP) or >= {DP_MIN_EPSILON}, got {v}"),
    "delta": (float, lambda v: None if DP_MIN_DELTA <= v < 0.1 else f"must be in [{DP_MIN_DELTA}, 0.1), got {v}"),
    "max-grad-norm": (float, _positive_finite),
    "noise-multiplier": (float, _non_negative_finite),
    "proto-epsilon": (float, _dp_epsilon),
    "proto-clip": (float, _positive_finite),
    "count-epsilon": (float, _dp_epsilon),
    "gate-epsilon": (float, _dp_epsilon),
    "accountant": (str, _choice("rdp", "prv")),
    "audit": (bool, None),  # under DP clients audit only with this, and keep the figures
}

# Settings namespaced by their owner that belong to no method: <namespace>.<key>. Mosaic's own
# (mosaic.*, which feddf-gen and the distillation core read too) are its Method.settings.
NAMESPACES: dict[str, dict[str, tuple[type, Callable[[Any], str | None] | None]]] = {"kd": KD, "dp": DP}

# The names these keys had before issue 40 (old -> new). An old name still works for one
# release: ``renamed`` translates it, with one warning per old name.
RENAMED: dict[str, str] = {
    "dp-epsilon": "dp.epsilon", "dp-delta": "dp.delta", "dp-max-grad-norm": "dp.max-grad-norm",
    "dp-noise-multiplier": "dp.noise-multiplier", "dp-proto-epsilon": "dp.proto-epsilon",
    "dp-proto-clip": "dp.proto-clip", "dp-count-epsilon": "dp.count-epsilon",
    "dp-gate-epsilon": "dp.gate-epsilon", "dp-accountant": "dp.accountant", "dp-audit": "dp.audit",
    "kd-steps": "kd.steps", "kd-batch-size": "kd.batch-size", "kd-lr": "kd.lr", "kd-a": "kd.a", "kd-b": "kd.b",
    "kd-temperature": "kd.temperature", "kd-student-bn": "kd.student-bn", "distill-gate": "kd.gate",
    "gate-statistic": "kd.gate-statistic", "gate-rounds": "kd.gate-rounds",
    "distill-local-steps": "kd.local-steps", "distill-batch-size": "kd.local-batch-size",
    "distill-momentum": "kd.local-momentum", "distill-weight-decay": "kd.local-weight-decay",
    "distill-lr": "kd.local-lr", "expert-pass": "kd.expert-pass", "report-test-subset": "kd.report-test-subset",
    "mosaic-meta": "mosaic.meta", "meta-arch": "mosaic.meta-arch", "meta-data": "mosaic.meta-data",
    "meta-guard": "mosaic.meta-guard", "meta-experts": "mosaic.meta-experts",
    "meta-samples-per-class": "mosaic.meta-samples-per-class", "meta-epochs": "mosaic.meta-epochs",
    "meta-lr": "mosaic.meta-lr", "meta-patience": "mosaic.meta-patience", "meta-holdout": "mosaic.meta-holdout",
    "meta-ema": "mosaic.meta-ema", "meta-prior": "mosaic.meta-prior", "proto-k": "mosaic.proto-k",
    "proto-min-records": "mosaic.proto-min-records", "proto-rounds": "mosaic.proto-rounds",
    "collect-rounds": "mosaic.collect-rounds", "generator-bank-size": "mosaic.generator-bank-size",
    "gen-steps": "mosaic.gen-steps", "gen-batch-size": "mosaic.gen-batch-size", "gen-lr": "mosaic.gen-lr",
    "gen-ce-weight": "mosaic.gen-ce-weight", "gen-div-weight": "mosaic.gen-div-weight",
    "generator": "mosaic.generator", "dcgan-width": "mosaic.dcgan-width",
}
RETIRED = "preset"  # presets are run-config files (conf/NAME.toml); only "" is accepted

_warned: set[str] = set()  # the old names this process has warned about


def _deprecated(old: str, new: str) -> None:
    """One warning line per old name and process, on Flower's logger (what ``flwr run``,
    ``scripts/flwr_sim.py`` and the ServerApp's log show)."""
    if old in _warned:
        return
    _warned.add(old)
    from flwr.common.logger import log
    log(WARNING, "%s is deprecated: use %s (the old name stops working in the next release)", old, new)


def _same(key: str, a: Any, b: Any, keys: Mapping) -> bool:
    try:
        return _cast(key, a, keys) == _cast(key, b, keys)
    except ConfigError:
        return a == b


def renamed(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *,
            warn: bool = True) -> dict[str, Any]:
    """``run_config`` with every old name (``RENAMED``) as its new name, warning once per old
    name (``warn``). An old name whose value is ``""`` is the placeholder ``pyproject.toml``
    declares it with (so that Flower accepts the old name for one release): not given, dropped.
    ``preset`` is dropped when ``""`` and a ``ConfigError`` otherwise. The old and the new name
    both given with different values is a ``ConfigError``; in a run config Flower has merged
    with ``defaults`` (it holds every default's key) the new name at its default counts as not
    given, since Flower wrote it there."""
    out = dict(run_config)
    if RETIRED in out:
        problem = _retired_preset(out.pop(RETIRED))
        if problem:
            raise ConfigError(f"{RETIRED}: {problem}")
    old_names = [k for k in out if k in RENAMED]
    if not old_names:
        return out
    keys = spec()
    fused = defaults is not None and bool(defaults) and set(defaults) <= set(run_config)
    for old in old_names:
        value, new = out.pop(old), RENAMED[old]
        if isinstance(value, str) and value == "":
            continue
        if new in out and not _same(new, out[new], value, keys) and not (
                fused and new in defaults and _same(new, out[new], defaults[new], keys)):
            raise ConfigError(f"{old}: the old name of {new}, given beside it with a different value "
                              f"({old}={value!r}, {new}={out[new]!r}); give only {new}")
        out[new] = value
        if warn:
            _deprecated(old, new)
    return out


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

    def of(self, method: str) -> "Settings":
        """The settings namespaced by ``method`` (keys ``<method>.<key>``: a method's own, or
        ``kd``, ``dp``), read as attributes: ``cfg.of('dense').gen_steps`` is ``dense.gen-steps``,
        ``cfg.of('kd').steps`` is ``kd.steps``."""
        prefix = f"{method}."
        return Settings(method, {k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def __hash__(self) -> int:  # usable as a cache key
        return hash(tuple(sorted(self.values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and dict(self.values) == dict(other.values)

    def replace(self, **changes: Any) -> "Config":
        merged = dict(self.values)  # (an old name in ``changes`` replaces its new one's value)
        merged.update(renamed({k.replace("_", "-"): v for k, v in changes.items()}))
        return build_config(merged, defaults={})

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class Settings:
    """One namespace's settings (see ``Config.of``)."""

    method: str
    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name.replace("_", "-")]
        except KeyError:
            raise AttributeError(f"{self.method}.{name.replace('_', '-')}") from None


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested run-config tables as Flower flattens them: ``{'dense': {'gen-steps': 1}}`` ->
    ``{'dense.gen-steps': 1}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_defaults(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, Any]:
    """The run-config defaults declared in ``pyproject.toml``."""
    with open(pyproject, "rb") as f:
        return flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def merge_run_config(args: Sequence[str], cwd: Path | None = None) -> dict[str, Any]:
    """``--run-config`` arguments merged in order, a later value winning: each is a run-config
    TOML file (a path ending in ``.toml``, e.g. ``conf/fmnist-dir0.1.toml``; relative to
    ``cwd``) or a ``key=value ...`` string as for ``flwr run`` (read by Flower's own parser).

    An old key name (``RENAMED``) is read as its new one, with a warning (``renamed``; within one
    argument the old and the new name with different values is a ``ConfigError``, across
    arguments the later wins as for any key), so the merged keys are the new names.

    ``flwr run`` itself takes a file only alone; the launchers (``scripts/flwr_sim.py``, the
    deploy scripts) merge here and hand Flower one file (``write_run_config``).
    """
    from flwr.common.config import parse_config_args

    merged: dict[str, Any] = {}
    for arg in args:
        if str(arg).strip().endswith(".toml"):
            path = Path(cwd or Path.cwd()) / Path(str(arg).strip()).expanduser()
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except OSError as exc:
                raise ConfigError(f"--run-config: cannot read {path} ({exc.strerror or exc})") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"--run-config: {path} is not valid TOML ({exc})") from None
            merged.update(renamed(flatten(data)))  # [dense] gen-steps = 1 -> dense.gen-steps
        elif str(arg).strip():
            try:
                parsed = parse_config_args([str(arg)])
            except Exception as exc:  # noqa: BLE001  (click's exception for a malformed string)
                raise ConfigError(f"--run-config {arg!r}: {getattr(exc, 'message', exc)}") from None
            merged.update(renamed(parsed))
    return merged


def write_run_config(values: Mapping[str, Any], path: Path) -> Path:
    """Write run-config ``values`` as a TOML file ``flwr run --run-config FILE`` accepts."""
    import tomli_w

    path.write_text(tomli_w.dumps(dict(values)))
    return path


def _cast(key: str, value: Any, keys: Mapping | None = None) -> Any:
    typ, _ = (keys or SPEC)[key]
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


def heterogeneous(models: Iterable[str], capacities: Iterable[float]) -> bool:
    """Whether a federation whose clients hold these model families and widths is
    heterogeneous: more than one family, or any width below full. The one definition, used
    on the config's lists (``build_config``) and on the clients' architectures (strategies)."""
    return len(set(models)) > 1 or width_scaled(capacities)


def config_heterogeneous(values: Mapping[str, Any]) -> bool:
    """``heterogeneous`` for what ``client-models`` / ``client-capacities`` assign."""
    return heterogeneous(split_list(values["client-models"]), split_list(values["client-capacities"]))


def width_scaled(capacities: Iterable[float]) -> bool:
    """Whether some client holds a width-scaled sub-model (its features are a slice's, not
    its family's full model's)."""
    return any(float(c) != 1.0 for c in capacities)


def config_width_scaled(values: Mapping[str, Any]) -> bool:
    """``width_scaled`` for what ``client-capacities`` assigns."""
    return width_scaled(split_list(values["client-capacities"]))


def meta_data_for(meta_data: str, is_heterogeneous: bool, clients: str = "", widths: bool | None = None) -> str:
    """The meta model's training data for a ``mosaic.meta-data`` setting. ``'auto'`` is
    ``'prototypes'`` (real-derived inputs only, the paper's) with one architecture at full
    width, and ``'screened'`` under model heterogeneity: measured on the model-families cell
    (``bench/results/mosaic-paper.md``), a meta model on each family's prototypes through that
    family's experts' heads (``'prototypes'``, allowed when every client is at its family's full
    width) made the teacher 7.7 validation points worse than the experts' mean. With
    width-scaled sub-models (``widths``; default: as ``is_heterogeneous``) prototypes live in a
    slice's feature space that no expert's head reads: ``'prototypes'``/``'both'`` raise a
    ``ConfigError`` there, and ``'clients'`` does under any heterogeneity (it sends one family's
    experts); ``clients`` describes the architectures, for the message."""
    widths = is_heterogeneous if widths is None else widths
    if meta_data == "auto":
        return "screened" if is_heterogeneous else "prototypes"
    held = f"clients hold {clients}" if clients else "client-models/client-capacities assign several"
    if is_heterogeneous and meta_data == "clients":
        raise ConfigError(f"mosaic.meta-data: 'clients' sends the class experts to every client to score its own "
                          f"images, which needs one architecture at full width, but {held}; use 'auto', "
                          "'prototypes', 'generated' or 'screened'")
    if widths and meta_data in ("prototypes", "both"):
        raise ConfigError(f"mosaic.meta-data: {meta_data!r} passes prototypes through the experts' heads, which needs "
                          f"every client at its family's full width (a width-scaled slice's features are not the full "
                          f"model's), but {held}; use 'auto', 'generated' or 'screened'")
    return meta_data


def check_local_work(values: Mapping[str, Any]) -> None:
    """Local work per round is ``local-steps`` SGD steps or ``local-epochs`` passes over the
    client's data: exactly one of the two keys is > 0, so neither is ever ignored."""
    epochs, steps = values["local-epochs"], values["local-steps"]
    if epochs > 0 and steps > 0:
        raise ConfigError(f"local-epochs/local-steps: both set (local-epochs={epochs}, "
                          f"local-steps={steps}); local work is one of them: set local-steps=0 to "
                          "train local-epochs passes, or local-epochs=0 to train local-steps steps")
    if epochs == 0 and steps == 0:
        raise ConfigError("local-epochs/local-steps: both 0, so clients would not train; set one "
                          "of them > 0")


def local_work(cfg: "Config") -> str:
    """What each sampled client does per round, in words (for the log and summary)."""
    if cfg.local_steps > 0:
        return f"{cfg.local_steps} local SGD steps of batch {cfg.batch_size}"
    return f"{cfg.local_epochs} local epoch(s) over the client's data in batches of {cfg.batch_size}"


def check_kd(values: Mapping[str, Any]) -> None:
    """Cross-key problems of the distillation core's keys (``kd.*``)."""
    if values["kd.gate"] == "validation" and values["validation-split"] == 0:
        raise ConfigError("kd.gate: 'validation' reads the validation split, but validation-split is 0; "
                          "set validation-split > 0 (benchmarks) or use kd.gate='clients'")
    if values["kd.local-steps"] > 0 and values["local-steps"] == 0:
        raise ConfigError("kd.local-steps: replaces local-steps at the distillation round, but local "
                          f"work is local-epochs={values['local-epochs']}; set local-steps instead")
    if values["kd.expert-pass"] and values["kd.local-steps"] == 0:
        raise ConfigError("kd.expert-pass: the expert pass trains kd.local-steps steps, which is 0; set "
                          "kd.local-steps > 0 (the authors: 10, with kd.local-batch-size=64)")


def meta_experts_for(chosen: str, meta_data: str, is_heterogeneous: bool, bank_rounds: int) -> str:
    """What Mosaic's meta model fuses for a ``mosaic.meta-experts`` setting (``chosen``), given
    its resolved ``meta_data`` (``meta_data_for``), the federation's heterogeneity and its
    prototype rounds (``proto_rounds``). ``'auto'`` is ``'heads'`` (each class expert's head on
    the features of the model the distillation round's clients received) where the meta model
    learns from that round's prototypes on the server (one architecture at full width,
    ``meta_data`` 'prototypes' or 'both', one prototype round): the teacher then feeds it the
    kind of inputs it learned on, so its guard, scored on held-out prototypes, judges the teacher
    that distils. Elsewhere ``'full'`` (each full expert on the image, the paper's). Measured in
    ``bench/results/mosaic-paper.md``: on CIFAR-10 the full experts' meta teacher passed its guard
    and fell below the mean of the experts; on Fashion-MNIST both are the same (the guard keeps
    the mean)."""
    if chosen != "auto":
        return chosen
    one_space = not is_heterogeneous and meta_data in ("prototypes", "both") and bank_rounds == 1
    return "heads" if one_space else "full"


def check_mosaic_meta(values: Mapping[str, Any]) -> None:
    """Cross-key problems of Mosaic's meta model (``mosaic.meta-*``) with the federation's
    architectures; checked for every strategy, as before the keys were namespaced (Mosaic's
    other checks are its ``Method.check``)."""
    meta_data = meta_data_for(values["mosaic.meta-data"], config_heterogeneous(values),
                              widths=config_width_scaled(values))
    if (meta_data in ("prototypes", "both") and values["mosaic.meta-prior"] == "global" and values["mosaic.meta"]
            and config_heterogeneous(values)):
        raise ConfigError("mosaic.meta-prior: 'global' makes the primary family's global model a token, but under "
                          "model families each family's prototypes pass through that family's models only; use "
                          "mosaic.meta-prior='experts' or mosaic.meta-data='screened'")
    if values["mosaic.meta-experts"] == "heads" and (config_heterogeneous(values)
                                                     or values["mosaic.meta-data"] == "clients"):
        raise ConfigError("mosaic.meta-experts: 'heads' reads every expert's head on the features of the model the "
                          "clients received, which needs one architecture at full width and a server-side meta model (not "
                          f"mosaic.meta-data='clients'); got mosaic.meta-data={values['mosaic.meta-data']!r}, "
                          f"client-models={values['client-models']!r}, client-capacities="
                          f"{values['client-capacities']!r}; use mosaic.meta-experts='full'")


def build_config(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *,
                 warn: bool = True) -> Config:
    """Merge defaults < run-config values (every run-config value wins); cast and validate.
    An old key name (``RENAMED``) is read as its new one, with a warning unless ``warn`` is
    false (``renamed``)."""
    defaults = load_defaults() if defaults is None else dict(defaults)
    keys = spec()
    run_config = renamed(run_config, defaults, warn=warn)
    defaults = renamed(defaults, warn=False)
    unknown = sorted(set(run_config) - set(keys))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; known keys: {sorted(keys)}")
    missing = sorted(set(keys) - set(defaults) - set(run_config))
    if missing:
        raise ConfigError(f"{missing[0]}: no value and no default")
    merged = {k: v for k, v in defaults.items() if k in keys}
    merged.update(run_config)
    values = {key: _cast(key, merged[key], keys) for key in keys}
    for key, (_, check) in keys.items():
        problem = check(values[key]) if check else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
    check_local_work(values)
    if distils(values["strategy"]) and values["warmup-rounds"] > values["num-server-rounds"]:
        raise ConfigError(f"warmup-rounds: {values['warmup-rounds']} exceeds num-server-rounds "
                          f"{values['num-server-rounds']} (distillation happens after the last "
                          "warm-up round)")
    check_mosaic_meta(values)
    check_kd(values)
    from mosaic_flwr.privacy.dp import check_config as dp_check
    problem = dp_check(values)
    if problem:
        raise ConfigError(problem)
    method = _methods()[values["strategy"]]
    if method.check is not None:
        method.check(values)
    return Config(values)


def lr_for_round(cfg: "Config", server_round: int) -> float:
    """The clients' learning rate in ``server_round``, for every strategy (``lr-schedule``):
    ``constant``: ``lr`` in every round; ``step``: ``lr`` up to ``warmup-rounds`` (or up to
    ``lr-step-round`` when that is set: the rate may drop before the distillation round, which
    then distils from models fine-tuned at the lower rate), then ``finetune-lr``; ``auto`` (the default): ``step`` for the distilling methods (their
    fine-tune rounds follow the distillation round), ``constant`` for the others. ``step``
    gives the baselines Mosaic's schedule, so that distillation is compared with FedAvg at
    the same rates, not with a FedAvg that never lowers its rate."""
    schedule = cfg.lr_schedule
    if schedule == "auto":
        schedule = "step" if distils(cfg.strategy) else "constant"
    step_after = cfg.lr_step_round if cfg.lr_step_round > 0 else cfg.warmup_rounds
    if schedule == "step" and server_round > step_after:
        return cfg.finetune_lr
    return cfg.lr


def resolve_device(name: str):
    """``auto`` -> CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use 'auto'")
    return torch.device(name)
