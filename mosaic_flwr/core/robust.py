"""Robust replacements for the weighted mean of client models (``aggregation`` in the config),
and the bound on any one client's share of a weighted mean (``max-client-share``).

A reply that passes validation (right keys, shapes, finite values) can still be poisoned:
scaled, sign-flipped or random weights. The coordinate-wise median and the trimmed mean
bound the influence of a minority of such clients (Yin et al., 2018); both ignore example
counts, which a malicious client could inflate. Where the mean is kept, ``cap_shares``
bounds the normalised weight any one client can claim with inflated counts.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

RULES = ("median", "trimmed-mean")


def bound_counts(counts: dict[int, torch.Tensor], factor: float) -> dict[int, torch.Tensor]:
    """The label counts each client is weighted by (``count-clip``): a client declaring more
    examples in total than ``factor`` times the median total over the clients has its counts
    scaled down to that (rounded down, a class it holds keeps at least 1); the others are
    unchanged. A consistent liar's declared counts then give it at most ``factor`` median
    clients' weight in every count-weighted mean, draw and ranking. ``factor`` 0: no bound."""
    if factor == 0 or not counts:
        return dict(counts)
    if factor < 1:
        raise ValueError(f"count-clip: must be 0 (no bound) or >= 1, got {factor}")
    cap = factor * statistics.median(float(c.sum()) for c in counts.values())
    out = {}
    for key, c in counts.items():
        total = float(c.sum())
        if total <= cap:
            out[key] = c
            continue
        scaled = torch.floor(c.double() * (cap / total)).long()
        out[key] = torch.where(c > 0, scaled.clamp_min(1), torch.zeros_like(scaled))
    return out


def _check(rule: str, trim: float) -> None:
    if rule not in RULES:
        raise ValueError(f"aggregation: unknown rule {rule!r}; allowed: {list(RULES)}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim-fraction: must be in [0, 0.5), got {trim}")


def robust_stack(stack: torch.Tensor, rule: str, trim: float = 0.1) -> torch.Tensor:
    """``rule`` over the leading (client) axis of ``stack [n, ...]``, in ``stack``'s dtype:
    ``median`` (the mean of the two middle values for even n) or ``trimmed-mean`` (drop the
    ``floor(trim * n)`` largest and smallest values, average the rest). Integer entries
    (batch counters) take the maximum."""
    _check(rule, trim)
    n = stack.shape[0]
    if not stack.is_floating_point():
        return stack.max(0).values
    ordered = stack.double().sort(0).values
    if rule == "median":
        # torch.median returns the lower of the two middle values; average them instead.
        return ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).to(stack.dtype)
    k = int(trim * n)
    return ordered[k:n - k].mean(0).to(stack.dtype)


def robust_average(states: Sequence[dict[str, torch.Tensor]], rule: str, *, trim: float = 0.1
                   ) -> dict[str, torch.Tensor]:
    """Entry-wise ``robust_stack`` of ``states`` (same keys and shapes)."""
    _check(rule, trim)
    if not states:
        raise ValueError("robust_average: no states")
    return {key: robust_stack(torch.stack([s[key] for s in states]), rule, trim)
            for key in states[0]}


def robust_stack_masked(stack: torch.Tensor, rule: str, trim: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``robust_stack`` where some clients do not hold some entries: ``stack [n, ...]`` is
    float64 with NaN where a client does not hold the entry. Each entry's median / trimmed
    mean is over its ``c`` holders (``floor(trim * c)`` trimmed at each end).

    Returns ``(values, c)``: float64 values (NaN where ``c == 0``) and the holder counts."""
    _check(rule, trim)
    held = ~torch.isnan(stack)
    c = held.sum(0)
    ordered = stack.sort(0).values  # NaN sorts last: the c held values come first
    if rule == "median":
        lo = ((c - 1).clamp_min(0) // 2).unsqueeze(0)
        hi = (c // 2).clamp_max(stack.shape[0] - 1).unsqueeze(0)
        values = (ordered.gather(0, lo) + ordered.gather(0, hi)).squeeze(0) / 2
    else:
        k = (trim * c.double()).floor().long()
        pos = torch.arange(stack.shape[0], device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
        keep = (pos >= k) & (pos < c - k)
        values = torch.where(keep, ordered, 0.0).sum(0) / (c - 2 * k)
    return torch.where(c > 0, values, float("nan")), c


def cap_shares(weights: Sequence[float] | torch.Tensor, max_share: float) -> torch.Tensor:
    """Normalised weights in which no entry exceeds ``max_share`` (water-filling).

    ``p = weights / sum(weights)``; entries above the bound are set to ``max_share`` and the
    excess is given to the others in proportion to their weights, repeatedly: the result is
    ``min(max_share, c * p)`` with the one ``c >= 1`` that makes it sum to one. Zero weights
    stay zero. When fewer than ``1 / max_share`` entries are positive the bound cannot be
    met: they get equal shares (the closest to it). ``max_share = 1`` returns ``p``.

    Returns a float64 tensor that sums to one.
    """
    p = torch.as_tensor(weights, dtype=torch.float64).flatten().clone()
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError("weights: must be finite, non-negative and sum to a positive value")
    if not 0 < max_share <= 1:
        raise ValueError(f"max-client-share: must be in (0, 1], got {max_share}")
    p /= p.sum()
    if max_share >= 1:
        return p
    positive = p > 0
    m = int(positive.sum())
    if m * max_share <= 1:
        return positive.double() / m
    order = torch.argsort(p, descending=True, stable=True)
    for j in range(m):  # the j largest are capped; the rest scaled by c
        rest = p[order[j:]]
        c = (1 - j * max_share) / rest.sum()
        if c * p[order[j]] <= max_share:
            break
    out = p * c
    out[order[:j]] = max_share
    return out


def as_weights(weights: Sequence[float] | torch.Tensor, n: int) -> list[float]:
    """``weights`` normalised to sum to 1 (``n`` finite non-negative values, positive sum)."""
    values = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if values.numel() != n:
        raise ValueError(f"weights: expected {n} values, got {values.numel()}")
    if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError("weights: must be finite, non-negative and sum to a positive value")
    return (values / values.sum()).tolist()
