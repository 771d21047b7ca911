#!/usr/bin/env python3
"""Server memory before / after streaming (issue 19), run once for bench/results/scaling-stream.md.

Probes each size of ``--probe-clients`` in-process twice (``bench.measures.probe``): with this
checkout's code (``--run-config`` plus ``--after-config``: the bounded bank) and with the code of
git ref ``--compare REF`` (``--run-config`` alone; ``git archive`` into a temporary directory),
and tabulates what the server holds:

    .venv/bin/python bench/archive/scaling_compare.py --compare main --probe-clients 100 300 1000 \
        --run-config "partition='dirichlet-client' fraction-train=0.1 ..." --name scaling-stream
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import RUNS, header_lines, loadavg, provenance, write_results  # noqa: E402
from bench.measures import SHORT, probe  # noqa: E402


def compare(args) -> int:
    """``--compare REF``: before (REF's code) / after (this checkout) in-process probes."""
    import tempfile

    prov = provenance()
    name = args.name or "scaling-stream"
    runs_dir = RUNS / name
    root = Path(__file__).resolve().parents[2]
    ref_commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", args.compare],
                                capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", args.compare], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for n in args.probe_clients or args.clients:
            after_rc = f"{args.run_config} {args.after_config}"
            before = probe(n, args.run_config, runs_dir / f"before-n{n}.json", args.fresh, code=tmp)
            after = probe(n, after_rc, runs_dir / f"after-n{n}.json", args.fresh)
            rows.append({"clients": n, "before": before, "after": after})
    prov["loadavg_end"] = loadavg()
    lines = header_lines(f"Server memory, before / after streaming: {', '.join(str(r['clients']) for r in rows)} clients",
                         prov)

    def cells(p):
        if not p:
            return ["failed"] * 5
        d, k = p["probes"].get("distillation", {}), p["probes"].get("kd", {})
        return [f"{d.get('replies', 0)} / {d.get('replies_mib', float('nan')):.0f} MiB",
                f"{d.get('live_tensor_mib', float('nan')):.0f} MiB", f"{k.get('live_tensor_mib', float('nan')):.0f} MiB",
                f"{max(p['peak_rss_mib'], p.get('rss_mib_polled', 0)):.0f} MiB", f"{p['wall_seconds']:.0f}"]
    lines += [f"In-process runs (mosaic_flwr.testing.inprocess.InProcessGrid: ServerApp and ClientApp in one process, clients "
              f"one at a time, at most two partitions cached), run config `{args.run_config}`; before = the code of "
              f"`{args.compare}` ({ref_commit}), after = this checkout plus `{args.after_config}`. At the "
              "distillation (Mosaic's largest round) the probe counts the replies' models and generators the "
              "strategy holds, and the live torch tensors of the process (distinct storages: what the server "
              "holds, plus the test set and at most two cached partitions); peak RSS is the whole process.", "",
              "| clients | before: replies held at distillation | before: live tensors at distillation | "
              "before: in KD loop | before: peak RSS | before: wall s | after: replies held | after: live tensors "
              "at distillation | after: in KD loop | after: peak RSS | after: wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | " + " | ".join(cells(r["before"]) + cells(r["after"])) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(name, md, {**prov, "run_config": args.run_config, "after_config": args.after_config,
                             "ref": args.compare, "ref_commit": ref_commit, "rows": rows})
    return 0 if all(r["before"] and r["after"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", metavar="REF", required=True, help="the git ref whose code is 'before'")
    ap.add_argument("--probe-clients", nargs="+", type=int, default=[100, 300, 1000])
    ap.add_argument("--clients", nargs="+", type=int, default=[], help=argparse.SUPPRESS)
    ap.add_argument("--run-config", default=SHORT, help="run-config overrides for both (default: %(default)r)")
    ap.add_argument("--after-config", default="mosaic.generator-bank-size=2",
                    help="run-config added for this checkout's probes (default: %(default)s)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--fresh", action="store_true", help="probe again sizes probed before")
    return compare(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
