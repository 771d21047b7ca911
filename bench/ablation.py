#!/usr/bin/env python3
"""Mosaic's teacher, ablated at the distillation round from ONE federation per (alpha, seed).

For each (alpha, seed), one in-process federation (``mosaic_flwr.testing.inprocess.InProcessGrid``
driving the real ClientApp handlers, 10 clients, the default schedule, a validation split
held out of the clients' data) runs the warm-up rounds and collects the distillation round's
client replies (models, label counts, prototypes, generators) once. Every variant then runs
the server's distillation round from a copy of that same server state and those same replies,
followed by its own fine-tune rounds:

- ``mosaic``: the meta model trained on prototypes and labelled generator samples (``both``,
  the default with one architecture);
- ``mosaic-nometa``: no meta model; the plain expert ensemble (mean of the experts' logits,
  the meta model's starting point) teaches;
- ``mosaic-prototypes`` / ``mosaic-generated``: the meta model trained on prototypes only
  (the authors') / on labelled generator samples only.

So the variants differ in the teacher alone (same experts, prototypes and generators): the
comparison is paired by construction, and costs one federation instead of one per variant.
Each variant's directory holds the files of a run (``summary.json``, ``metrics.json``, ...),
so ``bench/report.py``'s tables read them. Resumes: a group whose variants all have a
``summary.json`` is skipped.

    .venv/bin/python bench/ablation.py                          # 3 alphas x 3 seeds x 4 variants
    .venv/bin/python bench/ablation.py --shard 0/2 & .venv/bin/python bench/ablation.py --shard 1/2
    .venv/bin/python bench/ablation.py --table-only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RUNS, VARIANTS, Cell, ReplyRecorder, cell_done, git_commit, git_dirty, loadavg, provenance  # noqa: E402
from bench.report import report  # noqa: E402

ALPHAS = (0.1, 0.01, 1.0)
SEEDS = (42, 43, 44)
VARIANT_NAMES = ("mosaic", "mosaic-nometa", "mosaic-prototypes", "mosaic-generated")
SHARED = "validation-split=0.1"


def variant_overrides(variant: str) -> dict:
    from flwr.common.config import parse_config_args

    strategy, extra = VARIANTS.get(variant, (variant, ""))
    return {"strategy": strategy, **(parse_config_args([extra]) if extra else {})}


def run_group(alpha: float, seed: int, variants: list[str], runs_dir: Path, shared: str,
              num_clients: int) -> None:
    """One federation up to the distillation round's replies, then every variant from there."""
    import torch
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from client_app.app import app as client_app
    from mosaic_flwr.core.checkpoint import rng_state, set_rng_state
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy
    from server_app.app import finish_run, setup

    def run_config(variant: str) -> dict:
        return {**load_defaults(), **(parse_config_args([shared]) if shared.strip() else {}),
                "alpha": alpha, "seed": seed, "checkpoint": False, "output-dir": str(runs_dir),
                "run-name": Cell(variant, alpha, seed).name, **variant_overrides(variant)}

    def context(rc: dict) -> Context:
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)

    base_rc = run_config(variants[0])
    replies = ReplyRecorder()  # the distillation round's replies: every other variant collects its own copy
    grid = InProcessGrid(client_app, base_rc, num_clients, hook=replies)
    t0, load0 = time.perf_counter(), loadavg()
    sc = setup(grid, context(base_rc))
    base = MosaicStrategy(sc, teacher="meta" if sc.cfg.of('mosaic').meta else "ensemble")
    w = sc.cfg.warmup_rounds
    print(f"[ablation] alpha={alpha:g} seed={seed}: warm-up rounds 1..{w - 1} and the "
          f"distillation round's client work, once", flush=True)
    base.evaluate_round(0)
    for r in range(1, w):
        base.apply_round(r, base.train_round(r))
        base.evaluate_round(r)
    with replies.recording():
        items = base.train_round(w)
    shared_seconds = time.perf_counter() - t0
    state = copy.deepcopy(base.state_dict())
    rounds, extra, rng = copy.deepcopy(sc.results.rounds), copy.deepcopy(sc.results.extra), rng_state()
    for variant in variants:
        t1 = time.perf_counter()
        if variant == variants[0]:
            sv, strat = sc, base
        else:
            sv = setup(grid, context(run_config(variant)))
            strat = MosaicStrategy(sv, teacher="meta" if sv.cfg.of('mosaic').meta else "ensemble")
            strat.load_state_dict(copy.deepcopy(state))
            sv.results.restore(copy.deepcopy(rounds), copy.deepcopy(extra))
        set_rng_state(copy.deepcopy(rng))
        print(f"[ablation]   {variant}: distillation round and fine-tune rounds", flush=True)
        # The base collected round w itself (its running sums, its generator bank); every
        # other variant collects the same replies through its own strategy.
        strat.apply_round(w, copy.deepcopy(items) if strat is base else strat.collect(w, replies.copies()))
        strat.evaluate_round(w)
        for r in range(w + 1, sv.cfg.num_server_rounds + 1):
            strat.apply_round(r, strat.train_round(r))
            strat.evaluate_round(r)
        strat.finish()
        cfg = sv.cfg
        out = sv.results.out_dir
        (out / "bench.json").write_text(json.dumps(
            {"loadavg_before": load0, "loadavg_after": loadavg(), "commit": git_commit(),
             "dirty": git_dirty(), "shared_seconds": round(shared_seconds, 2),
             "variant_seconds": round(time.perf_counter() - t1, 2),
             "torch_threads": torch.get_num_threads(), "driver": "bench/ablation.py (in-process)"},
            indent=2) + "\n")
        summary = finish_run(sv, shared_seconds + time.perf_counter() - t1, variant=variant,
                             title=f"{variant} on {cfg.dataset} (alpha={cfg.alpha:g}, {sv.num_nodes} clients)")
        print(f"[ablation]   {variant}: final {summary['final_accuracy']:.4f} "
              f"(validation {summary.get('final_val_accuracy', float('nan')):.4f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="ablation")
    ap.add_argument("--variants", nargs="+", default=list(VARIANT_NAMES),
                    help="the first one runs the shared federation (default: %(default)s)")
    ap.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--run-config", default=SHARED, help="run-config overrides shared by every run (TOML)")
    ap.add_argument("--num-clients", type=int, default=10)
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th group starting at K (parallel processes)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    runs_dir = (RUNS / args.name).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    k, n = (int(v) for v in args.shard.split("/"))
    groups = [(a, s) for a in args.alphas for s in args.seeds]
    prov = provenance()
    if not args.table_only:
        for i, (a, s) in enumerate(groups):
            if i % n != k or all(cell_done(runs_dir / Cell(v, a, s).name) for v in args.variants):
                continue
            run_group(a, s, args.variants, runs_dir, args.run_config, args.num_clients)
    results = {}
    for a, s in groups:
        for v in args.variants:
            out = runs_dir / Cell(v, a, s).name
            if cell_done(out):
                summary = json.loads((out / "summary.json").read_text())
                if (out / "bench.json").is_file():
                    summary["bench"] = json.loads((out / "bench.json").read_text())
                results[Cell(v, a, s)] = summary
    if args.table_only or k == 0:
        md = report(args.name, results, list(args.variants), list(args.alphas), args.run_config,
                    args.num_clients, prov, paired=args.variants[0],
                    setting=(f"Fashion-MNIST, {args.num_clients} clients, in-process federation "
                             "(bench/ablation.py: the real ClientApp handlers, no Ray); per (alpha, "
                             "seed) ONE federation up to the distillation round's client replies, then "
                             "every variant's server-side distillation and fine-tune rounds from copies "
                             "of that state: the variants differ in the teacher alone"))
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
