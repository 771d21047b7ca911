"""Differential privacy of Mosaic's client uploads (``mosaic_flwr/privacy/dp.py``).

DP-SGD for the generator's discriminator: per-sample gradients are the real ones, each is
clipped to the bound before summing, noise is really added (and comes from the secret
generator, not the run seed), and with no noise and no clipping the private gradient is the
non-private one. The accountant's numbers are Opacus's. Noisy counts and prototypes have
the configured variance. Bad settings are refused before training. A tiny in-process Mosaic
run with DP reports the epsilon each client spent in ``summary.json`` and the log, and one
without DP says so plainly.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from mosaic_flwr.config import ConfigError, build_config
from mosaic_flwr.data import dataset_info
from mosaic_flwr.models.generators import build_discriminator, generator_for
from mosaic_flwr.methods.mosaic import generator as genmod
from mosaic_flwr.methods.mosaic.generator import train_generator
from mosaic_flwr.models import build_model
from mosaic_flwr.privacy import dp as dpm

INFO = dataset_info("synthetic")
C = INFO.num_classes


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _disc(seed: int = 0):
    torch.manual_seed(seed)
    return build_discriminator(INFO.in_channels, INFO.image_size, C)


def _batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, INFO.in_channels, INFO.image_size, INFO.image_size, generator=g) * 3,
            torch.randint(0, C, (n,), generator=g))


def _settings(**kw) -> dpm.DPSettings:
    base = dict(epsilon=4.0, delta=1e-5, max_grad_norm=1.0, noise_multiplier=0.0, proto_epsilon=1.0,
                proto_clip=10.0, count_epsilon=0.5, accountant="rdp")
    return dpm.DPSettings(**{**base, **kw})


# ----------------------------------------------------------------------------- DP-SGD for D
def test_per_sample_grads_are_each_samples_own_gradient():
    d = _disc()
    x, y = _batch(4)
    grads = dpm.per_sample_grads(d, lambda s: F.relu(1.0 - s), x, y)
    d.eval()
    for i in range(4):
        d.zero_grad()
        F.relu(1.0 - d(x[i:i + 1], y[i:i + 1])).sum().backward()
        for name, p in d.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-5), name


def test_every_sample_contributes_at_most_the_clip():
    """Noise-free, the private sum is the sum of each sample's gradient scaled to norm <= C
    (computed here independently), and one sample alone moves it by at most C."""
    d = _disc()
    x, y = _batch(8)
    grads = dpm.per_sample_grads(d, lambda s: F.relu(1.0 - s), x, y)
    clip = 0.05
    total, norms = dpm.private_grad_sum(grads, clip, 0.0, torch.Generator().manual_seed(0))
    assert (norms > clip).any(), "the test needs gradients above the clip"
    for name, g in grads.items():
        expect = sum(g[i] * min(1.0, clip / float(norms[i])) for i in range(8))
        assert torch.allclose(total[name], expect, atol=1e-6), name
    for i in range(8):  # leave one sample out: the sum changes by at most the clip
        rest = {k: torch.cat([g[:i], g[i + 1:]]) for k, g in grads.items()}
        without, _ = dpm.private_grad_sum(rest, clip, 0.0, torch.Generator().manual_seed(0))
        diff = torch.cat([(total[k] - without[k]).flatten() for k in grads]).norm()
        assert diff <= clip * (1 + 1e-4)


def test_noise_has_the_configured_scale_and_comes_from_the_generator():
    d = _disc()
    x, y = _batch(3)
    grads = dpm.per_sample_grads(d, lambda s: F.relu(1.0 - s), x, y)
    clean, _ = dpm.private_grad_sum(grads, 1.0, 0.0, torch.Generator().manual_seed(0))
    a, _ = dpm.private_grad_sum(grads, 1.0, 2.0, torch.Generator().manual_seed(1))
    b, _ = dpm.private_grad_sum(grads, 1.0, 2.0, torch.Generator().manual_seed(2))
    a2, _ = dpm.private_grad_sum(grads, 1.0, 2.0, torch.Generator().manual_seed(1))
    noise = torch.cat([(a[k] - clean[k]).flatten() for k in grads])
    assert noise.numel() > 10_000
    assert abs(noise.std().item() - 2.0) < 0.05 and abs(noise.mean().item()) < 0.05
    assert all(torch.equal(a[k], a2[k]) for k in grads)
    assert not all(torch.allclose(a[k], b[k]) for k in grads)


def test_without_noise_and_clipping_the_private_gradient_is_the_plain_one():
    d1, d2 = _disc(), _disc()
    d2.load_state_dict(d1.state_dict())
    x, y = _batch(5)
    g = torch.Generator().manual_seed(3)
    fake, y_fake = torch.randn(4, *x.shape[1:], generator=g), torch.randint(0, C, (4,), generator=g)
    # non-private: the hinge loss on real and fake, as train_generator computes it
    scores = d1(torch.cat([x, fake]), torch.cat([y, y_fake]))
    (F.relu(1.0 - scores[:5]).mean() + F.relu(1.0 + scores[5:]).mean()).backward()
    # private with sigma 0, no clipping, the expected batch = the real batch
    dp = dpm.DiscriminatorDP(max_grad_norm=math.inf, noise_multiplier=0.0, sample_rate=1.0,
                             label_weights=torch.ones(C), rng=torch.Generator().manual_seed(0))
    params = [p for p in d2.parameters() if p.requires_grad]
    genmod._dp_discriminator_grads(d2, params, x, y, fake, y_fake, dp, expected_batch=5.0)
    for (name, p1), p2 in zip(d1.named_parameters(), d2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5), name


def _train(dp=None, steps=6, seed=0):
    torch.manual_seed(seed)
    g = generator_for(INFO)
    d = build_discriminator(INFO.in_channels, INFO.image_size, C)
    clf = build_model("cnn_small", INFO.in_channels, C, INFO.image_size)
    gx = torch.Generator().manual_seed(5)
    x = torch.randn(60, INFO.in_channels, INFO.image_size, INFO.image_size, generator=gx)
    y = torch.arange(60) % 3
    stats = train_generator(g, d, clf, x, y, steps=steps, batch_size=8, seed=seed, eval_per_class=4, dp=dp)
    return g, stats


def _gdp(rng_seed, sigma=1.0, clip=0.1):
    return dpm.DiscriminatorDP(max_grad_norm=clip, noise_multiplier=sigma, sample_rate=8 / 60,
                               label_weights=torch.tensor([20.0, 20.0, 20.0] + [0.0] * (C - 3)),
                               rng=torch.Generator().manual_seed(rng_seed))


def test_generator_under_dp_clips_real_gradients_in_training(monkeypatch):
    """In a real training run every real batch goes through the clip: the spy sees the
    per-sample norms (many above the clip) and the noise multiplier, every step."""
    seen = []
    real = dpm.private_grad_sum

    def spy(grads, clip, sigma, rng):
        out, norms = real(grads, clip, sigma, rng)
        seen.append((clip, sigma, norms.clone(), len(next(iter(grads.values())))))
        return out, norms

    monkeypatch.setattr(dpm, "private_grad_sum", spy)
    _, stats = _train(_gdp(0), steps=6)
    assert len(seen) == 6 and all(c == 0.1 and s == 1.0 for c, s, _, _ in seen)
    norms = torch.cat([n for *_, n, _ in seen])
    assert (norms > 0.1).any()
    # Poisson sampling: the real batch size varies around 8, not fixed
    sizes = [b for *_, b in seen]
    assert stats["dp-real-per-step"] == pytest.approx(sum(sizes) / 6)
    assert stats["dp-max-sample-grad-norm"] == pytest.approx(float(norms.max()))


def test_generator_under_dp_depends_on_the_secret_noise_not_only_the_seed():
    g1, _ = _train(_gdp(1))
    g2, _ = _train(_gdp(2))
    g3, _ = _train(_gdp(1))
    g0, _ = _train(None)
    s1, s2, s3, s0 = (g.state_dict() for g in (g1, g2, g3, g0))
    assert all(torch.equal(s1[k], s3[k]) for k in s1)          # same secret stream: same result
    assert not all(torch.equal(s1[k], s2[k]) for k in s1)      # other noise: other generator
    assert not all(torch.equal(s1[k], s0[k]) for k in s1)      # and not the non-private one


def test_generator_under_dp_draws_labels_from_the_noisy_counts_only(monkeypatch):
    """The true classes are 0-2; the noisy counts say 1, 2 and 7: G is asked for those."""
    calls = []
    real_fid = genmod.generator_fidelity

    def fid(generator, classifier, classes, **kw):
        calls.append(list(classes))
        return real_fid(generator, classifier, classes, **kw)

    monkeypatch.setattr(genmod, "generator_fidelity", fid)
    weights = torch.zeros(C)
    weights[[1, 2, 7]] = 5.0
    dp = dpm.DiscriminatorDP(0.1, 1.0, 8 / 60, weights, torch.Generator().manual_seed(0))
    _, stats = _train(dp, steps=2)
    assert calls == [[1, 2, 7]] and stats["classes"] == [1, 2, 7]


# ----------------------------------------------------------------------------- accounting
def test_accountant_epsilon_is_opacus_own_value():
    from opacus.accountants import PRVAccountant, RDPAccountant
    for sigma, q, steps in ((1.1, 256 / 60000, 60 * 234), (0.6, 16 / 6000, 200), (4.0, 1.0, 1)):
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        lib = acc.get_epsilon(delta=1e-5, alphas=dpm.ALPHAS)
        assert dpm.epsilon_of([(sigma, q, steps)], 1e-5) == pytest.approx(lib, rel=1e-9)
        # Opacus's default orders: ours (a superset) is never looser
        assert dpm.epsilon_of([(sigma, q, steps)], 1e-5) <= acc.get_epsilon(delta=1e-5) + 1e-9
    prv = PRVAccountant()
    prv.history = [(0.6, 16 / 6000, 200)]
    assert dpm.epsilon_of([(0.6, 16 / 6000, 200)], 1e-5, "prv") == pytest.approx(prv.get_epsilon(delta=1e-5))


def test_known_full_batch_gaussian_matches_the_closed_form():
    """One Gaussian release, q = 1: RDP(alpha) = alpha / (2 sigma^2); Opacus converts with
    eps = min_a RDP(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1) (Balle et al., 2020)."""
    sigma, delta = 4.0, 1e-5
    best = min(a / (2 * sigma ** 2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in dpm.ALPHAS)
    assert dpm.epsilon_of([(sigma, 1.0, 1)], delta) == pytest.approx(best, rel=1e-6)


def test_calibrated_noise_reaches_the_target_and_composition_is_below_the_sum():
    q, steps = 16 / 600, 200
    sigma = dpm.sgd_sigma(2.0, 1e-5, q, steps)
    eps = dpm.epsilon_of([(sigma, q, steps)], 1e-5)
    assert 2.0 - 0.02 <= eps <= 2.0
    s = _settings(epsilon=2.0)
    report = dpm.compose(s, sgd=(sigma, q, steps), protos=True)
    parts = [report["epsilon-generator"], report["epsilon-prototypes"], report["epsilon-counts"]]
    assert max(parts) < report["epsilon"] < sum(parts)
    assert report["epsilon-prototypes"] == pytest.approx(1.0, abs=0.02)
    assert report["epsilon-counts"] == pytest.approx(0.5, abs=0.02)
    # composition in one accountant: the same as Opacus's with the three in its history
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    acc.history = [(report["sigma-counts"], 1.0, 1), (report["sigma-prototypes"], 1.0, 1), (sigma, q, steps)]
    assert report["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5, alphas=dpm.ALPHAS))


# ----------------------------------------------------------------------------- counts, prototypes
def test_noisy_counts_have_the_configured_variance():
    sigma = 3.0
    counts = torch.full((20000,), 1000)
    noisy = dpm.noisy_counts(counts, sigma, torch.Generator().manual_seed(0)).double()
    assert (noisy == noisy.round()).all()
    assert abs(noisy.mean().item() - 1000) < 0.1
    assert noisy.var().item() == pytest.approx(sigma ** 2 + 1 / 12, rel=0.05)   # + rounding
    assert (dpm.noisy_counts(torch.zeros(100, dtype=torch.long), 3.0, torch.Generator().manual_seed(1)) >= 0).all()


def test_noisy_class_means_have_the_configured_variance():
    n, d, clip, sigma = 100, 1000, 1.0, 2.0
    feats = torch.zeros(3 * n, d)
    labels = torch.arange(3).repeat_interleave(n)
    counts = torch.tensor([n, n, n] + [0] * (C - 3))
    protos, plabels = dpm.dp_class_means(feats, labels, counts, clip=clip, sigma=sigma,
                                         rng=torch.Generator().manual_seed(0))
    assert plabels.tolist() == [0, 1, 2]                      # classes with a noisy count >= 1 only
    assert protos.var().item() == pytest.approx((sigma * clip / n) ** 2, rel=0.05)
    # clipping: a far-away record moves its class's sum by at most the clip
    big = torch.zeros(3 * n, d)
    big[0, 0] = 1e6
    p0, _ = dpm.dp_class_means(big, labels, counts, clip=clip, sigma=0.0, rng=torch.Generator())
    assert p0[0, 0].item() == pytest.approx(clip / n) and p0.norm(dim=1).max() <= clip + 1e-6


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides,match", [
    ({"dp.epsilon": 1.0, "dp.noise-multiplier": 1.0}, r"^dp.epsilon/dp.noise-multiplier: both set"),
    ({"dp.epsilon": 1.0, "strategy": "fedavg"}, r"^dp.epsilon/dp.noise-multiplier: .*strategy='mosaic'"),
    ({"dp.epsilon": 1.0, "mosaic.meta-data": "clients"}, r"^mosaic.meta-data: 'clients' sends logits"),
    ({"dp.epsilon": 1.0, "kd.expert-pass": True, "kd.local-steps": 10},
     r"^kd.expert-pass: the expert model is a second set of classifier weights"),
    ({"dp.epsilon": 1.0, "resume": "/tmp/x", "kd.gate": "off"}, r"^resume: with DP"),
    ({"dp.epsilon": 8.0, "warmup-rounds": 2, "mosaic.proto-rounds": 2}, r"^mosaic.proto-rounds: 2 releases prototypes in 2 rounds"),
    ({"dp.epsilon": 1.0}, r"^dp.epsilon: 1 is the client's total, .* already compose to 1\.2\d\d, leaving the "
                          r"generator nothing"),
    ({"dp.epsilon": 0.05}, r"^dp.epsilon: must be 0 \(no DP\) or >= 0.1"),
    ({"dp.epsilon": 1.0, "dp.delta": 0.5}, r"^dp.delta: must be in"),
    ({"dp.epsilon": 1.0, "dp.accountant": "gdp"}, r"^dp.accountant: unknown value"),
    ({"dp.max-grad-norm": 0.0}, r"^dp.max-grad-norm: must be > 0"),
])
def test_bad_dp_settings_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides)


def test_dp_is_off_by_default_and_on_with_either_key():
    assert dpm.dp_settings(build_config({}).values) is None
    on = dpm.dp_settings(build_config({"dp.epsilon": 2.0, "kd.gate": "off"}).values)
    assert on is not None and on.epsilon == 2.0 and on.noise_multiplier == 0.0
    nm = dpm.dp_settings(build_config({"dp.noise-multiplier": 1.5, "kd.gate": "off"}).values)
    assert nm is not None and nm.noise_multiplier == 1.5


def test_delta_must_be_below_one_over_n():
    assert dpm.check_delta(1e-5, [500, 6000]) is None
    problem = dpm.check_delta(0.05, [50, 6000])
    assert problem.startswith("dp.delta: 0.05 is not below 1/N") and "N = 50" in problem


def test_noisy_counts_are_drawn_once_per_client_and_not_from_the_seed(tmp_path):
    from flwr.app import Context, RecordDict
    from client_app.app import released_counts
    cfg = build_config({"dp.epsilon": 2.0, "dataset": "synthetic"})
    y = torch.arange(500) % 4

    def ctx(ledger_dir):
        return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                       node_config={"partition-id": 0, "num-partitions": 1, "ledger-dir": str(ledger_dir)})

    first = released_counts(cfg, ctx(tmp_path / "a"), y, C)
    # repeated, not redrawn: in this node state and after a restart (a new one), from the ledger
    assert torch.equal(released_counts(cfg, ctx(tmp_path / "a"), y, C), first)
    others = [released_counts(cfg, ctx(tmp_path / f"b{i}"), y, C) for i in range(3)]  # same seed, new ledgers
    assert any(not torch.equal(o, first) for o in others)
    assert torch.equal(released_counts(build_config({"dataset": "synthetic"}), ctx(tmp_path / "c"), y, C),
                       torch.bincount(y, minlength=C))              # no DP: the true counts
    assert not (tmp_path / "c").exists()                            # and no ledger


# ----------------------------------------------------------------------------- end to end
def _spent(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_tiny_mosaic_run_with_dp_reports_epsilon_and_the_gate_hears_every_client(tmp_path, caplog):
    from tests.support import run_inprocess
    from tests.support import QUICK_MOSAIC as TINY
    counts_seen: dict[int, list] = {}
    scores_seen: dict[int, list] = {}
    audit_sent: list[str] = []

    def hook(grid, node_id, incoming, reply):
        recs = reply.content.metric_records
        if "label-counts" in recs:
            counts_seen.setdefault(node_id, []).append(list(recs["label-counts"]["counts"]))
        if incoming.metadata.message_type == "evaluate" and reply.has_content():
            scores_seen.setdefault(node_id, []).append(dict(recs["metrics"]))
        audit_sent.extend(k for r in recs.values() for k in r if k.startswith("privacy-"))
        return reply

    caplog.set_level(logging.INFO)
    # the clients' gate (its scores noisy, in the plan) and dp.audit: the clients audit their
    # uploads, and keep the figures (dp.epsilon does not cover them)
    out = run_inprocess(tmp_path, grid_options={"hook": hook},
                        **{**TINY, "kd.gate": "clients", "dp.epsilon": 3.0, "server-threads": 1,
                           "dp.audit": True})["dir"]
    assert audit_sent == [] and not (out / "privacy.json").exists()
    assert caplog.text.count("[privacy] audit under DP, kept on this node") == 3
    summary = _spent(out)
    dp = summary["dp"]
    assert dp["enabled"] and dp["delta"] == 1e-5 and set(dp["clients"]) == {"0", "1", "2"}
    for c in dp["clients"].values():  # dp.epsilon is the total; the generator gets what is left
        assert c["epsilon"] == pytest.approx(3.0, rel=2e-3) and c["epsilon"] <= 3.0 * (1 + 1e-6)
        assert max(c["epsilon-generator"], c["epsilon-prototypes"], c["epsilon-gate"]) < c["epsilon"] < (
            c["epsilon-generator"] + c["epsilon-prototypes"] + c["epsilon-counts"] + c["epsilon-gate"])
        assert c["steps"] == TINY["mosaic.gen-steps"] and 0 < c["sample-rate"] < 1
        assert c["ledger-epsilon"] < c["epsilon"]  # the gate's scores come after the distillation round
    assert dp["epsilon"] == max(c["epsilon"] for c in dp["clients"].values())
    # every message of a client carries the same noisy counts (drawn once)
    assert counts_seen and all(len({tuple(c) for c in v}) == 1 for v in counts_seen.values())
    # the gate heard every client: each scored with its released noisy total, none left out
    report = summary["distillation"]
    assert {"gate-before", "gate-after"} <= set(report) and "Evaluation reply from" not in caplog.text
    assert set(scores_seen) == set(counts_seen)
    for node, replies in scores_seen.items():
        for r in replies:
            assert r["num-examples"] == sum(counts_seen[node][0])
            assert all(0 <= r[k] <= r["num-examples"] for k in r if k.startswith("correct-"))
    # each client's ledger holds every release, composed within dp.epsilon
    ledgers = sorted((tmp_path / "privacy-ledger" / "run-1-run").glob("*.json"))
    assert len(ledgers) == 3
    gates = 1 + (report["gate-kept"] == 1.0)  # the look-ahead scores again after the last round
    for path in ledgers:
        book = json.loads(path.read_text())
        assert [e["what"] for e in book["releases"]] == ["counts", "prototypes", "generator"] + ["gate"] * gates
        assert book["epsilon-spent"] <= 3.0 * (1 + 1e-6) and path.stat().st_mode & 0o077 == 0
    text = caplog.text
    assert "differential privacy on: total epsilon 3" in text
    assert f"spent: at most epsilon {dp['epsilon']:.3f} per client" in text


def test_the_audit_is_off_under_dp_unless_asked_for():
    audits = dpm.audits
    dp = {"dp.epsilon": 4.0}
    assert audits(build_config({}).values) and not audits(build_config({"privacy-audit": False}).values)
    assert not audits(build_config(dp).values)
    assert audits(build_config({**dp, "dp.audit": True}).values)


@pytest.mark.slow  # ~40 s; the quick loop runs Mosaic without DP in test_e2e_quick.py
def test_tiny_mosaic_run_without_dp_says_so(tmp_path, caplog):
    from tests.support import run_inprocess
    from tests.support import QUICK_MOSAIC as TINY
    caplog.set_level(logging.INFO)
    out = run_inprocess(tmp_path, **{**TINY, "num-server-rounds": 2, "server-threads": 1,
                                     "privacy-audit": False})["dir"]
    assert _spent(out)["dp"] == {"enabled": False, "guarantee": dpm.NO_DP}
    assert "no differential privacy" in caplog.text
