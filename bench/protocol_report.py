"""The converged protocol's report (a ``bench/run.py`` study with ``pretrain-rounds``: every method from
the same converged FedAvg checkpoint): figures of a study's runs (``collect``'s ``runs``), the tables
``bench/headline.py`` puts in a part's section, and ``report``: every table of one study."""

from __future__ import annotations

import json
import re
import statistics
from itertools import product
from pathlib import Path

from bench.common import EQUAL_COMPUTE, RESULTS, label, machine_line, pretrain_name, provenance
from bench.report import (alpha_columns, captioned, collect, differences, finished, mean_pct, mean_sd, method_rows,
                          ms, per_alpha, points, read_json, row, table)


# ----------------------------------------------------------------------------- figures of the runs
def gap_closure(runs: dict, v: str, a: float, seeds, central: list[float]) -> tuple[float, int] | None:
    """((``v`` − FedAvg) / (central − FedAvg), seeds) from the mean final test accuracies over the
    seeds both methods finished; None without such seeds, a central reference, or a gap."""
    common = [s for s in seeds if (v, a, s) in runs and ("fedavg", a, s) in runs]
    if not common or not central:
        return None
    m = statistics.mean(runs[(v, a, s)]["final_accuracy"] for s in common)
    f = statistics.mean(runs[("fedavg", a, s)]["final_accuracy"] for s in common)
    c = statistics.mean(central)
    return ((m - f) / (c - f), len(common)) if c != f else None


def best_validation(rows: list[dict]) -> tuple[int, float] | None:
    """The round whose global model scores best on the validation split (the earliest of ties: the least
    compute) and that model's test accuracy; None without per-round validation scores."""
    scored = [r for r in rows if "val-accuracy" in r and "accuracy" in r]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["val-accuracy"], -r["round"]))
    return best["round"], best["accuracy"]


def chosen_differences(runs: dict, v: str, alpha: float, seeds) -> list[float]:
    """Mosaic minus ``v`` per seed, each run at the round its validation split picks (the seeds
    where both runs kept per-round scores)."""
    out = []
    for s in seeds:
        m, o = (best_validation((runs.get((w, alpha, s)) or {}).get("rows") or []) for w in ("mosaic", v))
        if m and o:
            out.append(m[1] - o[1])
    return out


def client_units(rows: list[dict]) -> float | None:
    """A run's client work in plain training rounds of the same run (FedAvg's R rounds are R units):
    its clients' measured seconds (generators, prototypes and look-ahead training included) over the
    median seconds of one plain training round (a round whose look-ahead trained the clients twice
    counts half). CPU seconds (``client-cpu-seconds``) where every round has them, so that the load
    of other processes on the same cores does not enter; else wall seconds (``client-seconds``: older
    runs, GPU clients), whose ratio a load that changes within the run distorts."""
    from mosaic_flwr.core.records import CLIENT_CPU_SECONDS, CLIENT_SECONDS

    rounds = [r for r in rows if r["round"] > 0]
    key = CLIENT_CPU_SECONDS if rounds and all(r.get(CLIENT_CPU_SECONDS) for r in rounds) else CLIENT_SECONDS
    secs = [r.get(key) for r in rounds]
    plain = [r[key] / (2 if r.get("shadow-clients") else 1) for r in rows
             if r["round"] > 1 and r.get(key) and not r.get("gen-seconds-mean")]
    if not secs or None in secs or not plain:
        return None
    return sum(secs) / statistics.median(plain)


def unit_rounds(runs: dict, v: str, a: float, s: int) -> float | None:
    """Run (v, a, s)'s client compute in FedAvg rounds (``client_units``; a run restored without its
    per-round rows: as recorded); None if missing."""
    r = runs.get((v, a, s))
    if not r:
        return None
    return client_units(r["rows"]) if r["rows"] else r.get("client_units")


def client_steps(run: dict) -> tuple[int, int] | None:
    """(classifier SGD steps, generator steps) one client spent in the continuation rounds:
    local steps each round (``kd.local-steps`` at the distillation round, or on top of
    them with ``kd.expert-pass``), one more local training per look-ahead round (the path without
    distillation), the generator at the distillation round (Mosaic and FedDF)."""
    c, rows = run["config"], run["rows"]
    if [r["round"] for r in rows] != list(range(c.get("num-server-rounds", 0) + 1)):
        return None  # an incomplete per-round log: not counted
    local = c.get("local-steps", 0)
    steps = sum(local for r in rows if r["round"] > 0)
    generators = c.get("strategy") in ("mosaic", "feddf-gen")  # Mosaic's client round at the distillation round
    if generators and c.get("kd.local-steps"):
        steps += c["kd.local-steps"] - (0 if c.get("kd.expert-pass") else local)
    steps += local * sum(1 for r in rows if r.get("shadow-clients"))
    return steps, c.get("mosaic.gen-steps", 0) if generators else 0


def distillations(runs: dict, v: str, a: float, seeds) -> list[dict]:
    """The distillation round's figures of ``v``'s finished runs at α ``a`` that distilled."""
    return [d for r in finished(runs, v, a, seeds) if (d := r.get("distillation"))]


def kept(reports: list[dict], key: str, default: float | None = None) -> tuple[int, int]:
    """How many of the ``reports`` a gate kept (``key``; a report without it: ``default``, or not
    counted), of how many."""
    vals = [r.get(key, default) for r in reports if key in r or default is not None]
    return int(sum(vals)), len(vals)


def kept_rounds(runs_rows: list[list[dict]]) -> tuple[int, int] | None:
    """Methods that distil every round: how many of the runs' gated distillations were kept, of how
    many; None where no run distilled in more than one round."""
    gates = [[r["gate-kept"] for r in rows if "gate-kept" in r] for rows in runs_rows]
    if not any(len(g) > 1 for g in gates):
        return None
    return int(sum(sum(g) for g in gates)), sum(len(g) for g in gates)


def gate_disagreements(named_rows: dict[str, list[dict]], margin: float = 0.005) -> tuple[int, list[str]]:
    """The clients' gate (``gate-before`` / ``gate-after``) checked against the validation split
    (``val-before-distill`` / ``val-after-distill``) in every gated distillation of the runs'
    per-round rows (``name -> rows``): how many decisions there were, and a line for each the
    validation split contradicts by at least ``margin`` (a refused distillation it finds that much
    better, a kept one that much worse)."""
    n, lines = 0, []
    for name, rows in named_rows.items():
        for r in rows:
            if not {"gate-kept", "gate-before", "gate-after", "val-before-distill", "val-after-distill"} <= set(r):
                continue
            n += 1
            gain = r["val-after-distill"] - r["val-before-distill"]
            if (gain >= margin and not r["gate-kept"]) or (gain <= -margin and r["gate-kept"]):
                lines.append(f"{name} round {r['round']}: {'kept' if r['gate-kept'] else 'refused'} "
                             f"(clients' data {100 * r['gate-before']:.1f} → {100 * r['gate-after']:.1f} %), "
                             f"validation {100 * r['val-before-distill']:.1f} → {100 * r['val-after-distill']:.1f} %")
    return n, lines


# ----------------------------------------------------------------------------- a headline part's tables
def main_table(runs: dict, alphas, seeds, variants, pre: dict, pretrain_rounds: int, central: list[float] | None,
               refused: dict[str, str]) -> list[str]:
    """Final accuracy per method and α (a method ``refused`` before training: its reason) with its client
    compute in FedAvg rounds; the FedAvg start and, where ``central`` is not None, the central reference."""
    def method_row(v: str) -> str:
        if v in refused and not any((v, a, s) in runs for a in alphas for s in seeds):
            return row(label(v), ["refused" for _ in alphas] + [refused[v].splitlines()[0][:160]])
        units = [u for a in alphas for s in seeds for u in [unit_rounds(runs, v, a, s)] if u is not None]
        accs = [mean_sd([r["final_accuracy"] for r in finished(runs, v, a, seeds)]) for a in alphas]
        return row(label(v), accs + [f"{statistics.mean(units):.1f}" if units else "-"])

    start = [mean_sd([pre[(a, s)]["test"] for s in seeds if (a, s) in pre]) for a in alphas]
    rows = [row(f"FedAvg start (round {pretrain_rounds})", start + ["-"]), *map(method_row, variants)]
    if central is not None:
        rows.append(row("central (same sample passes)", [mean_sd(central) for _ in alphas] + ["-"]))
    return ["Final test accuracy %, mean ± sd (seeds). Client compute: the clients' measured CPU seconds (wall "
            "seconds in runs made before CPU seconds were recorded, under a steady load of one process per core; all "
            "clients; generators, prototypes and look-ahead training included; the gate's evaluation queries not) "
            "over the seconds of one plain training round of the same run, i.e. in FedAvg rounds (FedAvg: the "
            "round count), mean over the runs.", "",
            *table("method", alpha_columns(alphas) + ["client compute (FedAvg rounds)"], rows)]


def paired_table(runs: dict, alphas, seeds, variants) -> list[str]:
    """Mosaic minus each method, paired by seed; the equal-compute rows also at the validation-chosen round."""
    rows = [row(label(v), [points(differences(runs, "mosaic", v, a, seeds)) for a in alphas])
            for v in variants if v != "mosaic"]
    # the equal-compute rows' last round can land in a trough
    rows += method_rows([v for v in EQUAL_COMPUTE if v in variants], alphas,
                        lambda v, a: points(chosen_differences(runs, v, a, seeds)),
                        name=lambda v: f"{label(v)}, both at the round the validation split picks")
    return ["", "Mosaic minus each method, test points, paired by seed: mean [95 % t interval] (each seed).", "",
            *table("Mosaic −", alpha_columns(alphas), rows)]


def gap_line(gap: dict[float, tuple[float, int]], alphas) -> list[str]:
    """Mosaic's gap closure (α -> ``gap_closure``) in a sentence; nothing where there is none."""
    if not gap:
        return []
    return ["", "Gap closure (Mosaic − FedAvg) / (central − FedAvg), means over the seeds: "
            + ", ".join(f"α={a:g}: " + (f"{gap[a][0]:+.2f} ({gap[a][1]} seed{'' if gap[a][1] == 1 else 's'})"
                                        if a in gap else "-") for a in alphas) + "."]


def distillation_summary(runs: dict, alphas, seeds, variants) -> list[str]:
    """Why a distilling method won or lost (its caption says what); nothing while no distilling run finished."""
    def cell(v: str, a: float) -> str:
        reps = [r for r in distillations(runs, v, a, seeds) if "val-teacher" in r]
        if not reps:
            return "-"
        fid = [r["gen-fidelity-mean"] for r in reps if "gen-fidelity-mean" in r]
        asked = [r["val-teacher-asked"] for r in reps if "val-teacher-asked" in r]
        rounds = kept_rounds([r.get("rows") or [] for r in finished(runs, v, a, seeds)])
        gate, look = kept(reps, "gate-kept", 1.0), kept(reps, "gate-final-kept")
        return (f"{mean_pct(r['val-before-distill'] for r in reps):.1f} / "
                f"{mean_pct(r['val-teacher'] for r in reps):.1f}"
                + (f" (asked {mean_pct(asked):.1f})" if asked else "")
                + f" / {gate[0]} of {gate[1]}"
                + (f", {look[0]} after the look-ahead" if look[1] else "")
                + (f", rounds kept {rounds[0]} of {rounds[1]}" if rounds else "")
                + (f" (fidelity {mean_pct(fid):.0f})" if fid else ""))

    return captioned("At the distillation round (validation split, %; mean over seeds): the student about to be "
                     "distilled into, the teacher, how many seeds' gates kept the distilled model (and how many still "
                     "kept it after the look-ahead's fine-tune rounds), and the clients' generators' fidelity (their "
                     "own classifier's accuracy on their samples). Every-round methods: the last distillation round, "
                     "and how many of all their rounds' distillations the gates kept. FedFTG's and DFRD's teacher "
                     "weights each generated sample by the class it was asked for: on real images it is scored class "
                     "by class, and (asked) with each image's own class as the asked one.", "method",
                     alpha_columns(alphas, "student / teacher / kept"),
                     method_rows(variants, alphas, cell))


def gate_check(runs: dict, alphas, seeds, variants) -> list[str]:
    """A sentence: the gated distillations the validation split contradicts (``gate_disagreements``)."""
    n, against = gate_disagreements({f"{label(v)} α={a:g} seed {s}": runs[(v, a, s)].get("rows") or []
                                     for v in variants for a in alphas for s in seeds if (v, a, s) in runs})
    if not n:
        return []
    return ["", f"The clients' gate against the validation split: of the {n} gated distillation"
            f"{'' if n == 1 else 's'} in the runs that kept their per-round metrics (at the distillation "
            "round; every round of the every-round methods), the validation split contradicts the gate's "
            f"decision by 0.5 points or more in {len(against) or 'none'}"
            + (": " + "; ".join(against) if against else "") + "."]


def chosen_round_table(runs: dict, alphas, seeds, variants) -> list[str]:
    """Final round vs the round the validation split picks, for the rows whose length differs (its caption: why)."""
    def cell(v: str, a: float) -> str:
        got = [(r["final_accuracy"], bv) for r in finished(runs, v, a, seeds)
               for bv in [best_validation(r["rows"] or [])] if bv]
        if not got:
            return "-"
        return (f"{mean_pct(f for f, _ in got):.1f} / {mean_pct(t for _, (_, t) in got):.1f} "
                f"(round {', '.join(str(r) for _, (r, _) in got)})")

    return captioned("Final round or the round the validation split picks (test %, mean over the seeds whose runs kept "
                     "per-round scores, restored runs did not: final / at the round of best validation accuracy, and "
                     "that round per seed). The equal-compute rows run many more rounds, and at small α their accuracy "
                     "swings from round to round: their last round alone can flatter or sink them.", "method",
                     alpha_columns(alphas, "final / chosen"),
                     method_rows([v for v in ("fedavg", "mosaic", "fedavg-eqc", "fedprox-eqc") if v in variants],
                                 alphas, cell))


def plot(path: Path, title: str, runs: dict, alphas, seeds, variants, central: list[float]) -> None:
    """Final accuracy per method and α as bars (mean ± sd over seeds; an equal-compute bar in its
    method's colour, hatched), the central reference as a line; none (an older one removed) while
    no run is finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {(v, a): [r["final_accuracy"] for r in finished(runs, v, a, seeds)] for v in variants for a in alphas}
    variants = [v for v in variants if any(acc[(v, a)] for a in alphas)]
    if not variants:
        path.unlink(missing_ok=True)
        return
    fig, ax = plt.subplots(figsize=(min(13.0, 4.5 + 3.0 * len(alphas)), 4.5))
    width = 0.8 / len(variants)
    palette = plt.get_cmap("tab20").colors
    base = [v for v in variants if v not in EQUAL_COMPUTE]
    colour = {v: palette[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20] for i, v in enumerate(base)}
    colour |= {v: colour.get(EQUAL_COMPUTE[v][0], palette[-1]) for v in variants if v in EQUAL_COMPUTE}
    for i, v in enumerate(variants):
        done = [(j, vals) for j, a in enumerate(alphas) if (vals := acc[(v, a)])]
        ax.bar([j + i * width for j, _ in done], [mean_pct(x) for _, x in done], width,
               yerr=[100 * statistics.stdev(x) if len(x) > 1 else 0.0 for _, x in done], label=label(v),
               capsize=2, color=colour[v], hatch="//" if v in EQUAL_COMPUTE else None,
               edgecolor="white" if v in EQUAL_COMPUTE else None)
    if central:
        ax.axhline(mean_pct(central), color="k", ls="--", lw=1, label="central")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(alphas))], alpha_columns(alphas))
    every = [x for vals in acc.values() for x in vals]
    ax.set_ylim(max(min(100 * min(every) - 5, 100), 0), 100 * max([*central, *every]) + 3)
    ax.set_ylabel("final test accuracy (%), mean ± sd over seeds")
    ax.set_title(f"headline: {title}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- one study's tables
def oracle_label(tag: str) -> str:
    """An oracle file's round-1 settings (its name after the seed) in words."""
    if not tag:
        return "default"
    words = {"expert-passTrue": "expert pass", "distill-local-steps10": "10 steps", "distill-batch-size64": "of 64",
             "distill-momentum0.0": "no momentum", "distill-weight-decay0.0001": "wd 1e-4",
             "distill-local-steps200": "200 local steps"}
    parts = re.split(r"-(?=distill-|expert-|proto-|count-|generator|dcgan-)", tag.strip("-"))
    return ", ".join(words.get(p, p) for p in parts)


def settings(d: dict, runs_dir: Path) -> tuple[dict, dict]:
    """A study's pre-training config and its continuation's (a Mosaic run's where there is one)."""
    runs = d["runs"]
    pre = next((c for (a, s) in d["pre"]
                if (c := read_json(runs_dir / pretrain_name(a, s) / "config.json")) is not None), {})
    mosaic = [r["config"] for r in runs.values() if r["config"].get("strategy") == "mosaic"]
    return pre, (mosaic or [r["config"] for r in runs.values()] or [{}])[0]


def protocol_lines(d: dict, p: dict, c: dict, rounds: int) -> list[str]:
    """A study's title and setting: the machine, the data and the two stages (``p``: the
    pre-training's config, ``c``: the continuation's)."""
    gen = (f"{c['mosaic.gen-steps']} steps of batch {c['mosaic.gen-batch-size']}"
           if c.get("strategy") == "mosaic" else "see config.json")
    P = p.get("num-server-rounds", "?")
    return ["# Mosaic from a converged FedAvg (bench/run.py)", "",
            f"Machine: {machine_line()}. In-process federations (the real ClientApp handlers, no Ray), "
            f"{len(d['assign'])} clients, {p.get('dataset', '?')}, {p.get('client-models') or p.get('model', '?')}, "
            f"Dirichlet partition, a {p.get('validation-split', 0):.0%} validation split held out of "
            "the clients' data (used to choose settings; the test set is reported once, at the end).", "",
            f"**Protocol.** Stage 1: FedAvg, {P} rounds x {p.get('local-steps')} local SGD steps (batch "
            f"{p.get('batch-size')}, lr {p.get('lr')}, momentum {p.get('momentum')}), "
            f"constant rate: the start every method continues from (`init-from`). Stage 2: {rounds} more rounds "
            "with the same client budget and the same rate schedule for every method (`lr-schedule='step'`: round "
            f"1 at lr {c.get('lr')}, rounds 2-{rounds} at {c.get('finetune-lr')}). FedAvg trains; FedDF and Mosaic "
            f"distil after round 1 (whose clients also train a generator, {gen}, and compute prototypes: extra client "
            f"compute FedAvg does not spend) and fine-tune in rounds 2-{rounds}. The distilling rows share round 1's "
            "client replies, so they differ in the server alone. Central: the same model and SGD on the union of the "
            f"clients' data for the sample passes of all {P + rounds if isinstance(P, int) else '?'} rounds.", ""]


def final_table(d: dict, alphas, seeds, variants, rounds: int, pretrain_rounds) -> list[str]:
    """Final accuracy (test, validation, paired Δ against FedAvg), the start, the central reference; gap closures."""
    runs, pre, central = d["runs"], d["pre"], d["central"]

    def cells(v: str, a: float) -> list[str]:
        got = finished(runs, v, a, seeds)
        return [ms([g["final_accuracy"] for g in got]),
                ms([g["final_val_accuracy"] for g in got if g.get("final_val_accuracy") is not None]),
                "" if v == "fedavg" else points(differences(runs, v, "fedavg", a, seeds))]

    def start(a: float) -> list[str]:
        got = [pre[(a, s)] for s in seeds if (a, s) in pre]
        return [ms([x["test"] for x in got]), ms([x["val"] for x in got if x["val"] is not None]), ""]

    rows = [row(f"FedAvg start (round {pretrain_rounds})", [c for a in alphas for c in start(a)]
                + ["/".join(str(sum((a, s) in pre for s in seeds)) for a in alphas)]),
            *(row(v, [c for a in alphas for c in cells(v, a)]
                  + ["/".join(str(len(finished(runs, v, a, seeds))) for a in alphas)]) for v in variants)]
    lines = [f"## Final accuracy (test set, after the {rounds} continuation rounds), mean ± sd over seeds", "",
             "Δ: the method minus FedAvg in test points, paired by seed: mean [95 % t interval] (each seed).", "",
             *table("method", alpha_columns(alphas, "test", "validation", "Δ test vs FedAvg")
                    + ["seeds"], rows)]
    if not central:
        return lines
    c = [central[s]["final_accuracy"] for s in seeds if s in central]
    lines.append(row("central (same sample passes; one value per seed, any α)",
                     [x for _ in alphas for x in (ms(c), "", "")] + [str(len(c))]))
    gaps = per_alpha([v for v in variants if v != "fedavg"], alphas,
                     lambda v, a: [f"{g[0]:+.2f}" if (g := gap_closure(runs, v, a, seeds, c)) else "-"])
    return lines + ["", "Gap closure (method − FedAvg) / (central − FedAvg), from the mean test accuracies:", "",
                    *table("method", alpha_columns(alphas), gaps)]


DISTILLATION_KEYS = (("val-before-distill", "student"), ("val-ensemble", "ensemble"), ("val-teacher", "teacher"),
                     ("Δval-ensemble", "ensemble − student"), ("Δval-teacher", "teacher − student"),
                     ("val-after-distill", "distilled"), ("Δval-after-distill", "distilled − student"),
                     ("meta-used", "meta model used"), ("gen-student", "gen student"),
                     ("gen-teacher", "gen teacher"), ("gen-after-distill", "gen distilled"),
                     ("gate-kept", "gate kept"), ("gate-final-kept", "look-ahead kept"))


def distillation_cell(reps: list[dict], key: str) -> str:
    """One figure of the distillation round over the seeds' reports: a margin over the student
    (``Δ`` keys, paired by seed), a count of seeds (the meta model used, the gates kept; a report
    without a gate kept it) or a mean ± sd."""
    if key.startswith("Δ"):
        vals = [r[key[1:]] - r["val-before-distill"] for r in reps if key[1:] in r]
        if len(vals) > 1:
            return points(vals)
        return f"{mean_pct(vals):+.1f}" if vals else "-"
    if key in ("meta-used", "gate-kept", "gate-final-kept"):
        k, n = kept(reps, key, 1.0 if key == "gate-kept" else None)
        return f"{k}/{n}" if n else "-"
    return ms([r[key] for r in reps if key in r])


def distillation_table(runs: dict, alphas, seeds, variants) -> list[str]:
    """The distillation round per α: every figure of ``DISTILLATION_KEYS`` per distilling method."""
    lines = ["", "## The distillation round (validation split; `gen-*`: held-out generator samples, what a "
             "server can check without data)", "",
             "Student = the round-1 aggregate about to be distilled into. Teacher − student is the teacher's margin on "
             "validation data (the issue's goal: ≥ +3 points at α ≤ 0.1). Gate: how many seeds kept the distilled "
             "model (ungated rows always keep it); look-ahead: of those kept, how many the gate still kept after the "
             "fine-tune rounds, against the path without distillation (`kd.gate-rounds=-1`).", ""]
    for a in alphas:
        rows = [row(v, [distillation_cell(reps, k) for k, _ in DISTILLATION_KEYS])
                for v in variants if (reps := distillations(runs, v, a, seeds))]
        lines += [f"**α = {a:g}**", "", *table("method", [k[1] for k in DISTILLATION_KEYS], rows), ""]
    return lines


def path_table(runs: dict, alphas, seeds, variants, rounds: int) -> list[str]:
    """Every run whose distilled model was kept at round 1: its validation accuracy minus FedAvg's, round
    by round (a gated run's last round is the look-ahead's choice)."""
    out = []
    for v, a, s in product(variants, alphas, seeds):
        run, plain = runs.get((v, a, s)), runs.get(("fedavg", a, s))
        if v == "fedavg" or run is None or plain is None or len(run["rows"]) <= rounds \
                or len(plain["rows"]) <= rounds or not run["rows"][1].get("gate-kept"):
            continue
        diffs = [100 * (run["rows"][r]["val-accuracy"] - plain["rows"][r]["val-accuracy"])
                 for r in range(1, rounds + 1)]
        final = run["rows"][rounds].get("gate-final-kept")
        out.append(row(f"{v} | {a:g} | {s}", [f"{d:+.1f}" for d in diffs]
                       + ["-" if final is None else ("distilled" if final else "plain")]))
    if not out:
        return []
    return ["## Where a kept distillation goes: validation points over FedAvg, round by round", "",
            "Every run whose distilled model was kept at the distillation round (round 1), minus FedAvg's model "
            f"of the same seed at the same round. Rounds 2-{rounds} are the fine-tune rounds at the lowered rate; "
            "`look-ahead`: which path the gate kept at the end (`-`: no gate, or it was off).", "",
            "| method | α | seed | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | look-ahead |",
            "|---|---|---|" + "---|" * rounds + "---|", *out, ""]


def oracle_tables(runs_dir: Path, alphas, seeds) -> list[str]:
    """The teacher's ceiling (``oracle-*.json``, ``bench.oracle``'s diagnostic of round 1),
    per α and round-1 setting: meta models fitted on real images, and heads against full experts."""
    oracles = sorted(runs_dir.glob("oracle-*.json"))
    if not oracles:
        return []
    tags = sorted({f.stem.split(f"-s{f.stem.split('-s')[1].split('-')[0]}", 1)[1] for f in oracles})
    cells = [(a, tag, got) for a in alphas for tag in tags
             if (got := [g for s in seeds if (g := read_json(runs_dir / f"oracle-a{a:g}-s{s}{tag}.json"))])]
    ceiling = []
    for a, tag, got in cells:
        def col(key: str) -> str:
            return ms([g[key] for g in got if g.get(key) is not None])

        best = [max(g["oracle-meta-experts"], g["oracle-meta-global"]) - g["student"] for g in got]
        ceiling.append(row(f"{a:g}", [oracle_label(tag), col("student"), col("ensemble"), col("oracle-meta-experts"),
                                      col("oracle-meta-global"), f"{mean_pct(best):+.1f}", col("own-class-expert"),
                                      str(len(got))]))
    heads = []
    for a, tag, got in cells:
        got = [g for g in got if "head-vs-full-agreement" in g]
        if not got:
            continue

        def both(key: str) -> tuple[str, str]:  # (received, aggregated); old files: aggregated only
            new = [g for g in got if "backbones" in g]
            return (ms([g[key] for g in new]),
                    ms([g[f"{key}-aggregated"] if "backbones" in g else g[key] for g in got]))

        agree, meta = both("head-vs-full-agreement"), both("oracle-meta-heads-on-full")
        heads.append(row(f"{a:g}", [oracle_label(tag), *agree, ms([g["ensemble"] for g in got]), *meta,
                                    str(len(got))]))
    return ["## The teacher's ceiling: a meta model trained on real images (diagnostic)", "",
            "Round 1's class experts and student, and a meta model (the same architecture and training) fitted on "
            "real labelled images, half of the validation split, all scored on the other half. No deployed server "
            "has such data: this bounds what better meta-model data (generator samples, prototypes) could give the "
            "teacher. `own-class expert` scores each image with the expert of its true class (routing by the label: "
            "the experts' best case, not a teacher). Mean ± sd over seeds, %.", "",
            *table("α", ["round-1 clients", "student", "ensemble", "meta on real images",
                         "meta on real images, global prior", "best − student", "own-class expert", "seeds"], ceiling),
            "",
            "What the meta model learns from against what it meets: a prototype is scored by each expert's *head* "
            "on the features of the model the client *received* (it computes its prototypes before training); the "
            "teacher runs each *full* expert on an image. On the same validation images: how often the two agree "
            "(argmax, per expert), the mean of the heads' logits, and a meta model fitted on the heads' logits of "
            "real images (the best prototypes could give it), scored on the full experts (%). The same on the "
            "round's *aggregated* model's features, which diagnostics written before 2026-12-07 measured alone (and "
            "`mosaic.meta-experts='heads'` read before 53d323e; it now reads the received model's).", "",
            *table("α", ["round-1 clients", "agreement, received", "agreement, aggregated", "mean of full experts",
                         "meta on heads, scored on full: received", "... aggregated", "seeds"], heads), ""]


def compute_tables(runs: dict, alphas, seeds, variants, rounds: int) -> list[str]:
    """What the continuation rounds cost per method: the clients' SGD and generator steps, the
    measured client and server seconds, and the wall time."""
    def n(values: list[float]) -> str:  # counts and seconds
        return ms(values, pct=False)

    def steps(v: str, a: float) -> list[str]:
        got = [g for r in finished(runs, v, a, seeds) if (g := client_steps(r)) is not None]
        return [n([g[0] for g in got]), n([g[1] for g in got])]

    def seconds(v: str, a: float) -> list[str]:
        got = finished(runs, v, a, seeds)
        # Runs of a shared round 1 made before its client seconds were passed on: add that
        # round's wall time (in-process: almost all of it is the clients' work).
        client = [g["client_seconds"] + (g["bench"].get("shared_seconds", 0.0)
                                         if not g["rows"][1].get("client-seconds") else 0.0)
                  for g in got if g.get("client_seconds") is not None and len(g["rows"]) > 1]
        dist = [g.get("distillation") or {} for g in got]
        return [n(client), n([d.get("distill-seconds-total", d.get("distill-seconds", 0.0)) for d in dist])]

    def wall(v: str, a: float) -> list[str]:
        return [n([g["bench"].get("variant_seconds", g.get("wall_seconds")) for g in finished(runs, v, a, seeds)])]

    lines = [f"## Client compute in the {rounds} continuation rounds (per client, mean over the runs)", "",
             "Classifier SGD steps (batch 32; a look-ahead round trains the model twice) and generator steps "
             "(the distillation round).", "",
             *table("method", alpha_columns(alphas, "classifier steps", "generator steps"),
                    per_alpha(variants, alphas, steps)), "",
             f"## Measured time in the {rounds} continuation rounds (s, mean over the runs)", "",
             "Client: the clients' own wall time for their training replies (`client-seconds`, all clients "
             "together; generators and prototypes included, the gate's evaluation queries not). Server: the "
             "distillation (teacher, synthetic data, KD, checks, gate), over every distillation round.", "",
             *table("method", alpha_columns(alphas, "client", "server"),
                    per_alpha(variants, alphas, seconds)), "",
             "## Wall time (s, in-process, one process per shard on the 2 shared cores)", "",
             *table("method", alpha_columns(alphas), per_alpha(variants, alphas, wall))]
    shared = [g["bench"]["shared_seconds"] for g in runs.values() if "shared_seconds" in g["bench"]]
    if shared:
        lines.append(f"\nShared round-1 client work of the distilling rows (once per α, seed): {n(shared)} s; "
                     "a distilling row's own run costs that plus its row.")
    return lines


def report(runs_dir: Path, alphas, seeds, variants, name: str = "converged") -> str:
    """Every table of the study in ``runs_dir``, written to ``bench/results/<name>.md`` (its figures
    to ``<name>.json``); returns the markdown."""
    d = collect(runs_dir, alphas, seeds, variants)
    runs, pre, central = d["runs"], d["pre"], d["central"]
    p, c = settings(d, runs_dir)
    rounds = c.get("num-server-rounds", 3)
    lines = [*protocol_lines(d, p, c, rounds),
             *final_table(d, alphas, seeds, variants, rounds, p.get("num-server-rounds", "?")),
             *distillation_table(runs, alphas, seeds, variants),
             *path_table(runs, alphas, seeds, variants, rounds),
             *oracle_tables(runs_dir, alphas, seeds),
             *compute_tables(runs, alphas, seeds, variants, rounds)]
    commits = sorted({g["bench"].get("commit", "?") for g in runs.values()})
    loads = [g["bench"].get("loadavg_after", [0])[0] for g in runs.values()]
    lines += ["", f"_Runs at commit(s) {', '.join(commits)}; load average (1 min) after the runs "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}; table written at {provenance()['commit']} by "
              f"`bench/run.py STUDY --table-only`._"]
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    keep = ("final_accuracy", "final_val_accuracy", "best_accuracy", "distillation", "init_from", "wall_seconds",
            "bench", "local_work", "client_seconds")
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "pretrain": {f"a{a:g}-s{s}": v for (a, s), v in pre.items()},
        "central": {str(s): {k: c.get(k) for k in ("final_accuracy", "best_accuracy", "sample_passes")}
                    for s, c in central.items()},
        "runs": {f"{v}-a{a:g}-s{s}": {k: r.get(k) for k in keep} for (v, a, s), r in runs.items()}},
        indent=1, sort_keys=True) + "\n")
    return md
