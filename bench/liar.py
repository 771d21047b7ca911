#!/usr/bin/env python3
"""A lying client joined to a real ``flwr run`` simulation (issue 39): the old defaults against
the new ones, clean and attacked.

The liar is ``bench/liar_client.py`` (partition 0: counts x 1000 everywhere, random weights, a
generator of random weights, prototypes of noise, forged gate scores). Each cell runs the
README's main job (``scripts/flwr_sim.py``, 10 clients, Fashion-MNIST, the default schedule)
from a git worktree of the current commit: ``honest`` as the project ships it, ``liar`` with the
lying ClientApp copied in as ``client_app/liar.py`` and named the app's ``clientapp``.

    .venv/bin/python bench/liar.py run [--alpha 0.1] [--seed 42]   # resumes: finished cells are kept
    .venv/bin/python bench/liar.py report

Cells: clean / attacked x old defaults (``count-clip=0 proto-min-records=1``) / new defaults /
robust settings (the new defaults with ``aggregation='median' gate-statistic='median'``).
Runs under /work/bench-runs/liar (outside git); the table goes to bench/results/liar.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import header_lines, provenance, write_results  # noqa: E402

RUNS = Path("/work/bench-runs/liar")
OLD = "count-clip=0.0 proto-min-records=1"
ROBUST = "aggregation='median' gate-statistic='median'"
CELLS = {  # name -> (app, extra run config)
    "clean, old defaults": ("honest", OLD),
    "attacked, old defaults": ("liar", OLD),
    "attacked, new defaults": ("liar", ""),
    "clean, new defaults": ("honest", ""),
    "attacked, robust settings": ("liar", ROBUST),
    "clean, robust settings": ("honest", ROBUST),
}
CORE = list(CELLS)[:4]


def tree(kind: str, commit: str) -> Path:
    """A worktree of ``commit`` (made once per commit), with the liar app in for ``liar``."""
    path = RUNS / "trees" / f"{kind}-{commit}"
    if path.exists():
        return path
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), commit], cwd=ROOT, check=True,
                   capture_output=True)
    if kind == "liar":
        shutil.copy(ROOT / "bench" / "liar_client.py", path / "client_app" / "liar.py")
        pyproject = path / "pyproject.toml"
        text = pyproject.read_text()
        assert 'clientapp = "client_app.app:app"' in text
        pyproject.write_text(text.replace('clientapp = "client_app.app:app"', 'clientapp = "client_app.liar:app"'))
    return path


def cell_dir(name: str, alpha: float, seed: int) -> Path:
    return RUNS / f"a{alpha:g}-s{seed}" / name.replace(", ", "-").replace(" ", "_")


def run(args) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    for name in args.cells or CELLS:
        kind, extra = CELLS[name]
        out = cell_dir(name, args.alpha, args.seed)
        if (out / "run" / "summary.json").exists():
            print(f"[liar] {name}: done, kept", flush=True)
            continue
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        where = tree(kind, commit)
        config = f"alpha={args.alpha} seed={args.seed} output-dir='{out}' run-name='run' {extra}".strip()
        print(f"[liar] {name}: {kind} app at {commit}, {config}", flush=True)
        with open(out / "log.txt", "w") as log:
            code = subprocess.run([sys.executable, str(where / "scripts" / "flwr_sim.py"), "--num-supernodes", "10",
                                   "--run-config", config], cwd=where, stdout=log, stderr=subprocess.STDOUT).returncode
        (out / "meta.json").write_text(json.dumps({"commit": commit, "app": kind, "config": config, "exit": code}))
        print(f"[liar] {name}: exit {code}", flush=True)


def report(args) -> None:
    rows = []
    for name in CELLS:
        out = cell_dir(name, args.alpha, args.seed)
        if not (out / "run" / "summary.json").exists():
            rows.append({"cell": name, "missing": True})
            continue
        s = json.loads((out / "run" / "summary.json").read_text())
        metrics = json.loads((out / "run" / "metrics.json").read_text())
        dist = next((r for r in metrics if r.get("phase") == "distill"), {})
        meta = json.loads((out / "meta.json").read_text())
        rows.append({"cell": name, "commit": meta["commit"], "final": s["final_accuracy"],
                     "before-distill": dist.get("acc-before-distill"), "teacher": dist.get("acc-teacher"),
                     "after-distill": dist.get("acc-after-distill"), "gate-kept": dist.get("gate-kept"),
                     "count-clipped": s.get("count-clipped"), "seconds": s.get("total_seconds")})
    prov = provenance()
    lines = header_lines(f"A lying client in a real flwr run (bench/liar.py), alpha {args.alpha:g}, seed {args.seed}", prov)
    lines += ["", "| cell | final accuracy | before distillation | teacher | after distillation | gate kept | liar weighted as |",
              "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['cell']} | not run | | | | | |")
            continue
        clipped = (r["count-clipped"] or {}).get("0")
        lines.append(f"| {r['cell']} | {fmt(r['final'])} | {fmt(r['before-distill'])} | {fmt(r['teacher'])} | "
                     f"{fmt(r['after-distill'])} | {fmt(r['gate-kept'])} | "
                     f"{'-' if not clipped else str(clipped['weighted-as']) + ' (declared ' + str(clipped['declared']) + ')'} |")
    write_results(f"liar-a{args.alpha:g}-s{args.seed}", "\n".join(lines) + "\n", {"provenance": prov, "rows": rows})
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report"))
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), metavar="CELL",
                    help=f"run only these cells (default all: {', '.join(CELLS)})")
    args = ap.parse_args()
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    main()
