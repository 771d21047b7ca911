"""What the benchmarks' tables share: a study's finished runs (``collect``), figures over seeds
and paired by seed, markdown tables (``table``; rows per method and alpha: ``method_rows``,
``per_alpha``), and a grid's report (``grid_lines``, the tables of ``bench/run.py``). The
converged protocol's tables: ``bench.protocol_report``."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.common import (CENTRAL, Cell, distils, fmt_mean_std, label, mean_std, paired_interval, pretrain_name,
                          variant_name)
from mosaic_flwr.config import renamed


# ----------------------------------------------------------------------------- formatting
def ms(values: list[float], pct: bool = True) -> str:
    """``mean ± sd`` of accuracies in % (``pct``) or of counts and seconds; one value alone."""
    if not values:
        return "-"
    k, f = (100, ".1f") if pct else (1, ".0f")
    m = statistics.mean(values) * k
    return f"{m:{f}}" if len(values) == 1 else f"{m:{f}} ± {statistics.stdev(values) * k:{f}}"


def mean_sd(xs: list[float]) -> str:
    """``ms`` of accuracies with their count: ``mean ± sd (n)``, one value ``x (1)``, none ``-``."""
    return f"{ms(xs)} ({len(xs)})" if xs else "-"


def mean_pct(xs: Iterable[float]) -> float:
    """The mean of accuracies in %."""
    return 100 * statistics.mean(xs)


def differences(runs: dict, v: str, w: str, a: float, seeds, key: str = "final_accuracy") -> list[float]:
    """``v``'s ``key`` minus ``w``'s at α ``a``, per seed of ``seeds`` both have it (paired by seed)."""
    return [runs[(v, a, s)][key] - runs[(w, a, s)][key] for s in seeds
            if runs.get((v, a, s), {}).get(key) is not None and runs.get((w, a, s), {}).get(key) is not None]


def points(diffs: list[float]) -> str:
    """Paired differences of accuracies in test points: mean [95 % t interval] (each seed)."""
    return paired_interval(diffs, scale=100, digits=1)


def row(name: str, cells: Iterable[str]) -> str:
    """A markdown table row: ``name``, then the ``cells``."""
    return f"| {name} | " + " | ".join(cells) + " |"


def table(first: str, columns: Iterable[str], rows: Iterable[str]) -> list[str]:
    """A markdown table: the header (``first``, then ``columns``), its rule, the ``rows``."""
    columns = list(columns)
    return [row(first, columns), "|---|" + "---|" * len(columns), *rows]


def captioned(caption: str, first: str, columns: Iterable[str], rows: list[str]) -> list[str]:
    """``caption`` and its table below a blank line each; nothing without rows."""
    return ["", caption, "", *table(first, columns, rows)] if rows else []


def alpha_columns(alphas, *each: str) -> list[str]:
    """The columns of a table per α: ``α=<a>``, or ``α=<a> <e>`` for each of ``each``."""
    return [f"α={a:g} {e}" for a in alphas for e in each] if each else [f"α={a:g}" for a in alphas]


def method_rows(variants, alphas, cell: Callable[[str, float], str], name=label) -> list[str]:
    """A row per method (``name(v)``) with a figure at some α: ``cell(v, a)`` for each α ("-": none)."""
    rows = [(v, [cell(v, a) for a in alphas]) for v in variants]
    return [row(name(v), cells) for v, cells in rows if any(c != "-" for c in cells)]


def per_alpha(variants, alphas, cells: Callable[[str, float], list[str]], name=str) -> list[str]:
    """A row per method (``name(v)``), figures or not: ``cells(v, a)`` for each α in turn."""
    return [row(name(v), [c for a in alphas for c in cells(v, a)]) for v in variants]


# ----------------------------------------------------------------------------- run folders
def read_json(path: Path, default=None):
    """The JSON file at ``path``; ``default`` where there is none."""
    return json.loads(path.read_text()) if path.is_file() else default


def _load(path: Path) -> dict | None:
    s = read_json(path / "summary.json")
    if s is None:
        return None
    s["bench"] = read_json(path / "bench.json", {})
    c = read_json(path / "config.json")
    s["config"] = renamed(c, warn=False) if c is not None else {}  # (old runs: old names)
    return s


def collect(runs_dir: Path, alphas, seeds, variants) -> dict:
    """A study's finished runs in ``runs_dir``: ``runs`` (variant, alpha, seed) -> summary with its
    ``bench``, ``config`` and per-round ``rows`` ([] for a run recorded by its summary alone, one
    restored from an earlier table); ``pre`` (alpha, seed) -> the pre-training's test, validation
    and best accuracy; ``central`` seed -> summary; ``assign``: one pre-training's client assignment rows."""
    data = {"pre": {}, "runs": {}, "central": {}, "assign": []}
    for s in seeds:
        if c := _load(runs_dir / f"central-s{s}"):
            data["central"][s] = c
        for a in alphas:
            p = runs_dir / pretrain_name(a, s)
            if (pre := _load(p)):
                rows = read_json(p / "metrics.json", [])
                if not data["assign"] and (p / "assignment.csv").is_file():
                    data["assign"] = (p / "assignment.csv").read_text().strip().splitlines()[1:]
                data["pre"][(a, s)] = ({"test": rows[-1]["accuracy"], "val": rows[-1].get("val-accuracy"),
                                        "best": max(r["accuracy"] for r in rows)} if rows else
                                       {"test": pre["final_accuracy"], "val": pre.get("final_val_accuracy"),
                                        "best": pre["best_accuracy"]})
            for v in variants:
                run = runs_dir / variant_name(v, a, s)
                if r := _load(run):
                    data["runs"][(v, a, s)] = {**r, "rows": read_json(run / "metrics.json", [])}
    return data


def finished(runs: dict, v: str, a: float, seeds) -> list[dict]:
    """Method ``v``'s finished runs at α ``a``, in the order of ``seeds``."""
    return [runs[(v, a, s)] for s in seeds if (v, a, s) in runs]


# ----------------------------------------------------------------------------- a grid's tables
# ``runs``: (variant, alpha, seed) -> summary, as ``collect`` reads them, the centralised
# reference of a seed under (CENTRAL, None, seed).
def with_central(data: dict) -> dict:
    """``collect``'s runs and its central references in one mapping (the tables' ``runs``)."""
    return {**data["runs"], **{(CENTRAL, None, s): c for s, c in data["central"].items()}}


def aggregate(runs: dict) -> dict[tuple[str, float | None], dict]:
    """Per (variant, alpha): the seeds, final/best accuracies, wall seconds and, where the runs
    have them, the validation accuracy and the distillation round's figures, in seed order."""
    groups: dict[tuple[str, float | None], dict] = {}
    for (variant, alpha, seed), s in sorted(runs.items(), key=lambda kv: kv[0][2]):
        g = groups.setdefault((variant, alpha), {"seeds": [], "final": [], "best": [], "wall": []})
        g["seeds"].append(seed)
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


def setting_of(cfg, num_clients: int, how: str = "") -> str:
    """A grid's data set, model and clients, and ``how`` its runs ran."""
    from mosaic_flwr.data.fetch import LABELS

    return f"{LABELS.get(cfg.dataset, cfg.dataset)}, {cfg.model}, {num_clients} clients" + (f" ({how})" if how else "")


def budget_lines(cfg, num_clients: int, variants: Iterable[str], central: dict | None) -> list[str]:
    """The client compute of every method, the distilling ones' extra, and the centralised reference's."""
    c = cfg
    per_client = c.num_server_rounds * c.local_steps * c.batch_size
    work = (f"{c.local_steps} local SGD steps of {c.batch_size} samples" if c.local_steps > 0
            else f"{c.local_epochs} local epoch(s)")
    lines = [f"**Client compute (equal for every strategy):** {c.num_server_rounds} rounds x "
             f"{num_clients} clients x {work} (lr {c.lr:g}, momentum {c.momentum:g}"
             + (f"; {per_client:,} sample passes per client" if c.local_steps > 0 else "") + ")."]
    if any(distils(v) for v in variants):
        lines.append(
            f"FedDF and the Mosaic variants run rounds {c.warmup_rounds + 1}..{c.num_server_rounds} at the fine-tune "
            f"rate {c.finetune_lr:g}, and at round {c.warmup_rounds} every client also trains its generator once: "
            f"{c.of('mosaic').gen_steps} steps of {c.of('mosaic').gen_batch_size} samples (generator, discriminator "
            "and the client's classifier forward/backward): **extra client compute** the baselines do not spend. "
            f"Their server distils for {c.of('kd').steps} steps of {c.of('kd').batch_size} generated samples (Mosaic "
            f"also trains the meta model, at most {c.of('mosaic').meta_epochs} epochs).")
    if central:
        lines.append(f"**Centralised reference:** the same model and SGD on the union of the clients' data "
                     f"({central['train_samples']:,} samples) for the same number of sample passes "
                     f"({central['sample_passes']:,.0f}: {central['steps']} steps of {c.batch_size}), at lr {c.lr:g} "
                     f"throughout; evaluated {c.num_server_rounds} times (best = best of those). One value per seed, "
                     "the same for every alpha.")
    return lines


def accuracy_table(groups: dict, variants: list[str], alphas: list[float]) -> list[str]:
    """Final and best test accuracy per alpha, mean ± sd over seeds; the centralised reference last."""
    rows = []
    for variant in [*variants, CENTRAL]:
        cells, seeds = [], set()
        for a in alphas:
            g = groups.get((variant, None if variant == CENTRAL else a))
            cells += [fmt_mean_std(g["final"]), fmt_mean_std(g["best"])] if g else ["-", "-"]
            seeds.update(g["seeds"] if g else [])
        if any(c != "-" for c in cells):
            rows.append(row(f"{variant} (upper bound)" if variant == CENTRAL else label(variant),
                            cells + [str(len(seeds))]))
    return table("strategy", alpha_columns(alphas, "final", "best") + ["seeds"], rows)


def group_table(caption: str, groups: dict, variants, alphas, cell: Callable[[dict], str]) -> list[str]:
    """``caption`` and a row per method with a figure of its (variant, alpha) group: ``cell(group)``
    ({} where it has none; "-": no figure)."""
    return captioned(caption, "strategy", alpha_columns(alphas),
                     method_rows(variants, alphas, lambda v, a: cell(groups.get((v, a)) or {})))


def _kd(g: dict, key: str) -> str:
    return fmt_mean_std(g[key], 3)


def distill_table(groups: dict, variants: list[str], alphas: list[float]) -> list[str]:
    """The distillation round's test accuracy: the global model before → after, and the teacher."""
    def cell(g: dict) -> str:
        if "acc-after-distill" not in g:
            return "-"
        return f"{_kd(g, 'acc-before-distill')} → {_kd(g, 'acc-after-distill')} (teacher {_kd(g, 'acc-teacher')})"

    return group_table("Distillation round (test accuracy of the global model before → after "
                       "distillation, and of the teacher; mean ± std over seeds):", groups, variants, alphas, cell)


def val_table(groups: dict, variants: list[str], alphas: list[float]) -> list[str]:
    """Final accuracy on the validation split (training data no client holds), and the
    distillation round on it: what settings are chosen on."""
    def cell(g: dict) -> str:
        if "final_val" not in g:
            return "-"
        if "val-after-distill" not in g:
            return fmt_mean_std(g["final_val"])
        return (f"{fmt_mean_std(g['final_val'])} (KD round: {_kd(g, 'val-before-distill')} → "
                f"{_kd(g, 'val-after-distill')}, teacher {_kd(g, 'val-teacher')}"
                + (f", ensemble {_kd(g, 'val-ensemble')}" if "val-ensemble" in g else "") + ")")

    return group_table("**Validation split** (held out of the training data before partitioning; no client "
                       "holds it; settings are chosen on these figures, never on the test set): final "
                       "accuracy, and at the distillation round the global model before → after and the "
                       "teachers, mean ± std over seeds:", groups, variants, alphas, cell)


def paired_lines(runs: dict, pairs: Iterable[tuple[str, str]], alphas: list[float],
                 key: str = "final_accuracy") -> list[str]:
    """Each pair's first variant minus its second, paired by seed (seeds only one of them has are left out)."""
    seeds = sorted({s for _, _, s in runs})

    def cell(pair: tuple[str, str], a: float) -> str:
        return paired_interval(differences(runs, *pair, a, seeds, key))

    which = "test" if key == "final_accuracy" else "validation"
    return captioned(f"Paired by seed, final {which} accuracy, each difference: mean [95 % t interval] "
                     "(per-seed differences):", "difference", alpha_columns(alphas),
                     method_rows(pairs, alphas, cell, name=lambda p: f"{label(p[0])} − {label(p[1])}"))


def wall_table(groups: dict, variants: list[str], alphas: list[float]) -> list[str]:
    """The ServerApp's wall seconds per run, mean over seeds."""
    return group_table("Wall seconds of the ServerApp per run (mean over seeds; the machine was shared, "
                       "see the load averages in the JSON):", groups, variants, alphas,
                       lambda g: f"{statistics.mean(g['wall']):.0f}" if g else "-")


def by_model_table(runs: dict, variants, alphas, seeds) -> list[str]:
    """Model heterogeneity: each method's final test accuracy of every family / width the clients
    hold, and of the model each client holds (mean over clients), mean over seeds. The main table's
    figure is the first family's model."""
    archs = list(dict.fromkeys(m for r in runs.values() for m in (r.get("final_accuracy_by_model") or {})))
    if len(archs) < 2:
        return []

    def cells(v: str, a: float) -> list[str]:
        got = finished(runs, v, a, seeds)
        by_model = [[r["final_accuracy_by_model"][m] for r in got if m in (r.get("final_accuracy_by_model") or {})]
                    for m in archs]
        clients = [r["final_accuracy_clients"] for r in got if r.get("final_accuracy_clients") is not None]
        return [f"{mean_pct(xs):.1f}" if xs else "-" for xs in (*by_model, clients)]

    ran = [v for v in variants if any(finished(runs, v, a, seeds) for a in alphas)]
    return ["", "Model heterogeneity: final test accuracy % of every model the clients hold (the main table "
            f"reports {archs[0]}), and `clients`: the mean over clients of the accuracy of the model each "
            "holds; mean over seeds.", "",
            *table("method", alpha_columns(alphas, *archs, "clients"), per_alpha(ran, alphas, cells, name=label))]


def plot(runs: dict, variants: list[str], alphas: list[float], path: Path, title: str) -> None:
    """Final and best test accuracy against alpha (log scale), mean ± sd over seeds, the
    centralised reference as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for ax, key in zip(axes, ("final", "best")):
        for variant in variants:
            pts = [(a, *mean_std(groups[(variant, a)][key])) for a in alphas if (variant, a) in groups]
            if pts:
                xs, means, sds = zip(*pts)
                ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=label(variant))
        if (CENTRAL, None) in groups:
            m, s = mean_std(groups[(CENTRAL, None)][key])
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def grid_lines(runs: dict, variants: list[str], alphas: list[float], seeds, cfg, num_clients: int, where: str,
               shared: str, pairs: list[tuple[str, str]]) -> list[str]:
    """A grid's report below its header: the setting (``where``: data set, model, clients and how they
    ran; ``shared``: the run config every run shares), the compute budget, and the tables (``pairs``'
    paired differences in test, then validation accuracy)."""
    groups = aggregate(runs)
    central = next((s for (v, _, _), s in runs.items() if v == CENTRAL), None)
    commits = sorted({(s.get("bench") or {}).get("commit", "?") for s in runs.values()})
    loads = [s["bench"]["loadavg_before"][0] for s in runs.values() if "loadavg_before" in (s.get("bench") or {})]
    return [f"{where}, Dirichlet label skew; shared run config: `{shared or '(defaults)'}`; cells finished at "
            f"commit(s) {', '.join(commits)}"
            + (f"; 1-min load average when cells started: {min(loads):.1f}-{max(loads):.1f}" if loads else "")
            + ".", "", *budget_lines(cfg, num_clients, variants, central), "",
            "Test accuracy, mean ± std over seeds (final: after the last round; best: best round; the test set is "
            "used for reporting only):", "",
            *accuracy_table(groups, variants, alphas), *distill_table(groups, variants, alphas),
            *paired_lines(runs, pairs, alphas), *val_table(groups, variants, alphas),
            *paired_lines(runs, pairs, alphas, key="final_val_accuracy"), *wall_table(groups, variants, alphas),
            *by_model_table(runs, variants, alphas, seeds)]


def grid_data(runs: dict) -> dict:
    """A grid's figures for its JSON: per (variant, alpha) over seeds, and every run's summary."""
    return {"groups": {f"{v}|{a}": g for (v, a), g in aggregate(runs).items()},
            "cells": {Cell(*k).name: {x: y for x, y in s.items()
                                      if x not in ("partition_label_counts", "config", "rows")} for k, s in runs.items()}}
