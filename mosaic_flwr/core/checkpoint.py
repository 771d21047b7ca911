"""The server's checkpoint: everything needed to continue a run exactly, one file per run.

``<run dir>/checkpoint.pt`` is rewritten atomically after every completed round (a reader,
or a resumed run, sees the previous complete round or the new one, never a torn file). It is
a plain ``torch.save`` of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: no pickled code runs when a checkpoint is read.

What a strategy keeps between rounds goes in ``strategy`` (its ``state_dict()``); the
server's random number generators (Python, NumPy, torch) and the metrics so far are saved
beside it. Clients hold no state between rounds (each round's seed is derived from the run
seed, the round and the partition id), so the server's checkpoint is the whole run's.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mosaic_flwr.core.results import atomic_write

FORMAT = "mosaic-flwr-checkpoint/1"
FILENAME = "checkpoint.pt"
ARTIFACTS = "distillation.pt"   # Mosaic's meta model, generators, prototypes: written once

# Keys that may differ between a run and its resumption: where results go, where the data is
# (that it is the same data is checked separately: the test set's fingerprint and the clients'
# label counts), the hardware, fault handling, and the number of rounds (a finished run can be
# extended).
RESUMABLE_CHANGES = frozenset({"resume", "output-dir", "run-name", "data-dir", "device", "client-threads",
                               "server-threads",
                               "eval-batch-size", "round-timeout", "connect-timeout", "round-retries", "min-replies",
                               "straggler-quorum", "straggler-factor", "straggler-floor", "reply-max-mb",
                               "checkpoint", "num-server-rounds"})


# What a run started from another's model (``init-from``) must share with it: the data each
# client holds (data set, partition and its seed, the validation split) and the models.
WARM_START_KEYS = ("dataset", "partition", "alpha", "min-partition-size", "partition-cap", "shards-per-client",
                   "validation-split", "seed", "model", "client-models", "client-capacities")


# The namespaces whose keys act whatever the strategy (``kd.*``, ``dp.*``, and ``mosaic.*``, which
# feddf-gen and the distillation core read too); a method's own ``<method>.*`` act for it only.
SHARED = ("kd", "dp", "mosaic")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


def rng_state() -> dict[str, Any]:
    """The server process's random number generator states (weights-only loadable)."""
    np_state = np.random.get_state()
    return {"python": _to_lists(random.getstate()), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def save_checkpoint(run_dir: Path, state: dict[str, Any], filename: str = FILENAME) -> Path:
    """Write ``state`` (plus the format tag) to ``run_dir/filename`` atomically, readable by
    its owner only (mode 0600): checkpoints hold models derived from client data (a class
    expert whose class one client holds is that client's model) and ``distillation.pt``
    every client's generator and prototypes."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    path = Path(run_dir) / filename
    atomic_write(path, buf.getvalue(), durable=True, private=True)
    return path


def load_checkpoint(run_dir: Path, filename: str = FILENAME) -> dict[str, Any]:
    """The checkpoint of ``run_dir`` (``weights_only`` load); ``CheckpointError`` naming the
    file and the problem when there is none or it is unreadable."""
    path = Path(run_dir).expanduser().resolve() / filename
    if not path.is_file():
        raise CheckpointError(f"resume: no checkpoint at {path} (a run writes one after every "
                              "round unless checkpoint=false)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated zip, pickle errors, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"resume: {path} is not a readable checkpoint "
                              f"({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"resume: {path} is not a mosaic-flwr checkpoint ({FORMAT})")
    return state


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings that differ between a checkpoint's run and the resuming run (other than
    ``RESUMABLE_CHANGES``), as ``key: saved -> current`` lines."""
    saved, current = _effective(saved), _effective(current)
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _effective(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as it acted: a checkpoint's config from before the settings were namespaced
    holds the old names (``kd-steps``, and ``preset``, which did nothing), read as the new ones
    (``config.renamed``, without a warning: a run folder is not the user's run config);
    checkpoints from before ``local-epochs`` defaulted to 0 hold ``local-epochs=1`` beside
    ``local-steps > 0``, where it did nothing (steps took precedence); another method's own
    settings (``<method>.<key>``) do nothing either (and a checkpoint written before that method
    existed lacks them), while the shared namespaces (``SHARED``) act whatever the strategy, as
    they did as top-level keys; a checkpoint from before ``mosaic.generator`` ran the
    conditional generator."""
    from mosaic_flwr.config import renamed

    config = renamed({k: v for k, v in config.items() if k != "preset"}, warn=False)
    own = f"{config.get('strategy')}."
    out = {k: v for k, v in config.items() if "." not in k or k.startswith(own) or k.split(".", 1)[0] in SHARED}
    out.setdefault("mosaic.generator", "conditional")
    out.setdefault("mosaic.dcgan-width", 64)
    if int(out.get("local-steps", 0) or 0) > 0:
        out["local-epochs"] = 0
    return out


def warm_start_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The ``WARM_START_KEYS`` whose values differ between the run ``init-from`` names and
    this run, as ``key: theirs -> ours`` lines (``saved`` may hold old names: ``_effective``)."""
    from mosaic_flwr.config import renamed

    saved = renamed({k: v for k, v in saved.items() if k != "preset"}, warn=False)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in WARM_START_KEYS
            if saved.get(k) != current.get(k)]
