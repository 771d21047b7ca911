"""Conditional generator / discriminator (models.generators) and client-side generator
training (mosaic.generator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosaic_flwr.models.classifiers import build_model
from mosaic_flwr.models.generators import (
    ConditionalDiscriminator,
    ConditionalGenerator,
    build_discriminator,
    build_generator,
    normalised_range,
    sample,
)
from mosaic_flwr.methods.mosaic.generator import (
    DIVERSITY_MODES,
    _ClassSampler,
    generator_fidelity,
    train_generator,
)
from tests.support import fmnist_data

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the simulation actors; restored afterwards. On a busy
    2-core machine two spinning intra-op threads made these small nets ~10-100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "channels,size,mean,std",
    [(1, 28, FMNIST_MEAN, FMNIST_STD), (3, 32, CIFAR_MEAN, CIFAR_STD)],
)
def test_generator_shape_and_normalised_range(channels, size, mean, std):
    torch.manual_seed(0)
    g = build_generator(channels, size, 10, mean, std)
    lo, hi = normalised_range(mean, std)
    lo, hi = lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)
    y = torch.arange(10).repeat(2)
    for mode in (True, False):
        g.train(mode)
        # large z pushes tanh into saturation: the bounds must still hold
        x = g(8.0 * torch.randn(len(y), g.nz), y)
        assert x.shape == (len(y), channels, size, size)
        assert torch.isfinite(x).all()
        assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    assert _n_params(g) < 1_000_000


def test_generator_param_counts_and_state_dict():
    g28 = build_generator(1, 28, 10, FMNIST_MEAN, FMNIST_STD)
    g32 = build_generator(3, 32, 10, CIFAR_MEAN, CIFAR_STD)
    assert _n_params(g28) == 292_369
    assert _n_params(g32) == 820_675
    # mean/std are fixed by the data set, not uploaded
    assert "mean" not in g28.state_dict() and "std" not in g28.state_dict()
    assert all(torch.isfinite(t.float()).all() for t in g28.state_dict().values())


def test_conditioning_changes_output():
    torch.manual_seed(0)
    g = build_generator(1, 28, 10, FMNIST_MEAN, FMNIST_STD)
    z = torch.randn(1, g.nz).repeat(10, 1)
    off_diag = ~torch.eye(10, dtype=torch.bool)
    with torch.no_grad():
        # train mode (batch statistics): same z, ten labels -> ten clearly different images
        x = g.train()(z, torch.arange(10))
        d = (x[:, None] - x[None]).abs().flatten(2).mean(2)
        assert (d[off_diag] > 1e-2).all()
        # eval mode at init: the label moves the output about as much as the noise does
        g.eval()
        zeros = torch.zeros(10, dtype=torch.long)
        d_label = (g(z, torch.arange(10)) - g(z, zeros)).abs().mean()
        d_noise = (g(torch.randn(10, g.nz), zeros) - g(z, zeros)).abs().mean()
        assert d_label > 0.1 * d_noise


def test_sample_is_seeded_and_restores_mode():
    torch.manual_seed(0)
    g = build_generator(1, 28, 10, FMNIST_MEAN, FMNIST_STD)
    g.train()
    labels = torch.tensor([0, 3, 3, 9])
    a = sample(g, labels, seed=7)
    b = sample(g, labels, rng=torch.Generator().manual_seed(7))
    c = sample(g, labels, seed=8)
    assert g.training  # restored
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 1, 28, 28) and not a.requires_grad
    # batching does not change the result (eval mode: no batch statistics)
    assert torch.allclose(sample(g, labels, seed=7, batch_size=3), a, atol=1e-6)
    assert sample(g, torch.tensor([], dtype=torch.long), seed=0).shape == (0, 1, 28, 28)
    with pytest.raises(ValueError):
        sample(g, torch.tensor([10]), seed=0)
    with pytest.raises(ValueError):
        sample(g, labels, seed=1, rng=torch.Generator())


def test_server_rebuilds_generator_from_state_dict():
    torch.manual_seed(0)
    g = build_generator(3, 32, 10, CIFAR_MEAN, CIFAR_STD)
    g.train()
    g(torch.randn(8, g.nz), torch.arange(8))  # move BN running stats
    h = build_generator(3, 32, 10, CIFAR_MEAN, CIFAR_STD)
    h.load_state_dict(g.state_dict())
    labels = torch.arange(10)
    assert torch.equal(sample(g, labels, seed=3), sample(h, labels, seed=3))


def test_builders_validate_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        build_generator(1, 30, 10, FMNIST_MEAN, FMNIST_STD)
    with pytest.raises(ValueError, match="unknown option"):
        build_generator(1, 28, 10, FMNIST_MEAN, FMNIST_STD, width=3)
    with pytest.raises(ValueError, match="channels"):
        build_generator(3, 32, 10, (0.1, 0.2), (0.3, 0.3))
    with pytest.raises(ValueError, match="std"):
        build_generator(1, 28, 10, (0.5,), (0.0,))
    g = build_generator(1, 28, 10, FMNIST_MEAN, FMNIST_STD, nz=16, base=8)
    assert g.nz == 16 and g.base == 8
    # a single mean/std value is broadcast over channels
    g3 = ConditionalGenerator(5, 3, 16, (0.5,), (0.5,), nz=8, base=4)
    assert g3.mean.shape == (1, 3, 1, 1)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_discriminator_projection(channels, size):
    torch.manual_seed(0)
    d = build_discriminator(channels, size, 10).eval()  # eval: no spectral-norm power iteration
    assert isinstance(d, ConditionalDiscriminator)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(6, channels, size, size)
    out = d(x, torch.zeros(6, dtype=torch.long))
    assert out.shape == (6,)
    # the label enters the score; a sample's score does not depend on the rest of the batch
    assert not torch.allclose(out, d(x, torch.full((6,), 3)))
    assert torch.allclose(d(x[:2], torch.zeros(2, dtype=torch.long)), out[:2], atol=1e-5)


# --------------------------------------------------------------------------- training (fast)


def test_class_sampler_is_uniform_over_present_classes_including_zero():
    # class 0 is rare (the reference code's bug dropped class 0 entirely)
    labels = torch.tensor([5] * 900 + [0] * 10 + [2] * 90)
    s = _ClassSampler(labels)
    assert s.classes.tolist() == [0, 2, 5]
    rng = torch.Generator().manual_seed(0)
    req = s.labels(30_000, rng)
    frac = torch.bincount(req, minlength=6).float() / len(req)
    assert frac[[0, 2, 5]].sub(1 / 3).abs().max() < 0.02 and frac[[1, 3, 4]].sum() == 0
    idx, lab = s.indices(30_000, rng)
    assert torch.equal(labels[idx], lab)
    frac = torch.bincount(lab, minlength=6).float() / len(lab)
    assert frac[[0, 2, 5]].sub(1 / 3).abs().max() < 0.02
    assert len(torch.unique(idx[lab == 0])) == 10  # every class-0 image is used


def _synthetic(n_per_class=40, classes=(0, 3), size=8, seed=0):
    """Class c: a bright horizontal band at row 2c mod size, on noise (normalised space)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in classes:
        x = 0.1 * torch.randn(n_per_class, 1, size, size, generator=g) - 0.5
        x[:, :, (2 * c) % size] += 2.0
        xs.append(x)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def test_train_generator_fast_synthetic():
    torch.manual_seed(0)
    x, y = _synthetic()
    clf = build_model("cnn_small", 1, 5, 8)
    clf.train()
    flags = [p.requires_grad for p in clf.parameters()]
    before_clf = {k: v.clone() for k, v in clf.state_dict().items()}
    gen = ConditionalGenerator(5, 1, 8, (0.5,), (0.5,), nz=8, base=4)
    disc = ConditionalDiscriminator(5, 1, 8, base=4)
    before_gen = [p.detach().clone() for p in gen.parameters()]
    lines: list[str] = []
    stats = train_generator(
        gen, disc, clf, x, y, steps=6, batch_size=8, device="cpu", seed=1, eval_per_class=4, log=lines.append
    )
    assert stats["steps"] == 6 and stats["seconds"] > 0 and stats["seconds_per_step"] > 0
    assert stats["classes"] == [0, 3]
    assert set(stats["fidelity_per_class"]) == {0, 3}
    assert 0.0 <= stats["fidelity"] <= 1.0
    for k in ("d_loss", "g_loss", "adv", "ce", "div"):
        assert np.isfinite(stats[k]), k
    assert lines and "fidelity" in lines[-1]
    # generator trained, classifier untouched and restored
    assert any(not torch.equal(a, b) for a, b in zip(before_gen, gen.parameters()))
    assert clf.training and [p.requires_grad for p in clf.parameters()] == flags
    assert all(torch.equal(before_clf[k], v) for k, v in clf.state_dict().items())
    assert all(p.grad is None for p in clf.parameters())
    fid = generator_fidelity(gen, clf, torch.tensor([3, 0]), per_class=5, seed=2)
    assert set(fid) == {0, 3} and all(abs(5 * v - round(5 * v)) < 1e-5 for v in fid.values())
    assert clf.training and generator_fidelity(gen, clf, []) == {}


def test_train_generator_is_deterministic_and_each_diversity_mode_counts():
    x, y = _synthetic()

    def run(diversity, div_weight=0.3):
        torch.manual_seed(0)
        clf = build_model("cnn_small", 1, 5, 8)
        gen = ConditionalGenerator(5, 1, 8, (0.5,), (0.5,), nz=8, base=4)
        disc = ConditionalDiscriminator(5, 1, 8, base=4)
        st = train_generator(
            gen, disc, clf, x, y, steps=3, batch_size=6, seed=4, diversity=diversity,
            div_weight=div_weight, eval_per_class=2,
        )
        assert np.isfinite(st["g_loss"]), diversity
        return st, torch.cat([p.detach().flatten() for p in gen.parameters()])

    runs = {mode: run(mode) for mode in DIVERSITY_MODES}
    # same seed, same generator (its weights)
    assert torch.equal(runs["mode_seeking"][1], run("mode_seeking")[1])
    # each mode trains a different generator ...
    modes = list(runs)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert (runs[a][1] - runs[b][1]).abs().max() > 1e-5, (a, b)
    # ... through its own term (reported over the last step: 3 steps, window 1):
    # none adds nothing; mode seeking is 1 / (|dG| / |dz|) > 0; the batch-mean entropy
    # term sum_k w_k log w_k lies in [-log 5, 0] (a 5-class classifier)
    stats = {mode: st for mode, (st, _) in runs.items()}
    assert stats["none"]["div"] == 0.0
    assert stats["mode_seeking"]["div"] > 0.0
    assert -np.log(5) - 1e-4 <= stats["batch_entropy"]["div"] < 0.0
    for mode, st in stats.items():  # the generator's loss is adv + ce_weight*ce + div_weight*div
        assert st["g_loss"] == pytest.approx(st["adv"] + st["ce"] + 0.3 * st["div"], rel=1e-5, abs=1e-6), mode
    # the term acts only through its weight: weight 0 trains the same generator as "none"
    assert torch.allclose(run("mode_seeking", div_weight=0.0)[1], runs["none"][1], rtol=0, atol=1e-7)


def test_train_generator_zero_steps_and_validation():
    x, y = _synthetic(classes=(0,))
    clf = build_model("cnn_small", 1, 5, 8)
    gen = ConditionalGenerator(5, 1, 8, (0.5,), (0.5,), nz=8, base=4)
    disc = ConditionalDiscriminator(5, 1, 8, base=4)
    st = train_generator(gen, disc, clf, x, y, steps=0, eval_per_class=3)
    assert st["steps"] == 0 and st["classes"] == [0] and np.isnan(st["d_loss"])
    with pytest.raises(ValueError, match="diversity"):
        train_generator(gen, disc, clf, x, y, steps=1, diversity="bogus")
    with pytest.raises(ValueError, match="labels"):
        train_generator(gen, disc, clf, x, y + 7, steps=1)
    with pytest.raises(ValueError, match="no data"):
        train_generator(gen, disc, clf, x[:0], y[:0], steps=1)
    with pytest.raises(ValueError):
        train_generator(gen, disc, clf, x, y[:-1], steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_generator_on_cuda_matches_cpu_contract():
    x, y = _synthetic()
    torch.manual_seed(0)
    clf = build_model("cnn_small", 1, 5, 8)  # stays on the CPU: moved for training, then back
    gen = ConditionalGenerator(5, 1, 8, (0.5,), (0.5,), nz=8, base=4)
    disc = ConditionalDiscriminator(5, 1, 8, base=4)
    st = train_generator(gen, disc, clf, x, y, steps=4, batch_size=8, device="cuda", eval_per_class=4)
    assert st["classes"] == [0, 3] and np.isfinite(st["g_loss"])
    assert next(clf.parameters()).device.type == "cpu"
    assert next(gen.parameters()).device.type == "cuda"
    xs = sample(gen, torch.tensor([0, 3]), seed=0)
    assert xs.device.type == "cuda" and xs.shape == (2, 1, 8, 8)
    # same seed, same noise on any device
    assert torch.allclose(xs.cpu(), sample(gen.cpu(), torch.tensor([0, 3]), seed=0), atol=1e-4)


# --------------------------------------------------------------------------- real FMNIST (slow)


def _fmnist_subset(data, classes, n_per_class: int, seed: int):
    """``n_per_class`` images of each class of ``data`` (an ``ImageData``), normalised."""
    labels = data.y.numpy()
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), n_per_class, replace=False) for c in classes]
    )
    sub = data.subset(idx)
    return sub.normalized(), sub.y


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_generator_learns_client_classes_on_fmnist():
    train, test = fmnist_data()  # a missing data set fails the test, never skips it
    assert (train.info.mean, train.info.std) == (FMNIST_MEAN, FMNIST_STD)
    classes = (0, 3, 7)  # T-shirt, dress, sneaker; class 0 on purpose (reference-code bug)
    x, y = _fmnist_subset(train, classes, 500, seed=0)
    xt, yt = _fmnist_subset(test, classes, 300, seed=1)

    # the client's classifier: cnn_small over all 10 classes, trained on its 3 classes
    torch.manual_seed(0)
    clf = build_model("cnn_small", 1, 10, 28)
    opt = torch.optim.SGD(clf.parameters(), lr=0.05, momentum=0.9)
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        i = torch.randint(len(x), (64,), generator=rng)
        loss = F.cross_entropy(clf(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf_acc = _accuracy(clf, xt, yt)
    assert clf_acc > 0.8, clf_acc  # chance is 1/3

    torch.manual_seed(1)
    gen = build_generator(1, 28, 10, FMNIST_MEAN, FMNIST_STD)
    disc = build_discriminator(1, 28, 10)
    stats = train_generator(gen, disc, clf, x, y, device="cpu", seed=0)  # default schedule
    assert stats["classes"] == list(classes)
    assert stats["fidelity"] > 0.6, stats
    assert stats["fidelity_per_class"][0] > 0.6, stats

    # fresh samples: the classifier labels them as requested, class 0 included
    n = 200
    labels = torch.tensor(classes).repeat_interleave(n)
    xs = sample(gen, labels, seed=123)
    lo, hi = normalised_range(FMNIST_MEAN, FMNIST_STD)
    assert xs.min() >= lo - 1e-5 and xs.max() <= hi + 1e-5
    with torch.no_grad():
        pred = clf(xs).argmax(1)
    per_class = (pred == labels).float().view(len(classes), n).mean(1)
    print(
        f"classifier acc {clf_acc:.3f}; generator {stats['steps']} steps, "
        f"{stats['seconds_per_step'] * 1000:.1f} ms/step, fidelity {stats['fidelity_per_class']}; "
        f"fresh-sample acc {dict(zip(classes, per_class.tolist()))}"
    )
    assert per_class.min() > 0.6, per_class
    assert (pred == 0).sum() >= 0.6 * n  # class 0 really is generated

    # the samples resemble the real class, not only the classifier's decision regions:
    # each generated class mean is nearest to the real mean of the same class ...
    gen_means = xs.view(len(classes), n, -1).mean(1)
    real_means = torch.stack([x[y == c].flatten(1).mean(0) for c in classes])
    dist = torch.cdist(gen_means, real_means)
    print(f"distance generated-mean -> real-mean:\n{dist}")
    assert torch.equal(dist.argmin(1), torch.arange(len(classes)))
    # ... and they are not collapsed to one image per class
    for k, c in enumerate(classes):
        spread = xs[k * n : (k + 1) * n].flatten(1).std(0).mean()
        real_spread = x[y == c].flatten(1).std(0).mean()
        print(f"class {c}: pixel spread {float(spread):.3f} vs real {float(real_spread):.3f}")
        assert spread > 0.3 * real_spread, (c, float(spread), float(real_spread))
