"""Robust replacements for the weighted mean of client models (``aggregation`` in the config).

A reply that passes validation (right keys, shapes, finite values) can still be poisoned:
scaled, sign-flipped or random weights. The coordinate-wise median and the trimmed mean
bound the influence of a minority of such clients (Yin et al., 2018); both ignore example
counts, which a malicious client could inflate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RULES = ("median", "trimmed-mean")


def robust_average(states: Sequence[dict[str, torch.Tensor]], rule: str, *, trim: float = 0.1
                   ) -> dict[str, torch.Tensor]:
    """Entry-wise ``median`` or ``trimmed-mean`` (drop the ``floor(trim * n)`` largest and
    smallest values of every entry, average the rest) of ``states``. Integer entries (batch
    counters) take the maximum."""
    if rule not in RULES:
        raise ValueError(f"aggregation: unknown rule {rule!r}; allowed: {list(RULES)}")
    if not states:
        raise ValueError("robust_average: no states")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim-fraction: must be in [0, 0.5), got {trim}")
    out = {}
    for key, ref in states[0].items():
        stack = torch.stack([s[key] for s in states])
        if not ref.is_floating_point():
            out[key] = stack.max(0).values
        elif rule == "median":
            # torch.median returns the lower of the two middle values; average them instead.
            ordered = stack.double().sort(0).values
            n = len(states)
            out[key] = ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).to(ref.dtype)
        else:
            k = int(trim * len(states))
            ordered = stack.double().sort(0).values
            out[key] = ordered[k:len(states) - k].mean(0).to(ref.dtype)
    return out
