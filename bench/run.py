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
    .venv/bin/python bench/run.py bench/studies/converged.toml --shard 0/2   # the converged protocol; and 1/2

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
    leave-out = ["fedbn"]          # methods of ``methods`` the study does not run (a group's member)
    alphas = [0.1, 1.0]
    seeds = [42, 43]
    only-seeds = { dense = [42] }  # method = [seeds]: a method run at these of the seeds only (a cut)
    clients = 10
    central = false                # true: the centralised reference per seed (bench.common.run_central:
                                   # the same model on the union of the clients' data for as many
                                   # sample passes; one per seed, the same for every alpha)
    fork = false                   # true (in-process only): per (alpha, seed) ONE federation up to the
                                   # distillation round's client replies, then every method's server
                                   # side and remaining rounds from there (mosaic_flwr.testing.replay.Fork):
                                   # methods that differ in the server alone (Mosaic's teacher variants),
                                   # paired by construction, for one federation's client work
    pretrain-rounds = 0            # > 0 (in-process only): the converged protocol: per (alpha, seed)
                                   # FedAvg trains to its plateau for this many rounds (constant rate,
                                   # a validation split: ``SHARED``), the run ``pretrain-a<alpha>-s<seed>``;
                                   # then every method continues from its checkpoint (``init-from``)
                                   # with the same schedule (``CONTINUE``: round 1 at lr, then
                                   # finetune-lr), the distilling methods that share round 1's client
                                   # work (``shares_round1``) forked from ONE federation of it (with the
                                   # teacher-ceiling diagnostic ``bench.oracle``, ``oracle-*.json``), the
                                   # equal-compute rows (``EQUAL_COMPUTE``) once their target finished;
                                   # the central reference for as many sample passes; the tables are
                                   # ``bench.protocol_report``'s. A pre-training the ledger holds without
                                   # its checkpoint is run again, and must reproduce it (``ensure_start``)
    reference = "fedavg"           # the paired differences are each method minus it (default: fedavg
                                   # where the study runs it, else none)
    run-config = ["conf/fmnist-dir0.1.toml", "num-server-rounds=4"]  # TOML files (relative to the
                                   # repository) and key=value strings, in order, a later value winning;
                                   # the method's own settings, alpha and seed win over them

Runs live outside the repository (``--runs-root``, default ``bench.common.RUNS``), one folder per
run under ``<runs-root>/<study>/``; a finished run (in the runs root or the ledger) is never rerun,
so an interrupted study goes on where it stopped (a whole in-process run from its last round's
checkpoint, ``resumable``); runs go seed by seed, so the first seed's table is complete early;
``--shard K/N`` runs every N-th (alpha, seed) cell (and central reference) from the K-th, one
process per core. A run whose simulation fails is reported and left out, the others go on, and the
command exits 1. One setting compared across methods is a spec like any other:
``bench/studies/families.toml`` runs every method on ``conf/fmnist-families.toml``. The headline
comparison's parts are studies too (``bench/studies/headline-<part>.toml``): this runs one alone,
``bench/headline.py`` runs them all and writes the verdict across them.

A measurement study names a measurement as its ``driver`` (``speed``, ``scaling``, ``privacy-dp``,
``privacy-audit``, ``attack``: ``bench.measures.STUDIES``, each with its own keys and their
defaults) and is run by ``bench/measures.py`` with the options ``--set KEY=VALUE``,
``--runs-root``, ``--results-dir`` and ``--table-only`` (``bench/run.py SPEC --help`` lists them):

    .venv/bin/python bench/run.py bench/studies/speed.toml --set sections=teacher
    .venv/bin/python bench/run.py bench/studies/privacy-dp.toml --table-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common, ledger, measures  # noqa: E402
from bench.common import (CENTRAL, EQUAL_COMPUTE, RESULTS, ROOT, RUNS, Cell, SpecError, cell_done,  # noqa: E402
                          distils, flower_context, header_lines, label, loadavg, method_names, pretrain_name,
                          provenance, resolved_config, run_cell, run_central, run_inprocess, runnable, toml_values,
                          variant_name, write_bench_note, write_refusal, write_results)
from bench.report import collect, grid_data, grid_lines, plot, setting_of, with_central  # noqa: E402

KEYS = ("name", "title", "driver", "methods", "leave-out", "alphas", "seeds", "only-seeds", "clients", "central",
        "fork", "pretrain-rounds", "reference", "run-config")
DRIVERS = {"inprocess": "in-process federation: the real ClientApp handlers, no Ray",
           "simulation": "real Flower simulation, scripts/flwr_sim.py"}


def listed(got: object, what: str, kind: type | tuple[type, ...], noun: str) -> list:
    """``got`` (a spec's ``what``) if it is a list of ``kind`` values (``noun``), else a
    ``SpecError``."""
    if not isinstance(got, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in got):
        raise SpecError(f"{what} must be a list of {noun}")
    return got


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
    if unknown := sorted(set(raw) - set(KEYS)):
        raise SpecError(f"{path}: unknown key(s) {', '.join(unknown)} (a spec knows {', '.join(KEYS)})")
    driver = raw.get("driver", "inprocess")
    if driver not in DRIVERS:
        raise SpecError(f"{path}: unknown driver {driver!r} (one of {', '.join(DRIVERS)})")
    try:
        own = method_names(raw.get("methods", "registry"))
        leave_out = method_names(listed(raw.get("leave-out", []), "leave-out", str, "method names"))
        if stray := [m for m in leave_out if m not in own]:
            raise SpecError(f"leave-out names {', '.join(stray)}, which the study does not run")
        own = [m for m in own if m not in leave_out]
        own_seeds = listed(raw.get("seeds", [42]), "seeds", int, "integers")
        only_seeds = only(raw.get("only-seeds", {}), own, own_seeds)
        reference = raw.get("reference", "fedavg" if "fedavg" in own else None)
        if reference is not None and reference not in own:
            raise SpecError(f"the reference {reference!r} is not one of the study's methods")
        if not all(isinstance(raw.get(k, False), bool) for k in ("central", "fork")):
            raise SpecError("central and fork must be true or false")
        if raw.get("fork") and driver != "inprocess":
            raise SpecError("fork = true needs the in-process driver (the replies are replayed in this process)")
        pretrain = raw.get("pretrain-rounds", 0)
        if not isinstance(pretrain, int) or isinstance(pretrain, bool) or pretrain < 0:
            raise SpecError("pretrain-rounds must be a whole number of rounds (0: no converged start)")
        if pretrain and (driver != "inprocess" or raw.get("fork")):
            raise SpecError("pretrain-rounds needs the in-process driver and forks by itself (no fork = true)")
        spec = {"name": str(raw.get("name", path.stem)), "title": str(raw.get("title", path.stem)),
                "driver": driver, "methods": method_names(methods) if methods else own,
                "alphas": [float(a) for a in listed(alphas or raw.get("alphas", [0.1]), "alphas", (int, float),
                                                    "numbers")],
                "seeds": listed(seeds or own_seeds, "seeds", int, "integers"), "only_seeds": only_seeds,
                "clients": int(raw.get("clients", 10)),
                "central": raw.get("central", False), "fork": raw.get("fork", False), "pretrain_rounds": pretrain,
                "reference": reference,
                "run_config": [*listed(raw.get("run-config", []), "run-config", str, "strings"), *overrides]}
        if not spec["alphas"] or not spec["seeds"]:
            raise SpecError("alphas and seeds must name at least one cell")
        resolved_config(spec["run_config"])  # a bad file or key stops here, before any run
    except (SpecError, ConfigError, TypeError, ValueError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    return spec


def only(table: object, methods: list[str], seeds: list[int]) -> dict[str, list[int]]:
    """A spec's ``only-seeds`` (method = [seeds]: a method run at these of the study's seeds only,
    a cut), checked against the study's own ``methods`` and ``seeds``."""
    if not isinstance(table, dict):
        raise SpecError("only-seeds must be a table, method = [seeds]")
    got = {m: listed(s, f"only-seeds.{m}", int, "integers") for m, s in table.items()}
    method_names(list(got))  # an unknown name stops here; a group's name below (the study runs no such method)
    if stray := [m for m in got if m not in methods]:
        raise SpecError(f"only-seeds names {', '.join(stray)}, which the study does not run")
    if stray := [m for m, s in got.items() if not set(s) <= set(seeds)]:
        raise SpecError(f"only-seeds of {', '.join(stray)} names seeds the study does not run")
    return got


def run_rank(variant: str) -> int:
    """The order a converged cell's methods run in (the tables keep the spec's): the methods that
    train alone first, then Mosaic's rows, so that an interrupted cell has its headline comparison,
    then the equal-compute rows (they need Mosaic's client work); the distilling baselines,
    whose teacher passes cost the most, last."""
    if variant in EQUAL_COMPUTE:
        return 2
    if runnable()[variant][0] == "mosaic":
        return 1
    return 3 if distils(variant) else 0


def cell_methods(spec: dict, seed: int) -> list[str]:
    """The methods a cell at ``seed`` runs: the spec's, less those its ``only-seeds`` keep to other
    seeds; under the converged protocol in ``run_rank``'s order."""
    got = [m for m in spec["methods"] if seed in spec.get("only_seeds", {}).get(m, [seed])]
    return sorted(got, key=run_rank) if spec.get("pretrain_rounds") else got


def plan(spec: dict) -> list[Cell]:
    """Every run of the study, seed by seed (its centralised reference first, where asked), then
    alpha, then method (``cell_methods``)."""
    return [cell for s in spec["seeds"]
            for cell in [*([Cell(CENTRAL, None, s)] if spec["central"] else []),
                         *(Cell(m, a, s) for a in spec["alphas"] for m in cell_methods(spec, s))]]


# The converged protocol (``pretrain-rounds``): the settings of every run, under the spec's run config.
SHARED = {"validation-split": 0.1, "server-threads": 1}  # one thread: processes share 2 cores
CONTINUE_ROUNDS = 3
CONTINUE = {"warmup-rounds": 1, "num-server-rounds": CONTINUE_ROUNDS, "lr-schedule": "step", "checkpoint": False}
# Settings that change round 1's client work: variants that differ in them cannot share it.
ROUND1_KEYS = ("kd.local-steps", "kd.local-batch-size", "kd.local-momentum", "kd.local-weight-decay", "mosaic.proto-k",
               "mosaic.proto-min-records", "count-floor", "kd.expert-pass", "mosaic.generator", "mosaic.dcgan-width",
               "kd.local-lr")


@lru_cache(maxsize=None)
def _merged(run_config: tuple[str, ...]) -> dict:
    from mosaic_flwr.config import merge_run_config

    return merge_run_config(list(run_config), cwd=ROOT)


def merged(spec: dict) -> dict:
    """The spec's run config (its files and strings, in order) as values, read once per process."""
    return dict(_merged(tuple(spec["run_config"])))


def method_config(spec: dict, variant: str) -> dict:
    """``variant``'s run config under the spec's, without the cell: the defaults, (a converged
    protocol's continuation settings, ``SHARED`` and ``CONTINUE``,) the spec's run config, the
    method (a registered one or a named variant of one)."""
    from mosaic_flwr.config import load_defaults

    strategy, over = runnable()[variant]
    protocol = {**SHARED, **CONTINUE} if spec.get("pretrain_rounds") else {}
    return {**load_defaults(), **protocol, **merged(spec), "strategy": strategy, **over}


def run_config(spec: dict, cell: Cell, out: Path) -> dict:
    """One run's whole config, as either driver resolves it: ``method_config``, then the cell (and
    a converged protocol's start, its cell's pre-training)."""
    start = {"init-from": str(out / pretrain_name(cell.alpha, cell.seed))} if spec.get("pretrain_rounds") else {}
    return {**method_config(spec, cell.variant), "alpha": cell.alpha, "seed": cell.seed, "output-dir": str(out),
            "run-name": cell.name, **start}


def central_config(spec: dict) -> list[str]:
    """The centralised reference's run config: the spec's, and under the converged protocol its
    settings and the sample passes of the pre-training and the continuation together."""
    if not spec.get("pretrain_rounds"):
        return spec["run_config"]
    rounds = spec["pretrain_rounds"] + merged(spec).get("num-server-rounds", CONTINUE_ROUNDS)
    return [toml_values(SHARED), *spec["run_config"], f"num-server-rounds={rounds}"]


def refusal(rc: dict) -> str | None:
    """The ConfigError a run config meets before any training (e.g. FedBN on a model without
    BatchNorm), or None."""
    from mosaic_flwr.config import ConfigError, build_config

    try:
        build_config(rc)
    except ConfigError as e:
        return str(e)
    return None


def resumable(rc: dict, out: Path) -> dict:
    """``rc`` writing a checkpoint after every round and, when an interrupted run of it left
    one in ``out``, going on from that round (``resume``: the run checks that the config is the
    checkpoint's, and its metrics continue the saved ones)."""
    return {**rc, "checkpoint": True, **({"resume": str(out)} if (out / "checkpoint.pt").is_file() else {})}


def simulation(spec: dict, cell: Cell, out: Path) -> dict:
    """The simulation driver's run of ``cell``: ``bench.common.run_cell``'s (and ``sim_command``'s)
    arguments, the spec's run config first (its files from the repository), then the cell's."""
    return {"runs_dir": out, "run_name": cell.name, "variant": cell.variant, "num_supernodes": spec["clients"],
            "run_config": f"alpha={cell.alpha} seed={cell.seed}",
            "base": [str(ROOT / c.strip()) if c.strip().endswith(".toml") else c for c in spec["run_config"]]}


def run_one(spec: dict, cell: Cell, out: Path, rc: dict | None = None, **bench_extra) -> str:
    """One run of the study into ``out`` (``rc``: its run config where not ``run_config``'s):
    ``finished``; ``refused`` (its settings refuse the method before any training: the reason in
    its refused.json); ``failed`` (a simulation that exited with an error: its log beside it). A
    whole in-process run of a converged protocol goes on from an interrupted attempt's checkpoint."""
    if cell.variant == CENTRAL:
        run_central(cell, out, central_config(spec), spec["clients"])
        return "finished"
    rc = rc or run_config(spec, cell, out)
    if (why := refusal(rc)) is not None:
        write_refusal(out / cell.name, cell.variant, why)
        print(f"[{spec['name']}] {cell.name} refused: {why}", flush=True)
        return "refused"
    if spec["driver"] == "simulation":
        return "finished" if run_cell(**simulation(spec, cell, out), tag=spec["name"]) is not None else "failed"
    if spec.get("pretrain_rounds"):
        rc = resumable(rc, out / cell.name)
    print(f"[{spec['name']}] running {cell.name} (in-process" + (", resumed)" if rc.get("resume") else ")"), flush=True)
    s = run_inprocess(rc, spec["clients"], f"{label(cell.variant)} (alpha={cell.alpha:g}, seed {cell.seed})",
                      **bench_extra)
    print(f"[{spec['name']}]   {cell.name}: final {s['final_accuracy']:.4f}", flush=True)
    return "finished"


def units(spec: dict) -> list[list[Cell]]:
    """The study's runs as the cells they run in (``plan``'s order): each central reference alone,
    each (alpha, seed)'s methods together (a fork, a converged start); ``--shard`` deals them out."""
    groups: dict = {}
    for c in plan(spec):
        groups.setdefault(c.name if c.variant == CENTRAL else (c.alpha, c.seed), []).append(c)
    return list(groups.values())


def run(spec: dict, root: Path, ledger_file: Path, shard: tuple[int, int] = (0, 1)) -> dict[str, str]:
    """Every run of the spec (of this ``shard``'s cells) that neither the runs root nor the ledger
    has finished, each cell's finished runs recorded into the ledger at once. What became of each
    run started, by name."""
    out = root / spec["name"]
    ledger.materialize(ledger_file, out)
    cells = plan(spec)
    done = sum(ledger.finished(out / c.name) for c in cells)
    print(f"[{spec['name']}] {len(cells)} runs, {done} finished; runs in {out}", flush=True)
    started = {}
    for i, unit in enumerate(units(spec)):
        if i % shard[1] == shard[0]:
            started |= run_unit(spec, unit, out, ledger_file)
            ledger.record(out, ledger_file)
    return started


def run_unit(spec: dict, unit: list[Cell], out: Path, ledger_file: Path | None = None) -> dict[str, str]:
    """One cell of the study (a unit of ``units``) into ``out``: a converged cell (``converged``:
    its start and its oracle, even when all is done; one whose start is not reproduced is left,
    said so), a forked one, or its runs one by one, each recorded into ``ledger_file`` at once.
    What became of each run started, by name."""
    todo = [c for c in unit if not ledger.finished(out / c.name)]
    if spec["pretrain_rounds"] and unit[0].variant != CENTRAL:
        try:
            return converged(spec, unit[0].alpha, unit[0].seed, out, [c.variant for c in unit])
        except NotReproduced as exc:
            print(f"[{spec['name']}] cell alpha={unit[0].alpha:g} seed={unit[0].seed} left: {exc}", flush=True)
            return {}
    if spec["fork"] and todo and unit[0].variant != CENTRAL:
        return run_forked(spec, todo, out)
    started = {}
    for cell in todo:
        started[cell.name] = run_one(spec, cell, out)
        if ledger_file is not None:
            ledger.record(out, ledger_file)
    return started


def refused_now(spec: dict, cells: list[Cell], out: Path) -> tuple[dict[Cell, dict], dict[str, str]]:
    """The run configs of ``cells`` that run, and those refused (their refused.json written)."""
    configs, done = {}, {}
    for c in cells:
        rc = run_config(spec, c, out)
        if (why := refusal(rc)) is not None:
            write_refusal(out / c.name, c.variant, why)
            print(f"[{spec['name']}] {c.name} refused: {why}", flush=True)
            done[c.name] = "refused"
        else:
            configs[c] = rc
    return configs, done


def run_forked(spec: dict, cells: list[Cell], out: Path) -> dict[str, str]:
    """Cells of one (alpha, seed), forked (``fork = true``): one federation plays up to the
    distillation round's client replies (with the first method's settings: the methods must not
    differ in client work), then each method's server takes that round and its remaining rounds
    from there (``forked``)."""
    configs, done = refused_now(spec, cells, out)
    configs = {c: {**rc, "checkpoint": False} for c, rc in configs.items()}
    if configs:  # the rounds before the fork are the same for every method: their client work
        forked(spec, next(iter(configs.values())), configs, "forked", lambda c: (
            f"{label(c.variant)} (alpha={c.alpha:g}, seed {c.seed}), forked at the distillation round"))
    return done | {c.name: "finished" for c in configs}


def forked(spec: dict, base: dict, members: dict[Cell, dict], driver: str, title, at: int | None = None,
           oracle: Path | None = None) -> None:
    """The one driver of ``mosaic_flwr.testing.replay.Fork``: ONE in-process federation of ``base``
    up to round ``at``'s client replies (default: its distillation round), then each member's
    server (its run config) takes that round and its remaining rounds from there, its bench.json
    saying what the shared rounds cost (``driver``, ``shared_seconds``), its summary ``title(cell)``.
    With ``oracle``, every client model of the round is kept and what a teacher trained on real
    images would score is written there first (``bench.oracle.oracle_teacher``)."""
    from client_app.app import app as client_app
    from mosaic_flwr.registry import STRATEGIES
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from mosaic_flwr.testing.replay import Fork
    from server_app.app import finish_run, setup

    t0, load0 = time.perf_counter(), loadavg()
    grid = InProcessGrid(client_app, base, spec["clients"])
    sc = setup(grid, flower_context(base))
    at = at or sc.cfg.warmup_rounds
    print(f"[{spec['name']}] alpha={sc.cfg.alpha:g} seed={sc.cfg.seed}: rounds 1..{at} of client work, once, for "
          f"{', '.join(c.variant for c in members) or 'the teacher-ceiling diagnostic'}", flush=True)
    fork = Fork.at(STRATEGIES[sc.cfg.strategy].strategy(sc), at, keep_models=oracle is not None)
    shared = time.perf_counter() - t0
    if oracle is not None and not oracle.is_file():
        import torch

        from bench.oracle import oracle_teacher

        with torch.random.fork_rng():
            got = oracle_teacher(fork.strategy, fork.items, sc.cfg.seed)
        oracle.write_text(json.dumps(got, indent=1) + "\n")
        print(f"[{spec['name']}]   teacher trained on real images (diagnostic): {got}", flush=True)
    for c, rc in members.items():
        t1 = time.perf_counter()
        print(f"[{spec['name']}]   {c.name}: its server from round {at} on", flush=True)
        sv = setup(grid, flower_context(rc))
        fork.run(sv)
        write_bench_note(sv.results.out_dir, loadavg_before=load0, shared_seconds=round(shared, 2),
                         variant_seconds=round(time.perf_counter() - t1, 2), driver=driver)
        s = finish_run(sv, shared + time.perf_counter() - t1, variant=c.variant, title=title(c))
        print(f"[{spec['name']}]   {c.name}: final {s['final_accuracy']:.4f}", flush=True)


# ----------------------------------------------------------------------------- the converged protocol
def pretrain(spec: dict, alpha: float, seed: int, out: Path) -> None:
    """The cell's start: FedAvg at a constant rate for ``pretrain-rounds`` rounds (``SHARED`` under
    the spec's run config), resumed from an interrupted attempt's checkpoint; its run directory
    holds the checkpoint every method of the cell starts from."""
    from mosaic_flwr.config import load_defaults

    name = pretrain_name(alpha, seed)
    if cell_done(out / name):
        return
    rc = resumable({**load_defaults(), **SHARED, **merged(spec), "strategy": "fedavg", "alpha": alpha, "seed": seed,
                    "lr-schedule": "constant", "output-dir": str(out), "run-name": name,
                    "num-server-rounds": spec["pretrain_rounds"]}, out / name)
    print(f"[{spec['name']}] pre-training FedAvg alpha={alpha:g} seed={seed}, {rc['num-server-rounds']} rounds"
          + (" (resumed)" if rc.get("resume") else ""), flush=True)
    s = run_inprocess(rc, spec["clients"], f"FedAvg pre-training (alpha={alpha:g}, seed {seed})")
    print(f"[{spec['name']}]   final {s['final_accuracy']:.4f}, best {s['best_accuracy']:.4f}", flush=True)


class NotReproduced(RuntimeError):
    """A rerun pre-training did not reproduce the ledger's model."""


def ensure_start(pre: Path, pending: list[str], started: list[str], rerun) -> None:
    """Before a cell's continuation: if its pre-training ``pre`` is recorded (restored from the
    ledger) but its checkpoint is gone and runs are ``pending``, run it again (``rerun()``) and check
    that the new run ends at the recorded accuracies, test and validation, to the last digit;
    unless no method of the cell ran from the recorded one (none ``started``)."""
    if not (pre / "summary.json").is_file() or (pre / "checkpoint.pt").is_file() or not pending:
        return
    recorded = json.loads((pre / "summary.json").read_text())
    print(f"[bench] {pre.name}: recorded (ledger) without its checkpoint; pre-training again to reproduce "
          f"it (recorded final accuracy {recorded['final_accuracy']:.4f})", flush=True)
    shutil.rmtree(pre)
    rerun()
    got = json.loads((pre / "summary.json").read_text())
    keys = ("final_accuracy", "final_val_accuracy")
    diff = {k: (recorded.get(k), got.get(k)) for k in keys if recorded.get(k) != got.get(k)}
    if diff and not started:  # no method ran from the recorded start: the new one is the cell's start
        print(f"[bench] {pre.name}: ended at {got['final_accuracy']:.4f} (recorded {recorded['final_accuracy']:.4f}); "
              "no method of the cell ran from the recorded one, so this is the cell's start", flush=True)
        return
    if diff:
        raise NotReproduced(f"{pre.name}: the rerun pre-training ended elsewhere than the recorded one "
                            f"({'; '.join(f'{k}: recorded {a}, now {b}' for k, (a, b) in diff.items())}); the "
                            "cell's finished runs started from the recorded model, so its remaining runs are "
                            "not run from another (a different machine, thread count or library version "
                            "changes the arithmetic). Rerun the whole cell: move its runs out of the ledger.")
    print(f"[bench] {pre.name}: reproduced exactly (final accuracy {got['final_accuracy']:.4f})", flush=True)


def shares_round1(variant: str) -> bool:
    """Whether a variant runs Mosaic's client round at the distillation round (generators,
    prototypes): those share one round 1 of client work; every other variant (FedAvg and
    the methods whose clients only train) is one whole in-process run, and so is a variant
    that distils at a later round (its own ``warmup-rounds``)."""
    from mosaic_flwr.distill.server import DistillStrategy
    from mosaic_flwr.registry import STRATEGIES

    strategy, over = runnable()[variant]
    cls = STRATEGIES[strategy].strategy if strategy in STRATEGIES else None
    return bool(cls and issubclass(cls, DistillStrategy) and cls.mosaic_message is not DistillStrategy.mosaic_message
                and over.get("warmup-rounds", CONTINUE["warmup-rounds"]) == CONTINUE["warmup-rounds"])


def round1_key(variant: str) -> tuple:
    return tuple((k, runnable()[variant][1].get(k)) for k in ROUND1_KEYS)


def oracle_file(out: Path, alpha: float, seed: int, key: tuple) -> Path:
    from mosaic_flwr.config import RENAMED

    old_name = {new: old for old, new in RENAMED.items()}  # the files' names keep the keys' old names
    tag = "".join(f"-{old_name.get(k, k)}{v}" for k, v in key if v is not None)
    return out / f"oracle-a{alpha:g}-s{seed}{tag}.json"


def equal_compute_rounds(out: Path, variant: str, alpha: float, seed: int, rounds: int) -> dict | None:
    """How many rounds ``variant`` (an ``EQUAL_COMPUTE`` key) gets in cell (alpha, seed): the
    target's client work in its own plain rounds (``client_units``; at least ``rounds``).
    ``None`` while the target's run of this cell is missing."""
    from bench.protocol_report import client_units

    _, target = EQUAL_COMPUTE[variant]
    f = out / variant_name(target, alpha, seed) / "metrics.json"
    if not cell_done(f.parent) or not f.is_file():
        return None
    rows = json.loads(f.read_text())
    units = client_units(rows)
    if units is None:
        return None
    return {"rounds": max(rounds, round(units)), "target": target, "target_units": round(units, 2),
            "target_client_seconds": round(sum(r.get("client-seconds", 0.0) for r in rows), 2)}


def converged(spec: dict, alpha: float, seed: int, out: Path, methods: list[str]) -> dict[str, str]:
    """Cell (alpha, seed) of the converged protocol: its pre-training (``ensure_start``,
    ``pretrain``), then ``methods`` from its checkpoint in the order given: a group of distilling
    methods that share round 1 at its first member's place (``forked``: one round 1 of client
    work per setting of ``ROUND1_KEYS``, with the teacher-ceiling diagnostic, computed even when
    its members are finished), an equal-compute one as soon as its target has finished, every
    other one a whole in-process run (``run_one``). What became of each run started, by name."""
    pre = out / pretrain_name(alpha, seed)
    cells = {m: Cell(m, alpha, seed) for m in methods}
    todo = [m for m in methods if not ledger.finished(out / cells[m].name)]
    pending = [m for m in todo if refusal(run_config(spec, cells[m], out)) is None]
    ensure_start(pre, pending, [m for m in methods if cell_done(out / cells[m].name)],
                 lambda: pretrain(spec, alpha, seed, out))
    pretrain(spec, alpha, seed, out)
    configs, started = refused_now(spec, [cells[m] for m in todo], out)
    todo = [m for m in todo if cells[m] in configs]
    keys = {round1_key(m) for m in methods if shares_round1(m)}
    missing = [k for k in keys if not oracle_file(out, alpha, seed, k).is_file()]
    if missing and not todo and not (pre / "checkpoint.pt").is_file():
        print(f"[{spec['name']}] alpha={alpha:g} seed={seed}: every run is finished; the teacher-ceiling diagnostic "
              f"(oracle) is missing and {pre.name}'s checkpoint is gone, so it is left out", flush=True)
        return started

    def group(key: tuple) -> None:
        first = next(m for m in methods if shares_round1(m) and round1_key(m) == key)
        members = {cells[m]: configs[cells[m]] for m in todo if shares_round1(m) and round1_key(m) == key}
        # Round 1 as every member needs it (prototypes included: a meta model that reads none ignores
        # them), into a scratch run directory of its own, never a member's (a finished member's
        # metrics would be overwritten by the shared round 0).
        oracle = oracle_file(out, alpha, seed, key)
        base = run_config(spec, cells[first], out)
        data = base.get("mosaic.meta-data", "auto")
        base |= {"run-name": oracle.stem.replace("oracle", "round1"), "strategy": "mosaic",
                 "mosaic.meta-data": "auto" if data in ("generated", "clients") else data}
        forked(spec, base, members, "in-process, converged", lambda c: (
            f"{c.variant} from FedAvg (alpha={alpha:g}, seed {seed})"), at=1, oracle=oracle)
        started.update({c.name: "finished" for c in members})

    def equal_compute(m: str) -> bool:
        rc = configs[cells[m]]
        if (eq := equal_compute_rounds(out, m, alpha, seed, rc["num-server-rounds"])) is None:
            return False
        print(f"[{spec['name']}] alpha={alpha:g} seed={seed}: {m}: {eq['rounds']} rounds: {eq['target']}'s clients "
              f"worked {eq['target_units']:.1f} plain rounds' time ({eq['target_client_seconds']:.0f} s)", flush=True)
        started[cells[m].name] = run_one(spec, cells[m], out, {**rc, "num-server-rounds": eq["rounds"]},
                                         equal_compute=eq)
        return True

    groups_done, waiting = set(), []
    for m in todo:
        if m in EQUAL_COMPUTE:
            if not equal_compute(m):
                waiting.append(m)
        elif shares_round1(m):
            if (key := round1_key(m)) not in groups_done:
                groups_done.add(key)
                group(key)
        else:
            started[cells[m].name] = run_one(spec, cells[m], out, configs[cells[m]])
        waiting = [w for w in waiting if not equal_compute(w)]  # its target may have just finished
    for key in missing:
        if key not in groups_done:
            group(key)  # round 1 for the oracle alone
    for w in waiting:
        print(f"[{spec['name']}] alpha={alpha:g} seed={seed}: {w} waits for {' and '.join(EQUAL_COMPUTE[w])}"
              " of this cell (add them to the study's methods)", flush=True)
    return started


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
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing; the table from the ledger (none: exit 2, the committed tables left)")
    ap.add_argument("--methods", nargs="+", help="these methods (names or groups, as in a spec) instead of the spec's")
    ap.add_argument("--alphas", nargs="+", type=float, help="these alphas instead of the spec's")
    ap.add_argument("--seeds", nargs="+", type=int, help="these seeds instead of the spec's")
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th cell (an alpha and seed, a central reference) "
                                                   "from the K-th")
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
    if args.table_only and not ledger_file.is_file():  # an empty table must not replace the committed one
        print(f"bench/run.py: --table-only: {shown(ledger_file)} does not exist (no run of {spec['name']} is "
              "recorded); the study's tables are left as they are", file=sys.stderr)
        return 2
    prov, shard = provenance(), tuple(int(v) for v in args.shard.split("/"))
    started = {} if args.table_only else run(spec, Path(args.runs_root).resolve(), ledger_file, shard)
    prov["loadavg_end"] = loadavg()
    if spec["pretrain_rounds"]:  # the converged protocol's tables
        from bench.protocol_report import report

        with tempfile.TemporaryDirectory(prefix="study-") as tmp:
            ledger.materialize(ledger_file, Path(tmp))
            print(report(Path(tmp), spec["alphas"], spec["seeds"], spec["methods"], name=spec["name"]))
    else:
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
