"""Per-class prototypes: k-means centres of penultimate features.

A client summarises each of its classes by ``k`` k-means centres of the features its
(global) backbone computes, or by the class mean when it holds fewer than ``k`` samples of
that class; with ``min_records`` (the ``mosaic.proto-min-records`` setting) every prototype is the
mean of at least that many records, and a class with fewer records sends none. Unlike the
authors' code (which kept only the first 10 centres whatever ``k`` was), every one of the
``k`` centres is returned.

A class with more than ``MAX_PER_CLASS`` (1000) samples is summarised from a random subset
of that many (``per_class_subset``): ``k`` centres (5 by default) are estimated as well from
1000 points as from 3000, and computing the features of every sample was most of the
prototypes' cost (a client of the default run holds up to ~3000 samples of a class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


MAX_PER_CLASS = 1000


def per_class_subset(labels: Tensor, max_per_class: int = MAX_PER_CLASS, *, seed: int = 0) -> Tensor:
    """Sorted indices of a random subset of ``labels`` with at most ``max_per_class`` of each
    class (every sample of a smaller class). Deterministic for a ``seed``; global RNG untouched."""
    if max_per_class < 1:
        raise ValueError(f"per_class_subset: max_per_class must be >= 1, got {max_per_class}")
    labels = labels.long().cpu()
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).squeeze(1)
        if members.numel() > max_per_class:
            members = members[torch.randperm(members.numel(), generator=generator)[:max_per_class]]
        keep.append(members)
    if not keep:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(keep).sort().values


def _squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``[N, k]`` squared Euclidean distances between rows of ``x`` and ``centres``."""
    return torch.cdist(x, centres).pow(2)


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre is a point drawn with probability proportional to
    its squared distance from the nearest centre chosen so far."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    centres = [x[first]]
    nearest = _squared_distances(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = nearest.sum()
        if total > 0:
            probs = (nearest / total).cpu()
            index = torch.multinomial(probs, 1, generator=generator).item()
        else:  # every point coincides with a centre already: any choice is as good
            index = torch.randint(n, (1,), generator=generator).item()
        centres.append(x[index])
        nearest = torch.minimum(nearest, _squared_distances(x, x[index : index + 1]).squeeze(1))
    return torch.stack(centres)


def _lloyd(x: Tensor, centres: Tensor, iters: int) -> tuple[Tensor, float]:
    """Lloyd iterations from ``centres``; returns the final centres and their inertia.

    A cluster left empty is re-seeded with the point farthest from its own centre (distinct
    points for several empty clusters). Stops early once the assignment is stable.
    """
    k = centres.shape[0]
    previous = None
    for _ in range(iters):
        distance, assignment = _squared_distances(x, centres).min(dim=1)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        centres = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel() > 0:
            farthest = distance.topk(empty.numel()).indices
            centres[empty] = x[farthest]
        elif previous is not None and torch.equal(assignment, previous):
            break
        previous = assignment
    inertia = _squared_distances(x, centres).min(dim=1).values.sum().item()
    return centres, inertia


@torch.no_grad()
def kmeans(x: Tensor, k: int, *, iters: int = 50, seed: int = 0, n_init: int = 3) -> Tensor:
    """k-means clustering of the rows of ``x`` (``[N, d]``); returns ``[k, d]`` centres.

    k-means++ seeding followed by at most ``iters`` Lloyd iterations, repeated ``n_init``
    times; the run with the lowest inertia (sum of squared distances to the nearest centre)
    wins. Deterministic for a given ``seed`` (its own ``torch.Generator``; the global RNG
    is untouched). Computed in float32 at least, returned in ``x``'s floating dtype.

    Raises ``ValueError`` unless ``1 <= k <= N``: the caller decides what to do with
    classes that have fewer than ``k`` samples (see ``class_prototypes``).
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans: expected a [N, d] tensor, got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: need 1 <= k <= N, got k={k}, N={x.shape[0]}")
    if iters < 1 or n_init < 1:
        raise ValueError(f"kmeans: iters and n_init must be >= 1, got {iters}, {n_init}")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    points = x.detach().to(torch.promote_types(out_dtype, torch.float32))
    generator = torch.Generator().manual_seed(seed)
    best_centres, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres, inertia = _lloyd(points, _kmeans_plus_plus(points, k, generator), iters)
        if inertia < best_inertia:
            best_centres, best_inertia = centres, inertia
    return best_centres.to(out_dtype)


def clusters_of_at_least(points: Tensor, centres: Tensor, min_size: int) -> tuple[Tensor, Tensor]:
    """The means of a partition of ``points`` in which every cluster holds at least
    ``min_size`` of them (``len(points) >= min_size``): the points go to their nearest
    centre, then the smallest cluster below ``min_size`` gives up its centre and its points
    go to the nearest remaining one, until none is below. Returns ``(means [k', d],
    assignment [N])``: each mean is exactly the mean of the points assigned to it."""
    if len(points) < min_size:
        raise ValueError(f"clusters_of_at_least: {len(points)} points, fewer than {min_size}")
    centres = centres.clone()
    while True:
        assignment = _squared_distances(points, centres).argmin(dim=1)
        sizes = torch.bincount(assignment, minlength=len(centres))
        small = torch.nonzero(sizes < min_size).squeeze(1)
        if small.numel() == 0:
            break
        drop = small[sizes[small].argmin()]
        centres = torch.cat([centres[:drop], centres[drop + 1:]])
    sums = torch.zeros_like(centres).index_add_(0, assignment, points)
    return sums / sizes.unsqueeze(1).to(points.dtype), assignment


@torch.no_grad()
def class_prototypes(
    features: Tensor,
    labels: Tensor,
    k: int,
    *,
    seed: int = 0,
    iters: int = 50,
    n_init: int = 3,
    min_records: int = 1,
) -> tuple[Tensor, Tensor]:
    """Prototypes of every class present in ``labels``.

    For each class, in increasing label order: at most ``k`` k-means centres of its features,
    each the mean of at least ``min_records`` of them (a class with fewer sends none). With
    ``min_records=1``: all ``k`` centres when it has at least ``k`` samples, otherwise its mean
    feature (one prototype). With ``min_records=m > 1`` no prototype is a record's features or
    the mean of a handful of records: k-means with ``min(k, n // m)`` centres, then clusters
    below ``m`` merged into their nearest neighbours (``clusters_of_at_least``), each prototype
    the exact mean of its cluster.

    Args:
        features: ``[N, d]`` features (e.g. ``model.features(x)``).
        labels: ``[N]`` integer labels.
        k: centres per class.
        seed, iters, n_init: passed to ``kmeans`` (the same seed for every class).
        min_records: the fewest records a prototype is the mean of.

    Returns:
        ``(prototypes [M, d], prototype_labels [M] long)``; ``M = 0`` when ``N = 0``.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            "class_prototypes: expected features [N, d] and labels [N], got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if k < 1 or min_records < 1:
        raise ValueError(f"class_prototypes: k and min_records must be >= 1, got {k}, {min_records}")
    labels = labels.long()
    dtype = features.dtype if features.is_floating_point() else torch.float32
    prototypes, prototype_labels = [], []
    for label in torch.unique(labels).tolist():
        members = features[labels == label].to(dtype)
        n = members.shape[0]
        if n < min_records:
            continue
        if min_records > 1:
            centres = kmeans(members, min(k, n // min_records), iters=iters, seed=seed, n_init=n_init)
            centres = clusters_of_at_least(members.to(centres.dtype), centres, min_records)[0].to(dtype)
        elif n >= k:
            centres = kmeans(members, k, iters=iters, seed=seed, n_init=n_init)
        else:
            centres = members.mean(dim=0, keepdim=True)
        prototypes.append(centres)
        prototype_labels.append(torch.full((centres.shape[0],), label, dtype=torch.long))
    if not prototypes:
        empty = features.new_zeros((0, features.shape[1]), dtype=dtype)
        return empty, torch.zeros(0, dtype=torch.long, device=features.device)
    return torch.cat(prototypes), torch.cat(prototype_labels).to(features.device)


def nearest_prototype_labels(features: Tensor, proto_features: Tensor, proto_labels: Tensor) -> Tensor:
    """The label of each feature row's nearest prototype (Euclidean): ``[N]``."""
    if proto_features.shape[0] == 0:
        raise ValueError("nearest_prototype_labels: no prototypes")
    nearest = _squared_distances(features.float(), proto_features.float()).argmin(dim=1)
    return proto_labels[nearest]


@torch.no_grad()
def screen_by_prototypes(x: Tensor, y: Tensor, owners: Tensor, models: Sequence[nn.Module],
                         prototypes: Sequence[tuple[Tensor, Tensor] | None], *,
                         batch_size: int = 256) -> Tensor:
    """Keep-mask for labelled generator samples: sample ``i`` made by client ``o = owners[i]``
    for class ``y[i]`` is kept when, in client ``o``'s feature space (``models[o].features``,
    the model the client computed its prototypes with), its nearest prototype among
    client ``o``'s prototypes has label ``y[i]``. Samples of clients without prototypes are
    dropped: nothing vouches for them (a client that sends none, or none of a class, is not
    screened as clean). This lets the meta model learn from samples in input space (any
    architecture) while the clients' prototypes veto samples that do not look like their class."""
    keep = torch.zeros(len(y), dtype=torch.bool)
    for o in owners.unique().tolist():
        if prototypes[o] is None or len(prototypes[o][0]) == 0:
            continue
        mask = owners == o
        model = models[o].eval()
        device = next(model.parameters()).device
        feats = torch.cat([model.features(chunk.to(device)).cpu()
                           for chunk in x[mask.to(x.device)].split(batch_size)])
        keep[mask] = nearest_prototype_labels(feats, *prototypes[o]) == y[mask]
    return keep
