#!/usr/bin/env python3
"""A study from its spec: methods x Dirichlet alphas x seeds, each run one in-process federation
(the real ClientApp handlers, no Ray: ``bench.converged.run_inprocess``), recorded in the study's
ledger (``bench/results/ledger/<study>.json``) and tabulated from it into
``bench/results/<study>.md`` and ``.json``.

    .venv/bin/python bench/run.py bench/studies/smoke.toml              # runs what is missing, then the table
    .venv/bin/python bench/run.py bench/studies/smoke.toml --table-only # the table from the ledger alone

A study spec (TOML):

    title = "..."                  # the table's heading (default: the study's name, the file's stem)
    methods = "registry"           # every method the library registers (bench.common.compared);
                                   # "distilling": those of them that distil; or a list of names
                                   # (registered methods and bench.converged.VARIANTS)
    alphas = [0.1, 1.0]
    seeds = [42, 43]
    clients = 10
    reference = "fedavg"           # the paired differences are against it
    run-config = ["conf/fmnist-dir0.1.toml", "num-server-rounds=4"]  # files and key=value strings

Runs live outside the repository (``--runs-root``, default ``bench.common.RUNS``), one folder per
run under ``<runs-root>/<study>/``; a finished run (in the runs root or the ledger) is never rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import ledger  # noqa: E402
from bench.common import (RESULTS, RUNS, compared, distils, header_lines, label, paired_interval,  # noqa: E402
                          provenance, variant_name, write_results)
from bench.report import collect, ms  # noqa: E402


def load_spec(path: Path) -> dict:
    """The study spec, with its defaults and its methods resolved to names."""
    spec = tomllib.loads(Path(path).read_text())
    methods = spec.get("methods", "registry")
    if methods == "registry":
        methods = list(compared())
    elif methods == "distilling":
        methods = [m for m in compared() if distils(m)]
    return {"name": spec.get("name", Path(path).stem), "title": spec.get("title", Path(path).stem),
            "methods": list(methods), "alphas": [float(a) for a in spec.get("alphas", [0.1])],
            "seeds": [int(s) for s in spec.get("seeds", [42])], "clients": int(spec.get("clients", 10)),
            "reference": spec.get("reference", "fedavg"), "run_config": list(spec.get("run-config", []))}


def run_config(spec: dict, method: str, alpha: float, seed: int, out: Path) -> dict:
    """One run's whole config: the defaults, the spec's run configs, the method (a registered
    one or a named variant of one, ``bench.converged.VARIANTS``), the cell."""
    from bench.converged import VARIANTS
    from mosaic_flwr.config import PROJECT_ROOT, load_defaults, merge_run_config

    strategy, over = VARIANTS.get(method, (method, {}))
    base = merge_run_config(spec["run_config"], cwd=PROJECT_ROOT) if spec["run_config"] else {}
    return {**load_defaults(), **base, "strategy": strategy, **over, "alpha": alpha, "seed": seed,
            "output-dir": str(out), "run-name": variant_name(method, alpha, seed)}


def run(spec: dict, root: Path, ledger_file: Path) -> list[str]:
    """Every run of the spec that neither the runs root nor the ledger has finished; a method
    its settings refuse records the reason (``refused.json``). Finished runs go into the ledger.
    The runs started."""
    from bench.converged import refusal, run_inprocess

    out = root / spec["name"]
    ledger.materialize(ledger_file, out)
    started = []
    for seed in spec["seeds"]:
        for alpha in spec["alphas"]:
            for method in spec["methods"]:
                name = variant_name(method, alpha, seed)
                if ledger.finished(out / name):
                    continue
                rc = run_config(spec, method, alpha, seed, out)
                if (why := refusal(rc)) is not None:
                    (out / name).mkdir(parents=True, exist_ok=True)
                    (out / name / "refused.json").write_text(json.dumps({"variant": method, "reason": why}) + "\n")
                    continue
                print(f"[run] {spec['name']}: {name}", flush=True)
                run_inprocess(rc, spec["clients"], f"{label(method)} (alpha={alpha:g}, seed {seed})")
                started.append(name)
                ledger.record(out, ledger_file)
    ledger.record(out, ledger_file)
    return started


def shown(path: Path) -> str:
    """``path`` relative to the repository where it is in it."""
    from bench.common import ROOT

    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def table(spec: dict, ledger_file: Path) -> tuple[str, dict]:
    """The study's table (markdown) and figures, from its ledger alone."""
    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        ledger.materialize(ledger_file, Path(tmp))
        d = collect(Path(tmp), spec["alphas"], spec["seeds"], spec["methods"])
        refused = {m: json.loads(f.read_text())["reason"] for m in spec["methods"] for a in spec["alphas"]
                   for s in spec["seeds"] if (f := Path(tmp) / variant_name(m, a, s) / "refused.json").is_file()}
    runs, ref = d["runs"], spec["reference"]
    acc = {(m, a): {s: runs[(m, a, s)]["final_accuracy"] for s in spec["seeds"] if (m, a, s) in runs}
           for m in spec["methods"] for a in spec["alphas"]}
    lines = [f"Final test accuracy %, mean ± sd over seeds ({', '.join(map(str, spec['seeds']))}); Δ: the method "
             f"minus {label(ref)}, paired by seed: mean [95 % t interval] (each seed).", "",
             "| method | " + " | ".join(f"α={a:g} | Δ α={a:g}" for a in spec["alphas"]) + " |",
             "|---|" + "---|---|" * len(spec["alphas"])]
    for m in spec["methods"]:
        if m in refused and not any(acc[(m, a)] for a in spec["alphas"]):
            lines.append(f"| {label(m)} | refused: {refused[m].splitlines()[0][:160]} |"
                         + " |" * (2 * len(spec["alphas"]) - 1))
            continue
        cells = []
        for a in spec["alphas"]:
            diffs = [acc[(m, a)][s] - acc[(ref, a)][s] for s in spec["seeds"]
                     if s in acc[(m, a)] and s in acc.get((ref, a), {})]
            cells += [ms(list(acc[(m, a)].values())), "" if m == ref else paired_interval(diffs, scale=100, digits=1)]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    done = sum(len(x) for x in acc.values())
    lines += ["", f"Runs finished: {done} of {len(spec['methods']) * len(spec['alphas']) * len(spec['seeds'])} "
              f"({len(refused)} method{'' if len(refused) == 1 else 's'} refused). Runs: `{shown(ledger_file)}`."]
    data = {"spec": spec, "accuracy": {f"{m}|{a:g}": {str(s): x for s, x in acc[(m, a)].items()}
                                       for m in spec["methods"] for a in spec["alphas"]}, "refused": refused}
    return "\n".join(lines) + "\n", data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="the study spec (TOML), e.g. bench/studies/smoke.toml")
    ap.add_argument("--runs-root", default=str(RUNS), help="runs go to RUNS_ROOT/<study>/ (outside the repository)")
    ap.add_argument("--ledger", default=None, help="the study's ledger (default bench/results/ledger/<study>.json)")
    ap.add_argument("--table-only", action="store_true", help="run nothing; the table from the ledger")
    args = ap.parse_args(argv)
    spec = load_spec(Path(args.study))
    ledger_file = Path(args.ledger) if args.ledger else RESULTS / "ledger" / f"{spec['name']}.json"
    if not args.table_only:
        run(spec, Path(args.runs_root).resolve(), ledger_file)
    prov = provenance()
    md, data = table(spec, ledger_file)
    md = "\n".join(header_lines(spec["title"], prov)) + "\n" + md
    write_results(spec["name"], md, {**prov, **data})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
