#!/usr/bin/env python3
"""Which data should Mosaic's meta model learn from? One in-process Mosaic run (ClientApp +
strategy, no Ray, real Fashion-MNIST); at the distillation round the same experts, generators
and pre-distillation model are used three times, once per ``meta-data`` setting
(``prototypes``: the authors' recipe, ``generated``, ``both``), and the distillation-round
accuracies of each are printed as a table (test set scored for reporting only).

    PYTHONPATH=. .venv/bin/python bench/meta_data_variants.py [--clients 5] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import tempfile

from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import load_defaults
from mosaic_flwr.inprocess import InProcessGrid
from mosaic_flwr.strategies import mosaic as mosaic_strategy
from server_app.app import main as server_main

VARIANTS = ("prototypes", "generated", "both")
KEYS = ("acc-before-distill", "acc-ensemble", "acc-teacher", "acc-after-distill", "meta-holdout-accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    original = mosaic_strategy.MosaicStrategy.distillation
    reports: dict[str, dict] = {}

    def each_variant(self, global_state, replies):
        base = self.cfg
        for variant in VARIANTS:
            self.cfg = base.replace(meta_data=variant)
            original(self, {k: v.clone() for k, v in global_state.items()}, replies)
            reports[variant] = dict(self.distill_report)
        self.cfg = base
        return original(self, global_state, replies)

    mosaic_strategy.MosaicStrategy.distillation = each_variant
    with tempfile.TemporaryDirectory() as out:
        run_config = {**load_defaults(), "strategy": "mosaic", "num-server-rounds": 6, "warmup-rounds": 6,
                      "local-steps": 30, "alpha": args.alpha, "seed": args.seed, "gen-steps": 300,
                      "kd-steps": 60, "output-dir": out, "run-name": "variants"}
        grid = InProcessGrid(client_app, run_config, args.clients)
        server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                  run_config=run_config))
    print("| meta-data | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for variant, r in reports.items():
        print(f"| {variant} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
