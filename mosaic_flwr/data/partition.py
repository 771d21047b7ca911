"""Partitioners: split sample indices among clients, deterministically for a seed.

Every function returns a list of ``num_clients`` sorted int64 index arrays that together
cover every sample exactly once.
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "dirichlet-client", "shards")


class PartitionError(ValueError):
    """The requested partition cannot be built (too many clients, impossible constraints)."""


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, *,
              min_size: int = 10, cap: bool = False, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: each class is split among clients by a Dirichlet(alpha) draw.

    ``cap=True`` is the Mosaic paper's "unbalanced" split (and NIID-Bench's balancing): a
    client already holding ``N / num_clients`` samples gets no share of later classes. The
    whole draw is repeated until every client holds at least ``min_size`` samples.
    """
    _check(labels, num_clients)
    if alpha <= 0:
        raise PartitionError(f"alpha: must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise PartitionError(f"min-partition-size: {min_size} x {num_clients} clients exceeds "
                             f"{len(labels)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    limit = len(labels) / num_clients
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            if cap:
                p = p * np.array([len(q) < limit for q in parts])
                p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]
    raise PartitionError(f"alpha: no Dirichlet({alpha}) split gave every one of {num_clients} "
                         f"clients >= {min_size} samples in {max_tries} draws; "
                         "raise alpha or lower min-partition-size")


def dirichlet_client(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew for many small clients: every client holds ``N // num_clients`` samples (the
    first ``N % num_clients`` one more), its label proportions drawn from Dirichlet(alpha) over
    the classes; each sample is taken from a class's pool, without replacement (a client whose
    drawn class is used up takes the proportions renormalised over the classes left).

    ``dirichlet`` splits each class among the clients instead: with hundreds of clients and a
    small ``alpha`` most clients then get nothing (at 1,000 clients and alpha 0.1 no draw gives
    every client a sample), which this split avoids."""
    _check(labels, num_clients)
    if alpha <= 0:
        raise PartitionError(f"alpha: must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    sizes = [len(labels) // num_clients + (i < len(labels) % num_clients) for i in range(num_clients)]
    parts = []
    for size in sizes:
        p = rng.dirichlet(np.full(len(classes), alpha))
        want = rng.multinomial(size, p)
        taken: list[int] = []
        for k in np.argsort(-want, kind="stable"):
            n = min(int(want[k]), len(pools[k]))
            taken.extend(pools[k][-n:] if n else [])
            del pools[k][len(pools[k]) - n:]
        while len(taken) < size:  # a drawn class ran out: the others, by the same proportions
            left = np.array([len(q) for q in pools], dtype=float)
            q = p * (left > 0)
            q = q / q.sum() if q.sum() > 0 else left / left.sum()
            k = int(rng.choice(len(classes), p=q))
            taken.append(pools[k].pop())
        parts.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return parts


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological split: each client holds exactly ``classes_per_client`` classes.

    Classes are dealt from shuffled decks so every class has at least one holder; each
    class's samples are then split evenly among its holders.
    """
    _check(labels, num_clients)
    classes = np.unique(labels)
    k = classes_per_client
    if not 1 <= k <= len(classes):
        raise PartitionError(f"shards-per-client: must be in [1, {len(classes)}], got {k}")
    if num_clients * k < len(classes):
        raise PartitionError(f"shards-per-client: {num_clients} clients x {k} classes cannot "
                             f"cover {len(classes)} classes")
    rng = np.random.default_rng(seed)
    deck: list[int] = []
    holders: list[list[int]] = [[] for _ in range(num_clients)]
    for client in range(num_clients):
        while len(holders[client]) < k:
            if not deck:
                deck = rng.permutation(classes).tolist()
            options = [c for c in deck if c not in holders[client]]
            choice = options[0] if options else rng.choice([c for c in classes if c not in holders[client]])
            if choice in deck:
                deck.remove(choice)
            holders[client].append(int(choice))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        owners = [i for i in range(num_clients) if int(c) in holders[i]]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].extend(chunk.tolist())
    return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]


def partition(labels, num_clients: int, *, method: str, seed: int, alpha: float = 0.5,
              min_size: int = 10, cap: bool = False, classes_per_client: int = 2) -> list[np.ndarray]:
    """Dispatch by name (``iid``, ``dirichlet``, ``shards``)."""
    labels = np.asarray(labels)
    if method == "iid":
        return iid(labels, num_clients, seed)
    if method == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed, min_size=min_size, cap=cap)
    if method == "dirichlet-client":
        return dirichlet_client(labels, num_clients, alpha, seed)
    if method == "shards":
        return shards(labels, num_clients, classes_per_client, seed)
    raise PartitionError(f"partition: unknown value {method!r}; allowed: {list(PARTITIONS)}")


def validation_indices(labels, fraction: float, seed: int) -> np.ndarray:
    """A class-stratified validation split: ``round(fraction * n_c)`` samples of every class
    ``c``, drawn with a generator of its own (independent of the partition's draw for the
    same seed). Sorted int64 indices; empty when ``fraction`` is 0.

    For benchmarking only: the federation never sees these samples, and they are not the
    test split, so settings can be chosen on them honestly."""
    labels = np.asarray(labels)
    if not 0 <= fraction < 1:
        raise PartitionError(f"validation-split: must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x7A11D])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:round(fraction * int((labels == c).sum()))]
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def partition_without(labels, held_out: np.ndarray, num_clients: int, **kwargs) -> list[np.ndarray]:
    """``partition`` of the samples not in ``held_out``, as indices into ``labels``."""
    labels = np.asarray(labels)
    if len(held_out) == 0:
        return partition(labels, num_clients, **kwargs)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return [rest[p] for p in partition(labels[rest], num_clients, **kwargs)]


def label_count_table(labels, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[num_clients, num_classes] int64 table of how many samples of each class each client holds."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def _check(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise PartitionError(f"num-partitions: must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise PartitionError(f"num-partitions: {num_clients} clients but only {len(labels)} samples")
