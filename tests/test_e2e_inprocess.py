"""The ClientApp and the strategies together, in-process (no Ray), on real Fashion-MNIST."""

import json

import pytest

from tests.support import requires_fmnist, run_inprocess


@requires_fmnist
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_baseline_learns_and_writes_results(tmp_path, strategy):
    out = run_inprocess(tmp_path, strategy=strategy)["dir"]
    for name in ("config.json", "metrics.json", "metrics.csv", "summary.json", "accuracy.png",
                 "partition.csv", "partition.png"):
        assert (out / name).is_file(), name
    rounds = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all({"round", "accuracy", "loss", "seconds"} <= set(r) for r in rounds)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2  # 60 SGD steps learn something
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["dataset"] == "fmnist"
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rounds)
    assert json.loads((out / "config.json").read_text())["strategy"] == strategy
    assert len((out / "partition.csv").read_text().strip().splitlines()) == 1 + 3
