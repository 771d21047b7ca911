"""Width-scaled sub-models and their masked aggregation (HeteroFL and FedRolex).

A sub-model of width ``r`` has the global model's keys, with every hidden channel count
scaled by ``r``. An ``IndexPlan`` says which entries of each global tensor it holds: per
key, one entry per dimension, either ``None`` (the whole dimension) or a ``LongTensor`` of
global indices. The held entries of a tensor are the Cartesian product of its dimensions'
index sets.

- HeteroFL ("fixed", Diao et al., 2021): a sub-model always holds the *first* ``u`` of the
  ``U`` channels of every layer, so the leading channels are trained by every client and
  the trailing ones only by the widest clients.
- FedRolex ("rolling", Alam et al., 2022): the window of held channels rolls with the
  round: channels ``(offset + j) % U`` for ``j < u``. The same ``offset`` is used for every
  dimension and reduced modulo that dimension's ``U``, so a layer's output channels and the
  next layer's input channels (same ``U``) select the same channels. Over rounds every
  channel is trained by small clients too.

A dimension can group several entries per channel (``channel_blocks``): dim 1 of a linear
layer after a flatten of ``[C, h, w]`` has ``C`` units of ``h * w`` contiguous entries.

Aggregation (``masked_average``) averages each entry of each global tensor over the clients
that hold it:

    theta[e] = sum_{i holds e} w_i * theta_i[e] / sum_{i holds e} w_i

and an entry no client (with positive weight) holds keeps the ``base`` (previous global)
value. With every client holding the full model this is ``weighted_average_states``.
``robust_masked_average`` is the robust counterpart (``aggregation='median'`` /
``'trimmed-mean'``): each entry's median / trimmed mean over the clients that hold it,
unweighted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mosaic_flwr.core.robust import as_weights, robust_stack, robust_stack_masked

IndexPlan = dict[str, tuple[Tensor | None, ...]]

SLICE_MODES = ("fixed", "rolling")


def submodel_plan(
    global_shapes: Mapping[str, Sequence[int]],
    sub_shapes: Mapping[str, Sequence[int]],
    *,
    mode: str = "fixed",
    offset: int = 0,
    channel_blocks: Mapping[str, tuple[int, int]] | None = None,
) -> IndexPlan:
    """Which global entries a sub-model of shapes ``sub_shapes`` holds.

    Args:
        global_shapes, sub_shapes: key -> shape, same keys and ranks; every sub size must
            be <= the global size.
        mode: ``"fixed"`` (HeteroFL: the first units) or ``"rolling"`` (FedRolex: units
            ``(offset + j) % U``).
        offset: the rolling window's start (e.g. the round number); reduced modulo each
            dimension's unit count. Ignored in fixed mode.
        channel_blocks: key -> ``(dim, m)``: in that dimension one unit (channel) is ``m``
            contiguous entries; every other dimension has units of one entry.

    Returns:
        key -> per-dimension ``None`` (sizes equal: whole dimension) or an int64 tensor of
        global indices, ordered as in the sub-model.

    Raises:
        ValueError: naming the key (and dimension) on mismatched keys or ranks, a sub size
            larger than the global one, a block size that does not divide both sizes, or an
            unknown mode.
    """
    if mode not in SLICE_MODES:
        raise ValueError(f"submodel_plan: unknown mode {mode!r}; allowed: {list(SLICE_MODES)}")
    if global_shapes.keys() != sub_shapes.keys():
        missing = sorted(set(global_shapes) - set(sub_shapes))
        extra = sorted(set(sub_shapes) - set(global_shapes))
        raise ValueError(
            f"submodel_plan: keys differ; missing in sub-model: {missing[:5]}, "
            f"not in global model: {extra[:5]}"
        )
    blocks = dict(channel_blocks or {})
    plan: IndexPlan = {}
    for key, gshape in global_shapes.items():
        gshape, sshape = tuple(gshape), tuple(sub_shapes[key])
        if len(gshape) != len(sshape):
            raise ValueError(f"submodel_plan: {key!r} has shape {sshape} in the sub-model "
                             f"but {gshape} in the global model (different ranks)")
        dims: list[Tensor | None] = []
        for dim, (big, small) in enumerate(zip(gshape, sshape)):
            if small > big:
                raise ValueError(f"submodel_plan: {key!r} dim {dim}: sub-model size {small} "
                                 f"exceeds global size {big}")
            if small == big:
                dims.append(None)
                continue
            block_dim, m = blocks.get(key, (dim, 1))
            if block_dim != dim:
                m = 1
            if m < 1 or big % m or small % m:
                raise ValueError(f"submodel_plan: {key!r} dim {dim}: block size {m} does not "
                                 f"divide sizes {big} (global) and {small} (sub-model)")
            units_total, units = big // m, small // m
            chosen = torch.arange(units)
            if mode == "rolling":
                chosen = (chosen + offset % units_total) % units_total
            dims.append((chosen[:, None] * m + torch.arange(m)).flatten())
        plan[key] = tuple(dims)
    return plan


def model_plan(full: nn.Module, sub: nn.Module, *, mode: str = "fixed",
               offset: int = 0) -> IndexPlan:
    """``submodel_plan`` for two modules' state dicts, with ``full.channel_blocks``."""
    return submodel_plan(
        {k: v.shape for k, v in full.state_dict().items()},
        {k: v.shape for k, v in sub.state_dict().items()},
        mode=mode, offset=offset, channel_blocks=getattr(full, "channel_blocks", {}),
    )


def _grid(index: tuple[Tensor | None, ...], shape: Sequence[int],
          device: torch.device) -> tuple[Tensor, ...]:
    """Broadcastable index tensors selecting the product of ``index``'s dimensions."""
    n = len(shape)
    grids = []
    for dim, (idx, size) in enumerate(zip(index, shape)):
        idx = torch.arange(size, device=device) if idx is None else idx.to(device)
        view = [1] * n
        view[dim] = -1
        grids.append(idx.view(view))
    return tuple(grids)


def _sub_shape(index: tuple[Tensor | None, ...], shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(size if idx is None else idx.numel() for idx, size in zip(index, shape))


def _check_plan_keys(plan: IndexPlan, state: Mapping[str, Tensor], what: str) -> None:
    if plan.keys() != state.keys():
        raise ValueError(f"{what}: plan and state keys differ "
                         f"(e.g. {sorted(set(plan) ^ set(state))[:5]})")


@torch.no_grad()
def slice_state(state: Mapping[str, Tensor], plan: IndexPlan) -> dict[str, Tensor]:
    """The sub-model's state: ``state`` (global shapes) restricted to ``plan``'s entries.

    Returns new contiguous tensors; ``state`` is not modified.
    """
    _check_plan_keys(plan, state, "slice_state")
    out = {}
    for key, tensor in state.items():
        index = plan[key]
        if len(index) != tensor.dim():
            raise ValueError(f"slice_state: {key!r} has {tensor.dim()} dims, plan has "
                             f"{len(index)}")
        piece = tensor
        for dim, idx in enumerate(index):
            if idx is not None:
                piece = piece.index_select(dim, idx.to(tensor.device))
        out[key] = piece.clone() if piece is tensor else piece.contiguous()
    return out


@torch.no_grad()
def unslice_state(sub_state: Mapping[str, Tensor], plan: IndexPlan,
                  like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``like`` (global shapes) with ``plan``'s entries taken from ``sub_state``.

    ``unslice_state(slice_state(s, p), p, like=s)`` equals ``s``. Inputs are not modified.
    """
    _check_plan_keys(plan, like, "unslice_state")
    _check_plan_keys(plan, sub_state, "unslice_state")
    out = {}
    for key, full in like.items():
        index, piece = plan[key], sub_state[key]
        expected = _sub_shape(index, full.shape)
        if len(index) != full.dim() or tuple(piece.shape) != expected:
            raise ValueError(f"unslice_state: {key!r} has shape {tuple(piece.shape)}, "
                             f"plan expects {expected}")
        result = full.clone()
        if full.dim() == 0:
            result.copy_(piece)
        else:
            result.index_put_(_grid(index, full.shape, full.device),
                              piece.to(device=full.device, dtype=full.dtype))
        out[key] = result
    return out


@torch.no_grad()
def masked_average(
    base: Mapping[str, Tensor],
    states: Sequence[Mapping[str, Tensor]],
    plans: Sequence[IndexPlan | None],
    weights: Sequence[float] | Tensor,
) -> dict[str, Tensor]:
    """HeteroFL/FedRolex aggregation of (sub-)model states into the global shapes of ``base``.

    Args:
        base: the previous global state; entries no client holds keep its value.
        states: client ``i``'s state, in the shapes ``plans[i]`` selects.
        plans: client ``i``'s ``IndexPlan``, or ``None`` for the full model.
        weights: one per client; finite, >= 0, positive sum. Clients with weight 0 hold
            nothing.

    Returns:
        New tensors with ``base``'s keys, shapes and dtypes: each entry is the weighted
        average over the clients holding it (see the module docstring). Floating tensors
        are accumulated in at least float32; integer tensors (e.g. ``num_batches_tracked``)
        get the rounded average, as in ``weighted_average_states``.
    """
    if len(plans) != len(states):
        raise ValueError(f"masked_average: {len(states)} states but {len(plans)} plans")
    if not states:
        raise ValueError("masked_average: no states")
    normalised = as_weights(weights, len(states))
    for i, (state, plan) in enumerate(zip(states, plans)):
        if state.keys() != base.keys():
            raise ValueError(f"masked_average: state {i} has different keys than base")
        if plan is not None and plan.keys() != base.keys():
            raise ValueError(f"masked_average: plan {i} has different keys than base")
    used = [(i, w, s, p) for i, (w, s, p) in enumerate(zip(normalised, states, plans)) if w > 0]
    averaged = {}
    for key, reference in base.items():
        if reference.is_floating_point():
            acc_dtype = torch.promote_types(reference.dtype, torch.float32)
        else:
            acc_dtype = torch.float64
        device = reference.device
        total = torch.zeros(reference.shape, dtype=acc_dtype, device=device)
        held = torch.zeros(reference.shape, dtype=acc_dtype, device=device)
        for i, w, state, plan in used:
            index = (None,) * reference.dim() if plan is None else plan[key]
            expected = _sub_shape(index, reference.shape)
            value = state[key].to(device=device, dtype=acc_dtype)
            if len(index) != reference.dim() or tuple(value.shape) != expected:
                raise ValueError(f"masked_average: client {i} {key!r} has shape "
                                 f"{tuple(value.shape)}, its plan expects {expected}")
            if all(idx is None for idx in index):
                total.add_(value, alpha=w)
                held.add_(w)
            else:
                grid = _grid(index, reference.shape, device)
                total.index_put_(grid, value * w, accumulate=True)
                held.index_put_(grid, torch.tensor(w, dtype=acc_dtype, device=device),
                                accumulate=True)
        mean = total / held.clamp_min(torch.finfo(acc_dtype).tiny)
        if not reference.is_floating_point():
            mean = mean.round()
        averaged[key] = torch.where(held > 0, mean.to(reference.dtype), reference)
    return averaged


@torch.no_grad()
def robust_masked_average(
    base: Mapping[str, Tensor],
    states: Sequence[Mapping[str, Tensor]],
    plans: Sequence[IndexPlan | None],
    rule: str,
    *,
    trim: float = 0.1,
    weights: Sequence[float] | Tensor | None = None,
) -> dict[str, Tensor]:
    """The robust ``masked_average``: each entry of each global tensor is the ``rule``
    (``median`` / ``trimmed-mean``, see ``mosaic_flwr.core.robust``) of the values of the
    clients that hold it, unweighted; an entry nobody holds keeps ``base``'s value.

    ``weights`` (optional) only selects the clients: those with weight 0 hold nothing. A
    tensor every used client holds whole gets exactly ``robust_average``'s value; integer
    tensors take the maximum over their holders.
    """
    if len(plans) != len(states):
        raise ValueError(f"robust_masked_average: {len(states)} states but {len(plans)} plans")
    if not states:
        raise ValueError("robust_masked_average: no states")
    used = list(range(len(states))) if weights is None else [
        i for i, w in enumerate(as_weights(weights, len(states))) if w > 0]
    for i in used:
        if states[i].keys() != base.keys() or (plans[i] is not None and plans[i].keys() != base.keys()):
            raise ValueError(f"robust_masked_average: state or plan {i} has different keys than base")
    out = {}
    for key, reference in base.items():
        device = reference.device
        indices = [(None,) * reference.dim() if plans[i] is None else plans[i][key] for i in used]
        for i, index in zip(used, indices):
            expected = _sub_shape(index, reference.shape)
            if len(index) != reference.dim() or tuple(states[i][key].shape) != expected:
                raise ValueError(f"robust_masked_average: client {i} {key!r} has shape "
                                 f"{tuple(states[i][key].shape)}, its plan expects {expected}")
        if all(idx is None for index in indices for idx in index):
            out[key] = robust_stack(torch.stack([states[i][key].to(device) for i in used]), rule, trim)
            continue
        if reference.is_floating_point():
            stack = torch.full((len(used), *reference.shape), float("nan"), dtype=torch.float64,
                               device=device)
        else:
            stack = torch.full((len(used), *reference.shape), torch.iinfo(reference.dtype).min,
                               dtype=reference.dtype, device=device)
        held = torch.zeros((len(used), *reference.shape), dtype=torch.bool, device=device)
        for row, (i, index) in enumerate(zip(used, indices)):
            grid = _grid(index, reference.shape, device)
            stack[row].index_put_(grid, states[i][key].to(device=device, dtype=stack.dtype))
            held[row].index_put_(grid, torch.tensor(True, device=device))
        if reference.is_floating_point():
            values, count = robust_stack_masked(stack, rule, trim)
            values = values.to(reference.dtype)
        else:
            values, count = stack.max(0).values, held.sum(0)
        out[key] = torch.where(count > 0, values, reference)
    return out
