#!/usr/bin/env python3
"""The headline comparison: every method from the same converged FedAvg start, on
Fashion-MNIST and CIFAR-10, at equal rounds and at equal client compute.

One command runs the whole grid, cell by cell, and resumes where it was interrupted (a
finished run directory is never rerun; an interrupted run goes on from its last round's
checkpoint, except Mosaic's group, which shares round 1 and starts again):

    .venv/bin/python bench/headline.py                          # every part, in order
    .venv/bin/python bench/headline.py --parts fmnist           # one part
    .venv/bin/python bench/headline.py --shard 0/2 &            # two processes, one per core
    .venv/bin/python bench/headline.py --shard 1/2
    .venv/bin/python bench/headline.py --parts cifar10-families --threads 2  # one cell, both cores
    .venv/bin/python bench/headline.py --table-only             # tables and plots of what is done
    .venv/bin/python bench/headline.py --plan                   # the cells and their measured cost

Runs (checkpoints included) live outside the repository, under ``--runs-root`` (default
``bench.common.RUNS``: ``$MOSAIC_FLWR_RUNS`` or ``~/.cache/mosaic-flwr/bench-runs``). What is
finished is recorded as data: each cell's finished runs go into
``bench/results/ledger/headline-<part>.json`` (``bench/ledger.py``; commit it) as soon as the cell
ends, and are written back into the runs root before the grid runs, so a new machine or a clean
clone goes on where the last one stopped; the tables are read from the ledger. A recorded
pre-training without its checkpoint is run again when its cell has runs to do and must reproduce
the recorded accuracy exactly, else the cell stops with the two figures: its finished runs started
from the recorded model, a different one would not be a fair start for the rest.

Each part is an ordinary ``bench/run.py`` study spec, ``bench/studies/headline-<part>.toml``, run
by its converged protocol (``bench.run.converged`` per cell (part, alpha, seed)): FedAvg to its
plateau (``init-from``), then every method of the part for the same further rounds with the same
learning-rate schedule (round 1 at ``lr``, then ``finetune-lr``) and the clients' distillation gate
on for every distilling method; then FedAvg and FedProx again with as many rounds as Mosaic's
clients' measured work buys (``bench.run.equal_compute_rounds``). Per seed, the centralised
reference with the same sample passes. Settings are the defaults (chosen on the validation split:
docs/methods.md, "How the defaults were chosen") and, for CIFAR-10, the CPU preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import ledger as ledger_  # noqa: E402
from bench import protocol_report as protocol  # noqa: E402
from bench import run as runner  # noqa: E402
from bench.common import (CENTRAL, EQUAL_COMPUTE, RESULTS, ROOT, RUNS, Cell, SpecError, label,  # noqa: E402
                          machine_line, pretrain_name, provenance, variant_name)
from bench.report import by_model_table, collect, differences, points, read_json, row, table  # noqa: E402

# The parts, in the order the grid runs them: each an ordinary bench/run.py study spec,
# bench/studies/headline-<part>.toml (read by ``bench.run.load_spec``), whose runs and ledger are
# named headline-<part> (``runs_dir``, ``ledger_file``).
PART_NAMES = ("fmnist", "cifar10", "cifar10-families")
STUDIES = ROOT / "bench" / "studies"

# What the tables say of each part's cut and of what happened in its cells, with the figures
# measured on the grid's machine: data, not code (bench/results/headline-notes.json).
NOTES = json.loads((RESULTS / "headline-notes.json").read_text())


def load_part(path: Path) -> dict:
    """The ``Part`` fields of the study spec at ``path`` (``bench.run.load_spec``, which names the
    file in a one-line ``SpecError``), a study of the converged protocol; its cut and notes are its
    entry of headline-notes.json (by the part's name, the file's stem without ``headline-``)."""
    spec = runner.load_spec(path)
    if not spec["pretrain_rounds"]:
        raise SpecError(f"{path}: a headline part is a converged study: pretrain-rounds must be a positive integer")
    notes = NOTES["parts"].get(spec["name"].removeprefix("headline-"), {})
    return {"title": spec["title"], "run_config": tuple(spec["run_config"]), "alphas": tuple(spec["alphas"]),
            "seeds": tuple(spec["seeds"]), "pretrain_rounds": spec["pretrain_rounds"],
            "variants": tuple(spec["methods"]), "central": spec["central"],
            "only_seeds": {m: tuple(s) for m, s in spec["only_seeds"].items()},
            "cut": notes.get("cut", ""), "notes": notes.get("notes", [])}


try:
    _PART_FIELDS = {name: load_part(STUDIES / f"headline-{name}.toml") for name in PART_NAMES}
except SpecError as exc:  # the command says what is wrong in one line; an importer gets the error
    if __name__ != "__main__":
        raise
    print(f"bench/headline.py: {exc}", file=sys.stderr)
    sys.exit(2)
# HEADLINE: every method some part runs, in the parts' order (every method the library registers,
# Mosaic without its meta model, the two equal-compute rows).
HEADLINE = tuple(dict.fromkeys(m for fields in _PART_FIELDS.values() for m in fields["variants"]))


@dataclass(frozen=True)
class Part:
    """One data set's grid (``load_part``: its study spec's fields, its cut and notes headline-notes.json's)."""

    title: str
    run_config: tuple[str, ...]
    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    pretrain_rounds: int
    variants: tuple[str, ...] = HEADLINE
    central: bool = True
    cut: str = ""
    notes: list = field(default_factory=list)
    only_seeds: dict = field(default_factory=dict)  # method -> the seeds it runs at (a cut), else all

    def methods(self, seed: int) -> list[str]:
        """The methods cell (alpha, ``seed``) runs, in ``bench.run.run_rank``'s order (``cell_methods``)."""
        return runner.cell_methods({"methods": self.variants, "only_seeds": self.only_seeds,
                                    "pretrain_rounds": self.pretrain_rounds}, seed)


PARTS = {name: Part(**fields) for name, fields in _PART_FIELDS.items()}


def runs_dir(part: str, root: Path) -> Path:
    return root / f"headline-{part}"


def study(part: Part, name: str, threads: int = 1) -> dict:
    """Part ``name`` as a ``bench/run.py`` study of the converged protocol (10 clients, in-process),
    its runs in ``RUNS_ROOT/headline-<name>``, each with ``threads`` torch threads (server and
    clients: 1 while shards share the cores, more when one cell is left to a machine's cores)."""
    threads_config = [f"server-threads={threads}", f"client-threads={threads}"]
    return {"name": f"headline-{name}", "run_config": [*part.run_config, *threads_config], "clients": 10,
            "pretrain_rounds": part.pretrain_rounds, "driver": "inprocess", "fork": False}


def ledger_file(part: str, root: Path) -> Path:
    """Part ``part``'s ledger (finished runs, as data) under ``root`` (default bench/results/ledger)."""
    return root / f"headline-{part}.json"


START = "checkpoint.pt"  # a pre-training's final state: what its cell's methods start from (init-from)


def has_start(run: Path) -> bool:
    """Whether a finished pre-training has its checkpoint (in the runs root, never in the ledger: a
    cell whose pre-training is recorded without it runs it again, ``bench.run.ensure_start``)."""
    return (run / START).is_file() and (run / "summary.json").is_file()


def variant_config(part: Part, variant: str) -> dict:
    """``variant``'s run config over the part's settings as a cell's continuation runs it
    (``bench.run.method_config``), alpha and seed the defaults'."""
    return runner.method_config({"run_config": list(part.run_config), "pretrain_rounds": part.pretrain_rounds},
                                variant)


def refuses(part: Part, variant: str) -> bool:
    """Whether the part's settings refuse ``variant`` before any training (FedBN on a model
    without BatchNorm): its cells record the reason instead of a run."""
    return runner.refusal(variant_config(part, variant)) is not None


def pending(part: Part, out: Path, alpha: float, seed: int) -> list[str]:
    """The variants of cell (alpha, seed) not yet finished in ``out`` nor refused."""
    return [v for v in part.methods(seed)
            if not ledger_.finished(out / variant_name(v, alpha, seed)) and not refuses(part, v)]


def cells(parts: list[str]) -> list[tuple[str, float | None, int]]:
    """(part, alpha, seed) in the order they run: per seed, each alpha's cell (its pre-training and
    continuation), then that seed's central reference (alpha None)."""
    return [(name, a, s) for name in parts for s in PARTS[name].seeds
            for a in [*PARTS[name].alphas, *([None] if PARTS[name].central else [])]]


def preflight(parts: list[str]) -> None:
    """Before any training: every part's data set and what each method reads from disk of its own
    (FedDF's transfer set) can be read, so that a grid does not stop hours in at its first FedDF
    run; else ``SystemExit`` listing each problem. A method its part's model refuses (FedBN without
    BatchNorm) is refused in its cell instead."""
    from mosaic_flwr.config import ConfigError, build_config
    from mosaic_flwr.registry import STRATEGIES
    from mosaic_flwr.core.task import test_data

    problems = []
    for name in parts:
        part = PARTS[name]
        for v in part.variants:
            try:
                cfg = build_config(variant_config(part, v))
            except ConfigError:
                continue
            try:
                test_data(cfg)
                if STRATEGIES[cfg.strategy].prepare is not None:
                    STRATEGIES[cfg.strategy].prepare(cfg)
            except (OSError, ValueError) as exc:  # DatasetNotFoundError is a ValueError
                problems.append(f"{name}, {v}: {exc}")
    if problems:
        raise SystemExit("[headline] nothing was run: " + "; ".join(dict.fromkeys(problems)))


def run(parts: list[str], root: Path, shard: tuple[int, int], ledger: Path | None = None, threads: int = 1) -> None:
    """Run this shard's cells under ``root``; with ``ledger`` (a folder of ledger files), first take the
    finished runs from it and record each cell's finished runs in it as soon as the cell ends."""
    preflight(parts)
    for name in parts if ledger is not None else ():
        got = ledger_.materialize(ledger_file(name, ledger), runs_dir(name, root))
        if got:
            print(f"[headline] {name}: {len(got)} finished runs taken from the ledger {ledger_file(name, ledger)}",
                  flush=True)
    k, n = shard
    for name, alpha, seed in cells(parts)[k::n]:
        out, spec = runs_dir(name, root), study(PARTS[name], name, threads)
        out.mkdir(parents=True, exist_ok=True)
        print(f"[headline] {name}: alpha={alpha if alpha is not None else '-'} seed={seed}", flush=True)
        runner.run_unit(spec, [Cell(CENTRAL, None, seed)] if alpha is None else
                        [Cell(m, alpha, seed) for m in PARTS[name].methods(seed)], out)
        if ledger is not None:
            got = ledger_.record(out, ledger_file(name, ledger))
            if got:
                print(f"[headline] {name}: into the ledger {ledger_file(name, ledger)}: {', '.join(got)} "
                      "(commit it)", flush=True)


# ---------------------------------------------------------------- report

def part_table(name: str, root: Path) -> tuple[str, dict]:
    """Part ``name``'s section of headline.md and its figures, from the runs in ``root``; writes its plot."""
    p, out = PARTS[name], runs_dir(name, root)
    d = collect(out, p.alphas, p.seeds, p.variants)
    runs, central, pre = d["runs"], d["central"], d["pre"]
    study = (runs, p.alphas, p.seeds, p.variants)
    cen = [central[s]["final_accuracy"] for s in p.seeds if s in central]
    gap = {a: g for a in p.alphas if (g := protocol.gap_closure(runs, "mosaic", a, p.seeds, cen))}
    # the equal-compute FedAvg runs' notes (bench.json: rounds, target), per cell
    eq = [e for a, s in product(p.alphas, p.seeds)
          if (e := read_json(out / variant_name("fedavg-eqc", a, s) / "bench.json", {}).get("equal_compute"))]
    refused = {v: why for v in p.variants if (why := refused_reason(p, out, v))}

    lines = [f"## {p.title}", "", *([f"{NOTES['cut_intro']}: {p.cut}.", ""] if p.cut else []),
             *[n for note in p.notes for n in (note, "")],
             *protocol.main_table(*study, pre, p.pretrain_rounds, cen if p.central else None, refused),
             *protocol.paired_table(*study), *protocol.gap_line(gap, p.alphas), *protocol.distillation_summary(*study),
             *protocol.gate_check(*study), *protocol.chosen_round_table(*study),
             *by_model_table(runs, p.variants, p.alphas, p.seeds)]
    if eq:
        lines += ["", "Equal client compute: FedAvg and FedProx ran "
                  + ", ".join(str(e["rounds"]) for e in eq) + " rounds in the cells (Mosaic's client work in its own "
                  "plain rounds, `protocol_report.client_units`), at the same schedule (round 1 at lr, then finetune-lr)."]
    total = sum(1 for a in p.alphas for s in p.seeds for v in p.methods(s)
                if not (out / variant_name(v, a, s) / "refused.json").is_file() and not refuses(p, v))
    central_done = f", {len(cen)} of {len(p.seeds)} central" if p.central else ""
    lines += ["", f"Runs finished: {len(runs)} of {total} (+ {len(pre)} of {len(p.alphas) * len(p.seeds)} "
              f"pre-trainings{central_done}). Details: `bench/results/headline-{name}-detail.md`.", ""]
    protocol.plot(RESULTS / f"headline-{name}.png", p.title, *study, cen)
    data = {"accuracy": {f"{v}|{a:g}": {str(s): runs[(v, a, s)]["final_accuracy"] for s in p.seeds if (v, a, s) in runs}
                         for v in p.variants for a in p.alphas},
            "central": {str(s): central[s]["final_accuracy"] for s in central},
            "pretrain": {f"a{a:g}-s{s}": v for (a, s), v in pre.items()},
            "gap_closure": {f"{a:g}": g for a, (g, _) in gap.items()}, "equal_compute": eq,
            "verdict": verdict(p, runs)}
    return "\n".join(lines), data


def refused_reason(p: Part, out: Path, v: str) -> str | None:
    """Why ``v`` was refused before training in a cell of ``out``, or why the part's settings refuse it;
    None where it runs."""
    for a, s in product(p.alphas, p.seeds):
        if (refusal := read_json(out / variant_name(v, a, s) / "refused.json")) is not None:
            return refusal["reason"]
    return runner.refusal(variant_config(p, v))


def verdict(p: Part, runs: dict) -> list[dict]:
    """Per α, the part's numbers on Mosaic: minus FedAvg per seed at equal rounds and at equal client
    compute (final rounds, and each run at the round its validation split picks); its client compute
    in FedAvg rounds; the best method at equal rounds by mean final accuracy over the seeds Mosaic
    finished (of methods tied, the first in the table's order, so a tie is never Mosaic's win) and
    the methods tied with it."""
    out = []
    for a in p.alphas:
        seeds = [s for s in p.seeds if ("mosaic", a, s) in runs]
        if not seeds:
            continue
        rivals = {v: statistics.mean(runs[(v, a, s)]["final_accuracy"] for s in seeds) for v in p.variants
                  if v not in EQUAL_COMPUTE and all((v, a, s) in runs for s in seeds)}
        top = max(rivals.values(), default=None)
        tied = [v for v in rivals if rivals[v] == top]  # in the table's order: a baseline before Mosaic
        units = [u for s in seeds for u in [protocol.unit_rounds(runs, "mosaic", a, s)] if u is not None]
        eqc = "fedavg-eqc" in p.variants
        out.append({"alpha": a, "seeds": len(seeds),
                    "equal_rounds": differences(runs, "mosaic", "fedavg", a, p.seeds),
                    "equal_compute": differences(runs, "mosaic", "fedavg-eqc", a, p.seeds) if eqc else [],
                    "equal_compute_chosen": protocol.chosen_differences(runs, "fedavg-eqc", a, p.seeds) if eqc else [],
                    "compute": statistics.mean(units) if units else None, "best": tied[0] if tied else None,
                    "best_accuracy": top, "tied": tied[1:], "mosaic_accuracy": rivals.get("mosaic")})
    return out


def _verdict_table(parts: list[str], verdicts: dict[str, list[dict]]) -> list[str]:
    """The summary at the top of headline.md: one row per (part, α) with Mosaic's verdict."""
    def verdict_row(name: str, v: dict) -> str:
        diffs = [points(v[k]) for k in ("equal_rounds", "equal_compute", "equal_compute_chosen")]
        compute = "-" if v["compute"] is None else f"{v['compute']:.0f}"
        best = "-"
        if v["best"] is not None:
            best = f"{label(v['best'])} {100 * v['best_accuracy']:.2f}"
            if v["tied"]:
                best += f" (tied: {', '.join(label(t) for t in v['tied'])})"
            if v["best"] != "mosaic" and "mosaic" not in v["tied"]:
                best += f"; Mosaic {100 * v['mosaic_accuracy']:.2f}"
        return row(PARTS[name].title, [f"{v['alpha']:g}", str(v["seeds"]), *diffs, compute, best])

    rows = [verdict_row(name, v) for name in parts for v in verdicts.get(name, [])]
    if not rows:
        return []
    return ["## In short", "",
            "Mosaic minus FedAvg, test points, paired by seed: mean [95 % t interval] (each seed); at equal rounds, "
            "against FedAvg given Mosaic's client compute (final rounds), and the same with each run at the round its "
            "validation split picks (the seeds whose runs kept per-round scores). Mosaic's client compute in FedAvg "
            "rounds (its generators included). The best method at equal rounds by mean final test accuracy over "
            "Mosaic's seeds (of the methods run at all of them), with the methods tied with it (a tie is listed under "
            "the first baseline, not Mosaic). Details per data set below.", "",
            *table("data set", ["α", "seeds", "equal rounds", "equal client compute",
                                "equal compute, validation-chosen rounds", "Mosaic's compute", "best at equal rounds"],
                   rows), ""]


@contextmanager
def recorded(ledger: Path, root: Path):
    """What the tables and the plan read: a temporary runs root holding every part's ledger as run
    directories, each pre-training's checkpoint marked where ``root`` has it (the plan counts a
    pre-training without one as left)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="headline-ledger-") as tmp:
        for name in PARTS:
            out = runs_dir(name, Path(tmp))
            ledger_.materialize(ledger_file(name, ledger), out)
            for pre in out.glob("pretrain-*"):
                if has_start(runs_dir(name, root) / pre.name):
                    (pre / START).touch()
        yield Path(tmp)


def report(parts: list[str], root: Path) -> str:
    """``headline.md`` and ``.json`` from the runs in ``root``: the verdict, then each part's section;
    each part's every table in ``headline-<part>-detail.md`` (``protocol_report.report``)."""
    prov = provenance()
    lines = ["# The headline comparison (bench/headline.py)", "",
             f"Machine: {machine_line()}. Every method continues from the same FedAvg checkpoint per (data set, α, "
             "seed) for the same rounds with the same schedule; the distilling methods with the clients' gate. "
             "Equal client compute rows: FedAvg / FedProx with the rounds Mosaic's clients' measured work buys. "
             f"Table written at {prov['commit']}.", ""]
    data, sections = {}, []
    for name in parts:
        text, data[name] = part_table(name, root)
        sections.append(text)
        if (RESULTS / f"headline-{name}.png").is_file():
            sections.append(f"Plot: `headline-{name}.png`.\n")
        p = PARTS[name]
        protocol.report(runs_dir(name, root), p.alphas, p.seeds, p.variants, name=f"headline-{name}-detail")
    lines += _verdict_table(parts, {name: d["verdict"] for name, d in data.items()}) + sections
    md = "\n".join(lines) + "\n"
    (RESULTS / "headline.md").write_text(md)
    (RESULTS / "headline.json").write_text(json.dumps({**prov, "parts": data}, indent=1, sort_keys=True) + "\n")
    return md


def run_seconds(run: Path) -> float:
    """A finished run's wall seconds; for a resumed one, its rounds before the interruption
    (their per-round seconds, kept in the checkpoint) added to the resumed process's."""
    summary = read_json(run / "summary.json")
    wall, after = summary.get("wall_seconds") or 0.0, summary.get("resumed_after_round")
    if after is not None and wall:
        wall += sum(r.get("seconds", 0.0) for r in read_json(run / "metrics.json", []) if r["round"] <= after)
    return wall


def _cell_costs(name: str, root: Path) -> tuple[dict, dict[str, float]]:
    """Part ``name``'s cells in ``root``: per (alpha, seed) the core-seconds of its finished runs
    (wall seconds times bench.json ``torch_threads``) and the runs left to do; and each run kind's
    mean core-seconds over the part's cells. A distilling group's shared round 1 is in each member's
    wall time (bench.json ``shared_seconds``): counted once. A pre-training recorded without its
    checkpoint in a cell with runs left is left: the grid runs it again (``bench.run.ensure_start``)."""
    p, out = PARTS[name], runs_dir(name, root)

    def cell(a: float, s: int) -> tuple[dict[str, float], list[str]]:
        secs, left, shared = {}, [], set()
        central = ["central"] if p.central and a == p.alphas[0] else []  # one central reference per seed
        for k in ["pretrain", *p.methods(s), *central]:
            d = out / {"central": f"central-s{s}", "pretrain": pretrain_name(a, s)}.get(k, variant_name(k, a, s))
            if k == "pretrain" and (d / "summary.json").is_file() and not has_start(d) and pending(p, out, a, s):
                left.append(k)
            elif (d / "summary.json").is_file():
                secs[k] = run_seconds(d)
                b = read_json(d / "bench.json", {})
                if (sh := b.get("shared_seconds")) and secs[k]:
                    secs[k] -= sh if sh in shared else 0.0
                    shared.add(sh)
                secs[k] *= b.get("torch_threads") or 1
            elif not (d / "refused.json").is_file() and (k in ("pretrain", "central") or not refuses(p, k)):
                left.append(k)
        return secs, left

    per_cell = {(a, s): cell(a, s) for s in p.seeds for a in p.alphas}
    walls = [(k, v) for secs, _ in per_cell.values() for k, v in secs.items() if v]
    return per_cell, {k: statistics.mean(v for kind, v in walls if kind == k) for k, _ in walls}


def plan(parts: list[str], root: Path) -> str:
    """The cells, what the finished runs cost (core-seconds) and what the missing ones will, to size the
    grid: the mean of the same run kind in the same part, else (a kind none of whose runs there has
    finished) in the other parts on the same data set (named; e.g. the model-families cell from
    CIFAR-10's ResNet-8 cells), else named as unmeasured."""
    def dataset(name: str) -> str:
        return str(variant_config(PARTS[name], "fedavg").get("dataset"))

    costs = {name: _cell_costs(name, root) for name in PARTS}
    lines, total_left, unmeasured, borrowed = [], 0.0, set(), set()
    for name in parts:
        p, (per_cell, mean) = PARTS[name], costs[name]
        others = [o for o in PARTS if o != name and dataset(o) == dataset(name)]
        done_h = left_h = 0.0
        for s, a in product(p.seeds, p.alphas):
            secs, left = per_cell[(a, s)]
            est, new, lent, lenders = 0.0, [], [], set()
            for k in left:
                if k in mean:
                    est += mean[k]
                elif got := {o: costs[o][1][k] for o in others if k in costs[o][1]}:
                    est += statistics.mean(got.values())
                    lent.append(k)
                    lenders |= set(got)
                else:
                    new.append(k)
            unmeasured |= {f"{name}:{k}" for k in new}
            borrowed |= {f"{name}:{k}" for k in lent}
            done_h, left_h = done_h + sum(secs.values()) / 3600, left_h + est / 3600
            runs = (sum(not refuses(p, k) for k in p.methods(s))  # FedBN without BatchNorm: no run
                    + 1 + (p.central and a == p.alphas[0]))  # + the pre-training and the central reference
            lines.append(f"{name} alpha={a:g} seed={s}: {len(secs)} of {runs} done, {sum(secs.values()) / 3600:.2f} h"
                         + (": " + ", ".join(f"{k} {v / 60:.0f}m" for k, v in secs.items()) if secs else "")
                         + (f"; left: {len(left)}, ~{est / 3600:.1f} h" if left else "")
                         + (f" ({len(lent)} of them at {' and '.join(sorted(lenders))}'s times)" if lent else "")
                         + (f" + {len(new)} not yet measured" if new else ""))
        lines.append(f"{name}: {done_h:.1f} core-hours done (runs restored from an earlier table count 0 when "
                     f"they lack their time), ~{left_h:.1f} core-hours left")
        total_left += left_h
    lines.append(f"all: ~{total_left:.1f} core-hours left, ~{total_left / 2:.1f} h on 2 cores"
                 + (f"; estimated from another part on the same data set: {', '.join(sorted(borrowed))}"
                    if borrowed else "")
                 + (f"; not yet measured (counted 0): {', '.join(sorted(unmeasured))}" if unmeasured else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--runs-root", default=str(RUNS),
                    help="run directories (checkpoints included) go to RUNS_ROOT/headline-<part>")
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th (part, alpha, seed) starting at K")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every run (server and clients); default 1: one process per core. "
                         "More when fewer cells are left than cores and nothing else runs there: client compute is "
                         "measured in CPU seconds, which count threads waiting for a busy core (recorded in each "
                         "run's bench.json)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--plan", action="store_true", help="print the cells and the cost of the finished ones")
    ap.add_argument("--ledger", default=None,
                    help="the folder of the ledger files (headline-<part>.json) where finished runs are recorded "
                         "and the tables read from (default bench/results/ledger, committed with the repository)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    root = Path(args.runs_root).resolve()
    ledger = Path(args.ledger).resolve() if args.ledger else RESULTS / "ledger"  # ledger_.LEDGERS
    if args.plan:
        with recorded(ledger, root) as view:
            print(plan(args.parts, view))
        return 0
    if not args.table_only:
        k, n = (int(x) for x in args.shard.split("/"))
        run(args.parts, root, (k, n), ledger, args.threads)
    with recorded(ledger, root) as view:
        print(report(args.parts, view))
    return 0

if __name__ == "__main__":
    sys.exit(main())
