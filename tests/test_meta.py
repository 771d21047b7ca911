"""The meta model and its training on prototype expert logits."""

import pytest
import torch
import torch.nn.functional as F

from mosaic_flwr.methods.mosaic.meta import (MetaModel, _holdout_split, default_width, meta_beats_mean, sign_test_p,
                                     train_meta)


def _expert_toy(m: int, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert logits ``[m, c, c]`` where only the true class's expert votes for its own
    class; every other expert votes, just as loudly, for some class other than its own.

    Reading each expert's own-class logit separates the classes almost perfectly, while
    the plain ensemble (mean over experts) is right only about half of the time: a fuser
    must know which expert is which.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(c, (m,), generator=g)
    logits = torch.randn(m, c, c, generator=g)
    votes = (torch.arange(c) + torch.randint(1, c, (m, c), generator=g)) % c
    votes[torch.arange(m), labels] = labels
    logits.scatter_add_(2, votes.unsqueeze(-1), torch.full((m, c, 1), 4.0))
    return logits, labels


@pytest.mark.parametrize("arch", ["transformer", "gating"])
def test_meta_model_shapes_and_starts_at_the_ensemble(arch):
    torch.manual_seed(0)
    meta = MetaModel(7, 3, arch=arch).eval()
    logits = torch.randn(4, 7, 3)
    out = meta(logits)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, logits.mean(dim=1))


def test_default_width_derived_from_classes():
    assert [default_width(c) for c in (2, 10, 50, 100, 200)] == [32, 40, 200, 256, 256]
    assert MetaModel(10, 10).embed.out_features == 40


def test_meta_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        MetaModel(3, 3, arch="mlp")
    with pytest.raises(ValueError, match="nhead"):
        MetaModel(3, 3, d_model=30, nhead=4)
    with pytest.raises(ValueError, match=r"\[B, 3, 4\]"):
        MetaModel(3, 4)(torch.zeros(2, 4, 3))


def test_holdout_split_is_stratified():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2])
    train, holdout = _holdout_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(train.tolist() + holdout.tolist()) == list(range(13))
    assert labels[holdout].tolist() == [0, 0, 1]  # 2 of 10, 1 of 2, none of 1
    assert set(labels[train].tolist()) == {0, 1, 2}


def test_holdout_is_drawn_from_the_pool_only():
    labels = torch.tensor([0] * 10 + [1] * 10)
    pool = torch.tensor([True] * 5 + [False] * 5 + [True] * 2 + [False] * 8)  # e.g. the prototypes
    train, holdout = _holdout_split(labels, 0.4, torch.Generator().manual_seed(0), pool)
    assert sorted(train.tolist() + holdout.tolist()) == list(range(20))
    assert pool[holdout].all() and labels[holdout].tolist() == [0, 0, 1]  # 2 of 5 pooled, 1 of 2
    assert not any(i in holdout.tolist() for i in torch.nonzero(~pool).squeeze(1).tolist())


def test_the_guard_keeps_a_meta_model_only_when_it_beats_the_mean_on_held_out_pooled_inputs():
    """Expert 0 is right, experts 1-2 confidently agree on a wrong class: the mean is wrong,
    a meta model that learns to trust expert 0 beats it (kept). Where the mean is already
    perfect the meta model can at best tie (dropped). No hold-out: nothing shows it is better."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(4, (300,), generator=g)
    logits = torch.randn(300, 3, 4, generator=g)
    logits[torch.arange(300), 0, labels] += 4.0
    wrong = (labels + 1) % 4
    for e in (1, 2):
        logits[torch.arange(300), e, wrong] += 6.0
    pool = torch.arange(300) % 3 == 0  # the real-derived third
    torch.manual_seed(0)
    ema, stats = train_meta(MetaModel(3, 4), logits, labels, epochs=60, lr=1e-2, seed=0, holdout_pool=pool)
    assert stats["n_holdout"] == pytest.approx(0.2 * 100, abs=4)
    assert stats["holdout_mean_accuracy"] < 0.1 and stats["holdout_accuracy"] > 0.9
    assert meta_beats_mean(stats)

    perfect = 5 * torch.randn(100, 3, 3, generator=torch.Generator().manual_seed(1))
    y = perfect.mean(dim=1).argmax(dim=1)
    _, stats = train_meta(MetaModel(3, 3), perfect, y, epochs=10, lr=1e-2, seed=0)
    assert stats["holdout_mean_accuracy"] == 1.0 and not meta_beats_mean(stats)
    _, stats = train_meta(MetaModel(3, 3), perfect[:3], y[:3], epochs=2, holdout_frac=0.0)
    assert stats["holdout_accuracy"] is None and not meta_beats_mean(stats)


def test_the_guard_needs_a_significant_win_not_a_lucky_one():
    """One-sided exact sign test on the held-out inputs where the two disagree."""
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(1, 0) == 0.5
    assert sign_test_p(5, 0) == pytest.approx(1 / 32) and sign_test_p(3, 1) == pytest.approx(5 / 16)
    base = {"holdout_accuracy": 0.88, "holdout_mean_accuracy": 0.84}
    # Fashion-MNIST alpha 0.1 seed 42: 88 % vs 84 % on 50 held-out prototypes, e.g. 3 wins, 1 loss
    assert not meta_beats_mean({**base, "holdout_only_meta": 3, "holdout_only_mean": 1})
    assert meta_beats_mean({**base, "holdout_only_meta": 9, "holdout_only_mean": 1})       # p = 0.011
    assert not meta_beats_mean({**base, "holdout_only_meta": 1, "holdout_only_mean": 9})


def test_the_guard_compares_with_the_experts_mean_not_the_students_token():
    """With ``prior='last'`` (the student is the last token) the mean leaves the student out."""
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(3, (200,), generator=g)
    z = torch.randn(200, 3, 3, generator=g)
    z[torch.arange(200), :2, labels] += 5.0     # the two experts are right
    z[torch.arange(200), 2, (labels + 1) % 3] += 50.0  # the student token is loud and wrong
    _, stats = train_meta(MetaModel(3, 3, prior="last"), z, labels, epochs=1, lr=1e-6, seed=0)
    assert stats["holdout_mean_accuracy"] == 1.0 and stats["initial_holdout_accuracy"] < 0.1


@pytest.mark.parametrize("arch", ["transformer", "gating"])
def test_train_meta_learns_which_expert_to_trust(arch):
    logits, labels = _expert_toy(400)
    torch.manual_seed(0)
    ema, stats = train_meta(
        MetaModel(5, 5, arch=arch), logits, labels, epochs=40, lr=1e-2, batch_size=32, seed=0
    )
    assert not ema.training
    assert stats["n_train"] + stats["n_holdout"] == 400 and stats["n_holdout"] == 80
    assert stats["initial_holdout_accuracy"] < 0.7
    assert stats["holdout_accuracy"] >= 0.9 - 1e-6  # 72 of 80 is 0.9 in float32 (0.89999998)
    assert 1 <= stats["best_epoch"] <= stats["epochs_run"] <= 40


def test_train_meta_restores_best_ema_state():
    # Random labels: nothing generalises, so the hold-out loss soon rises and training stops.
    logits = torch.randn(200, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(4, (200,), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    ema, stats = train_meta(MetaModel(4, 4), logits, labels, epochs=200, lr=1e-2, patience=5)

    assert stats["epochs_run"] == stats["best_epoch"] + 5 < 200
    _, holdout = _holdout_split(labels, 0.2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(ema(logits[holdout]), labels[holdout]).item()
    assert loss == pytest.approx(stats["holdout_loss"])


def test_train_meta_falls_back_to_the_ensemble_when_training_only_hurts():
    logits = 5 * torch.randn(100, 3, 3, generator=torch.Generator().manual_seed(1))
    labels = logits.mean(dim=1).argmax(dim=1)  # the plain ensemble is already perfect
    torch.manual_seed(0)
    # An absurd learning rate wrecks the model from the first step on.
    ema, stats = train_meta(MetaModel(3, 3), logits, labels, epochs=30, lr=10.0, patience=3)
    assert stats["best_epoch"] == 0 and stats["epochs_run"] == 3
    assert stats["holdout_accuracy"] == stats["initial_holdout_accuracy"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(ema(logits), logits.mean(dim=1))


def test_train_meta_tiny_set_without_holdout():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 10, 10), torch.arange(10)  # one prototype per class
    ema, stats = train_meta(MetaModel(10, 10), logits, labels, epochs=7, patience=2)
    assert stats["n_holdout"] == 0 and stats["n_train"] == 10
    assert stats["early_stopping"] is False
    assert stats["epochs_run"] == stats["best_epoch"] == 7
    assert stats["holdout_accuracy"] is None and stats["holdout_loss"] is None
    assert ema(logits).shape == (10, 10)


def test_train_meta_tiny_set_with_pairs():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 5, 5), torch.arange(5).repeat(2)
    _, stats = train_meta(MetaModel(5, 5, arch="gating"), logits, labels, epochs=5)
    assert stats["n_holdout"] == 5 and stats["n_train"] == 5


def test_train_meta_is_deterministic_and_leaves_global_rng_alone():
    logits, labels = _expert_toy(60)
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        meta = MetaModel(5, 5, dropout=0.5)
        state = torch.random.get_rng_state()
        ema, stats = train_meta(meta, logits, labels, epochs=3, seed=4)
        assert torch.equal(torch.random.get_rng_state(), state)
        outputs.append(ema(logits))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["transformer", "gating"])
def test_train_meta_on_cuda(arch):
    logits, labels = _expert_toy(100)
    torch.manual_seed(0)
    ema, stats = train_meta(MetaModel(5, 5, arch=arch), logits, labels, epochs=3, device="cuda")
    assert next(ema.parameters()).device.type == "cuda" and stats["epochs_run"] == 3
    assert ema(logits.cuda()).shape == (100, 5)


@pytest.mark.parametrize("arch", ["transformer", "gating"])
def test_ablation_teacher_has_the_meta_models_starting_scale(arch):
    """"Mosaic without the meta model" must distil the same targets the meta model starts
    from (the mean of the experts' logits, not their sum: C times sharper at a temperature)."""
    from mosaic_flwr.methods.mosaic.meta import MetaModel as Meta
    from mosaic_flwr.distill.teachers import ensemble_teacher, meta_teacher

    class Experts:  # the only method the teachers read: logits(x) -> [E, B, C]
        def logits(self, x):
            return x.permute(1, 0, 2)

    torch.manual_seed(0)
    z = torch.randn(6, 10, 10) * 3  # [B, E, C]
    torch.testing.assert_close(ensemble_teacher(Experts())(z), meta_teacher(Experts(), Meta(10, 10, arch=arch))(z))


@pytest.mark.parametrize("arch", ["transformer", "gating"])
def test_meta_model_with_the_global_prior_starts_at_the_last_input(arch):
    """mosaic.meta-prior='global': the student's logits are the last token; the untrained teacher
    is the student (to float precision), whatever the experts say."""
    torch.manual_seed(0)
    z = torch.randn(16, 5, 10) * 3
    meta = MetaModel(5, 10, arch=arch, prior="last").eval()
    with torch.no_grad():
        out = meta(z)
    assert torch.allclose(out, z[:, -1], atol=1e-3)
    assert torch.equal(out.argmax(1), z[:, -1].argmax(1))
    with pytest.raises(ValueError, match="meta prior"):
        MetaModel(5, 10, prior="first")


def test_concat_experts_appends_the_global_model_as_one_more_expert():
    from mosaic_flwr.models.classifiers import SmallCNN
    from mosaic_flwr.distill.experts import StackedExperts
    from mosaic_flwr.distill.teachers import ConcatExperts

    torch.manual_seed(0)
    template = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    states = [{k: v + 0.01 * i for k, v in template.state_dict().items()} for i in range(3)]
    experts, student = StackedExperts(template, states), StackedExperts(template, [states[0]])
    both = ConcatExperts([experts, student])
    x = torch.randn(4, 1, 28, 28)
    assert len(both) == 4
    z = both.logits(x)
    assert z.shape == (4, 4, 10) and torch.equal(z[:3], experts.logits(x)) and torch.equal(z[3], z[0])
    feats = torch.randn(6, template.feature_dim)
    h = both.head_logits(feats)
    assert h.shape == (6, 4, 10) and torch.allclose(h[:, 3], h[:, 0])
