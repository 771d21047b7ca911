#!/usr/bin/env python3
"""Accuracy benchmark: strategies x Dirichlet alpha x seeds on Fashion-MNIST, each cell one
run of this Flower app through the real simulation (scripts/flwr_sim.py, 10 clients), plus
the centralised-training reference (same model, same number of sample passes: the upper
bound). Writes bench/results/<name>.md (mean ± std over seeds of final and best accuracy),
.json (every cell) and .png (accuracy vs alpha).

    .venv/bin/python bench/grid.py             # the full grid: every registered method and Mosaic
                                               # without meta model x 3 alphas x 3 seeds
    .venv/bin/python bench/grid.py --quick     # 2 strategies x 1 alpha x 1 seed, 3 short rounds
    .venv/bin/python bench/grid.py --table-only   # rebuild the table from the finished cells
    .venv/bin/python bench/grid.py headline   # the headline table: every method, both data sets (bench/headline.py)
    .venv/bin/python bench/grid.py converged --stage pretrain ...   # the two-stage protocol:
        # FedAvg pre-trained once per (data set, alpha, seed), then every method from that
        # checkpoint (bench/converged.py's options; --run-config conf/cifar10-cpu.toml for CIFAR-10)

Resumes: a cell whose run directory (RUNS/<name>/<cell>/, bench.common.RUNS: outside the repository) holds summary.json is not
run again, so an interrupted grid continues where it stopped. Cells run in seed order, so
the first seed's table is complete early.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (CENTRAL, RESULTS, RUNS, Cell, cell_done, fmt_mean_std, header_lines,  # noqa: E402,F401
                          distils, loadavg, paired_interval, provenance, registered, resolved_config, run_cell,
                          run_central, write_results)

# every registered method (bench.common.registered: FedGen included) and Mosaic without its meta model
STRATEGIES = (*registered(), "mosaic-nometa")
ALPHAS = (0.01, 0.1, 1.0)
SEEDS = (42, 43, 44)
QUICK = {"strategies": ("fedavg", "mosaic"), "alphas": (0.1,), "seeds": (42,),
         "run_config": "num-server-rounds=3 warmup-rounds=2 local-steps=20 mosaic.gen-steps=60 "
                       "kd.steps=30 mosaic.meta-epochs=40"}


def grid_cells(strategies: Iterable[str], alphas: Iterable[float], seeds: Iterable[int],
               central: bool = True) -> list[Cell]:
    """Every cell, seed by seed (the centralised reference first), then alpha, then strategy."""
    cells = []
    for seed in seeds:
        if central:
            cells.append(Cell(CENTRAL, None, seed))
        cells += [Cell(v, a, seed) for a in alphas for v in strategies]
    return cells


def run_grid(cells: Iterable[Cell], runs_dir: Path, runner: Callable[[Cell], dict | None]
             ) -> dict[Cell, dict]:
    """Each cell's summary: read from ``runs_dir/<cell>/summary.json`` when it exists (a
    finished cell is never rerun), else from ``runner(cell)`` (``None``: failed, left out)."""
    results = {}
    for cell in cells:
        out = Path(runs_dir) / cell.name
        if cell_done(out):
            summary = json.loads((out / "summary.json").read_text())
        else:
            summary = runner(cell)
        if summary is not None:
            results[cell] = summary
    return results


def aggregate(results: dict[Cell, dict]) -> dict[tuple[str, float | None], dict]:
    """Per (variant, alpha): final/best accuracies and wall seconds over seeds."""
    groups: dict[tuple[str, float | None], dict] = {}
    for cell, s in sorted(results.items(), key=lambda kv: kv[0].seed):
        g = groups.setdefault((cell.variant, cell.alpha),
                              {"seeds": [], "final": [], "best": [], "wall": []})
        g["seeds"].append(cell.seed)
        g["final"].append(float(s["final_accuracy"]))
        g["best"].append(float(s["best_accuracy"]))
        g["wall"].append(float(s.get("wall_seconds", 0.0)))
        if s.get("final_val_accuracy") is not None:
            g.setdefault("final_val", []).append(float(s["final_val_accuracy"]))
        for key in ("acc-before-distill", "acc-teacher", "acc-after-distill", "val-before-distill",
                    "val-ensemble", "val-teacher", "val-after-distill"):
            if key in (s.get("distillation") or {}):
                g.setdefault(key, []).append(float(s["distillation"][key]))
    return groups


# ----------------------------------------------------------------------------- running
def cell_config(shared: str, cell: Cell) -> str:
    return f"{shared} alpha={cell.alpha} seed={cell.seed}"


# ----------------------------------------------------------------------------- reporting
def budget_lines(cfg, num_clients: int, strategies: Iterable[str], central: dict | None) -> list[str]:
    c = cfg
    per_client = c.num_server_rounds * c.local_steps * c.batch_size
    work = (f"{c.local_steps} local SGD steps of {c.batch_size} samples" if c.local_steps > 0
            else f"{c.local_epochs} local epoch(s)")
    lines = [f"**Client compute (equal for every strategy):** {c.num_server_rounds} rounds x "
             f"{num_clients} clients x {work} (lr {c.lr:g}, momentum {c.momentum:g}"
             + (f"; {per_client:,} sample passes per client" if c.local_steps > 0 else "") + ")."]
    if any(distils(v) for v in strategies):
        lines.append(
            f"FedDF and the Mosaic variants run rounds {c.warmup_rounds + 1}..{c.num_server_rounds} "
            f"at the fine-tune rate {c.finetune_lr:g}, and at round {c.warmup_rounds} every client "
            f"also trains its generator once: {c.of('mosaic').gen_steps} steps of {c.of('mosaic').gen_batch_size} samples "
            "(generator, discriminator and the client's classifier forward/backward): **extra "
            "client compute** the baselines do not spend. Their server distils for "
            f"{c.of('kd').steps} steps of {c.of('kd').batch_size} generated samples (Mosaic also trains the "
            f"meta model, at most {c.of('mosaic').meta_epochs} epochs).")
    if central:
        lines.append(f"**Centralised reference:** the same model and SGD on the union of the "
                     f"clients' data ({central['train_samples']:,} samples) for the same number "
                     f"of sample passes ({central['sample_passes']:,.0f}: {central['steps']} steps "
                     f"of {c.batch_size}), at lr {c.lr:g} throughout; evaluated "
                     f"{c.num_server_rounds} times (best = best of those). One value per seed, the "
                     "same for every alpha.")
    return lines


def table(groups: dict, strategies: list[str], alphas: list[float]) -> list[str]:
    head = "| strategy | " + " | ".join(f"α={a:g} final | α={a:g} best" for a in alphas) + " | seeds |"
    lines = [head, "|---|" + "---|---|" * len(alphas) + "---|"]
    for variant in strategies + [CENTRAL]:
        cells, seeds = [], set()
        for a in alphas:
            g = groups.get((variant, None if variant == CENTRAL else a))
            cells += [fmt_mean_std(g["final"]), fmt_mean_std(g["best"])] if g else ["-", "-"]
            seeds.update(g["seeds"] if g else [])
        if any(c != "-" for c in cells):
            label = f"{variant} (upper bound)" if variant == CENTRAL else variant
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return lines


def distill_table(groups: dict, strategies: list[str], alphas: list[float]) -> list[str]:
    rows = []
    for variant in strategies:
        cells = []
        for a in alphas:
            g = groups.get((variant, a)) or {}
            if "acc-after-distill" in g:
                cells.append(f"{fmt_mean_std(g['acc-before-distill'], 3)} → "
                             f"{fmt_mean_std(g['acc-after-distill'], 3)} "
                             f"(teacher {fmt_mean_std(g['acc-teacher'], 3)})")
            else:
                cells.append("-")
        if any(c != "-" for c in cells):
            rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return (["", "Distillation round (test accuracy of the global model before → after "
             "distillation, and of the teacher; mean ± std over seeds):", "",
             "| strategy | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)] + rows)


def val_table(groups: dict, strategies: list[str], alphas: list[float]) -> list[str]:
    """Final accuracy on the validation split (training data no client holds), and the
    distillation round on it: what settings are chosen on."""
    rows = []
    for variant in strategies:
        cells = []
        for a in alphas:
            g = groups.get((variant, a)) or {}
            if "final_val" not in g:
                cells.append("-")
                continue
            cell = fmt_mean_std(g["final_val"])
            if "val-after-distill" in g:
                cell += (f" (KD round: {fmt_mean_std(g['val-before-distill'], 3)} → "
                         f"{fmt_mean_std(g['val-after-distill'], 3)}, teacher "
                         f"{fmt_mean_std(g['val-teacher'], 3)}"
                         + (f", ensemble {fmt_mean_std(g['val-ensemble'], 3)}" if "val-ensemble" in g else "")
                         + ")")
            cells.append(cell)
        if any(c != "-" for c in cells):
            rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return (["", "**Validation split** (held out of the training data before partitioning; no client "
             "holds it; settings are chosen on these figures, never on the test set): final "
             "accuracy, and at the distillation round the global model before → after and the "
             "teachers, mean ± std over seeds:", "",
             "| strategy | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)] + rows)


def paired_lines(results: dict, reference: str, strategies: list[str], alphas: list[float],
                 key: str = "final_accuracy") -> list[str]:
    """``reference`` minus each other variant, paired by seed: mean and 95 % t interval."""
    rows = []
    for variant in strategies:
        if variant == reference:
            continue
        cells = []
        for a in alphas:
            ref = {c.seed: s.get(key) for c, s in results.items() if c.variant == reference and c.alpha == a}
            oth = {c.seed: s.get(key) for c, s in results.items() if c.variant == variant and c.alpha == a}
            diffs = [ref[k] - oth[k] for k in sorted(ref.keys() & oth.keys())
                     if ref[k] is not None and oth[k] is not None]
            cells.append(paired_interval(diffs))
        if any(c != "-" for c in cells):
            rows.append(f"| {reference} − {variant} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    label = "test" if key == "final_accuracy" else "validation"
    return (["", f"Paired by seed, final {label} accuracy of {reference} minus each variant: mean "
             "[95 % t interval] (per-seed differences):", "",
             "| difference | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)] + rows)


def wall_table(groups: dict, strategies: list[str], alphas: list[float]) -> list[str]:
    lines = ["", "Wall seconds of the ServerApp per run (mean over seeds; the machine was shared, "
             "see the load averages in the JSON):", "",
             "| strategy | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)]
    for variant in strategies:
        vals = [groups.get((variant, a)) for a in alphas]
        if any(vals):
            lines.append(f"| {variant} | " + " | ".join(
                f"{sum(g['wall']) / len(g['wall']):.0f}" if g else "-" for g in vals) + " |")
    return lines


def plot(groups: dict, strategies: list[str], alphas: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import mean_std

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for ax, key in zip(axes, ("final", "best")):
        for variant in strategies:
            pts = [(a, *mean_std(groups[(variant, a)][key])) for a in alphas if (variant, a) in groups]
            if pts:
                xs, ms, ss = zip(*pts)
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=variant)
        central = [g for (v, _), g in groups.items() if v == CENTRAL]
        if central:
            m, s = mean_std(central[0][key])
            ax.axhline(m, color="black", ls="--", lw=1, label="central (upper bound)")
            ax.axhspan(m - s, m + s, color="black", alpha=0.08)
        ax.set_xscale("log")
        ax.set_xlabel("Dirichlet α (small = more label skew)")
        ax.set_title(f"{key} accuracy", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(name: str, results: dict[Cell, dict], strategies: list[str], alphas: list[float],
           shared: str, num_clients: int, prov: dict, paired: str | None = None,
           setting: str | None = None) -> str:
    groups = aggregate(results)
    cfg = resolved_config(shared)
    central = next((s for c, s in results.items() if c.variant == CENTRAL), None)
    commits = sorted({(s.get("bench") or {}).get("commit", "?") for s in results.values()})
    loads = [s["bench"]["loadavg_before"][0] for s in results.values()
             if "loadavg_before" in (s.get("bench") or {})]
    lines = header_lines(f"Accuracy grid: {name}", prov)
    setting = setting or (f"Fashion-MNIST, {cfg.model}, {num_clients} clients (real Flower simulation, "
                          "scripts/flwr_sim.py)")
    lines += [f"{setting}, Dirichlet label skew; shared run config: "
              f"`{shared.strip() or '(defaults)'}`; cells finished at commit(s) {', '.join(commits)}"
              + (f"; 1-min load average when cells started: {min(loads):.1f}-{max(loads):.1f}" if loads else "")
              + ".", ""]
    lines += budget_lines(cfg, num_clients, strategies, central) + [""]
    lines += ["Test accuracy, mean ± std over seeds (final: after the last round; best: best "
              "round; the test set is used for reporting only):", ""]
    lines += table(groups, strategies, alphas)
    lines += distill_table(groups, strategies, alphas)
    if paired:
        lines += paired_lines(results, paired, strategies, alphas)
    lines += val_table(groups, strategies, alphas)
    if paired:
        lines += paired_lines(results, paired, strategies, alphas, key="final_val_accuracy")
    lines += wall_table(groups, strategies, alphas)
    lines += ["", f"Plot: `{name}.png`. Runs: `$MOSAIC_FLWR_RUNS/{name}/<cell>/` (outside the repository)."]
    plot(groups, strategies, alphas, RESULTS / f"{name}.png",
         f"{name}: Fashion-MNIST, {num_clients} clients")
    md = "\n".join(lines) + "\n"
    data = {**prov, "name": name, "strategies": strategies, "alphas": alphas,
            "shared_run_config": shared, "num_clients": num_clients,
            "groups": {f"{v}|{a}": g for (v, a), g in groups.items()},
            "cells": {c.name: {k: v for k, v in s.items() if k not in ("partition_label_counts", "config")}
                      for c, s in results.items()}}
    write_results(name, md, data)
    return md


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["headline"]:
        # Every method from the same converged start, Fashion-MNIST and CIFAR-10, equal rounds
        # and equal client compute: bench/headline.py, with its own options.
        from bench.headline import main as headline_main
        return headline_main(argv[1:])
    if argv[:1] == ["converged"]:
        # The two-stage protocol (pre-train FedAvg once per data set, alpha and seed, then every
        # method from that checkpoint): bench/converged.py, with its own options.
        from bench.converged import main as converged_main
        return converged_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", help="results name (default: grid, or grid-quick with --quick)")
    ap.add_argument("--strategies", nargs="+", help=f"default: {' '.join(STRATEGIES)}")
    ap.add_argument("--alphas", nargs="+", type=float, help=f"default: {ALPHAS}")
    ap.add_argument("--seeds", nargs="+", type=int, help=f"default: {SEEDS}")
    ap.add_argument("--run-config", help="run-config overrides shared by every cell (TOML)")
    ap.add_argument("--num-supernodes", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help=f"reduced grid: {QUICK}")
    ap.add_argument("--no-central", action="store_true", help="leave out the centralised reference")
    ap.add_argument("--table-only", action="store_true", help="run nothing; tabulate finished cells")
    ap.add_argument("--paired", metavar="VARIANT",
                    help="also tabulate VARIANT minus every other variant, paired by seed (95 %% intervals)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else {"strategies": STRATEGIES, "alphas": ALPHAS, "seeds": SEEDS,
                                     "run_config": ""}
    name = args.name or ("grid-quick" if args.quick else "grid")
    strategies = list(args.strategies or base["strategies"])
    alphas = list(args.alphas or base["alphas"])
    seeds = list(args.seeds or base["seeds"])
    shared = args.run_config if args.run_config is not None else base["run_config"]
    runs_dir = RUNS / name
    prov = provenance()

    def runner(cell: Cell) -> dict | None:
        if args.table_only:
            return None
        if cell.variant == CENTRAL:
            return run_central(cell, runs_dir, shared, args.num_supernodes)
        return run_cell(runs_dir, cell.name, cell.variant, cell_config(shared, cell),
                        num_supernodes=args.num_supernodes, tag="grid")

    cells = grid_cells(strategies, alphas, seeds, central=not args.no_central)
    print(f"[grid] {len(cells)} cells, {sum(cell_done(runs_dir / c.name) for c in cells)} finished; "
          f"runs in {runs_dir}", flush=True)
    results = run_grid(cells, runs_dir, runner)
    for cell in cells:  # the bench.json sidecar (commit, load) of every finished cell
        sidecar = runs_dir / cell.name / "bench.json"
        if cell in results and sidecar.is_file():
            results[cell]["bench"] = json.loads(sidecar.read_text())
    prov["loadavg_end"] = loadavg()
    md = report(name, results, strategies, alphas, shared, args.num_supernodes, prov, paired=args.paired)
    print(md)
    missing = [c.name for c in cells if c not in results]
    if missing:
        print(f"[grid] {len(missing)} cells missing or failed: {', '.join(missing)}", flush=True)
    return 1 if missing and not args.table_only else 0


if __name__ == "__main__":
    sys.exit(main())
