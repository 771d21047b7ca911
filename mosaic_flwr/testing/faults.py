"""A hostile client for the in-process grid (``InProcessGrid``'s ``hook``): the node of one partition
lies in every reply it sends, its declared counts multiplied and its model poisoned
(``inflating_attacker``), consistently, so that every check the server can make without its data
passes. The attack study (``bench/studies/attack.toml``), the robustness tests and the archived
lying ClientApp (``bench/archive/liar_client.py``) use it."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

__all__ = ["POISONS", "inflate_reply", "inflating_attacker", "poison_state"]

POISONS = ("random", "negated")


def poison_state(state: dict, poison: str, gen) -> dict:
    """The poisoned model: every floating tensor but BatchNorm's running statistics replaced by
    random normal values of the tensor's own standard deviation (``random``: as large as a
    trained model's weights, but meaningless) or by -10 times itself (``negated``)."""
    if poison not in POISONS:
        raise ValueError(f"poison: unknown value {poison!r}; allowed: {list(POISONS)}")
    out = {}
    for key, value in state.items():
        if not value.is_floating_point() or "running_" in key:
            out[key] = value
        elif poison == "random":
            scale = value.std() if value.numel() > 1 else value.abs()
            out[key] = torch.randn(value.shape, generator=gen, dtype=value.dtype) * scale
        else:
            out[key] = -10 * value
    return out


def inflate_reply(content, message_type: str, factor: int, poison: str, gen) -> dict | None:
    """The lie, in place, in the reply ``content`` of a ``message_type`` message: every count it
    declares times ``factor``, consistently, so the server's checks pass (the example count, the
    label counts, a gate/evaluation reply's ``correct-*``: the same accuracy on ``factor`` x the
    examples, so its vote weighs ``factor`` x); a training reply's model replaced by the poisoned
    one, returned (``None``: a reply without a model)."""
    metrics = content.metric_records.get("metrics")
    if metrics is not None:
        if "num-examples" in metrics:
            metrics["num-examples"] = int(metrics["num-examples"]) * factor
        if message_type == "query" and "counts" in metrics:
            metrics["counts"] = [int(c) * factor for c in metrics["counts"]]
        if message_type == "evaluate":
            for key in [k for k in metrics if k.startswith("correct-")]:
                metrics[key] = int(metrics[key]) * factor
    if "label-counts" in content.metric_records:
        record = content.metric_records["label-counts"]
        record["counts"] = [int(c) * factor for c in record["counts"]]
    if "arrays" not in content.array_records:
        return None
    state = poison_state(content.array_records["arrays"].to_torch_state_dict(), poison, gen)
    content["arrays"] = ArrayRecord(state)
    return state


def inflating_attacker(partition: int = 0, factor: int = 1000, poison: str = "random", seed: int = 0):
    """An ``InProcessGrid`` hook: the node of ``partition`` lies in every reply (``inflate_reply``).
    ``hook.declared``: the label counts it declared at discovery; ``hook.sent``: the poisoned states
    by server round; ``hook.replies``: how many of its replies of each message type went through it."""
    gen = torch.Generator().manual_seed(seed)

    def hook(grid, node: int, incoming, reply):
        if grid.contexts[node].node_config.get("partition-id") != partition or reply.has_error():
            return reply
        kind = incoming.metadata.message_type
        state = inflate_reply(reply.content, kind, factor, poison, gen)
        hook.replies[kind] = hook.replies.get(kind, 0) + 1
        if kind == "query":
            hook.declared = list(reply.content.metric_records["metrics"]["counts"])
        if state is not None:
            hook.sent[int(incoming.content.config_records["config"]["server-round"])] = state
        return reply

    hook.declared, hook.sent, hook.replies = None, {}, {}
    return hook
