"""What the benchmarks' tables share: reading a study's run folders (``collect``: summaries,
configs, bench notes, per-round metrics, pre-trainings, central references) and formatting
figures over seeds. Paired t-intervals: ``bench.common.paired_interval``. Run names:
``bench.common.pretrain_name`` / ``variant_name``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import pretrain_name, variant_name
from mosaic_flwr.config import renamed


# ----------------------------------------------------------------------------- formatting
def mean_sd(xs: list[float], k: float = 100) -> str:
    """``mean ± sd (n)`` of ``xs`` times ``k`` (one value: ``x (1)``; none: ``-``)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0] * k:.1f} (1)"
    return f"{statistics.mean(xs) * k:.1f} ± {statistics.stdev(xs) * k:.1f} ({len(xs)})"


def ms(values: list[float], pct: bool = True) -> str:
    """``mean ± sd`` of accuracies in % (``pct``) or of counts and seconds; one value alone."""
    if not values:
        return "-"
    k = 100 if pct else 1
    m = statistics.mean(values) * k
    if len(values) == 1:
        return f"{m:.1f}" if pct else f"{m:.0f}"
    sd = statistics.stdev(values) * k
    return f"{m:.1f} ± {sd:.1f}" if pct else f"{m:.0f} ± {sd:.0f}"


# ----------------------------------------------------------------------------- run folders
def _load(path: Path) -> dict | None:
    f = path / "summary.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    b = path / "bench.json"
    s["bench"] = json.loads(b.read_text()) if b.is_file() else {}
    c = path / "config.json"
    s["config"] = renamed(json.loads(c.read_text()), warn=False) if c.is_file() else {}  # (old runs: old names)
    return s


def _last_val(rows: list[dict]) -> float | None:
    return rows[-1].get("val-accuracy") if rows else None


def _rows(run: Path) -> list[dict]:
    """A run's per-round metrics; [] for a run recorded by its summary alone (one restored from
    an earlier table, ``restored`` in its summary.json)."""
    f = run / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else []


def collect(runs_dir: Path, alphas, seeds, variants) -> dict:
    """A study's finished runs in ``runs_dir``: ``runs`` (variant, alpha, seed) -> summary with its
    ``bench``, ``config`` and per-round ``rows``; ``pre`` (alpha, seed) -> the pre-training's test,
    validation and best accuracy; ``central`` seed -> summary; ``assign``: one pre-training's
    client assignment rows."""
    data = {"pre": {}, "runs": {}, "central": {}, "assign": []}
    for s in seeds:
        c = _load(runs_dir / f"central-s{s}")
        if c:
            data["central"][s] = c
        for a in alphas:
            p = runs_dir / pretrain_name(a, s)
            if (pre := _load(p)):
                rows = _rows(p)
                if not data["assign"] and (p / "assignment.csv").is_file():
                    data["assign"] = (p / "assignment.csv").read_text().strip().splitlines()[1:]
                data["pre"][(a, s)] = ({"test": rows[-1]["accuracy"], "val": _last_val(rows),
                                        "best": max(r["accuracy"] for r in rows)} if rows else
                                       {"test": pre["final_accuracy"], "val": pre.get("final_val_accuracy"),
                                        "best": pre["best_accuracy"]})
            for v in variants:
                r = _load(runs_dir / variant_name(v, a, s))
                if r:
                    r["rows"] = _rows(runs_dir / variant_name(v, a, s))
                    data["runs"][(v, a, s)] = r
    return data
