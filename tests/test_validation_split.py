"""The benchmark's validation split: held out of every client's data, scored every round and
at the distillation round, reported in the summary (so settings are chosen off the test set)."""

import json

import numpy as np
from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import build_config, load_defaults
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.core.task import client_data, partitions_for, validation_data, validation_split
from server_app.app import main as server_main

TINY = {"dataset": "synthetic", "num-server-rounds": 2, "warmup-rounds": 1, "local-steps": 5,
        "mosaic.gen-steps": 5, "kd.steps": 3, "mosaic.meta-epochs": 3, "mosaic.meta-samples-per-class": 8,
        "mosaic.proto-k": 2, "eval-batch-size": 128, "checkpoint": False}


def test_no_client_holds_a_validation_image():
    cfg = build_config({"dataset": "synthetic", "validation-split": 0.2})
    val = validation_split(cfg)
    parts = partitions_for(cfg, 4)
    assert len(val) > 0 and not np.intersect1d(np.concatenate(parts), val).size
    x, y = validation_data(cfg)
    assert len(y) == len(val)
    assert sum(len(client_data(cfg, i, 4)[1]) for i in range(4)) + len(val) == \
        sum(len(p) for p in partitions_for(build_config({"dataset": "synthetic"}), 4))
    assert validation_data(build_config({"dataset": "synthetic"})) is None


def test_mosaic_run_reports_validation_accuracy(tmp_path):
    run_config = {**load_defaults(), **TINY, "validation-split": 0.2, "output-dir": str(tmp_path),
                  "run-name": "run"}
    grid = InProcessGrid(client_app, run_config, 3)
    server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                              run_config=run_config))
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(0 <= r["val-accuracy"] <= 1 for r in rounds)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_val_accuracy"] == rounds[-1]["val-accuracy"]
    report = summary["distillation"]
    for key in ("val-before-distill", "val-ensemble", "val-teacher", "val-after-distill"):
        assert 0 <= report[key] <= 1, key
    # the distillation round records the model the gate kept: the distilled one (its
    # validation accuracy is val-after-distill) or the one before distillation
    kept = report["val-after-distill"] if report["gate-kept"] else report["val-before-distill"]
    assert rounds[1]["val-accuracy"] == round(kept, 5)
