import numpy as np
import pytest

from mosaic_flwr.data import PartitionError, label_count_table, partition

LABELS = np.repeat(np.arange(10), 500)  # 5000 samples, 10 balanced classes
ALL = [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("dirichlet", {"alpha": 0.5, "cap": True}),
       ("shards", {"classes_per_client": 2})]


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n, "every sample in exactly one client"
    assert len(np.unique(joined)) == n


@pytest.mark.parametrize("method,kw", ALL)
def test_cover_no_overlap_and_deterministic(method, kw):
    a = partition(LABELS, 10, method=method, seed=3, **kw)
    b = partition(LABELS, 10, method=method, seed=3, **kw)
    c = partition(LABELS, 10, method=method, seed=4, **kw)
    assert len(a) == 10
    _assert_exact_cover(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_extreme_alpha():
    skewed = label_count_table(LABELS, partition(LABELS, 10, method="dirichlet", alpha=0.01, seed=0), 10)
    flat = label_count_table(LABELS, partition(LABELS, 10, method="dirichlet", alpha=1e4, seed=0), 10)
    # alpha -> 0: a class lives on one or two clients (min-size resampling splits a few)
    holders = (skewed / skewed.sum(axis=0) >= 0.1).sum(axis=0)
    assert holders.mean() <= 2.0 and (holders >= 1).all()
    # alpha -> inf: every client gets ~1/10 of every class
    assert np.allclose(flat / flat.sum(axis=0), 0.1, atol=0.03)


def test_min_size_and_cap():
    parts = partition(LABELS, 10, method="dirichlet", alpha=0.05, seed=1, min_size=50, cap=True)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 50
    # the cap stops a client from collecting more once it holds N/10; one class can overshoot
    assert max(sizes) <= len(LABELS) / 10 + 500


def test_shards_exact_classes_per_client():
    table = label_count_table(LABELS, partition(LABELS, 10, method="shards", classes_per_client=3, seed=0), 10)
    assert ((table > 0).sum(axis=1) == 3).all()
    assert (table.sum(axis=0) == 500).all()


@pytest.mark.parametrize("kw,key", [
    ({"method": "dirichlet", "alpha": 0.0}, "alpha"),
    ({"method": "dirichlet", "alpha": -1.0}, "alpha"),
    ({"method": "nope"}, "partition"),
    ({"method": "shards", "classes_per_client": 11}, "shards-per-client"),
])
def test_bad_arguments_name_the_key(kw, key):
    with pytest.raises(PartitionError, match=key):
        partition(LABELS, 10, seed=0, **kw)


def test_more_clients_than_samples():
    with pytest.raises(PartitionError, match="num-partitions"):
        partition(LABELS[:5], 10, method="iid", seed=0)


def test_validation_split_is_stratified_seeded_and_never_partitioned():
    from mosaic_flwr.data import partition_without, validation_indices

    val = validation_indices(LABELS, 0.1, seed=3)
    assert np.array_equal(np.bincount(LABELS[val], minlength=10), np.full(10, 50))  # 10 % of each class
    assert np.array_equal(val, validation_indices(LABELS, 0.1, seed=3))
    assert not np.array_equal(val, validation_indices(LABELS, 0.1, seed=4))
    parts = partition_without(LABELS, val, 10, method="dirichlet", seed=3, alpha=0.5)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) - len(val)
    assert not np.intersect1d(joined, val).size, "no client holds a validation sample"
    assert len(np.unique(np.concatenate([joined, val]))) == len(LABELS)
    # no validation split: exactly today's partition
    same = partition_without(LABELS, validation_indices(LABELS, 0.0, seed=3), 10, method="dirichlet",
                             seed=3, alpha=0.5)
    for a, b in zip(same, partition(LABELS, 10, method="dirichlet", seed=3, alpha=0.5)):
        assert np.array_equal(a, b)
    with pytest.raises(PartitionError, match="validation-split"):
        validation_indices(LABELS, 1.0, seed=3)
