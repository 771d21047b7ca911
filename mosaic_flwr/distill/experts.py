"""Class experts (the mixture of experts) and a batched evaluator for them.

Expert ``k`` is the average of the clients' models weighted by how many class-``k``
samples each client holds:

    theta_k = sum_i n_ik * theta_i / sum_i n_ik

Counts are what each client declares, so a client that inflates them would own every expert
of a class it claims: ``max_share`` caps each client's normalised weight in each expert
(``robust.cap_shares``), and a robust ``average`` (``robust_class_average``) replaces the
weighted mean by the entry-wise median / trimmed mean of the class's holders, unweighted.

``StackedExperts`` evaluates all experts at once with ``torch.func.functional_call`` over
stacked weights and ``torch.vmap`` (one batched forward instead of one forward per expert),
with a per-expert loop as the reference path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mosaic_flwr.core.robust import as_weights, cap_shares, robust_average

StateDict = dict[str, Tensor]


def class_expert_weights(label_counts: Tensor) -> Tensor:
    """Per-class mixing weights over clients.

    Args:
        label_counts: ``[N_clients, C]`` non-negative sample counts.

    Returns:
        ``[C, N_clients]`` float64: row ``k`` is ``counts[:, k] / counts[:, k].sum()``. A
        class that no client holds gets an all-zero row (the caller keeps its previous
        expert).
    """
    if label_counts.dim() != 2:
        raise ValueError(f"label_counts: expected [N_clients, C], got {tuple(label_counts.shape)}")
    counts = label_counts.detach().to(torch.float64)
    if (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError("label_counts: counts must be finite and non-negative")
    totals = counts.sum(dim=0)
    return (counts / totals.clamp_min(1.0)).T.contiguous()



@torch.no_grad()
def weighted_average_states(
    states: Sequence[StateDict], weights: Sequence[float] | Tensor
) -> StateDict:
    """Weighted average of state dicts with identical keys and shapes.

    Weights are normalised to sum to one; states with weight zero are skipped, so one
    non-zero weight returns an exact copy of that state.

    - Floating-point tensors are averaged in at least float32 and cast back to their dtype.
    - Integer (and bool) tensors, e.g. BatchNorm's ``num_batches_tracked``, get the weighted
      average rounded to the nearest integer, in their own dtype. (``num_batches_tracked``
      only matters for BatchNorm with ``momentum=None``; the reference code averages it
      like every other entry, and rounding keeps it a valid count.)

    Always returns new tensors; the inputs are not modified.
    """
    if not states:
        raise ValueError("weighted_average_states: no states")
    keys = states[0].keys()
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise ValueError(f"weighted_average_states: state {i} has different keys")
    used = [(w, s) for w, s in zip(as_weights(weights, len(states)), states) if w > 0]
    averaged = {}
    for key in keys:
        reference = states[0][key]
        if reference.is_floating_point():
            acc_dtype = torch.promote_types(reference.dtype, torch.float32)
        else:
            acc_dtype = torch.float64
        total = torch.zeros(reference.shape, dtype=acc_dtype, device=reference.device)
        for w, state in used:
            total.add_(state[key].to(device=total.device, dtype=acc_dtype), alpha=w)
        if not reference.is_floating_point():
            total = total.round()
        averaged[key] = total.to(reference.dtype)
    return averaged


def build_class_experts(
    client_states: Sequence[StateDict],
    label_counts: Tensor,
    previous: Sequence[StateDict] | None = None,
    average: Callable[[Sequence[StateDict], Tensor], StateDict] = weighted_average_states,
    *,
    max_share: float = 1.0,
) -> list[StateDict]:
    """One expert state dict per class.

    Args:
        client_states: the N clients' state dicts (same architecture).
        label_counts: ``[N, C]`` class counts of those clients.
        previous: the C experts of the previous round, or ``None``.
        average: ``(states, weights) -> state``; the default averages whole state dicts. For
            width-scaled sub-models pass a masked average
            (``mosaic_flwr.core.submodels.masked_average`` over the clients' slices); for
            a robust expert ``robust_class_average`` (or ``submodels.robust_masked_average``).
        max_share: each weight row is passed through ``cap_shares(row, max_share)`` first: no
            client has more than this share of an expert (1.0: no bound, rows as they are).

    Returns:
        C state dicts. Class ``k`` is the ``label_counts[:, k]``-weighted average of the
        client states. A class none of these clients holds keeps ``previous[k]``; with no
        previous experts it falls back to the sample-count-weighted average (FedAvg) of all
        clients. Classes with identical weight rows share one (read-only) state dict: at
        strong label skew most classes have a single owner, so this saves memory and work
        (``StackedExperts`` then evaluates each shared dict once).
    """
    counts = torch.as_tensor(label_counts)
    if counts.dim() != 2 or counts.shape[0] != len(client_states):
        raise ValueError(
            f"label_counts: expected [{len(client_states)}, C], got {tuple(counts.shape)}"
        )
    num_classes = counts.shape[1]
    if previous is not None and len(previous) != num_classes:
        raise ValueError(f"previous: expected {num_classes} experts, got {len(previous)}")
    weights = class_expert_weights(counts)
    cache: dict[tuple[float, ...], StateDict] = {}
    experts = []
    for k in range(num_classes):
        row = weights[k]
        if row.sum() == 0:
            if previous is not None:
                experts.append(previous[k])
                continue
            row = counts.sum(dim=1).to(torch.float64)  # FedAvg fallback
        if max_share < 1:
            row = cap_shares(row, max_share)
        key = tuple(row.tolist())
        if key not in cache:
            cache[key] = average(client_states, row)
        experts.append(cache[key])
    return experts


def robust_class_average(rule: str, trim: float = 0.1
                         ) -> Callable[[Sequence[StateDict], Tensor], StateDict]:
    """An ``average`` for ``build_class_experts``: the entry-wise ``rule`` (``median`` /
    ``trimmed-mean``) of the states with a positive weight (for expert k: the clients that
    hold class k), unweighted: declared counts only decide who holds a class."""
    def average(states: Sequence[StateDict], weights: Tensor) -> StateDict:
        return robust_average([s for s, w in zip(states, weights.tolist()) if w > 0], rule, trim=trim)

    return average


class StackedExperts:
    """All experts' weights stacked along a leading expert axis, evaluated together.

    Experts are frozen and evaluated in eval mode (BatchNorm uses each expert's own running
    statistics) without gradients. Experts given as the same state dict object (as
    ``build_class_experts`` returns for classes with identical weights) are stored and
    evaluated once: at strong label skew, C = 100 classes may need only a few distinct
    forwards.

    Args:
        template: a module with the experts' architecture (its weights are not used; it is
            copied, never modified). Its linear head must be the submodule named ``head``
            (see ``mosaic_flwr.models.classifiers``).
        states: E state dicts for ``template``.
        device: where the stacked weights live and compute happens; default: the
            template's device.
        chunk: at most this many distinct experts per vmapped call (bounds peak memory for
            large E, e.g. 100 ResNet-18 experts); ``None`` evaluates all in one call.

    The stacking is what ``torch.func.stack_module_state`` does, done directly on the state
    dicts, so no module copies are built.
    """

    def __init__(
        self,
        template: nn.Module,
        states: Sequence[StateDict],
        *,
        device: torch.device | str | None = None,
        chunk: int | None = None,
    ):
        if not states:
            raise ValueError("StackedExperts: no expert states")
        if chunk is not None and chunk < 1:
            raise ValueError(f"StackedExperts: chunk must be >= 1, got {chunk}")
        if device is None:
            device = next(template.parameters()).device
        self.device = torch.device(device)
        self.chunk = chunk
        distinct: dict[int, StateDict] = {}
        for state in states:
            distinct.setdefault(id(state), state)
        position = {key: i for i, key in enumerate(distinct)}
        # expert e's outputs are row index[e] of the distinct experts' outputs
        self.index = torch.tensor([position[id(s)] for s in states], device=self.device)
        names = [n for n, _ in template.named_parameters()]
        names += [n for n, _ in template.named_buffers()]
        missing = [n for n in names if n not in states[0]]
        if missing:
            raise KeyError(f"StackedExperts: expert states lack {missing[:5]}")
        with torch.no_grad():
            self.weights = {
                name: torch.stack([s[name].detach() for s in distinct.values()]).to(self.device)
                for name in names
            }
        # Weights-free copy of the architecture: functional_call supplies the tensors.
        self._module = copy.deepcopy(template).to("meta").eval()

    def __len__(self) -> int:
        """E, the number of experts."""
        return self.index.numel()

    @property
    def num_distinct(self) -> int:
        """How many distinct experts are stored and evaluated."""
        return next(iter(self.weights.values())).shape[0]

    def _slices(self) -> list[dict[str, Tensor]]:
        size = self.chunk or self.num_distinct
        return [
            {name: w[start : start + size] for name, w in self.weights.items()}
            for start in range(0, self.num_distinct, size)
        ]

    def _forward_one(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self._module, weights, (x,))

    @torch.no_grad()
    def logits(self, x: Tensor, *, loop: bool | None = None) -> Tensor:
        """Every expert's logits for the input batch ``x``: ``[E, B, C]``.

        ``loop=False``: one vmapped forward over the stacked weights (per chunk).
        ``loop=True``: the reference path, one ordinary forward per distinct expert.
        ``None`` (default) picks the path that is faster on the device: the loop on CPU,
        where vmap turns convolutions into grouped convolutions (measured about 1.7x
        slower for 10 cnn_small or ResNet-18 experts on 2 cores), vmap elsewhere.
        """
        x = x.to(self.device)
        if loop is None:
            loop = self.device.type == "cpu"
        if loop:
            distinct = [
                self._forward_one({n: w[e] for n, w in self.weights.items()}, x)
                for e in range(self.num_distinct)
            ]
            return torch.stack(distinct)[self.index]
        batched = torch.vmap(self._forward_one, in_dims=(0, None))
        return torch.cat([batched(weights, x) for weights in self._slices()])[self.index]

    @torch.no_grad()
    def head_logits(self, features: Tensor, *, loop: bool = False) -> Tensor:
        """Every expert's linear head applied to penultimate ``features [M, d]``:
        ``[M, E, C]`` (the meta model's input layout).

        ``loop=True`` is the reference path: one ``F.linear`` per distinct expert.
        """
        features = features.to(self.device)
        weight, bias = self.weights["head.weight"], self.weights["head.bias"]
        if loop:
            distinct = [
                nn.functional.linear(features, weight[e], bias[e])
                for e in range(self.num_distinct)
            ]
            return torch.stack(distinct, dim=1)[:, self.index]
        return (torch.einsum("md,ecd->mec", features, weight) + bias)[:, self.index]


class ModelMixture:
    """Linear mixtures of the outputs of groups of stacked models.

    ``logits(x) = sum_g W_g @ group_g.logits(x)``: ``[E, B, C]`` from groups of
    ``StackedExperts`` (one group per architecture) and mixing matrices ``W_g [E, E_g]``.
    It stands in for ``StackedExperts`` (``logits``, ``len``, ``device``) where models of
    different architectures must be combined in output space:

    - class experts under model heterogeneity: group ``f`` holds family ``f``'s C class
      experts and ``W_f = diag(w_f)`` with ``w_f[k]`` = family ``f``'s share of class ``k``;
    - FedDF's teacher over clients of several architectures: ``W_g = 1 / N`` (a 1 x E_g row).
    """

    def __init__(self, groups: Sequence[tuple[StackedExperts, Tensor]]):
        if not groups:
            raise ValueError("ModelMixture: no groups")
        rows = {w.shape[0] for _, w in groups}
        if len(rows) != 1 or any(w.shape != (w.shape[0], len(g)) for g, w in groups):
            raise ValueError("ModelMixture: every W_g must be [E, E_g] with the same E")
        self.device = groups[0][0].device
        self.groups = [(g, w.to(self.device, torch.float32)) for g, w in groups]
        self._len = rows.pop()

    def __len__(self) -> int:
        return self._len

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        out = None
        for group, w in self.groups:
            z = torch.einsum("oe,ebc->obc", w, group.logits(x).to(self.device))
            out = z if out is None else out + z
        return out
