#!/usr/bin/env python3
"""Kept for the record: the one-off diagnostic behind bench/results/scaling-1000-fedavg-curve.md
(run at commit 5e1177b; still runnable, tests/test_bench.py runs it on tiny data).

A plain FedAvg accuracy curve with many clients, in-process (no Ray): how many rounds of
FedAvg reach the accuracy another run reached (Mosaic's at 1,000 clients), and at what client
work. The scaling study (``bench/studies/scaling.toml``) measures time and memory through the real simulation; on the same
run config both draw the same partition and sample the same clients each round (the round-4
accuracies of the two agree to the digit), so the curve continues that run.

    .venv/bin/python bench/archive/scaling_curve.py --clients 1000 --rounds 100 --target 0.626 \\
        --run-config "partition='dirichlet-client' alpha=0.1 fraction-train=0.1 min-train-clients=2 \\
                      server-threads=1 client-threads=1 test-subset=2000 local-steps=5" \\
        --name scaling-1000-fedavg-curve

Resumable: the run checkpoints every round and goes on from its checkpoint when started again;
``--table-only`` tabulates what the run has so far (bench/results/<name>.md and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import RUNS, header_lines, loadavg, provenance, write_results  # noqa: E402

MILESTONES = (10, 25, 50, 100, 150, 200)


def curve_table(rows: list[dict], target: float | None) -> tuple[list[str], dict]:
    """The curve at a few rounds, the first round at or above ``target`` and the clients'
    work up to it (their summed ``client-seconds``)."""
    rows = [r for r in rows if "accuracy" in r]
    work, cum = 0.0, {}
    for r in rows:
        work += float(r.get("client-seconds", 0.0))
        cum[r["round"]] = work
    first = next((r for r in rows if target is not None and r["accuracy"] >= target), None)
    last = rows[-1] if rows else None
    data = {"rounds": len(rows) - 1 if rows else 0, "target": target,
            "first_round_at_target": first and first["round"],
            "client_seconds_to_target": first and round(cum[first["round"]], 1),
            "curve": [[r["round"], r["accuracy"]] for r in rows]}
    lines = ["| round | test accuracy | clients' work so far (s) |", "|---|---|---|"]
    shown = [r for r in rows if r["round"] in MILESTONES or r is first or r is last]
    for r in sorted({id(r): r for r in shown}.values(), key=lambda r: r["round"]):
        mark = " (first at or above the target)" if r is first else ""
        lines.append(f"| {r['round']}{mark} | {r['accuracy']:.4f} | {cum[r['round']]:.0f} |")
    best = max(rows, key=lambda r: r["accuracy"]) if rows else None
    if best:
        lines += ["", f"Best: {best['accuracy']:.4f} at round {best['round']}."]
    if target is not None:
        lines += ["", f"Target {target:.4f}: " + (f"first reached at round {first['round']}, after "
                                                  f"{cum[first['round']]:.0f} s of the clients' work."
                                                  if first else "not reached.")]
    return lines, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--run-config", default="", help="run-config overrides (strategy: fedavg unless given)")
    ap.add_argument("--target", type=float, help="the accuracy to reach (e.g. Mosaic's final one)")
    ap.add_argument("--name", default="scaling-fedavg-curve")
    ap.add_argument("--runs-dir", default=str(RUNS), help="the run goes to RUNS_DIR/<name>/run")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)

    from flwr.common.config import parse_config_args

    from mosaic_flwr.config import ConfigError, build_config, load_defaults

    out = Path(args.runs_dir).resolve() / args.name
    run_dir = out / "run"
    prov = provenance()
    if not args.table_only:
        from bench.common import run_inprocess

        rc = {**load_defaults(), "strategy": "fedavg",
              **(parse_config_args([args.run_config]) if args.run_config.strip() else {}),
              "num-server-rounds": args.rounds, "output-dir": str(out), "run-name": "run"}
        if (run_dir / "checkpoint.pt").is_file():
            rc["resume"] = str(run_dir)
        try:
            build_config(rc)
        except ConfigError as exc:
            print(f"[scaling_curve] error: {exc}", file=sys.stderr)
            return 2
        print(f"[scaling_curve] {rc['strategy']}, {args.clients} clients, {args.rounds} rounds -> {run_dir}",
              flush=True)
        run_inprocess(rc, args.clients, title=f"{rc['strategy']} {args.clients} clients")
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        print(f"[scaling_curve] error: no rounds yet in {run_dir}", file=sys.stderr)
        return 2
    rows = json.loads(metrics.read_text())
    config = json.loads((run_dir / "config.json").read_text())
    lines, data = curve_table(rows, args.target)
    prov["loadavg_end"] = loadavg()
    md = header_lines(f"A FedAvg curve with {args.clients} clients (in-process)", prov) + [
        f"Run config as resolved: `{run_dir / 'config.json'}` ({config.get('strategy')}, partition "
        f"{config.get('partition')}, alpha {config.get('alpha')}, fraction-train {config.get('fraction-train')}, "
        f"local-steps {config.get('local-steps')}, lr {config.get('lr')}).", ""] + lines + [""]
    path = write_results(args.name, "\n".join(md), {**prov, **data})
    print(f"[scaling_curve] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
