"""One Mosaic run, in-process (ClientApp + strategy, no Ray), on real Fashion-MNIST: the
distillation improves the model. The pipeline's mechanics (and FedDF's, and the no-meta
ablation's) are checked on synthetic data in ``test_e2e_quick.py``."""

import json

import pytest

from tests.support import requires_fmnist, run_inprocess


@pytest.mark.slow
@requires_fmnist
def test_mosaic_distillation_improves_its_own_pre_distillation_model(tmp_path):
    out = run_inprocess(tmp_path, num_nodes=5, strategy="mosaic", alpha=0.1,
                        **{"num-server-rounds": 7, "warmup-rounds": 6, "local-steps": 30,
                           "mosaic.gen-steps": 200, "kd.steps": 60, "test-subset": 2000})["dir"]
    rounds = json.loads((out / "metrics.json").read_text())
    distill = next(r for r in rounds if r.get("phase") == "distill")
    assert distill["round"] == 6 and rounds[-1]["phase"] == "finetune"
    for key in ("acc-before-distill", "acc-ensemble", "acc-teacher", "acc-after-distill",
                "meta-holdout-accuracy", "gen-fidelity-mean", "kd-seconds", "meta-seconds"):
        assert key in distill, key
    # the distilled model is the round's global model and beats the model it started from
    assert distill["accuracy"] == pytest.approx(distill["acc-after-distill"], abs=1e-4)
    assert distill["acc-after-distill"] > distill["acc-before-distill"] + 0.02
    # the teacher is the meta model only where it beats the plain expert ensemble it starts
    # from significantly on held-out prototypes (mosaic.meta-guard: a one-sided sign test at 5 %);
    # otherwise the mean of the experts teaches
    assert distill["meta-real-inputs"] == distill["meta-inputs"] > 0  # prototypes only (the default)
    significant = (distill["meta-holdout-accuracy"] > distill["meta-holdout-mean-accuracy"]
                   and distill["meta-guard-p"] <= 0.05)
    assert bool(distill["meta-used"]) == significant, distill
    if not distill["meta-used"]:
        assert distill["acc-teacher"] == distill["acc-ensemble"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distillation"]["acc-after-distill"] == distill["acc-after-distill"]
    assert (out / "generator_samples.png").stat().st_size > 2000
