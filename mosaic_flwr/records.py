"""torch <-> Flower records, and validation of every payload that arrives.

This and the strategies/apps are the only modules that import flwr.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (tensors detached and moved to the CPU)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def state_problem(state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be loaded in place of ``template`` (None when it can): same keys,
    shapes and dtype kinds, finite floating values."""
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing or extra:
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in template.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key}: not a tensor"
        if tuple(value.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.is_floating_point() != ref.is_floating_point():
            return f"{key}: dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key}: non-finite values"
    return None


def reply_problem(msg: Message, template: Mapping[str, torch.Tensor]) -> str | None:
    """Validate a baseline train reply: one ArrayRecord ``arrays`` matching the template and a
    MetricRecord ``metrics`` with a positive ``num-examples``."""
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if ARRAYS not in content.array_records:
        return "no 'arrays' record"
    if METRICS not in content.metric_records:
        return "no 'metrics' record"
    n = content.metric_records[METRICS].get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
        return f"bad {NUM_EXAMPLES}: {n!r}"
    try:
        state = record_to_state(content.array_records[ARRAYS])
    except Exception as exc:  # undecodable arrays
        return f"arrays do not decode: {exc}"
    return state_problem(state, template)
