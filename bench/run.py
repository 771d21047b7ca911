#!/usr/bin/env python3
"""A study from its spec: methods x Dirichlet alphas x seeds (and, where asked, the centralised
reference per seed), each run recorded in the study's ledger (``bench/results/ledger/<study>.json``)
and tabulated from it into ``bench/results/<study>.md``, ``.json`` and ``.png``
(``bench.report.grid_lines``: final and best accuracy, the distillation round, the paired
differences to the reference, validation accuracy, wall seconds, accuracy per model).

    .venv/bin/python bench/run.py bench/studies/smoke.toml              # runs what is missing, then the table
    .venv/bin/python bench/run.py bench/studies/smoke.toml --table-only # the table from the ledger alone
    .venv/bin/python bench/run.py bench/studies/grid.toml               # the accuracy grid (real simulation)
    .venv/bin/python bench/run.py bench/studies/grid.toml --methods fedavg mosaic --seeds 42   # part of it

A study spec (TOML; every key has a default, an unknown key is an error):

    title = "..."                  # the table's heading (default: the study's name, the file's stem)
    driver = "inprocess"           # each run one in-process federation (the real ClientApp handlers,
                                   # no Ray: bench.common.run_inprocess); "simulation": the real
                                   # Flower simulation (scripts/flwr_sim.py through bench.common.run_cell:
                                   # its log beside the run, its load and commit in its bench.json)
    methods = "registry"           # every method the library registers but its ablations
                                   # (bench.common.compared); "distilling": those of them that distil;
                                   # or a list of names and of these groups and "ablations"
                                   # (bench.common.ABLATIONS); a name is a registered method or a
                                   # named variant of one (bench/variants.toml, e.g. "mosaic-nometa")
    alphas = [0.1, 1.0]
    seeds = [42, 43]
    clients = 10
    central = false                # true: the centralised reference per seed (bench.common.run_central:
                                   # the same model on the union of the clients' data for as many
                                   # sample passes; one per seed, the same for every alpha)
    fork = false                   # true (in-process only): per (alpha, seed) ONE federation up to the
                                   # distillation round's client replies, then every method's server
                                   # side and remaining rounds from there (mosaic_flwr.testing.replay.Fork):
                                   # methods that differ in the server alone (Mosaic's teacher variants),
                                   # paired by construction, for one federation's client work
    reference = "fedavg"           # the paired differences are each method minus it (default: fedavg
                                   # where the study runs it, else none)
    run-config = ["conf/fmnist-dir0.1.toml", "num-server-rounds=4"]  # TOML files (relative to the
                                   # repository) and key=value strings, in order, a later value winning;
                                   # the method's own settings, alpha and seed win over them

Runs live outside the repository (``--runs-root``, default ``bench.common.RUNS``), one folder per
run under ``<runs-root>/<study>/``; a finished run (in the runs root or the ledger) is never rerun,
so an interrupted study goes on where it stopped; runs go seed by seed, so the first seed's table
is complete early. A run whose simulation fails is reported and left out, the others go on, and the
command exits 1. One setting compared across methods is a spec like any other:
``bench/studies/families.toml`` runs every method on ``conf/fmnist-families.toml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common, ledger, measures  # noqa: E402
from bench.common import (CENTRAL, RESULTS, ROOT, RUNS, Cell, SpecError, header_lines, label, loadavg,  # noqa: E402
                          method_names, provenance, resolved_config, run_cell, run_central, run_inprocess, runnable,
                          write_refusal, write_results)
from bench.report import collect, grid_data, grid_lines, plot, setting_of, with_central  # noqa: E402

KEYS = ("name", "title", "driver", "methods", "alphas", "seeds", "clients", "central", "fork", "reference",
        "run-config")
DRIVERS = {"inprocess": "in-process federation: the real ClientApp handlers, no Ray",
           "simulation": "real Flower simulation, scripts/flwr_sim.py"}


def load_spec(path: Path, methods: Sequence[str] | None = None, alphas: Sequence[float] | None = None,
              seeds: Sequence[int] | None = None, overrides: Sequence[str] = ()) -> dict:
    """The study spec with its defaults and its methods resolved to names; ``methods``, ``alphas``,
    ``seeds`` replace its own where given (narrowing it), ``overrides`` (run-config strings) go
    after its run config. A ``SpecError`` names what cannot run."""
    from mosaic_flwr.config import ConfigError

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    if raw.get("driver") in measures.STUDIES:  # a measurement study (bench/measures.py)
        return measures.load_spec(path)
    if "parts" in raw:
        raise SpecError(f"{path}: the headline comparison's parts: run them with bench/headline.py")
    if unknown := sorted(set(raw) - set(KEYS)):
        raise SpecError(f"{path}: unknown key(s) {', '.join(unknown)} (a spec knows {', '.join(KEYS)})")
    driver = raw.get("driver", "inprocess")
    if driver not in DRIVERS:
        raise SpecError(f"{path}: unknown driver {driver!r} (one of {', '.join(DRIVERS)})")
    try:
        own = method_names(raw.get("methods", "registry"))
        reference = raw.get("reference", "fedavg" if "fedavg" in own else None)
        if reference is not None and reference not in own:
            raise SpecError(f"the reference {reference!r} is not one of the study's methods")
        if not isinstance(raw.get("run-config", []), list) or not all(
                isinstance(raw.get(k, False), bool) for k in ("central", "fork")):
            raise SpecError("run-config must be a list of strings, central and fork true or false")
        if raw.get("fork") and driver != "inprocess":
            raise SpecError("fork = true needs the in-process driver (the replies are replayed in this process)")
        spec = {"name": str(raw.get("name", path.stem)), "title": str(raw.get("title", path.stem)),
                "driver": driver, "methods": method_names(methods) if methods else own,
                "alphas": [float(a) for a in alphas or raw.get("alphas", [0.1])],
                "seeds": [int(s) for s in seeds or raw.get("seeds", [42])], "clients": int(raw.get("clients", 10)),
                "central": raw.get("central", False), "fork": raw.get("fork", False), "reference": reference,
                "run_config": [str(c) for c in (*raw.get("run-config", []), *overrides)]}
        resolved_config(spec["run_config"])  # a bad file or key stops here, before any run
    except (SpecError, ConfigError, TypeError, ValueError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    return spec


def plan(spec: dict) -> list[Cell]:
    """Every run of the study, seed by seed (its centralised reference first, where asked), then
    alpha, then method."""
    return [cell for s in spec["seeds"]
            for cell in [*([Cell(CENTRAL, None, s)] if spec["central"] else []),
                         *(Cell(m, a, s) for a in spec["alphas"] for m in spec["methods"])]]


def run_config(spec: dict, cell: Cell, out: Path) -> dict:
    """One run's whole config, as either driver resolves it: the defaults, the spec's run config,
    the method (a registered one or the driver's variant of one), the cell."""
    from mosaic_flwr.config import load_defaults, merge_run_config

    strategy, over = runnable()[cell.variant]
    return {**load_defaults(), **merge_run_config(spec["run_config"], cwd=ROOT), "strategy": strategy, **over,
            "alpha": cell.alpha, "seed": cell.seed, "output-dir": str(out), "run-name": cell.name}


def simulation(spec: dict, cell: Cell, out: Path) -> dict:
    """The simulation driver's run of ``cell``: ``bench.common.run_cell``'s (and ``sim_command``'s)
    arguments, the spec's run config first (its files from the repository), then the cell's."""
    return {"runs_dir": out, "run_name": cell.name, "variant": cell.variant, "num_supernodes": spec["clients"],
            "run_config": f"alpha={cell.alpha} seed={cell.seed}",
            "base": [str(ROOT / c.strip()) if c.strip().endswith(".toml") else c for c in spec["run_config"]]}


def run_one(spec: dict, cell: Cell, out: Path) -> str:
    """One run of the study into ``out``: ``finished``; ``refused`` (its settings refuse the method
    before any training: the reason in its refused.json); ``failed`` (a simulation that exited with
    an error: its log beside it)."""
    from bench.converged import refusal

    if cell.variant == CENTRAL:
        run_central(cell, out, spec["run_config"], spec["clients"])
        return "finished"
    rc = run_config(spec, cell, out)
    if (why := refusal(rc)) is not None:
        write_refusal(out / cell.name, cell.variant, why)
        return "refused"
    if spec["driver"] == "simulation":
        return "finished" if run_cell(**simulation(spec, cell, out), tag=spec["name"]) is not None else "failed"
    print(f"[{spec['name']}] running {cell.name} (in-process)", flush=True)
    run_inprocess(rc, spec["clients"], f"{label(cell.variant)} (alpha={cell.alpha:g}, seed {cell.seed})")
    return "finished"


def run(spec: dict, root: Path, ledger_file: Path) -> dict[str, str]:
    """Every run of the spec that neither the runs root nor the ledger has finished (``run_one``),
    each finished one recorded into the ledger at once. What became of each run started, by name."""
    out = root / spec["name"]
    ledger.materialize(ledger_file, out)
    cells = plan(spec)
    todo = [c for c in cells if not ledger.finished(out / c.name)]
    print(f"[{spec['name']}] {len(cells)} runs, {len(cells) - len(todo)} finished; runs in {out}", flush=True)
    started = {}
    if spec["fork"]:
        for group in {(c.alpha, c.seed): None for c in todo if c.variant != CENTRAL}:
            started |= run_forked(spec, [c for c in todo if (c.alpha, c.seed) == group], out)
            ledger.record(out, ledger_file)
        todo = [c for c in todo if c.variant == CENTRAL]
    for cell in todo:
        started[cell.name] = run_one(spec, cell, out)
        ledger.record(out, ledger_file)
    ledger.record(out, ledger_file)
    return started


def run_forked(spec: dict, cells: list[Cell], out: Path) -> dict[str, str]:
    """Cells of one (alpha, seed), forked (``fork = true``): one federation plays up to the
    distillation round's client replies (with the first method's settings: the methods must not
    differ in client work), then each method's server takes that round and its remaining rounds
    from there (``Fork.run``)."""
    import time

    from bench.common import flower_context, write_bench_note
    from bench.converged import refusal
    from client_app.app import app as client_app
    from mosaic_flwr.registry import STRATEGIES
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from mosaic_flwr.testing.replay import Fork
    from server_app.app import finish_run, setup

    a, s = cells[0].alpha, cells[0].seed
    configs = {c: {**run_config(spec, c, out), "checkpoint": False} for c in cells}
    done = {}
    for c, rc in configs.items():
        if (why := refusal(rc)) is not None:
            write_refusal(out / c.name, c.variant, why)
            done[c.name] = "refused"
    todo = [c for c in cells if c.name not in done]
    if not todo:
        return done
    base = configs[todo[0]]  # the rounds before the fork are the same for every method: their client work
    t0, load0 = time.perf_counter(), loadavg()
    grid = InProcessGrid(client_app, base, spec["clients"])
    sc = setup(grid, flower_context(base))
    print(f"[{spec['name']}] alpha={a:g} seed={s}: rounds 1..{sc.cfg.warmup_rounds} of client work, once, "
          f"for {', '.join(c.variant for c in todo)}", flush=True)
    fork = Fork.at(STRATEGIES[sc.cfg.strategy].strategy(sc), sc.cfg.warmup_rounds)
    shared = time.perf_counter() - t0
    for c in todo:
        t1 = time.perf_counter()
        print(f"[{spec['name']}]   {c.name}: its server from the distillation round on", flush=True)
        sv = setup(grid, flower_context(configs[c]))
        fork.run(sv)
        write_bench_note(sv.results.out_dir, loadavg_before=load0, shared_seconds=round(shared, 2),
                         variant_seconds=round(time.perf_counter() - t1, 2), driver="in-process, forked")
        finish_run(sv, shared + time.perf_counter() - t1, variant=c.variant,
                   title=f"{label(c.variant)} (alpha={a:g}, seed {s}), forked at the distillation round")
        done[c.name] = "finished"
    return done


def shown(path: Path) -> str:
    """``path`` relative to the repository where it is in it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def table(spec: dict, ledger_file: Path) -> tuple[str, dict]:
    """The study's report below its header (markdown) and its figures, from its ledger alone; its
    plot goes to ``bench/results/<study>.png``."""
    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        ledger.materialize(ledger_file, Path(tmp))
        d = collect(Path(tmp), spec["alphas"], spec["seeds"], spec["methods"])
        refused = {c.variant: json.loads(f.read_text())["reason"] for c in plan(spec)
                   if (f := Path(tmp) / c.name / "refused.json").is_file()}
    runs = with_central(d) if spec["central"] else d["runs"]
    cfg, name, ref = resolved_config(spec["run_config"]), spec["name"], spec["reference"]
    lines = grid_lines(runs, spec["methods"], spec["alphas"], spec["seeds"], cfg, spec["clients"],
                       setting_of(cfg, spec["clients"], DRIVERS[spec["driver"]]), " ".join(spec["run_config"]),
                       [(m, ref) for m in spec["methods"] if ref and m != ref])
    if refused:
        lines += ["", "Refused by their settings (before any training): "
                  + "; ".join(f"{label(m)}: {why.splitlines()[0][:160]}" for m, why in refused.items()) + "."]
    if runs:
        plot(runs, spec["methods"], spec["alphas"], common.RESULTS / f"{name}.png",
             f"{name}: {setting_of(cfg, spec['clients'])}")
    lines += ["", f"Runs finished: {len(runs)} of {len(plan(spec))} ({len(refused)} method"
              f"{'' if len(refused) == 1 else 's'} refused)." + (f" Plot: `{name}.png`." if runs else "")
              + f" Runs: `{shown(ledger_file)}`."]
    return "\n".join(lines) + "\n", {"spec": spec, **grid_data(runs), "refused": refused}


def main(argv: list[str] | None = None) -> int:
    # ---- a measurement study (speed, scaling, privacy, attack): bench/measures.py, its own options
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and measures.driver_of(argv[0]):
        return measures.main(argv)
    # ----
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="the study spec (TOML), e.g. bench/studies/smoke.toml")
    ap.add_argument("--runs-root", default=str(RUNS), help="runs go to RUNS_ROOT/<study>/ (outside the repository)")
    ap.add_argument("--ledger", default=None, help="the study's ledger (default bench/results/ledger/<study>.json)")
    ap.add_argument("--table-only", action="store_true", help="run nothing; the table from the ledger")
    ap.add_argument("--methods", nargs="+", help="these methods (names or groups, as in a spec) instead of the spec's")
    ap.add_argument("--alphas", nargs="+", type=float, help="these alphas instead of the spec's")
    ap.add_argument("--seeds", nargs="+", type=int, help="these seeds instead of the spec's")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="run-config values for every run, after the spec's run-config (its runs go into the "
                         "study's ledger: pair a trial with --runs-root and --ledger)")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(Path(args.study), args.methods, args.alphas, args.seeds,
                         [" ".join(args.set)] if args.set else [])
    except SpecError as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        return 2
    ledger_file = Path(args.ledger) if args.ledger else RESULTS / "ledger" / f"{spec['name']}.json"
    prov = provenance()
    started = {} if args.table_only else run(spec, Path(args.runs_root).resolve(), ledger_file)
    prov["loadavg_end"] = loadavg()
    md, data = table(spec, ledger_file)
    md = "\n".join(header_lines(spec["title"], prov)) + "\n" + md
    write_results(spec["name"], md, {**prov, **data})
    print(md)
    if failed := [n for n, what in started.items() if what == "failed"]:
        print(f"[{spec['name']}] {len(failed)} run(s) failed (their logs beside them): {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
