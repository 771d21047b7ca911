"""DENSE (server-side generator against the clients' ensemble and the student): the loss terms
and what training the generator does with each, the pool, and in-process runs of
``strategy='dense'`` on synthetic data (one-shot, and under model heterogeneity)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import mosaic_flwr.distill.server as core_module
from mosaic_flwr.core.checkpoint import ARTIFACTS, load_checkpoint
from mosaic_flwr.data import dataset_info, load_dataset
from mosaic_flwr.models.classifiers import build_model
from mosaic_flwr.distill.teachers import ClientEnsemble, uniform_weights
from mosaic_flwr.core.training import train_local
from mosaic_flwr.registry import STRATEGIES
from mosaic_flwr.methods.dense import (BNStatistics, DenseGenerator, DenseStrategy, DenseSynthesizer,
                                          disagreement)
from tests.support import run_inprocess

INFO = dataset_info("synthetic")
C = INFO.num_classes


@pytest.fixture(scope="module")
def data():
    train, _ = load_dataset("synthetic")
    return train.normalized(), train.y


def _member(data, first_half: bool, seed: int, steps: int = 15):
    """A half-width cnn_small trained on half of the classes (0-4 or 5-9)."""
    x, y = data
    torch.manual_seed(seed)
    model = build_model("cnn_small", 1, C, 28, width=0.5)
    keep = torch.nonzero((y < 5) == first_half).flatten()[:200]
    train_local(model, x[keep], y[keep], steps=steps, batch_size=32, lr=0.05, momentum=0.9, seed=seed)
    return model


def _generator(seed: int = 3) -> DenseGenerator:
    torch.manual_seed(seed)
    return DenseGenerator(32, 8, 1, 28, INFO.mean, INFO.std)


# ----------------------------------------------------------------------------- the loss terms
def test_disagreement_is_the_kl_on_the_samples_whose_argmax_differs():
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])   # agrees on the first, not the second
    p, q = torch.softmax(t[1], 0), torch.softmax(s[1], 0)
    assert torch.allclose(disagreement(s, t), (p * (p / q).log()).sum() / 2)
    assert disagreement(t, t) == 0


def test_the_generator_maps_into_the_normalised_input_space():
    g = _generator()
    x = g(torch.randn(5, 32))
    assert x.shape == (5, 1, 28, 28)
    low, high = (0 - INFO.mean[0]) / INFO.std[0], (1 - INFO.mean[0]) / INFO.std[0]
    assert x.min() >= low and x.max() <= high
    assert set(g.state_dict()) >= {"l1.weight"} and "mean" not in g.state_dict()


def test_training_against_the_student_raises_its_disagreement_with_the_ensemble(data):
    """Two clients that know disjoint halves of the classes; the student is the first client's
    model. The adversarial term, and only it, drives the synthesised batch to where the
    student and the ensemble disagree most; the student is read, never changed."""
    members = [_member(data, True, 1), _member(data, False, 2)]
    student = copy.deepcopy(members[0]).train()
    teacher = ClientEnsemble(members, uniform_weights(2, C))
    before = copy.deepcopy(student.state_dict())

    def measure(x):
        with torch.no_grad():
            return float(disagreement(student.eval()(x), teacher(x)))

    with torch.no_grad():
        untrained = measure(_generator().eval()(torch.randn(24, 32, generator=torch.Generator().manual_seed(0))))
    after = {}
    for adv in (0.0, 1.0):
        synth = DenseSynthesizer(teacher, _generator(), [student.train()], num_classes=C, steps=12, lr=1e-2,
                                 batch_size=24, bn=0.0, oh=1.0, adv=adv, seed=0)
        parts = synth.synthesize()
        assert student.training and all(p.requires_grad for p in student.parameters())
        assert len(synth.pool_y) == 24 and synth.pool_y.max() < C
        after[adv] = measure(synth.pool_x)
        assert parts["adv"] == pytest.approx(-after[adv], rel=1e-4)   # the pool holds the best batch
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert after[1.0] > after[0.0] + 2.0 and after[1.0] > untrained + 2.0
    assert after[1.0] > 1.5 * after[0.0]


def test_the_bn_term_is_zero_without_batchnorm_and_training_lowers_it_with_batchnorm(data):
    x, _ = data
    plain = ClientEnsemble([build_model("cnn_small", 1, C, 28)], uniform_weights(1, C))
    with BNStatistics(plain.members) as stats:
        plain(x[:8])
        assert stats.loss() == 0
    # a resnet8 whose running statistics are exactly those of 256 real images
    torch.manual_seed(1)
    model = build_model("resnet8", 1, C, 28, width=0.5)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None
            bn.reset_running_stats()
    with torch.no_grad():
        model.train()(x[:256])
    teacher = ClientEnsemble([model], uniform_weights(1, C))
    with BNStatistics(teacher.members) as stats:
        teacher(x[256:320])
        real = float(stats.loss())
    synth = DenseSynthesizer(teacher, _generator(), [], num_classes=C, steps=12, lr=5e-2, batch_size=16,
                             bn=1.0, oh=0.0, adv=0.0, seed=0)
    best = synth.synthesize()
    start = synth.trace[0]["bn"]
    assert real < 0.2 * start                     # real images match the statistics, noise does not
    assert best["bn"] < 0.5 * start and synth.trace[-1]["bn"] < 0.5 * start
    assert not any(bn._forward_hooks for bn in model.modules())   # hooks gone after the phase


def test_the_pool_keeps_the_newest_samples_and_sample_trains_every_interval():
    teacher = ClientEnsemble([build_model("cnn_small", 1, C, 28, width=0.25)], uniform_weights(1, C))
    student = build_model("cnn_small", 1, C, 28, width=0.25)
    synth = DenseSynthesizer(teacher, _generator(), [student], num_classes=C, steps=1, lr=1e-3, batch_size=4,
                             interval=3, pool_size=10, kd_batch_size=6, seed=0)
    shapes = [tuple(synth.sample(step)[0].shape) for step in range(7)]   # phases at steps 0, 3, 6
    assert shapes == [(6, 1, 28, 28)] * 7 and synth.phases == 3
    assert len(synth.pool_y) == 10
    marked = torch.arange(12).float().view(12, 1, 1, 1).expand(12, 1, 28, 28)   # sample k: all pixels k
    synth.add(marked[:8], torch.arange(8) % C)
    synth.add(marked[8:], torch.arange(8, 12) % C)
    assert torch.equal(synth.pool_x, marked[2:]) and torch.equal(synth.pool_y, torch.arange(2, 12) % C)
    x, y = synth.draw(50)                  # no augmentation here: the pool's samples with their targets
    k = x[:, 0, 0, 0].long()
    assert torch.equal(x, marked[k]) and torch.equal(y, k % C) and k.min() >= 2


# ----------------------------------------------------------------------------- the strategy
TINY = {"dataset": "synthetic", "alpha": 1.0, "local-steps": 5, "batch-size": 16, "kd.steps": 6,
        "kd.batch-size": 16, "kd.lr": 1e-3, "kd.gate": "off", "test-subset": 100, "dense.gen-steps": 2,
        "dense.gen-interval": 3, "dense.gen-batch-size": 8, "dense.gen-width": 4, "dense.noise-dim": 8}


def _spy(monkeypatch) -> list[dict]:
    seen = []
    real = core_module.distill_many

    def distill_many(students, teacher, sample, **kw):
        seen.append({"teacher": teacher, "families": list(students)})
        return real(students, teacher, sample, **kw)

    monkeypatch.setattr(core_module, "distill_many", distill_many)
    return seen


def test_dense_is_registered_with_its_settings():
    method = STRATEGIES["dense"]
    assert method.strategy is DenseStrategy and method.distils
    assert {"gen-steps", "gen-interval", "adv-weight", "bn-weight", "oh-weight", "pool-size"} <= set(method.settings)


def test_dense_one_shot_runs_in_process(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    out = run_inprocess(tmp_path, strategy="dense", **{**TINY, "warmup-rounds": 1, "num-server-rounds": 1})
    sent = [m for m in out["grid"].sent if m.metadata.message_type != "query"]
    assert [m.metadata.message_type for m in sent] == ["train"] * 3   # one round of plain local training
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["phase"] == "distill"
    report = json.loads((out["dir"] / "summary.json").read_text())["distillation"]
    assert report["dense-phases"] == 2 and report["dense-pool"] == 16   # steps 0 and 3, 8 samples each
    assert "gen-teacher" not in report                                     # no labels: no held-out check
    assert report["dense-last-bn"] == 0                                    # cnn_small has no BatchNorm
    assert math.isfinite(report["kd-final-loss"]) and 0 <= report["acc-after-distill"] <= 1
    (spied,) = seen
    teacher = spied["teacher"]
    assert isinstance(teacher, ClientEnsemble) and len(teacher.members) == 3
    assert torch.allclose(teacher.weights, torch.full((3, C), 1 / 3))
    artifacts = load_checkpoint(out["dir"], ARTIFACTS)
    assert "l1.weight" in artifacts["dense-generator"]
    assert artifacts["dense-samples"]["x"].shape == (16, 1, 28, 28)


def test_dense_runs_under_model_heterogeneity(tmp_path, monkeypatch):
    """Two families (cnn_small and resnet8) and half-width clients: the ensemble holds each
    client model in its own architecture; every family's global model is a student and the
    BatchNorm term reads the resnet8 clients; then one fine-tune round."""
    seen = _spy(monkeypatch)
    out = run_inprocess(tmp_path, num_nodes=4, strategy="dense",
                        **{**TINY, "warmup-rounds": 1, "num-server-rounds": 2,
                           "client-models": "cnn_small,resnet8", "client-capacities": "1,1,0.5,0.5",
                           "submodel": "fixed"})
    (spied,) = seen
    members = spied["teacher"].members
    assert sorted(type(m).__name__ for m in members) == ["ResNet8", "ResNet8", "SmallCNN", "SmallCNN"]
    assert len({sum(p.numel() for p in m.parameters()) for m in members}) == 4   # two widths per family
    assert spied["families"] == ["cnn_small", "resnet8"]
    report = json.loads((out["dir"] / "summary.json").read_text())["distillation"]
    assert report["dense-last-bn"] > 0
    assert {"acc-after-distill/cnn_small", "acc-after-distill/resnet8"} <= set(report)
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    assert [r.get("phase") for r in rows[1:]] == ["distill", "finetune"]
