#!/usr/bin/env python3
"""Mosaic from a converged FedAvg: the authors' two-stage protocol on Fashion-MNIST.

Stage 1, once per (alpha, seed): FedAvg trains to its plateau (``PRETRAIN_ROUNDS`` rounds,
constant lr, a validation split held out of the clients' data) in an in-process federation
(``mosaic_flwr.inprocess.InProcessGrid`` driving the real ClientApp handlers, no Ray); its
run directory (``pretrain-a<alpha>-s<seed>``) holds the checkpoint every method starts from.

    .venv/bin/python bench/converged.py --stage pretrain [--shard K/N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RUNS, cell_done, git_commit, git_dirty, loadavg  # noqa: E402

ALPHAS = (0.1, 0.01, 1.0)
SEEDS = (42, 43, 44)
PRETRAIN_ROUNDS = 30
SHARED = {"validation-split": 0.1}


def pretrain_name(alpha: float, seed: int) -> str:
    return f"pretrain-a{alpha:g}-s{seed}"


def context(rc: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)


def run_inprocess(rc: dict, num_clients: int, title: str) -> dict:
    """One whole run of ``rc`` (a full run config) in an in-process federation."""
    import torch

    from client_app.app import app as client_app
    from mosaic_flwr.inprocess import InProcessGrid
    from mosaic_flwr.strategies import get_strategy
    from server_app.app import finish_run, setup

    t0, load0 = time.perf_counter(), loadavg()
    grid = InProcessGrid(client_app, rc, num_clients)
    sc = setup(grid, context(rc))
    get_strategy(sc.cfg.strategy)(sc)
    (sc.results.out_dir / "bench.json").write_text(json.dumps(
        {"loadavg_before": load0, "loadavg_after": loadavg(), "commit": git_commit(), "dirty": git_dirty(),
         "torch_threads": torch.get_num_threads(), "driver": "bench/converged.py (in-process)"},
        indent=2) + "\n")
    return finish_run(sc, time.perf_counter() - t0, title=title)


def pretrain(alpha: float, seed: int, runs_dir: Path, num_clients: int) -> None:
    from mosaic_flwr.config import load_defaults

    name = pretrain_name(alpha, seed)
    if cell_done(runs_dir / name):
        return
    rc = {**load_defaults(), **SHARED, "strategy": "fedavg", "alpha": alpha, "seed": seed,
          "num-server-rounds": PRETRAIN_ROUNDS, "output-dir": str(runs_dir), "run-name": name}
    print(f"[converged] pre-training FedAvg alpha={alpha:g} seed={seed}, {PRETRAIN_ROUNDS} rounds", flush=True)
    s = run_inprocess(rc, num_clients, f"FedAvg pre-training (alpha={alpha:g}, seed {seed})")
    print(f"[converged]   final {s['final_accuracy']:.4f}, best {s['best_accuracy']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["pretrain"], default="pretrain")
    ap.add_argument("--name", default="converged")
    ap.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--num-clients", type=int, default=10)
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th (alpha, seed) starting at K")
    args = ap.parse_args(argv)
    runs_dir = (RUNS / args.name).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    k, n = (int(v) for v in args.shard.split("/"))
    groups = [(a, s) for s in args.seeds for a in args.alphas]
    for i, (a, s) in enumerate(groups):
        if i % n == k:
            pretrain(a, s, runs_dir, args.num_clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
