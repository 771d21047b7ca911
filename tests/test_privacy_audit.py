"""The privacy audit of what Mosaic clients upload (``mosaic_flwr/privacy``): the pure
functions on stand-ins whose answer is known, the validation of a reply's figures, and an
in-process Mosaic run that writes privacy.json, the plot and the summary entry."""

import json
import math

import pytest
import torch

from mosaic_flwr.data import dataset_info
from mosaic_flwr.methods.mosaic.client import mosaic_client_round
from mosaic_flwr.methods.mosaic.prototypes import class_prototypes
from mosaic_flwr.privacy.audit import (RandomFeatures, audit_generator, audit_prototypes, flags, label_disclosure,
                                       nn_distances, roc_auc, validate_figures)
from mosaic_flwr.privacy.report import client_entry, summarise
from mosaic_flwr.models import build_model
from tests.support import as_flower_server, run_inprocess

C = 10


def _data(n: int, seed: int):
    """Images of 10 classes: a fixed mean per class plus independent noise (the same means for
    every seed), so two draws are independent samples of one distribution."""
    means = torch.randn(C, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (n,), generator=g)
    return means[y] + torch.randn(n, 1, 28, 28, generator=g), y


def _stand_in(x: torch.Tensor, y: torch.Tensor, seed: int = 3):
    """A "generator" that returns random images of the asked class from ``(x, y)``."""
    g = torch.Generator().manual_seed(seed)

    def generate(labels):
        out = []
        for c in labels.tolist():
            idx = torch.nonzero(y == c).flatten()
            out.append(x[idx[torch.randint(len(idx), (1,), generator=g)]][0])
        return torch.stack(out)
    return generate


@pytest.fixture(scope="module")
def split():
    return {"train": _data(600, 10), "unseen": _data(1500, 11), "fresh": _data(1500, 12)}


def test_nn_distances_and_leave_one_out():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    assert nn_distances(a, a).tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(nn_distances(a, a, exclude_self=True, chunk=2), torch.tensor([1.0, math.sqrt(9 + 9), 1.0]))
    with pytest.raises(ValueError):
        nn_distances(a[:1], a[:1], exclude_self=True)


def test_roc_auc_known_values_and_ties():
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))[0] == 1.0
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))[0] == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0]))[0] == 0.5  # ties count one half
    # 1 > 0 and 1 > 0.5 win, 0.2 loses to 0.5 and wins over 0: 3 of 4 pairs
    auc, low, high = roc_auc(torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.5]))
    assert auc == 0.75 and 0 <= low < auc < high <= 1


def test_auc_near_half_on_independent_data():
    """Scores of two independent draws of one distribution: AUC near 0.5, its interval covers it."""
    g = torch.Generator().manual_seed(0)
    auc, low, high = roc_auc(torch.randn(2000, generator=g), torch.randn(2000, generator=g))
    assert abs(auc - 0.5) < 0.03 and low < 0.5 < high
    auc, low, high = roc_auc(torch.randn(2000, generator=g) + 1, torch.randn(2000, generator=g))
    assert low > 0.7  # a real shift is seen


def test_random_features_fixed_and_data_independent():
    x = torch.randn(5, 3, 32, 32)
    f1, f2 = RandomFeatures(3)(x), RandomFeatures(3)(x)
    assert f1.shape == (5, RandomFeatures.DIM) and torch.equal(f1, f2)  # the same net every time, any global RNG state
    torch.manual_seed(123)
    assert torch.equal(RandomFeatures(3)(x), f1)


def test_memorising_generator_is_flagged(split):
    (xt, yt), (xu, yu) = split["train"], split["unseen"]
    out = audit_generator(_stand_in(xt, yt), xt, yt, xu, yu, n_gen=60, m_max=100, seed=0)
    assert out["dcr-ratio-pixel"] < 0.1 and out["dcr-ratio-feature"] < 0.1
    assert out["near-copy-pixel"] > 0.9 and out["near-copy-baseline-pixel"] < 0.2
    assert out["mia-auc-pixel"] > 0.6 and out["mia-auc-pixel-low"] > 0.5
    assert {"copies", "near-copies", "membership"} <= set(flags(out))


def test_fresh_generator_passes(split):
    (xt, yt), (xu, yu), (xf, yf) = split["train"], split["unseen"], split["fresh"]
    out = audit_generator(_stand_in(xf, yf), xt, yt, xu, yu, n_gen=60, m_max=100, seed=0)
    assert 0.9 < out["dcr-ratio-pixel"] < 1.1 and 0.9 < out["dcr-ratio-feature"] < 1.1
    assert abs(out["near-copy-pixel"] - out["near-copy-baseline-pixel"]) < 0.1
    assert out["mia-auc-pixel-low"] < 0.5 < out["mia-auc-pixel-high"]  # chance, its interval covers 0.5
    assert flags(out) == []


def test_generator_audit_reads_only_held_classes(split):
    (xt, yt), (xu, yu) = split["train"], split["unseen"]
    keep = yt < 3
    asked = []

    def generate(labels):
        asked.extend(labels.unique().tolist())
        return torch.zeros(len(labels), 1, 28, 28)
    out = audit_generator(generate, xt[keep], yt[keep], xu, yu, n_gen=5, m_max=20)
    assert sorted(set(asked)) == [0, 1, 2] and out["classes-audited"] == 3
    assert out["class-m"][:3] == [20.0] * 3 and out["class-m"][3:] == [0.0] * 7
    assert all(r >= 0 for r in out["class-dcr-ratio-pixel"][:3]) and out["class-dcr-ratio-pixel"][3:] == [-1.0] * 7
    assert audit_generator(generate, xt[keep], yt[keep], xu[yu >= 3], yu[yu >= 3], n_gen=5) == {}


def test_one_sample_class_prototype_is_flagged():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(41, 16, generator=g)
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(1, dtype=torch.long)])
    protos, plabels = class_prototypes(feats, labels, 5, seed=0)
    out = audit_prototypes(protos, plabels, feats, labels, 5)
    assert out["proto-single-record"] == 1 and out["proto-few-classes"] == 1
    assert out["proto-exact"] >= 1 and out["proto-nn-ratio-min"] < 1e-6  # class 1's prototype is its record
    assert "prototype-records" in flags(out)
    # the 5 k-means centres of a 40-record class are none of them a record
    many = audit_prototypes(protos[plabels == 0], plabels[plabels == 0], feats[labels == 0], labels[labels == 0], 5)
    assert many["proto-exact"] == 0 and many["proto-single-record"] == 0 and flags(many) == []


def test_prototypes_of_at_least_m_records_are_never_a_record():
    """``mosaic.proto-min-records``: the 1-record class sends nothing, every prototype of the others is
    the mean of at least m records, and the audit flags none of them."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(61, 16, generator=g)
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(1, dtype=torch.long),
                        torch.full((20,), 2, dtype=torch.long)])
    for m in (2, 5, 9):
        protos, plabels = class_prototypes(feats, labels, 5, seed=0, min_records=m)
        assert set(plabels.tolist()) == {0, 2}
        assert (plabels == 0).sum() == min(5, 40 // m) or (plabels == 0).sum() < min(5, 40 // m)  # merged, never more
        out = audit_prototypes(protos, plabels, feats, labels, 5)
        assert out["proto-exact"] == 0 and out["proto-single-record"] == 0 and flags(out) == [], (m, out)
        assert out["proto-nn-ratio-min"] > 0.1


def test_clusters_of_at_least_m_points_partition_the_points():
    from mosaic_flwr.methods.mosaic.prototypes import clusters_of_at_least, kmeans
    g = torch.Generator().manual_seed(1)
    points = torch.cat([torch.randn(30, 4, generator=g), torch.randn(3, 4, generator=g) + 20])  # a tiny far cluster
    centres = kmeans(points, 5, seed=0)
    means, assignment = clusters_of_at_least(points, centres, 6)
    sizes = torch.bincount(assignment, minlength=len(means))
    assert sizes.min() >= 6 and len(assignment) == len(points) and len(means) < 5
    for j in range(len(means)):  # each prototype is exactly the mean of its own records
        assert torch.allclose(points[assignment == j].mean(dim=0), means[j], atol=1e-5)
    with pytest.raises(ValueError, match="fewer than 40"):
        clusters_of_at_least(points, centres, 40)


def test_summary_per_class_small_vs_large():
    entries = [client_entry(0, torch.tensor([1, 2, 300]), {"dcr-ratio-pixel": 0.9, "class-m": [1.0, 2.0, 300.0],
                                                       "class-dcr-ratio-pixel": [0.5, 0.7, 1.01]}),
               client_entry(1, torch.tensor([3, 0, 400]), {"dcr-ratio-pixel": 1.0, "class-m": [3.0, 0.0, 400.0],
                                                       "class-dcr-ratio-pixel": [1.2, -1.0, 0.99]})]
    s = summarise(entries)
    assert s["class-dcr-ratio-pixel-small-classes"] == 3 and s["class-dcr-ratio-pixel-small-below-1"] == 2
    assert s["class-dcr-ratio-pixel-small-median"] == 0.7 and s["class-dcr-ratio-pixel-large-classes"] == 2
    assert s["class-dcr-ratio-pixel-small-sign-p"] == 0.5  # P(>= 2 of 3 below 1) = 4/8
    assert s["label-rare-classes-total"] == 3


def test_label_disclosure():
    out = label_disclosure(torch.tensor([0, 1, 5, 6, 300]))
    assert out == {"label-classes-held": 4.0, "label-rare-classes": 2.0, "label-min-count": 1.0}


@pytest.mark.parametrize("metrics,problem", [
    ({"privacy-mia-auc-pixel": 1.5}, "out of range"),
    ({"privacy-dcr-ratio-pixel": -0.1}, "out of range"),
    ({"privacy-dcr-ratio-pixel": float("inf")}, "not a finite"),
    ({"privacy-near-copy-pixel": True}, "not a finite"),
    ({"privacy-classes-audited": 11.0}, "exceeds"),
    ({"privacy-class-m": [1.0] * 11}, "at most"),
    ({"privacy-class-m": [1.0, float("nan")]}, "at most"),
    ({"privacy-class-dcr-ratio-pixel": [0.5, -0.5]}, "out of range"),
    ({"privacy-class-m": "x"}, "at most"),
])
def test_hostile_figures_are_rejected(metrics, problem):
    figures, why = validate_figures(metrics, C)
    assert figures == {} and problem in why


def test_figures_without_audit_keys_and_unknown_keys():
    assert validate_figures({"train-loss": 1.0, "num-examples": 5}, C) == ({}, None)
    figures, why = validate_figures({"privacy-dcr-ratio-pixel": 0.5, "privacy-whatever": 7.0}, C)
    assert why is None and figures == {"dcr-ratio-pixel": 0.5}
    entry = client_entry(3, torch.tensor([5, 0, 1]), {}, None, "privacy-x: bad")
    assert entry["audit-rejected"] == "privacy-x: bad" and entry["flags"] == []
    summary = summarise([entry])
    assert summary["rejected"] == [3] and summary["clients-audited"] == 0


def test_client_round_reports_the_audit():
    """The client's distillation round: the figures come back as finite ``privacy-*`` metrics;
    without unseen data (audit off) none do, and the uploads are the same either way."""
    info = dataset_info("synthetic")
    x, y = _data(120, 20)
    xu, yu = _data(200, 21)
    common = dict(train={"epochs": 0, "steps": 2, "batch_size": 16, "lr": 0.01, "momentum": 0.0,
                         "weight_decay": 0.0}, seed=1, device=torch.device("cpu"), distill_round=True, proto_k=5,
                  gen={"steps": 2, "batch-size": 8, "lr": 1e-3, "ce-weight": 1.0, "div-weight": 0.0})

    def model():
        torch.manual_seed(0)
        return build_model("cnn_small", 1, C, 28)
    on = mosaic_client_round(model(), x, y, info, audit_unseen=(xu, yu), **common)
    off = mosaic_client_round(model(), x, y, info, **common)
    audit = {k: v for k, v in on.metrics.items() if k.startswith("privacy-")}
    assert {"privacy-dcr-ratio-pixel", "privacy-mia-auc-pixel", "privacy-proto-count", "privacy-seconds"} <= set(audit)
    assert all(math.isfinite(x) for v in audit.values() for x in (v if isinstance(v, list) else [v]))
    assert not any(k.startswith("privacy-") for k in off.metrics)
    assert validate_figures(on.metrics, C)[1] is None
    assert len(on.metrics["privacy-class-m"]) == C
    # the reply carries the per-class lists to the server, which keeps them
    from flwr.app import Message
    from mosaic_flwr.core.records import decode_mosaic_reply, mosaic_payload
    from mosaic_flwr.models.generators import generator_for
    as_flower_server()
    msg = Message(mosaic_payload(on), dst_node_id=1, message_type="train.mosaic")
    reply, problem = decode_mosaic_reply(msg, on.state, num_classes=C, feature_dim=on.prototypes[0].shape[1],
                                         generator_template=generator_for(info).state_dict(),
                                         expect_prototypes=True, max_prototypes=5 * C)
    assert problem is None
    figures, why = validate_figures(reply.metrics, C)
    assert why is None and figures["class-m"] == on.metrics["privacy-class-m"]
    for a, b in ((on.prototypes[0], off.prototypes[0]), *((on.generator[k], off.generator[k]) for k in on.generator)):
        assert torch.equal(a, b)  # auditing changes nothing that is uploaded


@pytest.mark.slow
def test_inprocess_mosaic_writes_privacy(tmp_path):
    out = run_inprocess(tmp_path, dataset="synthetic", num_nodes=3, **{
        "strategy": "mosaic", "num-server-rounds": 2, "warmup-rounds": 1, "local-steps": 5,
        "mosaic.gen-steps": 5, "kd.steps": 3, "mosaic.meta-epochs": 2, "mosaic.meta-data": "prototypes", "kd.gate": "off",
        "privacy-audit": True})["dir"]
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["round"] == 1 and len(privacy["clients"]) == 3
    assert all("dcr-ratio-pixel" in c and "proto-count" in c and "label-counts" in c and len(c["class-m"]) == 10
               for c in privacy["clients"])
    assert (out / "privacy.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["clients-audited"] == 3
    assert summary["privacy"] == privacy["summary"]


@pytest.mark.slow
def test_inprocess_audit_off_writes_nothing(tmp_path):
    out = run_inprocess(tmp_path, dataset="synthetic", num_nodes=2, **{
        "strategy": "mosaic", "num-server-rounds": 1, "warmup-rounds": 1, "local-steps": 3,
        "mosaic.gen-steps": 3, "kd.steps": 2, "mosaic.meta-epochs": 1, "mosaic.meta-data": "prototypes", "kd.gate": "off",
        "privacy-audit": False})["dir"]
    assert not (out / "privacy.json").exists()
    assert "privacy" not in json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_inprocess_feddf_gen_audits_its_generators(tmp_path):
    """FedDF on the clients' generators uploads generators too: audited, no prototype figures."""
    out = run_inprocess(tmp_path, dataset="synthetic", num_nodes=2, **{
        "strategy": "feddf-gen", "num-server-rounds": 1, "warmup-rounds": 1, "local-steps": 3,
        "mosaic.gen-steps": 3, "kd.steps": 2, "kd.gate": "off"})["dir"]
    privacy = json.loads((out / "privacy.json").read_text())
    assert len(privacy["clients"]) == 2
    assert all("mia-auc-pixel" in c and "proto-count" not in c for c in privacy["clients"])


@pytest.mark.slow
def test_node_without_test_split_skips_the_audit(tmp_path, monkeypatch):
    """A node that cannot read the test split trains and uploads as usual, without figures."""
    import client_app.app as capp
    from mosaic_flwr.data import DatasetNotFoundError

    def missing(cfg):
        raise DatasetNotFoundError("no test split here")
    monkeypatch.setattr(capp, "unseen_data", missing)
    out = run_inprocess(tmp_path, dataset="synthetic", num_nodes=2, **{
        "strategy": "mosaic", "num-server-rounds": 1, "warmup-rounds": 1, "local-steps": 3,
        "mosaic.gen-steps": 3, "kd.steps": 2, "mosaic.meta-epochs": 1, "mosaic.meta-data": "prototypes", "kd.gate": "off"})["dir"]
    summary = json.loads((out / "summary.json").read_text())
    assert not (out / "privacy.json").exists() and "privacy" not in summary
    assert summary["distillation"]["acc-after-distill"] >= 0  # the distillation ran on the uploads
