"""Issue 14: warm starts (``init-from``), the shared learning-rate schedule and the
distillation gate, on the in-process federation (real ClientApp handlers, synthetic data)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from mosaic_flwr.core.checkpoint import WARM_START_KEYS, load_checkpoint, warm_start_changes
from mosaic_flwr.config import ConfigError, build_config, lr_for_round
from mosaic_flwr.core.records import METRICS, NUM_EXAMPLES, decode_evaluate_reply, record_to_state
from tests.support import (as_flower_server, assert_same_run, crash_then_resume, metric_rows, round_of, run_inprocess,
                           SYNTH)

PRETRAIN = {**SYNTH, "strategy": "fedavg", "num-server-rounds": 2, "local-steps": 10, "validation-split": 0.2}
# Round 1 is the distillation round (warm start), round 2 a fine-tune round.
CONTINUE = {**SYNTH, "strategy": "mosaic", "num-server-rounds": 2, "warmup-rounds": 1, "local-steps": 10,
            "mosaic.gen-steps": 10, "kd.steps": 5, "mosaic.meta-epochs": 3, "validation-split": 0.2}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One FedAvg pre-training run (2 rounds, 3 clients) the tests continue from."""
    return run_inprocess(tmp_path_factory.mktemp("pre"), **PRETRAIN)["dir"]


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("strategy, schedule, expected", [
    ("fedavg", "auto", [0.1, 0.1, 0.1, 0.1]),       # the baselines' default: constant
    ("fedprox", "auto", [0.1, 0.1, 0.1, 0.1]),
    ("mosaic", "auto", [0.1, 0.1, 0.01, 0.01]),     # distilling strategies: step after warm-up
    ("feddf-gen", "auto", [0.1, 0.1, 0.01, 0.01]),
    ("fedavg", "step", [0.1, 0.1, 0.01, 0.01]),     # the baseline given Mosaic's schedule
    ("mosaic", "constant", [0.1, 0.1, 0.1, 0.1]),
])
def test_every_strategy_follows_the_same_lr_schedule(strategy, schedule, expected):
    cfg = build_config({"strategy": strategy, "lr-schedule": schedule, "lr": 0.1, "finetune-lr": 0.01,
                        "warmup-rounds": 2, "num-server-rounds": 4})
    assert [lr_for_round(cfg, r) for r in range(1, 5)] == expected


@pytest.mark.parametrize("step_round, expected", [
    (-1, [0.1, 0.1, 0.1, 0.01]),   # after warmup-rounds (3)
    (1, [0.1, 0.01, 0.01, 0.01]),  # before the distillation round: it distils fine-tuned models
    (4, [0.1, 0.1, 0.1, 0.1]),     # after the last round: never
])
def test_lr_step_round_moves_the_step_independently_of_the_distillation_round(step_round, expected):
    cfg = build_config({"strategy": "mosaic", "lr": 0.1, "finetune-lr": 0.01, "warmup-rounds": 3,
                        "num-server-rounds": 4, "lr-step-round": step_round})
    assert [lr_for_round(cfg, r) for r in range(1, 5)] == expected
    fedavg = build_config({"strategy": "fedavg", "lr-schedule": "step", "lr": 0.1, "finetune-lr": 0.01,
                           "warmup-rounds": 3, "num-server-rounds": 4, "lr-step-round": step_round})
    assert [lr_for_round(fedavg, r) for r in range(1, 5)] == expected  # the baseline at the same rates


def test_fedavg_with_the_step_schedule_sends_the_finetune_rate(tmp_path):
    out = run_inprocess(tmp_path, **{**PRETRAIN, "num-server-rounds": 3, "lr-schedule": "step", "local-steps": 2,
                                     "warmup-rounds": 1, "lr": 0.05, "finetune-lr": 0.005})
    lrs = {round_of(m): m.content["config"]["lr"] for m in out["grid"].sent if round_of(m)}
    assert lrs == {1: 0.05, 2: 0.005, 3: 0.005}


# ----------------------------------------------------------------------------- init-from
def test_warm_start_changes_name_every_key_that_differs():
    saved = {k: 1 for k in WARM_START_KEYS}
    assert warm_start_changes(saved, {**saved, "lr": 5, "strategy": "x"}) == []  # training settings may differ
    lines = warm_start_changes(saved, {**saved, "alpha": 2, "model": "cnn"})
    assert lines == ["alpha: 1 -> 2", "model: 1 -> 'cnn'"]


def test_a_run_starts_from_another_runs_final_model_and_records_it(tmp_path, pretrained):
    pre = pretrained
    final = load_checkpoint(pre)["strategy"]["globals"]["cnn_small"]
    pre_rows = metric_rows(pre)
    out = run_inprocess(tmp_path / "cont", **{**CONTINUE, "init-from": str(pre), "kd.gate": "off",
                                              "mosaic.meta-prior": "global"})
    rows = metric_rows(out["dir"])
    # The server's own check at the distillation round (held-out generator samples).
    for key in ("gen-student", "gen-ensemble", "gen-teacher", "gen-after-distill"):
        assert 0 <= rows[1][key] <= 1, key
    # Round 0 evaluates the model it started from: the pre-training's last figure.
    assert rows[0]["accuracy"] == pytest.approx(pre_rows[-1]["accuracy"], abs=1e-6)
    first = [m for m in out["grid"].sent if round_of(m) == 1]
    assert first and all(m.metadata.message_type == "train.mosaic" and m.content["config"]["distill"]
                         for m in first)  # warmup-rounds=1: the first round distils
    for m in first:
        got = record_to_state(m.content["arrays"])
        assert all(torch.equal(got[k], v) for k, v in final.items())
    summary = json.loads((out["dir"] / "summary.json").read_text())
    assert summary["init_from"]["run"] == str(pre.resolve())
    assert summary["init_from"]["strategy"] == "fedavg" and summary["init_from"]["after_round"] == 2
    assert summary["init_from"]["accuracy"] == pre_rows[-1]["accuracy"]


def test_init_from_a_run_of_other_data_or_models_is_refused_before_training(tmp_path, pretrained):
    pre = pretrained
    with pytest.raises(RuntimeError, match=r"init-from: .*alpha: 1\.0 -> 0\.5.*model: 'cnn_small' -> 'cnn_wide'"):
        run_inprocess(tmp_path / "other", **{**CONTINUE, "init-from": str(pre), "alpha": 0.5, "model": "cnn_wide"})
    assert not (tmp_path / "other" / "run" / "checkpoint.pt").exists()  # nothing trained
    with pytest.raises(RuntimeError, match=r"init-from: no checkpoint at"):
        run_inprocess(tmp_path / "none", **{**CONTINUE, "init-from": str(tmp_path / "missing")})
    with pytest.raises(RuntimeError, match="init-from: the connected clients"):  # another client set
        run_inprocess(tmp_path / "four", num_nodes=4, **{**CONTINUE, "init-from": str(pre)})


# ----------------------------------------------------------------------------- the gate
def _evaluate_reply(**metrics) -> Message:
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), dst_node_id=100, message_type="evaluate")


def test_evaluate_replies_are_validated():
    ok, problem = decode_evaluate_reply(_evaluate_reply(**{NUM_EXAMPLES: 10, "correct-a": 3, "correct-b": 10}),
                                        ["a", "b"])
    assert problem is None and ok == {NUM_EXAMPLES: 10, "a": 3, "b": 10}
    for bad, needle in (({NUM_EXAMPLES: 10, "correct-a": 11, "correct-b": 1}, "not in [0, 10]"),
                        ({NUM_EXAMPLES: 10, "correct-a": 2.5, "correct-b": 1}, "not an integer"),
                        ({NUM_EXAMPLES: 10, "correct-a": float("inf"), "correct-b": 1}, "not an integer"),
                        ({NUM_EXAMPLES: 10, "correct-a": float("nan"), "correct-b": 1}, "not an integer"),
                        ({NUM_EXAMPLES: float("inf"), "correct-a": 1, "correct-b": 1}, "not an integer"),
                        ({NUM_EXAMPLES: 0, "correct-a": 0, "correct-b": 0}, "not positive"),
                        ({NUM_EXAMPLES: 10, "correct-a": 1}, "correct-b")):
        got, problem = decode_evaluate_reply(_evaluate_reply(**bad), ["a", "b"])
        assert got is None and needle in problem


# A distillation that must hurt: Adam at lr 5 for 20 steps wrecks the student.
HARMFUL = {"kd.lr": 5.0, "kd.steps": 20}


@pytest.mark.parametrize("gate", ["clients", pytest.param("validation", marks=pytest.mark.slow)])  # the default quick
def test_the_gate_keeps_the_model_before_a_distillation_that_hurts(tmp_path, pretrained, gate):
    out = run_inprocess(tmp_path / "cont", **{**CONTINUE, **HARMFUL, "num-server-rounds": 1,
                                              "init-from": str(pretrained), "kd.gate": gate})
    report = json.loads((out["dir"] / "summary.json").read_text())["distillation"]
    assert report["gate-kept"] == 0.0 and report["gate-after"] < report["gate-before"]
    assert report["val-after-distill"] < report["val-before-distill"]  # it really hurt
    # The round's global model is the aggregate before distillation, not the wrecked student.
    assert report["acc-after-distill"] == pytest.approx(report["acc-before-distill"], abs=1e-9)
    evaluate = [m for m in out["grid"].sent if m.metadata.message_type == "evaluate"]
    if gate == "clients":  # every client scored both candidates, its own architecture's
        assert sorted(m.metadata.dst_node_id for m in evaluate) == out["grid"].node_ids
        assert all(set(m.content["config"]["candidates"]) == {"before", "after"} for m in evaluate)
        assert not any(torch.equal(record_to_state(evaluate[0].content["candidate-before"])[k], v)
                       for k, v in record_to_state(evaluate[0].content["candidate-after"]).items()
                       if v.is_floating_point() and k.endswith("weight"))
    else:
        assert evaluate == []


@pytest.mark.slow  # ~25 s; the quick loop has the gate refusing the same distillation (above)
def test_without_the_gate_a_harmful_distillation_is_kept(tmp_path, pretrained):
    out = run_inprocess(tmp_path / "cont", **{**CONTINUE, **HARMFUL, "num-server-rounds": 1,
                                              "init-from": str(pretrained), "kd.gate": "off"})
    report = json.loads((out["dir"] / "summary.json").read_text())["distillation"]
    assert report["gate-kept"] == 1.0 and "gate-before" not in report
    assert report["acc-after-distill"] < report["acc-before-distill"]


def test_the_validation_gate_needs_a_validation_split():
    with pytest.raises(ConfigError, match="kd.gate: 'validation' reads the validation split"):
        build_config({"kd.gate": "validation"})


# ----------------------------------------------------------------------------- look-ahead gate
def _scripted_gate(monkeypatch, *winners: str) -> list[int]:
    """The gate's check answers ``winners`` in turn ('after' or 'before' better); returns the
    rounds at which it was asked."""
    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy

    asked, answers = [], iter(winners)

    def scores(self, server_round, before, after):
        asked.append(server_round)
        win = next(answers)
        return {f: {"before": 0.5 + 0.1 * (win == "before"), "after": 0.5 + 0.1 * (win == "after")}
                for f in after}

    monkeypatch.setattr(MosaicStrategy, "gate_scores", scores)
    return asked


LOOKAHEAD = {**CONTINUE, "num-server-rounds": 3}  # round 1 distils, rounds 2-3 fine-tune


def _final_globals(run_dir):
    return load_checkpoint(run_dir)["strategy"]["globals"]["cnn_small"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_look_ahead_gate_undoes_a_distillation_that_fine_tunes_worse(tmp_path, pretrained, monkeypatch):
    """Kept at its round, the distilled model trains beside the model before distillation;
    when the latter is better at the end, the run ends exactly where it would have without
    distillation (the run whose gate refused it at its round)."""
    start = {**LOOKAHEAD, "init-from": str(pretrained)}
    asked = _scripted_gate(monkeypatch, "after", "before")
    undone = run_inprocess(tmp_path / "undone", **start)
    assert asked == [1, 3]                      # at the distillation round, then after round 3
    asked = _scripted_gate(monkeypatch, "before")
    refused = run_inprocess(tmp_path / "refused", **start)
    assert asked == [1]                         # nothing kept: no second path, no second check
    assert _same(_final_globals(undone["dir"]), _final_globals(refused["dir"]))
    report = json.loads((undone["dir"] / "summary.json").read_text())["distillation"]
    assert report["gate-kept"] == 1.0 and report["gate-final-kept"] == 0.0 and report["gate-final-round"] == 3
    rows, ref = metric_rows(undone["dir"]), metric_rows(refused["dir"])
    assert rows[3]["accuracy"] == ref[3]["accuracy"]
    # During the look-ahead the path without distillation is the refused run's, round by round.
    assert rows[2]["acc-undistilled"] == ref[2]["accuracy"] and rows[2]["shadow-clients"] == 3
    assert rows[2]["loss"] != ref[2]["loss"]  # the distilled path is another model
    # Every client trained both models in each fine-tune round, the same clients, in that order.
    for r in (2, 3):
        sent = [m for m in undone["grid"].sent if round_of(m) == r and m.metadata.message_type == "train"]
        assert len(sent) == 6 and sorted(m.metadata.dst_node_id for m in sent[:3]) == \
            sorted(m.metadata.dst_node_id for m in sent[3:])
    # Round 2: the clients first receive the distilled model, then the model before
    # distillation (what the refused run sent them).
    sent = [record_to_state(m.content["arrays"]) for m in undone["grid"].sent if round_of(m) == 2]
    plain = record_to_state(next(m for m in refused["grid"].sent if round_of(m) == 2).content["arrays"])
    assert _same(sent[3], plain) and not _same(sent[0], plain)


@pytest.mark.slow
def test_the_look_ahead_gate_keeps_a_distillation_that_stays_better_and_resumes_exactly(
        tmp_path, pretrained, monkeypatch):

    start = {**LOOKAHEAD, "init-from": str(pretrained)}
    _scripted_gate(monkeypatch, "after", "after")
    kept = run_inprocess(tmp_path / "kept", **start)
    _scripted_gate(monkeypatch, "after")
    decided_at_once = run_inprocess(tmp_path / "once", **{**start, "kd.gate-rounds": 0})
    assert _same(_final_globals(kept["dir"]), _final_globals(decided_at_once["dir"]))
    assert [m for m in decided_at_once["grid"].sent if round_of(m) == 2 and m.metadata.message_type == "train"
            ].__len__() == 3                     # kd.gate-rounds=0: one path only
    # Killed in round 3, with both paths in the checkpoint, resumed: the same run.
    _scripted_gate(monkeypatch, "after", "after")

    def both_paths_kept(server_round, run_dir):
        state = load_checkpoint(run_dir)
        assert state["round"] == 2 and state["strategy"]["shadow-until"] == 3
        assert set(state["strategy"]["shadow"]) == {"cnn_small"}
        _scripted_gate(monkeypatch, "after")  # what the gate still has to say after the restart
    run_dir = crash_then_resume(tmp_path / "b", [3], on_crash=both_paths_kept, **start)
    assert_same_run(kept["dir"], run_dir, resumed_after=2)
    assert load_checkpoint(run_dir)["strategy"]["shadow"] is None


def test_gate_rounds_is_checked():
    with pytest.raises(ConfigError, match="kd.gate-rounds: must be -1"):
        build_config({"kd.gate-rounds": -2})


# ----------------------------------------------------------------------------- mosaic.meta-data='clients'
def test_the_meta_model_can_learn_from_the_clients_own_images(tmp_path, pretrained):
    """``mosaic.meta-data='clients'``: at the distillation round every client receives the distinct
    class experts and returns their logits on at most mosaic.meta-samples-per-class of its images
    per class; the meta model trains on those (no prototypes are asked for)."""
    out = run_inprocess(tmp_path / "cont", **{**CONTINUE, "num-server-rounds": 1, "init-from": str(pretrained),
                                              "kd.gate": "off", "mosaic.meta-data": "clients",
                                              "mosaic.meta-samples-per-class": 7})
    sent = [m for m in out["grid"].sent if m.metadata.message_type == "query.logits"]
    assert sorted(m.metadata.dst_node_id for m in sent) == out["grid"].node_ids
    c = sent[0].content["config"]
    assert c["samples-per-class"] == 7 and 1 <= c["num-models"] <= 10
    assert all(f"model-{j}" in sent[0].content.array_records for j in range(c["num-models"]))
    train = [m for m in out["grid"].sent if m.metadata.message_type == "train.mosaic"]
    assert all(m.content["config"]["proto-k"] == 0 for m in train)
    report = json.loads((out["dir"] / "summary.json").read_text())["distillation"]
    assert report["meta-client-replies"] == 3 and 0 < report["meta-inputs"] <= 3 * 7 * 10


def _logits_reply(logits, labels) -> Message:
    from mosaic_flwr.core.records import META_LOGITS, state_to_record

    as_flower_server()
    return Message(RecordDict({META_LOGITS: state_to_record({"logits": logits, "labels": labels})}),
                   dst_node_id=100, message_type="query.logits")


def test_logits_replies_are_validated():
    from mosaic_flwr.core.records import decode_logits_reply

    counts = torch.tensor([5, 0, 2])
    kw = {"num_models": 2, "num_classes": 3, "max_per_class": 4, "counts": counts}
    ok, problem = decode_logits_reply(_logits_reply(torch.zeros(5, 2, 3), torch.tensor([0, 0, 0, 2, 2])), **kw)
    assert problem is None and ok[0].shape == (5, 2, 3)
    for logits, labels, needle in (
            (torch.zeros(5, 2, 3), torch.tensor([0, 0, 0, 0, 0]), "more than the client holds"),  # > 4 asked
            (torch.zeros(1, 2, 3), torch.tensor([1]), "class 1"),                               # undeclared class
            (torch.full((1, 2, 3), float("nan")), torch.tensor([0]), "not finite"),
            (torch.zeros(1, 3, 3), torch.tensor([0]), "expected [n <= 12, 2, 3]"),
            (torch.zeros(13, 2, 3), torch.zeros(13, dtype=torch.long), "expected [n <= 12, 2, 3]"),  # > 3 x 4 rows
            (torch.zeros(1, 2, 3, dtype=torch.int64), torch.tensor([0]), "expected float logits"),
            (torch.full((1, 2, 3), 1e300, dtype=torch.float64), torch.tensor([0]), "not finite"),  # inf as float32
            (torch.zeros(2, 2, 3), torch.tensor([0]), "labels"),
            (torch.zeros(1, 2, 3), torch.tensor([7]), "outside")):
        got, problem = decode_logits_reply(_logits_reply(logits, labels), **kw)
        assert got is None and needle in problem, (needle, problem)


def test_meta_data_clients_needs_one_architecture():
    with pytest.raises(ConfigError, match="mosaic.meta-data: 'clients' sends the class experts"):
        build_config({"mosaic.meta-data": "clients", "client-models": "cnn_small,resnet8"})
