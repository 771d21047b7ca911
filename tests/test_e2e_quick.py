"""The whole Mosaic pipeline (and FedDF, and Mosaic without its meta model) end to end, in the
quick loop: the real ServerApp and the real ClientApp handlers on an in-process grid, on the
synthetic data set, with a schedule of a few seconds.

What a run goes through: discovery (``query``), a warm-up round (``train.mosaic``), the
distillation round (clients: local training, prototypes, generator training; server: class
experts, meta model, the generator sampler, distillation) and a fine-tune round (``train``).
Two spies watch the server's distillation without changing it: one wraps ``distill`` (it
keeps the student as it enters, the teacher and a copy of the sampler), one wraps
``train_meta``. The grid's hook keeps a copy of every reply.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import mosaic_flwr.distill.server as core_module
import mosaic_flwr.methods.mosaic.strategy as mosaic_module
from mosaic_flwr.core.checkpoint import ARTIFACTS, load_checkpoint
from mosaic_flwr.config import ConfigError, build_config
from mosaic_flwr.distill.kd import kd_loss
from mosaic_flwr.methods.mosaic.meta import MetaModel
from mosaic_flwr.core.records import ARRAYS, record_to_state
from mosaic_flwr.core.task import initial_model
from tests.support import run_inprocess, QUICK_MOSAIC as TINY

C = 10


def _round(incoming) -> int:
    configs = incoming.content.config_records
    return int(configs["config"]["server-round"]) if "config" in configs else 0


class Recorder:
    """The grid hook and the two spies; what they saw, copied."""

    def __init__(self, monkeypatch):
        self.replies: dict[int, dict[int, dict]] = {}   # round -> node -> what the client sent
        self.kd: list[dict] = []
        self.meta: list[dict] = []
        self.experts: list[dict] = []   # the class experts the distillation round started from
        real_distill, real_train_meta = core_module.distill_many, mosaic_module.train_meta
        real_distillation = core_module.DistillStrategy.distillation

        def distill_many(students, teacher, sampler, **kw):
            (name, student), = students.items()   # one family
            seen = {"before": copy.deepcopy(student.state_dict()), "student_before": copy.deepcopy(student),
                    "probe": copy.deepcopy(sampler), "teacher": teacher, "sampler": sampler}
            stats = real_distill(students, teacher, sampler, **kw)
            seen["stats"] = stats[name]
            seen["after"] = copy.deepcopy(student.state_dict())
            seen["student_after"] = copy.deepcopy(student)
            self.kd.append(seen)
            return stats

        def distillation(strategy, *args, **kwargs):
            self.experts.append(copy.deepcopy(getattr(strategy, "experts", {})))
            return real_distillation(strategy, *args, **kwargs)

        def train_meta(meta, z, labels, **kw):
            initial = copy.deepcopy(meta.state_dict())
            trained, stats = real_train_meta(meta, z, labels, **kw)
            self.meta.append({"z": z.clone(), "labels": labels.clone(), "initial": initial,
                              "trained": copy.deepcopy(trained.state_dict()), "stats": stats})
            return trained, stats

        monkeypatch.setattr(core_module, "distill_many", distill_many)
        monkeypatch.setattr(core_module.DistillStrategy, "distillation", distillation)
        monkeypatch.setattr(mosaic_module, "train_meta", train_meta)

    def hook(self, grid, node, incoming, reply):
        content = reply.content
        self.replies.setdefault(_round(incoming), {})[node] = {
            "type": incoming.metadata.message_type,
            "records": set(content.keys()),
            "state": record_to_state(content["arrays"]) if "arrays" in content.array_records else None,
            "num-examples": content.metric_records["metrics"]["num-examples"]
            if "metrics" in content.metric_records else None,
            "counts": list(content["label-counts"]["counts"]) if "label-counts" in content else None,
            "prototypes": record_to_state(content["prototypes"]) if "prototypes" in content else None,
            "generator": record_to_state(content["generator"]) if "generator" in content else None,
            "expert": record_to_state(content["expert-arrays"]) if "expert-arrays" in content else None,
        }
        return reply


def _run(tmp_path, monkeypatch, **overrides):
    rec = Recorder(monkeypatch)
    out = run_inprocess(tmp_path, num_nodes=3, grid_options={"hook": rec.hook}, **{**TINY, **overrides})
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    return out, rows, rec


def _finite_fraction(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0


def _floats(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _expert_logits(cfg, states, x) -> torch.Tensor:
    """``[B, E, C]``: each state loaded into a fresh model of the run's architecture."""
    outs = []
    for state in states:
        model = initial_model(cfg)
        model.load_state_dict(state)
        outs.append(_logits(model, x))
    return torch.stack(outs, dim=1)


def _check_schedule_and_distillation(out, rows, rec, run_config) -> tuple[dict, dict]:
    """What every distilling strategy shares; returns the distillation row and the KD spy."""
    cfg = build_config({**run_config, "output-dir": str(out["dir"].parent)})
    grid = out["grid"]
    nodes = set(grid.node_ids)
    # Discovery first, to every node; then each round's message type and phase.
    assert [m.metadata.message_type for m in grid.sent[:3]] == ["query"] * 3
    assert {m.metadata.dst_node_id for m in grid.sent[:3]} == nodes
    sent = {r: [m for m in grid.sent[3:] if _round(m) == r] for r in (1, 2, 3)}
    assert sum(len(v) for v in sent.values()) == len(grid.sent) - 3 == 9
    # Mosaic's warm-up rounds report label counts (its class experts); FedDF's train plainly.
    warm = "train" if run_config["strategy"] == "feddf-gen" else "train.mosaic"
    assert {m.metadata.message_type for m in sent[1]} == {warm}
    assert {m.metadata.message_type for m in sent[2]} == {"train.mosaic"}
    assert all(m.content["config"]["distill"] is False for m in sent[1] if warm == "train.mosaic")
    assert all(m.content["config"]["distill"] is True and m.content["config"]["gen-steps"] == TINY["mosaic.gen-steps"]
               for m in sent[2])
    assert {m.metadata.message_type for m in sent[3]} == {"train"}
    assert all(m.content["config"]["lr"] == cfg.finetune_lr for m in sent[3])

    # Every round complete: every client answered, nothing rejected, accuracies finite.
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r.get("phase") for r in rows] == [None, "warmup", "distill", "finetune"]
    for r in rows[1:]:
        assert r["clients"] == 3 and r["rejected"] == 0 and math.isfinite(r["train-loss"]), r
    assert all(_finite_fraction(r["accuracy"]) and math.isfinite(r["loss"]) for r in rows)
    # ... and each round's scalars in TensorBoard, the distillation's figures included
    from tests.support import scalars_of
    board = scalars_of(out["dir"] / "tensorboard")
    assert board["accuracy"] == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert board["acc-teacher"] == [(2, pytest.approx(rows[2]["acc-teacher"]))]
    assert set(rec.replies) == {0, 1, 2, 3} and all(set(v) == nodes for v in rec.replies.values())

    # The distillation round: a generator from every client (only then), finite report.
    assert all(r["generator"] is None for r in rec.replies[1].values())
    assert all(r["generator"] is not None and all(torch.isfinite(t).all() for t in _floats(r["generator"]).values())
               for r in rec.replies[2].values())
    distill = rows[2]
    for key in ("acc-before-distill", "acc-teacher", "acc-after-distill", "gen-fidelity-mean",
                "kd-agreement", "kd-teacher-label-agreement"):
        assert _finite_fraction(distill[key]), (key, distill.get(key))
    assert math.isfinite(distill["kd-final-loss"]) and distill["kd-seconds"] > 0
    # the distilled model is the round's global model
    assert distill["accuracy"] == pytest.approx(distill["acc-after-distill"], abs=1e-4)
    summary = json.loads((out["dir"] / "summary.json").read_text())
    assert summary["distillation"]["acc-after-distill"] == distill["acc-after-distill"]
    # the clients' reported wall time per round, and in total (client compute in benchmarks)
    assert all(r["client-seconds"] > 0 for r in rows[1:])
    assert summary["client_seconds"] == pytest.approx(sum(r["client-seconds"] for r in rows[1:]), abs=0.02)
    # CPU clients also report their process's CPU seconds (what equal-compute budgets use)
    assert all(r["client-cpu-seconds"] > 0 for r in rows[1:])
    assert summary["client_cpu_seconds"] == pytest.approx(sum(r["client-cpu-seconds"] for r in rows[1:]), abs=0.02)
    assert (out["dir"] / "generator_samples.png").stat().st_size > 1000

    # The student entered distillation as the round's aggregate: the example-weighted mean
    # of the models the clients sent at the distillation round.
    assert len(rec.kd) == 1
    kd = rec.kd[0]
    replies = list(rec.replies[2].values())
    total = sum(r["num-examples"] for r in replies)
    for key, value in _floats(kd["before"]).items():
        mean = sum(r["state"][key] * (r["num-examples"] / total) for r in replies)
        assert torch.allclose(value, mean, atol=1e-5), key
    # Distillation changed the global model, and that model is what the fine-tune round sent.
    assert any(not torch.equal(kd["before"][k], v) for k, v in _floats(kd["after"]).items())
    for m in sent[3]:
        got = record_to_state(m.content["arrays"])
        assert all(torch.equal(got[k], v) for k, v in kd["after"].items())

    # The generator sampler: labels of classes some client holds, finite images in the
    # classifiers' input space, one batch of kd.batch-size.
    held = {c for r in replies for c, n in enumerate(r["counts"]) if n > 0}
    probe = kd["probe"]
    probe.rng.manual_seed(12345)
    x, y = zip(*(probe(i) for i in range(4)))
    x, y = torch.cat(x), torch.cat(y)
    assert x.shape == (4 * TINY["kd.batch-size"], 1, 28, 28) and torch.isfinite(x).all()
    assert set(y.tolist()) <= held
    # ... and the student moved toward the teacher on fresh generated samples: a lower KD
    # loss, an argmax agreement at least as high (it can be 1.0 from the start).
    with torch.no_grad():
        t = kd["teacher"](x)
    s0, s1 = _logits(kd["student_before"], x), _logits(kd["student_after"], x)
    assert kd_loss(s1, t).item() < kd_loss(s0, t).item()
    kd["agreement"] = [(s.argmax(1) == t.argmax(1)).float().mean().item() for s in (s0, s1)]
    assert kd["agreement"][1] >= kd["agreement"][0]
    kd["x"], kd["cfg"] = x, cfg
    return distill, kd


def test_mosaic_pipeline_end_to_end_on_synthetic_data(tmp_path, monkeypatch):
    # The widest meta-model path: prototypes and generated samples through the full experts
    # (the heads, 'auto' here, are tested below), the fitted meta model used whatever its
    # hold-out says (the default's guard is tested below).
    both = {"mosaic.meta-data": "both", "mosaic.meta-guard": False, "mosaic.meta-experts": "full"}
    run_config = {**TINY, "strategy": "mosaic", **both}
    out, rows, rec = _run(tmp_path, monkeypatch, strategy="mosaic", **both)
    distill, kd = _check_schedule_and_distillation(out, rows, rec, run_config)
    cfg, x = kd["cfg"], kd["x"]
    # here the student starts far from the meta teacher on generated samples and gets closer
    assert kd["agreement"][1] > kd["agreement"][0] + 0.2, kd["agreement"]
    for key in ("acc-ensemble", "meta-holdout-accuracy", "meta-holdout-accuracy-at-init"):
        assert _finite_fraction(distill[key]), key
    assert distill["meta-epochs-run"] >= 1

    # Prototypes from every client, at the distillation round only: k-means centres in the
    # model's feature space, each the mean of at least mosaic.proto-min-records (m) records: at most
    # min(mosaic.proto-k, n_c // m) of each class the client holds, none of a class of fewer than m.
    assert all(r["prototypes"] is None for r in rec.replies[1].values())
    feature_dim = initial_model(cfg).feature_dim
    n_protos = 0
    for r in rec.replies[2].values():
        feats, labels = r["prototypes"]["features"], r["prototypes"]["labels"]
        assert feats.shape == (len(labels), feature_dim) and torch.isfinite(feats).all()
        m = cfg.of('mosaic').proto_min_records
        for n, sent in zip(r["counts"], torch.bincount(labels, minlength=C).tolist()):
            assert (sent == 0) if n < m else (1 <= sent <= min(2, n // m)), (n, sent, m)
        n_protos += len(labels)

    # The meta model trained on the prototypes' and labelled generator samples' expert
    # logits ('both'), and changed while training.
    assert len(rec.meta) == 1
    meta = rec.meta[0]
    held = sum(1 for c in range(C) if any(r["counts"][c] for r in rec.replies[2].values()))
    assert meta["z"].shape == (n_protos + 4 * held, C, C) and torch.isfinite(meta["z"]).all()
    assert distill["meta-inputs"] == len(meta["labels"]) and distill["meta-real-inputs"] == n_protos
    # model selection saw held-out prototypes only, never generated samples
    assert 0 < meta["stats"]["n_holdout"] == distill["meta-holdout"] <= n_protos // 2
    assert distill["meta-used"] == 1
    assert any(not torch.equal(meta["initial"][k], v) for k, v in meta["trained"].items())

    # Checkpoint and artifacts: C class experts; the meta model, every client's generator
    # (as sent) and prototypes, in distillation.pt.
    state = load_checkpoint(out["dir"])
    assert state["round"] == 3 and state["strategy"]["experts"] == {}   # not needed after round 2
    experts = rec.experts[0]["cnn_small"]
    assert len(rec.experts) == 1 and len(experts) == C
    artifacts = load_checkpoint(out["dir"], ARTIFACTS)
    assert artifacts["round"] == 2
    assert [g["partition-id"] for g in artifacts["generators"]] == [0, 1, 2]
    assert [p["partition-id"] for p in artifacts["prototypes"]] == [0, 1, 2]
    by_partition = [rec.replies[2][n] for n in sorted(rec.replies[2])]  # node ids follow partitions
    for g, r in zip(artifacts["generators"], by_partition):
        assert all(torch.equal(g["state"][k], v) for k, v in r["generator"].items())
    assert meta["trained"].keys() == artifacts["meta"].keys()
    assert all(torch.equal(artifacts["meta"][k], v) for k, v in meta["trained"].items())

    # The teacher that was distilled is the meta model over the C class experts.
    model = MetaModel(C, C, arch=cfg.of('mosaic').meta_arch)
    model.load_state_dict(artifacts["meta"])
    with torch.no_grad():
        expected = model.eval()(_expert_logits(cfg, experts, x))
        assert torch.allclose(kd["teacher"](x), expected, atol=1e-4)


def test_mosaic_default_meta_model_learns_from_prototypes_and_is_dropped_when_it_does_not_beat_the_mean(
        tmp_path, monkeypatch):
    """The default (``mosaic.meta-data='auto'``: prototypes with one model family; ``mosaic.meta-guard``):
    the meta model sees prototypes only, and a meta model that does not beat the plain mean
    of its experts on the held-out prototypes is not the teacher: the mean is. A learning
    rate that wrecks every step forces the fitted model back to its prior, which ties with
    the mean and so does not beat it."""
    overrides = {"strategy": "mosaic", "mosaic.meta-lr": 50.0, "mosaic.meta-patience": 1}
    out, rows, rec = _run(tmp_path, monkeypatch, **overrides)
    distill, kd = _check_schedule_and_distillation(out, rows, rec, {**TINY, **overrides})
    cfg, x = kd["cfg"], kd["x"]
    n_protos = sum(len(r["prototypes"]["labels"]) for r in rec.replies[2].values())
    (meta,) = rec.meta
    assert len(meta["labels"]) == n_protos == distill["meta-inputs"] == distill["meta-real-inputs"]
    stats = meta["stats"]
    assert stats["holdout_accuracy"] == stats["holdout_mean_accuracy"] and stats["best_epoch"] == 0
    assert distill["meta-used"] == 0 and distill["acc-teacher"] == distill["acc-ensemble"]
    assert "meta" not in load_checkpoint(out["dir"], ARTIFACTS)
    with torch.no_grad():  # the teacher that was distilled is the plain mean of the C class experts
        expected = _expert_logits(cfg, rec.experts[0]["cnn_small"], x).mean(dim=1)
        assert torch.allclose(kd["teacher"](x), expected, atol=1e-4)


@pytest.mark.parametrize("meta_data", ["prototypes", "screened"])
def test_without_prototypes_the_meta_model_gets_nothing_unvouched_and_the_mean_teaches(
        tmp_path, monkeypatch, meta_data):
    """Every class below ``mosaic.proto-min-records``: no client sends a prototype, so the meta model
    has no prototype to learn from ('prototypes') and no generator sample is screened as
    clean ('screened': unscreened samples are dropped, not used); the run goes on, with the
    plain mean of the experts as the teacher."""
    overrides = {"strategy": "mosaic", "mosaic.proto-min-records": 10**6, "mosaic.meta-data": meta_data}
    out, rows, rec = _run(tmp_path, monkeypatch, **overrides)
    assert all(len(r["prototypes"]["labels"]) == 0 for r in rec.replies[2].values())
    distill = next(r for r in rows if r.get("phase") == "distill")
    assert distill["meta-inputs"] == 0 and distill["meta-used"] == 0
    assert distill["acc-teacher"] == distill["acc-ensemble"] and rec.meta == []
    assert distill.get("meta-screen-kept", 0.0) == 0.0
    assert [r["round"] for r in rows] == [0, 1, 2, 3]


def test_mosaic_with_meta_experts_heads_fuses_each_experts_head_on_the_received_models_features(tmp_path, monkeypatch):
    """``mosaic.meta-experts='heads'``: the meta model learns on prototypes through the experts'
    heads and, as the teacher, reads the same kind of input: each class expert's head on the
    features of the model the distillation round's clients received (where they computed their
    prototypes), not on the round's aggregate."""
    overrides = {"strategy": "mosaic", "mosaic.meta-experts": "heads", "mosaic.meta-guard": False}
    out, rows, rec = _run(tmp_path, monkeypatch, **overrides)
    distill, kd = _check_schedule_and_distillation(out, rows, rec, {**TINY, **overrides})
    x = kd["x"]
    model = MetaModel(C, C, arch=kd["cfg"].of('mosaic').meta_arch)
    model.load_state_dict(load_checkpoint(out["dir"], ARTIFACTS)["meta"])
    sent = [m for m in out["grid"].sent if m.metadata.message_type == "train.mosaic" and m.content["config"]["distill"]]
    backbone = initial_model(kd["cfg"])
    backbone.load_state_dict(record_to_state(sent[0].content.array_records[ARRAYS]))
    backbone.eval()
    heads = []
    for state in rec.experts[0]["cnn_small"]:
        head = torch.nn.Linear(state["head.weight"].shape[1], C)
        head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
        heads.append(head)
    with torch.no_grad():
        feats = backbone.features(x)
        expected = model.eval()(torch.stack([h(feats) for h in heads], dim=1))
        got = kd["teacher"](x)
        assert torch.allclose(got, expected, atol=1e-4)
        full = model(_expert_logits(kd["cfg"], rec.experts[0]["cnn_small"], x))
        assert not torch.allclose(kd["teacher"](x), full, atol=1e-3)  # not the full experts' teacher
        aggregate = kd["student_before"].eval().features(x)
        assert not torch.allclose(got, model(torch.stack([h(aggregate) for h in heads], dim=1)), atol=1e-3)
    assert distill["meta-used"] == 1
    assert 0 <= distill["acc-heads-mean"] <= 1  # the prior the heads' meta model starts from


def test_mosaic_with_an_expert_pass_builds_its_class_experts_from_the_expert_models(tmp_path, monkeypatch):
    """``kd.expert-pass``: at the distillation round every client also sends an expert model
    (the ``distill-*`` settings, a second pass from the received model); the class experts
    the distillation starts from are the label-count weighted means of those, while the
    regular training's settings and the averaged model are the plain path's."""
    overrides = {"strategy": "mosaic", "kd.expert-pass": True, "kd.local-steps": 2, "kd.local-batch-size": 8,
                 "kd.local-momentum": 0.0, "kd.local-weight-decay": 1e-4}
    out, rows, rec = _run(tmp_path, monkeypatch, **overrides)
    _check_schedule_and_distillation(out, rows, rec, {**TINY, **overrides})
    sent = [m for m in out["grid"].sent if _round(m) == 2]
    assert all(m.content["config"]["local-steps"] == TINY["local-steps"]
               and m.content["config"]["expert-local-steps"] == 2 for m in sent)
    assert all(r["expert"] is None for rnd in (1, 3) for r in rec.replies[rnd].values())
    uploads = list(rec.replies[2].values())
    assert all(r["expert"] is not None and r["expert"].keys() == r["state"].keys() for r in uploads)
    counts = torch.tensor([r["counts"] for r in uploads], dtype=torch.float64)  # [clients, C]
    experts = rec.experts[0]["cnn_small"]
    for c in range(C):
        if counts[:, c].sum() == 0:
            continue
        w = counts[:, c] / counts[:, c].sum()
        for key, value in experts[c].items():
            if value.is_floating_point():
                expected = sum(wi * r["expert"][key].double() for wi, r in zip(w, uploads))
                assert torch.allclose(value.double(), expected, atol=1e-5), (c, key)


@pytest.mark.parametrize("overrides, expected", [
    ({}, "heads"),
    ({"mosaic.meta-data": "both"}, "heads"),
    ({"mosaic.proto-rounds": -1}, "full"),  # a bank of earlier rounds' feature spaces
    ({"mosaic.meta-data": "generated"}, "full"),
    ({"mosaic.meta-data": "clients"}, "full"),
    ({"client-capacities": "1,0.5"}, "full"),
    ({"client-models": "cnn_small,cnn_wide"}, "full"),
    ({"mosaic.meta-experts": "full"}, "full"),
])
def test_meta_experts_auto_reads_the_heads_where_prototypes_and_teacher_share_one_space(overrides, expected):
    """The default, ``mosaic.meta-experts='auto'``: heads where the meta model learns from one
    round's prototypes on the server with one architecture at full width; the full experts elsewhere."""
    from mosaic_flwr.config import config_heterogeneous, config_width_scaled, meta_data_for, meta_experts_for
    from mosaic_flwr.core.schedule import proto_rounds
    assert build_config({"strategy": "mosaic"}).of("mosaic").meta_experts == "auto"
    v = build_config({"strategy": "mosaic", **overrides}).values
    meta_data = meta_data_for(v["mosaic.meta-data"], config_heterogeneous(v), widths=config_width_scaled(v))
    assert meta_experts_for(v["mosaic.meta-experts"], meta_data, config_heterogeneous(v), proto_rounds(v)) == expected


def test_meta_experts_heads_needs_one_architecture():
    with pytest.raises(ConfigError, match=r"^mosaic.meta-experts: 'heads' .* one architecture at full width"):
        build_config({"strategy": "mosaic", "mosaic.meta-experts": "heads", "client-capacities": "1,0.5"})
    with pytest.raises(ConfigError, match=r"^mosaic.meta-experts: 'heads' .*mosaic.meta-data='clients'"):
        build_config({"strategy": "mosaic", "mosaic.meta-experts": "heads", "mosaic.meta-data": "clients"})


@pytest.mark.parametrize("overrides", [
    pytest.param({"strategy": "feddf-gen"}, id="feddf-gen"),
    # the same pipeline as Mosaic's but for its teacher: slow, to keep the quick loop short
    pytest.param({"strategy": "mosaic", "mosaic.meta": False}, id="mosaic-no-meta", marks=pytest.mark.slow),
])
def test_feddf_and_no_meta_ablation_distill_their_own_teacher(tmp_path, monkeypatch, overrides):
    run_config = {**TINY, **overrides}
    out, rows, rec = _run(tmp_path, monkeypatch, **overrides)
    distill, kd = _check_schedule_and_distillation(out, rows, rec, run_config)
    cfg, x = kd["cfg"], kd["x"]
    # no meta model, so no prototypes asked for or sent
    assert rec.meta == [] and "meta-holdout-accuracy" not in distill
    assert all(m.content["config"]["proto-k"] == 0 for m in out["grid"].sent if _round(m) == 2)
    assert all(r["prototypes"] is None for r in rec.replies[2].values())
    with torch.no_grad():
        teacher = kd["teacher"](x)
    if overrides["strategy"] == "feddf-gen":
        # FedDF's teacher: the mean of the logits of the models the clients sent
        clients = [rec.replies[2][n]["state"] for n in sorted(rec.replies[2])]
        assert torch.allclose(teacher, _expert_logits(cfg, clients, x).mean(1), atol=1e-4)
        assert "acc-ensemble" not in distill
    else:
        # the plain ensemble: the mean of the C class experts' logits (the meta model's start)
        experts = rec.experts[0]["cnn_small"]
        assert torch.allclose(teacher, _expert_logits(cfg, experts, x).mean(1), atol=1e-4)
        assert distill["acc-teacher"] == distill["acc-ensemble"]


@pytest.mark.parametrize("strategy", ["mosaic", "feddf-gen"])
def test_the_authors_dcgan_generators_end_to_end(tmp_path, monkeypatch, strategy):
    """``mosaic.generator='dcgan'``: every client uploads the authors' unconditional DCGAN at the
    distillation round (the server's dcgan template, ``mosaic.dcgan-width`` wide); the server keeps
    every one, draws ``kd.batch-size // 3`` samples of each per KD step, labelled by the
    teacher's argmax (one teacher pass a batch), and distils; no check batch (no label was
    asked for); the clients' privacy audit covers their prototypes only."""
    from mosaic_flwr.data import dataset_info
    from mosaic_flwr.models.generators import generator_for
    from mosaic_flwr.distill.samplers import UnconditionalSampler
    from mosaic_flwr.distill.server import RememberingTeacher

    overrides = {"strategy": strategy, "mosaic.generator": "dcgan", "mosaic.dcgan-width": 4}
    out, rows, rec = _run(tmp_path, monkeypatch, **overrides)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["rejected"] == 0 for r in rows[1:])
    template = generator_for(dataset_info("synthetic"), "dcgan", 4).state_dict()
    for r in rec.replies[2].values():
        assert r["generator"].keys() == template.keys()
        assert all(r["generator"][k].shape == v.shape for k, v in template.items())
    distill = rows[2]
    assert distill["generators-kept" if strategy == "mosaic" else "kd-seconds"] > 0
    assert 0 <= distill["gen-coverage-mean"] <= 1 and "gen-fidelity-mean" not in distill
    assert "gen-teacher" not in distill and distill["kd-teacher-label-agreement"] == 1.0
    assert _finite_fraction(distill["acc-after-distill"])
    kd = rec.kd[0]
    assert isinstance(kd["teacher"], RememberingTeacher) and isinstance(kd["sampler"], UnconditionalSampler)
    x, y = kd["probe"](0)
    assert x.shape == (3 * (TINY["kd.batch-size"] // 3), 1, 28, 28) and torch.isfinite(x).all()
    assert torch.equal(y, kd["teacher"].teacher(x).argmax(1).cpu())
    assert any(not torch.equal(kd["before"][k], v) for k, v in _floats(kd["after"]).items())
    assert (out["dir"] / "generator_samples.png").stat().st_size > 1000
    if strategy == "mosaic":
        privacy = json.loads((out["dir"] / "privacy.json").read_text())
        assert all("proto-count" in c and "dcr-train-pixel" not in c for c in privacy["clients"])
