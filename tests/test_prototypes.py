"""k-means and per-class prototypes."""

import itertools

import pytest
import torch

from mosaic_flwr.methods.mosaic.prototypes import _lloyd, class_prototypes, kmeans, per_class_subset


def _brute_force(x: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    """Optimal k-means by enumerating every assignment of the points to k clusters."""
    best_inertia, best_centres = float("inf"), None
    for assignment in itertools.product(range(k), repeat=x.shape[0]):
        labels = torch.tensor(assignment)
        if len(set(assignment)) < k:
            continue
        centres = torch.stack([x[labels == j].mean(0) for j in range(k)])
        inertia = ((x - centres[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best_inertia, best_centres = inertia, centres
    return best_inertia, best_centres


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    return t[torch.argsort(t[:, 0])]


def _inertia(x: torch.Tensor, centres: torch.Tensor) -> float:
    return torch.cdist(x, centres).pow(2).min(1).values.sum().item()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_kmeans_matches_brute_force_optimum(k, data_seed):
    torch.manual_seed(data_seed)
    x = torch.randn(8, 2, dtype=torch.float64)
    optimum, optimal_centres = _brute_force(x, k)
    centres = kmeans(x, k, seed=0, n_init=10)
    assert centres.shape == (k, 2) and centres.dtype == torch.float64
    assert _inertia(x, centres) == pytest.approx(optimum, rel=1e-9)
    torch.testing.assert_close(_sorted_rows(centres), _sorted_rows(optimal_centres))


def test_kmeans_finds_separated_blobs_with_defaults():
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([m + 0.1 * torch.randn(20, 2) for m in means])
    centres = kmeans(x, 3)
    blob_means = torch.stack([x[i * 20 : (i + 1) * 20].mean(0) for i in range(3)])
    torch.testing.assert_close(_sorted_rows(centres), _sorted_rows(blob_means))


def test_kmeans_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    x = torch.randn(50, 4)
    assert torch.equal(kmeans(x, 5, seed=3), kmeans(x, 5, seed=3))


def test_kmeans_leaves_global_rng_alone():
    x = torch.randn(30, 3)
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    kmeans(x, 4)
    assert torch.equal(torch.rand(1), expected)


def test_kmeans_with_k_equal_n_returns_the_points():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    torch.testing.assert_close(_sorted_rows(kmeans(x, 3)), x)


@pytest.mark.parametrize("k", [0, 4])
def test_kmeans_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match="1 <= k <= N"):
        kmeans(torch.zeros(3, 2), k)


def test_empty_cluster_is_reseeded_with_farthest_point():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # Both initial centres at 0: every point joins cluster 0 and cluster 1 is empty, so it
    # is re-seeded with the point farthest from its centre (10).
    centres, inertia = _lloyd(x, torch.zeros(2, 1), iters=10)
    torch.testing.assert_close(_sorted_rows(centres), torch.tensor([[1.0], [10.0]]))
    assert inertia == pytest.approx(2.0)


def test_class_prototypes_all_centres_and_small_class_mean():
    torch.manual_seed(0)
    blobs = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    big = torch.cat([b + 0.1 * torch.randn(5, 2) for b in blobs])  # 20 points, label 5
    small = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])  # 3 points, label 2
    exact = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])  # 4 points, label 7
    features = torch.cat([big, small, exact])
    labels = torch.tensor([5] * 20 + [2] * 3 + [7] * 4)

    prototypes, proto_labels = class_prototypes(features, labels, k=4)

    assert prototypes.shape == (1 + 4 + 4, 2)
    assert proto_labels.dtype == torch.long
    assert proto_labels.tolist() == [2] + [5] * 4 + [7] * 4
    torch.testing.assert_close(prototypes[0], torch.tensor([3.0, 5.0]))
    blob_means = torch.stack([big[i * 5 : (i + 1) * 5].mean(0) for i in range(4)])
    torch.testing.assert_close(_sorted_rows(prototypes[1:5]), _sorted_rows(blob_means))
    torch.testing.assert_close(_sorted_rows(prototypes[5:]), exact)


def test_class_prototypes_keeps_all_k_centres_beyond_ten():
    torch.manual_seed(0)
    features, labels = torch.randn(40, 3), torch.zeros(40, dtype=torch.long)
    prototypes, proto_labels = class_prototypes(features, labels, k=12)
    assert prototypes.shape == (12, 3) and proto_labels.tolist() == [0] * 12


def test_per_class_subset_caps_large_classes_only():
    labels = torch.tensor([3] * 50 + [0] * 7 + [9] * 12)[torch.randperm(69, generator=torch.Generator().manual_seed(1))]
    keep = per_class_subset(labels, 10, seed=4)
    assert keep.tolist() == sorted(set(keep.tolist()))  # sorted, no repeats
    assert torch.bincount(labels[keep], minlength=10)[[0, 3, 9]].tolist() == [7, 10, 10]
    assert torch.equal(keep, per_class_subset(labels, 10, seed=4))  # seeded
    assert not torch.equal(keep, per_class_subset(labels, 10, seed=5))
    state = torch.get_rng_state()
    assert per_class_subset(labels, 100, seed=4).tolist() == list(range(69))  # nothing to cap
    assert torch.equal(state, torch.get_rng_state())
    assert per_class_subset(torch.zeros(0, dtype=torch.long), 5).shape == (0,)
    with pytest.raises(ValueError):
        per_class_subset(labels, 0)


def test_class_prototypes_empty_input():
    prototypes, labels = class_prototypes(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), 3)
    assert prototypes.shape == (0, 6) and labels.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_class_prototypes_on_cuda():
    torch.manual_seed(0)
    features, labels = torch.randn(60, 4), torch.arange(3).repeat(20)
    cpu_protos, cpu_labels = class_prototypes(features, labels, k=4)
    protos, proto_labels = class_prototypes(features.cuda(), labels.cuda(), k=4)
    assert protos.device.type == "cuda" and proto_labels.device.type == "cuda"
    assert torch.equal(proto_labels.cpu(), cpu_labels)
    for c in range(3):
        members = features[labels == c]
        assert _inertia(members, protos[proto_labels == c].cpu()) == pytest.approx(
            _inertia(members, cpu_protos[cpu_labels == c]), rel=1e-3
        )
