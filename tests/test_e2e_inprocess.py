"""The ClientApp and the strategies together, in-process (no Ray), on real Fashion-MNIST."""

import json

import pytest
from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import load_defaults
from mosaic_flwr.testing.inprocess import InProcessGrid
from server_app.app import main as server_main
from tests.conftest import requires_fmnist


def run_inprocess(tmp_path, num_nodes=3, grid_options=None, **overrides) -> dict:
    """Run the ServerApp's main on an in-process grid; ``grid_options`` go to ``InProcessGrid``
    (fault ``hook``, ``first_node_id``)."""
    run_config = {**load_defaults(), "output-dir": str(tmp_path), "run-name": "run",
                  "num-server-rounds": 2, "local-steps": 30, "batch-size": 32, **overrides}
    grid = InProcessGrid(client_app, run_config, num_nodes, **(grid_options or {}))
    server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                              run_config=run_config))
    return {"dir": tmp_path / "run", "grid": grid}


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
