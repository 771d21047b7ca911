#!/usr/bin/env python3
"""A lying client joined to a real ``flwr run`` simulation (issue 39): the old defaults against
the new ones, clean and attacked.

The liar is ``bench/archive/liar_client.py`` (partition 0: counts x 1000 everywhere, random weights, a
generator of random weights, prototypes of noise, forged gate scores). Each cell runs the
main job (``scripts/flwr_sim.py``, 10 clients, Fashion-MNIST, the default schedule)
from a git worktree of the current commit: ``honest`` as the project ships it, ``liar`` with the
lying ClientApp copied in as ``client_app/liar.py`` and named the app's ``clientapp``.

    .venv/bin/python bench/archive/liar.py run [--alpha 0.1] [--seed 42]   # resumes: finished cells are kept
    .venv/bin/python bench/archive/liar.py report                              # every alpha and seed run so far

Cells: clean / attacked x old defaults (``count-clip=0 mosaic.proto-min-records=1``) / new defaults /
robust settings (the new defaults with ``aggregation='median' kd.gate-statistic='median'``) / median
gate (the new defaults with ``kd.gate-statistic='median'`` alone).
Runs under /work/bench-runs/liar (outside git); ``report`` writes every finished cell, by alpha
and seed, to bench/results/liar.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.common import git_commit, header_lines, provenance, write_results  # noqa: E402

RUNS = Path("/work/bench-runs/liar")
OLD = "count-clip=0.0 mosaic.proto-min-records=1"
ROBUST = "aggregation='median' kd.gate-statistic='median'"
CELLS = {  # name -> (app, extra run config)
    "clean, old defaults": ("honest", OLD),
    "attacked, old defaults": ("liar", OLD),
    "attacked, new defaults": ("liar", ""),
    "clean, new defaults": ("honest", ""),
    "attacked, robust settings": ("liar", ROBUST),
    "clean, robust settings": ("honest", ROBUST),
    "attacked, median gate": ("liar", "kd.gate-statistic='median'"),
    "clean, median gate": ("honest", "kd.gate-statistic='median'"),
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
        shutil.copy(ROOT / "bench" / "archive" / "liar_client.py", path / "client_app" / "liar.py")
        pyproject = path / "pyproject.toml"
        text = pyproject.read_text()
        assert 'clientapp = "client_app.app:app"' in text
        pyproject.write_text(text.replace('clientapp = "client_app.app:app"', 'clientapp = "client_app.liar:app"'))
    return path


def cell_dir(name: str, alpha: float, seed: int) -> Path:
    return RUNS / f"a{alpha:g}-s{seed}" / name.replace(", ", "-").replace(" ", "_")


def run(args) -> None:
    commit = git_commit()
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


def _cell_row(out: Path) -> dict | None:
    if not (out / "run" / "summary.json").exists():
        return None
    s = json.loads((out / "run" / "summary.json").read_text())
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    dist = next((r for r in metrics if r.get("phase") == "distill"), {})
    meta = json.loads((out / "meta.json").read_text())
    clipped = (s.get("count-clipped") or {}).get("0")
    return {"commit": meta["commit"], "final": s["final_accuracy"],
            "before-distill": dist.get("acc-before-distill"), "teacher": dist.get("acc-teacher"),
            "after-distill": dist.get("acc-after-distill"), "gate-kept": dist.get("gate-kept"),
            "gate-final-kept": next((r["gate-final-kept"] for r in metrics if "gate-final-kept" in r), None),
            "liar-weighted-as": clipped["weighted-as"] if clipped else None,
            "liar-declared": clipped["declared"] if clipped else None, "wall-seconds": s.get("wall_seconds")}


def report(args) -> None:
    """Every finished cell under RUNS, by alpha: mean +- sd over seeds, and each run."""
    from bench.common import fmt_mean_std
    runs: dict[float, dict[int, dict[str, dict]]] = {}
    for d in sorted(RUNS.glob("a*-s*")):
        alpha, seed = float(d.name[1:].split("-s")[0]), int(d.name.split("-s")[1])
        for name in CELLS:
            row = _cell_row(cell_dir(name, alpha, seed))
            if row is not None:
                runs.setdefault(alpha, {}).setdefault(seed, {})[name] = row
    prov = provenance()
    lines = header_lines("A lying client in a real flwr run (bench/archive/liar.py)", prov)
    lines += [
        "Fashion-MNIST, 10 clients, Dirichlet alpha as below, the main job (`scripts/flwr_sim.py",
        "--num-supernodes 10`: a real `flwr run` simulation, Ray, 8 rounds, distillation after round 6, the",
        "clients' gate with its look-ahead). The liar is partition 0 (`bench/archive/liar_client.py`): it declares",
        "1000 x its counts, sends random weights of its model's scale, a random generator and noise",
        "prototypes, and scores every distilled candidate right and every model before distillation wrong",
        "on all its declared examples. Old defaults: `count-clip=0 mosaic.proto-min-records=1`; robust settings:",
        "the new defaults with `aggregation='median' kd.gate-statistic='median'`; median gate: the new",
        "defaults with `kd.gate-statistic='median'` alone. Each cell runs from a git",
        "worktree of the commit named; one cell at a time on the 2-core VM, other jobs beside it.", ""]
    for alpha in sorted(runs):
        seeds = sorted(runs[alpha])
        lines += [f"## alpha {alpha:g}: final accuracy, mean +- sd over seeds {', '.join(map(str, seeds))}", "",
                  "| cell | final accuracy | seeds | before distillation | gate kept (after look-ahead) |",
                  "|---|---|---|---|---|"]
        for name in CELLS:
            rows = [runs[alpha][s][name] for s in seeds if name in runs[alpha][s]]
            if not rows:
                continue
            kept = ", ".join(f"{_g(r['gate-kept'])} ({_g(r['gate-final-kept'])})" for r in rows)
            lines.append(f"| {name} | {fmt_mean_std([r['final'] for r in rows])} | {len(rows)} | "
                         f"{fmt_mean_std([r['before-distill'] for r in rows if r['before-distill'] is not None])} | "
                         f"{kept} |")
        lines += ["", "Each run:", "", "| seed | cell | final | before distillation | teacher | after distillation "
                  "| liar weighted as (declared) | commit | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for seed in seeds:
            for name, r in runs[alpha][seed].items():
                weighted = "-" if r["liar-weighted-as"] is None else f"{r['liar-weighted-as']} ({r['liar-declared']})"
                lines.append(f"| {seed} | {name} | {_f(r['final'])} | {_f(r['before-distill'])} | {_f(r['teacher'])} "
                             f"| {_f(r['after-distill'])} | {weighted} | {r['commit']} | {_f(r['wall-seconds'], 0)} |")
        lines.append("")
    write_results("liar", "\n".join(lines) + "\n", {"provenance": prov, "runs": {
        f"{a:g}": {str(s): v for s, v in by_seed.items()} for a, by_seed in runs.items()}})
    print("\n".join(lines))


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _g(v) -> str:
    return "-" if v is None else f"{v:g}"


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
