#!/usr/bin/env python3
"""Run several strategies on the same data, partition, models, seed and schedule through the
real Flower simulation (scripts/flwr_sim.py), then print and save a markdown table.

    .venv/bin/python bench/compare.py --name dir0.1 --strategies fedavg feddf mosaic \\
        --run-config "alpha=0.1"
    .venv/bin/python bench/compare.py --name families --run-config conf/fmnist-families.toml

``--run-config`` is repeatable: run-config TOML files (applied first) and ``key=value`` strings.

A finished run (its summary.json exists) is not run again, so an interrupted comparison resumes.
Results: bench/results/<name>.md and .json, with the git commit they came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, git_commit, registered, run_cell  # noqa: E402

DISTILL_KEYS = ("acc-before-distill", "acc-ensemble", "acc-teacher", "acc-after-distill",
                "gen-seconds-mean", "meta-seconds", "kd-seconds", "distill-seconds")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--strategies", nargs="+", default=list(registered()),
                    help="default: every method the library registers")
    ap.add_argument("--run-config", action="append", default=[],
                    help="shared run-config: a TOML file (conf/*.toml) or overrides (TOML values); repeatable")
    ap.add_argument("--num-supernodes", type=int, default=10)
    args = ap.parse_args()
    files = [a for a in args.run_config if a.strip().endswith(".toml")]
    shared = " ".join(a for a in args.run_config if not a.strip().endswith(".toml"))

    runs_dir = ROOT / "bench" / "runs" / args.name
    results = {}
    for variant in args.strategies:
        summary = run_cell(runs_dir, variant, variant, shared, base=files,
                           num_supernodes=args.num_supernodes, tag="compare")
        if summary is not None:
            summary.pop("bench", None)
            results[variant] = summary

    commit = git_commit()
    lines = [f"# {args.name}", "",
             f"commit `{commit}`, {platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores), "
             f"{args.num_supernodes} clients, shared run config: `{' '.join(args.run_config) or '(defaults)'}`", "",
             "| strategy | final acc | best acc | wall s | " + " | ".join(DISTILL_KEYS) + " |",
             "|---|---|---|---|" + "---|" * len(DISTILL_KEYS)]
    for variant, s in results.items():
        d = s.get("distillation") or {}
        cells = [f"{d[k]:.4f}" if k in d and k.startswith("acc") else f"{d[k]:.1f}" if k in d else "-"
                 for k in DISTILL_KEYS]
        lines.append(f"| {variant} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
                     f"{s['wall_seconds']:.0f} | " + " | ".join(cells) + " |")
    by_model = {v: s["final_accuracy_by_model"] for v, s in results.items() if s.get("final_accuracy_by_model")}
    if by_model:  # model heterogeneity: final accuracy of every family / width
        archs = list(dict.fromkeys(a for accs in by_model.values() for a in accs))
        lines += ["", "Final accuracy per model (family at full width, and every width clients hold); "
                  "`clients`: mean over clients of the accuracy of the model they hold.", "",
                  "| strategy | " + " | ".join(archs) + " | clients |", "|---|" + "---|" * (len(archs) + 1)]
        for variant, accs in by_model.items():
            cells = [f"{accs[a]:.4f}" if a in accs else "-" for a in archs]
            lines.append(f"| {variant} | " + " | ".join(cells)
                         + f" | {results[variant].get('final_accuracy_clients', float('nan')):.4f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.md").write_text(table)
    (out_dir / f"{args.name}.json").write_text(json.dumps({"commit": commit, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
