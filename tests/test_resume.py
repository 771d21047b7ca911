"""Exact resume, for every registered strategy: a run whose server dies mid-round and resumes
from its checkpoint (on new node ids) reports and ends exactly as the uninterrupted run
(``support.assert_same_run``: every round's scores, the final accuracy, the distillation
summary, the checkpointed strategy state bit for bit). Features with resumable state of their
own (the look-ahead gate, collection rounds, the prototype bank, a hostile client) apply the
same check in their own tests."""

from __future__ import annotations

import json

import pytest

from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.registry import STRATEGIES
from tests.support import SYNTH, TINY_MOSAIC, assert_same_run, crash_then_resume, run_inprocess

PLAIN = {**SYNTH, "alpha": 0.3, "num-server-rounds": 3, "local-steps": 4, "batch-size": 16, "lr": 0.05}
RIVALS = {**SYNTH, "alpha": 0.5, "num-server-rounds": 3, "warmup-rounds": 1, "local-steps": 10, "batch-size": 16,
          "lr": 0.05, "kd.steps": 6, "kd.batch-size": 16, "kd.lr": 1e-3, "mosaic.meta-samples-per-class": 4,
          "fedftg.gen-interval": 2, "dfrd.gen-interval": 2, "kd.gate": "off"}
FEDDF = {**RIVALS, "feddf.transfer-set": "holdout", "validation-split": 0.1}


def _mosaic_checks(server_round, run_dir):
    """Mosaic dies in the distillation round (2; clients have trained their generators) and in
    a fine-tune round (3): the checkpoint holds the experts only until they are used."""
    state = load_checkpoint(run_dir)
    assert state["round"] == server_round - 1 and not (run_dir / "summary.json").exists()
    if server_round == 2:
        assert len(state["strategy"]["experts"]["cnn_small"]) == 10  # needed by the distillation round
    else:
        assert state["strategy"]["experts"] == {} and state["strategy"]["family-counts"] == {}


def _mosaic_artifacts(full, run_dir):
    """The distillation artifacts are written once, in the distillation round, and the
    client-derived files are readable by their owner only."""
    state = load_checkpoint(run_dir)
    assert state["round"] == 3 and state["strategy"]["experts"] == {}
    artifacts = load_checkpoint(run_dir, state["strategy"]["artifacts-file"])
    assert artifacts["round"] == 2 and {"generators", "prototypes"} <= set(artifacts)
    meta_used = json.loads((run_dir / "summary.json").read_text())["distillation"]["meta-used"]
    assert ("meta" in artifacts) == bool(meta_used)  # the meta model, where it taught
    assert [g["partition-id"] for g in artifacts["generators"]] == [0, 1, 2]
    mode = lambda name: (run_dir / name).stat().st_mode & 0o777
    assert mode("checkpoint.pt") == mode("distillation.pt") == 0o600  # client-derived: owner only
    assert mode("metrics.json") == mode("summary.json") == mode("generator_samples.png") != 0o600


# strategy -> (run config, the rounds the server dies in, checks after each crash, checks at the end)
CASES = {
    "fedavg": (PLAIN, (3,), None, None),
    "fedprox": ({**PLAIN, "proximal-mu": 0.1}, (3,), None, None),
    "fedrs": ({**PLAIN, "fedrs.alpha": 0.2}, (3,), None, None),
    "fedbn": ({**PLAIN, "model": "resnet8", "local-steps": 2}, (3,), None, None),
    "mosaic": ({k: v for k, v in TINY_MOSAIC.items() if k != "strategy"}, (2, 3), _mosaic_checks, _mosaic_artifacts),
    "feddf": (FEDDF, (3,), None, None),
    "feddf-gen": ({**RIVALS, "warmup-rounds": 2, "mosaic.gen-steps": 5, "mosaic.gen-batch-size": 8}, (3,), None, None),
    "fedftg": (RIVALS, (3,), None, None),
    "dfrd": (RIVALS, (3,), None, None),
    "dense": ({**RIVALS, "dense.gen-steps": 2, "dense.gen-interval": 3, "dense.gen-batch-size": 8,
               "dense.gen-width": 4, "dense.noise-dim": 8}, (3,), None, None),
    "fedgen": ({**PLAIN, "alpha": 0.3, "fedgen.gen-steps": 5, "fedgen.gen-batch-size": 8, "fedgen.hidden-dim": 32,
                "fedgen.noise-dim": 8}, (3,), None, None),
}
QUICK = {"fedavg", "fedbn", "fedgen"}  # the quick loop: plain, client-local state, a server-side generator


def test_every_registered_strategy_has_a_resume_case():
    assert set(CASES) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", [s if s in QUICK else pytest.param(s, marks=pytest.mark.slow) for s in CASES])
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_run(tmp_path, strategy):
    run_config, crash_rounds, checks, at_end = CASES[strategy]
    full = run_inprocess(tmp_path / "a", strategy=strategy, **run_config)["dir"]
    resumed = crash_then_resume(tmp_path / "b", crash_rounds, on_crash=checks, strategy=strategy, **run_config)
    assert_same_run(full, resumed, resumed_after=crash_rounds[-1] - 1)
    if at_end is not None:
        at_end(full, resumed)
