"""The privacy audit on Mosaic runs, in-process (no Ray, no SuperLink), one run per alpha.

Each run is the default configuration (pyproject.toml: Mosaic, Fashion-MNIST, 10 clients,
cnn_small, 6 warm-up rounds) with the given overrides; it stops after the distillation round
(``num-server-rounds`` = ``warmup-rounds`` by default: the audit happens there, the fine-tune
rounds do not change what was uploaded). Writes ``bench/results/<name>.json`` (each run's
privacy.json summary and clients) and ``<name>.md`` (tables).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/privacy_audit.py \
        --alphas 0.1 0.01 --out-root /tmp/privacy-runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_inprocess  # noqa: E402
from mosaic_flwr.config import load_defaults  # noqa: E402
from mosaic_flwr.privacy.report import summarise  # noqa: E402


def run(alpha: float, out_root: Path, rounds: int | None, extra: dict, nodes: int) -> Path:
    cfg = {**load_defaults(), "alpha": alpha, "server-threads": 1, "client-threads": 1,
           "output-dir": str(out_root), "run-name": f"privacy-a{alpha:g}", **extra}
    cfg["num-server-rounds"] = rounds or cfg["warmup-rounds"]
    summary = run_inprocess(cfg, nodes)
    print(f"alpha {alpha:g}: {summary['wall_seconds']:.0f} s", flush=True)
    return out_root / cfg["run-name"]


def table(name: str, results: dict) -> str:
    lines = [f"# Privacy audit of what Mosaic clients upload ({name})", "",
             "Command: `" + " ".join(["bench/privacy_audit.py", *sys.argv[1:]]) + "`", "",
             f"Runs at commit {results['commit']}"
             + (f", summaries recomputed from the clients' figures at {results['tabulated-at']}"
                if results.get("tabulated-at") else "") + f"; {results['machine']}.", ""]
    for alpha, r in results["runs"].items():
        s = r["summary"]
        lines += [f"## alpha = {alpha}", "",
                  f"Run: {r['config']}; audit at round {s['round']}, {s['clients-audited']} of {s['clients']} "
                  f"clients; flagged: {s['flagged'] or 'none'}.", "",
                  "| client | examples | classes held (rare <= 5) | DCR ratio pixel | DCR ratio feature | "
                  "near copies pixel (baseline) | MIA AUC pixel [95 % CI] | MIA AUC feature | prototypes "
                  "(exact records, classes < k, single-record) | proto NN ratio min | audit s (share of round) | flags |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["clients"]:
            def f(k, d=3):
                v = c.get(k)
                return "-" if v is None else f"{v:.{d}f}"
            lines.append(
                f"| {c['partition-id']} | {sum(c['label-counts'])} | {int(c['label-classes-held'])} "
                f"({int(c['label-rare-classes'])}) | {f('dcr-ratio-pixel')} | {f('dcr-ratio-feature')} | "
                f"{f('near-copy-pixel')} ({f('near-copy-baseline-pixel')}) | {f('mia-auc-pixel')} "
                f"[{f('mia-auc-pixel-low')}, {f('mia-auc-pixel-high')}] | {f('mia-auc-feature')} | "
                f"{int(c.get('proto-count', 0))} ({int(c.get('proto-exact', 0))}, {int(c.get('proto-few-classes', 0))}, "
                f"{int(c.get('proto-single-record', 0))}) | {f('proto-nn-ratio-min')} | {f('seconds', 1)} "
                f"({100 * c.get('seconds-fraction', 0):.1f} %) | {'+'.join(c['flags']) or '-'} |")
        lines.append("")
        for sp in ("pixel", "feature"):
            small, large = (f"class-dcr-ratio-{sp}-small", f"class-dcr-ratio-{sp}-large")
            if small + "-median" in s and large + "-median" in s:
                lines.append(
                    f"- per class, {sp}: classes of <= 5 records: median DCR ratio {s[small + '-median']:.3f}, "
                    f"{s[small + '-below-1']} of {s[small + '-classes']} below 1 (one-sided sign test p = "
                    f"{s[small + '-sign-p']:.2g}); larger classes: {s[large + '-median']:.3f}, {s[large + '-below-1']} "
                    f"of {s[large + '-classes']} below 1 (p = {s[large + '-sign-p']:.2g})")
        lines += [f"- prototypes that are a record's features: {s.get('proto-exact-total', 0)} of "
                  f"{int(sum(c.get('proto-count', 0) for c in r['clients']))} ({s.get('proto-single-record-total', 0)} "
                  f"single-record classes); classes sent as the mean of < k records: {s.get('proto-few-classes-total', 0)}; "
                  f"label counts of 1-5 records disclosed: {s.get('label-rare-classes-total', 0)} classes",
                  f"- audit cost: {s.get('seconds-mean', 0):.2f} s per client, {100 * s.get('seconds-fraction-mean', 0):.1f} % "
                  "of the client's distillation round", "", "Summary: `" + json.dumps(s) + "`", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.01])
    ap.add_argument("--rounds", type=int, default=0, help="num-server-rounds (0: warmup-rounds)")
    ap.add_argument("--num-supernodes", type=int, default=10)
    ap.add_argument("--set", default="{}", help="more run-config overrides as JSON")
    ap.add_argument("--out-root", default="/tmp/privacy-runs")
    ap.add_argument("--name", default="privacy-audit")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: tabulate the run directories under --out-root (summaries recomputed "
                         "from the clients' figures with the current code)")
    ap.add_argument("--machine", default="2-core VM shared with other jobs, one thread per run")
    args = ap.parse_args(argv)
    out_root = Path(args.out_root)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = {"commit": commit, "machine": args.machine, "runs": {}}
    previous = ROOT / "bench" / "results" / f"{args.name}.json"
    if args.table_only and previous.is_file():  # the runs' own commit; the summaries' is now
        results["commit"] = json.loads(previous.read_text())["commit"]
        results["tabulated-at"] = commit
    for alpha in args.alphas:
        d = (out_root / f"privacy-a{alpha:g}" if args.table_only
             else run(alpha, out_root, args.rounds or None, json.loads(args.set), args.num_supernodes))
        privacy = json.loads((d / "privacy.json").read_text())
        privacy["summary"] = {"round": privacy["round"], **summarise(privacy["clients"])}
        summary = json.loads((d / "summary.json").read_text())
        results["runs"][f"{alpha:g}"] = {"config": f"alpha={alpha:g}, {args.num_supernodes} clients, "
                                                   f"num-server-rounds={args.rounds or privacy['round']}",
                                         "summary": privacy["summary"], "clients": privacy["clients"],
                                         "thresholds": privacy["thresholds"], "run-dir": str(d),
                                         "final_accuracy": summary.get("final_accuracy")}
    res = ROOT / "bench" / "results"
    (res / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (res / f"{args.name}.md").write_text(table(args.name, results))
    print((res / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
