"""Tables of ``bench/converged.py``: every method from the same converged FedAvg checkpoint."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from bench.common import RESULTS, machine_line, paired_interval, pretrain_name, provenance
from bench.report import collect, ms as _ms


def oracle_label(tag: str) -> str:
    """An oracle file's round-1 settings (its name after the seed) in words."""
    if not tag:
        return "default"
    words = {"expert-passTrue": "expert pass", "distill-local-steps10": "10 steps", "distill-batch-size64": "of 64",
             "distill-momentum0.0": "no momentum", "distill-weight-decay0.0001": "wd 1e-4",
             "distill-local-steps200": "200 local steps"}
    parts = re.split(r"-(?=distill-|expert-|proto-|count-|generator|dcgan-)", tag.strip("-"))
    return ", ".join(words.get(p, p) for p in parts)


def path_table(runs: dict, alphas, seeds, variants, rounds: int) -> list[str]:
    """Every run whose distilled model was kept at the distillation round (round 1): its
    validation accuracy minus FedAvg's of the same seed, round by round (the fine-tune rounds
    train the distilled model; a gated run's last round is the look-ahead's choice)."""
    out = []
    for v in variants:
        for a in alphas:
            for s in seeds:
                run, plain = runs.get((v, a, s)), runs.get(("fedavg", a, s))
                if v == "fedavg" or run is None or plain is None or len(run["rows"]) <= rounds \
                        or len(plain["rows"]) <= rounds or not run["rows"][1].get("gate-kept"):
                    continue
                diffs = [100 * (run["rows"][r]["val-accuracy"] - plain["rows"][r]["val-accuracy"])
                         for r in range(1, rounds + 1)]
                final = run["rows"][rounds].get("gate-final-kept")
                out.append(f"| {v} | {a:g} | {s} | " + " | ".join(f"{d:+.1f}" for d in diffs)
                           + f" | {'-' if final is None else ('distilled' if final else 'plain')} |")
    if not out:
        return []
    return [f"## Where a kept distillation goes: validation points over FedAvg, round by round", "",
            "Every run whose distilled model was kept at the distillation round (round 1), minus FedAvg's model "
            f"of the same seed at the same round. Rounds 2-{rounds} are the fine-tune rounds at the lowered rate; "
            "`look-ahead`: which path the gate kept at the end (`-`: no gate, or it was off).", "",
            "| method | α | seed | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | look-ahead |",
            "|---|---|---|" + "---|" * rounds + "---|", *out, ""]


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


def report(runs_dir: Path, alphas, seeds, variants, name: str = "converged") -> str:
    d = collect(runs_dir, alphas, seeds, variants)
    runs, pre, central = d["runs"], d["pre"], d["central"]
    cfgs = [r["config"] for r in runs.values() if r["config"].get("strategy") == "mosaic"]
    gen = f"{cfgs[0]['mosaic.gen-steps']} steps of batch {cfgs[0]['mosaic.gen-batch-size']}" if cfgs else "see config.json"
    p = next((json.loads(f.read_text()) for (a, s) in pre
              if (f := runs_dir / pretrain_name(a, s) / "config.json").is_file()), {})
    c = cfgs[0] if cfgs else next((r["config"] for r in runs.values()), {})
    models = p.get("client-models") or p.get("model", "?")
    R, P = c.get("num-server-rounds", 3), p.get("num-server-rounds", "?")
    lines = [f"# Mosaic from a converged FedAvg (bench/converged.py)", "",
             f"Machine: {machine_line()}. In-process federations (the real ClientApp handlers, no Ray), "
             f"{len(d['assign'])} clients, {p.get('dataset', '?')}, {models}, Dirichlet partition, a "
             f"{p.get('validation-split', 0):.0%} validation split held out of "
             "the clients' data (used to choose settings; the test set is reported once, at the end).", "",
             f"**Protocol.** Stage 1: FedAvg, {P} rounds x {p.get('local-steps')} local SGD steps (batch "
             f"{p.get('batch-size')}, lr {p.get('lr')}, momentum {p.get('momentum')}), "
             f"constant rate: the start every method continues from (`init-from`). Stage 2: {R} more rounds with the "
             "same client budget and the same rate schedule for every method (`lr-schedule='step'`: round 1 at "
             f"lr {c.get('lr')}, rounds 2-{R} at {c.get('finetune-lr')}). FedAvg trains; FedDF and Mosaic distil "
             "after round 1 (whose clients "
             f"also train a generator, {gen}, and compute prototypes: extra client compute FedAvg does not "
             f"spend) and fine-tune in rounds 2-{R}. The distilling rows share round 1's client replies, so they "
             "differ in the server alone. Central: the same model and SGD on the union of the clients' data "
             f"for the sample passes of all {P + R if isinstance(P, int) else '?'} rounds.", ""]
    # ---- final accuracy
    lines += [f"## Final accuracy (test set, after the {R} continuation rounds), mean ± sd over seeds", "",
              "Δ: the method minus FedAvg in test points, paired by seed: mean [95 % t interval] (each seed).", "",
              "| method | " + " | ".join(f"α={a:g} test | α={a:g} validation | α={a:g} Δ test vs FedAvg"
                                        for a in alphas) + " | seeds |",
              "|---|" + "---|---|---|" * len(alphas) + "---|"]
    row = [f"FedAvg start (round {P})"]
    for a in alphas:
        row += [_ms([pre[(a, s)]["test"] for s in seeds if (a, s) in pre]),
                _ms([pre[(a, s)]["val"] for s in seeds if (a, s) in pre and pre[(a, s)]["val"] is not None]), ""]
    row.append("/".join(str(sum((a, s) in pre for s in seeds)) for a in alphas))
    lines.append("| " + " | ".join(row) + " |")
    for v in variants:
        row = [v]
        for a in alphas:
            got = [runs[(v, a, s)] for s in seeds if (v, a, s) in runs]
            diffs = [runs[(v, a, s)]["final_accuracy"] - runs[("fedavg", a, s)]["final_accuracy"]
                     for s in seeds if (v, a, s) in runs and ("fedavg", a, s) in runs]
            row += [_ms([g["final_accuracy"] for g in got]),
                    _ms([g["final_val_accuracy"] for g in got if g.get("final_val_accuracy") is not None]),
                    "" if v == "fedavg" else paired_interval(diffs, scale=100, digits=1)]
        row.append("/".join(str(sum((v, a, s) in runs for s in seeds)) for a in alphas))
        lines.append("| " + " | ".join(row) + " |")
    if central:
        c = [central[s]["final_accuracy"] for s in seeds if s in central]
        cells = [x for _ in alphas for x in (_ms(c), "", "")] + [str(len(c))]
        lines.append("| central (same sample passes; one value per seed, any α) | " + " | ".join(cells) + " |")
        lines += ["", "Gap closure (method − FedAvg) / (central − FedAvg), from the mean test accuracies:", "",
                  "| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
        cm = statistics.mean(c)
        for v in variants:
            if v == "fedavg":
                continue
            cells = []
            for a in alphas:
                vs = [runs[(v, a, s)]["final_accuracy"] for s in seeds if (v, a, s) in runs and ("fedavg", a, s) in runs]
                fs = [runs[("fedavg", a, s)]["final_accuracy"] for s in seeds if (v, a, s) in runs and ("fedavg", a, s) in runs]
                cells.append(f"{(statistics.mean(vs) - statistics.mean(fs)) / (cm - statistics.mean(fs)):+.2f}"
                             if vs and cm != statistics.mean(fs) else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    # ---- distillation round
    lines += ["", "## The distillation round (validation split; `gen-*`: held-out generator samples, what a "
              "server can check without data)", "",
              "Student = the round-1 aggregate about to be distilled into. Teacher − student is the teacher's "
              "margin on validation data (the issue's goal: ≥ +3 points at α ≤ 0.1). Gate: how many seeds kept "
              "the distilled model (ungated rows always keep it); look-ahead: of those kept, how many the gate "
              "still kept after the fine-tune rounds, against the path without distillation (`kd.gate-rounds=-1`).",
              ""]
    keys = [("val-before-distill", "student"), ("val-ensemble", "ensemble"), ("val-teacher", "teacher"),
            ("Δval-ensemble", "ensemble − student"), ("Δval-teacher", "teacher − student"),
            ("val-after-distill", "distilled"), ("Δval-after-distill", "distilled − student"),
            ("meta-used", "meta model used"), ("gen-student", "gen student"),
            ("gen-teacher", "gen teacher"), ("gen-after-distill", "gen distilled"), ("gate-kept", "gate kept"),
            ("gate-final-kept", "look-ahead kept")]
    for a in alphas:
        lines += [f"**α = {a:g}**", "", "| method | " + " | ".join(k[1] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for v in variants:
            reps = [runs[(v, a, s)].get("distillation", {}) for s in seeds if (v, a, s) in runs]
            reps = [r for r in reps if r]
            if not reps:
                continue
            cells = []
            for key, label in keys:
                if key.startswith("Δ"):
                    vals = [r[key[1:]] - r["val-before-distill"] for r in reps if key[1:] in r]
                    cells.append(paired_interval(vals, scale=100, digits=1) if len(vals) > 1
                                 else f"{100 * statistics.mean(vals):+.1f}" if vals else "-")
                elif key == "meta-used":
                    vals = [r[key] for r in reps if key in r]
                    cells.append(f"{int(sum(vals))}/{len(vals)}" if vals else "-")
                elif key == "gate-kept":
                    vals = [r.get(key, 1.0) for r in reps]
                    cells.append(f"{int(sum(vals))}/{len(vals)}")
                elif key == "gate-final-kept":
                    vals = [r[key] for r in reps if key in r]
                    cells.append(f"{int(sum(vals))}/{len(vals)}" if vals else "-")
                else:
                    cells.append(_ms([r[key] for r in reps if key in r]))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    # ---- where a kept distillation goes in the fine-tune rounds
    lines += path_table(runs, alphas, seeds, variants, R)
    # ---- the teacher's ceiling
    oracles = sorted(runs_dir.glob("oracle-*.json"))
    if oracles:
        lines += ["## The teacher's ceiling: a meta model trained on real images (diagnostic)", "",
                  "Round 1's class experts and student, and a meta model (the same architecture and training) "
                  "fitted on real labelled images, half of the validation split, all scored on the other half. "
                  "No deployed server has such data: this bounds what better meta-model data (generator samples, "
                  "prototypes) could give the teacher. `own-class expert` scores each image with the expert of "
                  "its true class (routing by the label: the experts' best case, not a teacher). "
                  "Mean ± sd over seeds, %.", "",
                  "| α | round-1 clients | student | ensemble | meta on real images | meta on real images, "
                  "global prior | best − student | own-class expert | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        tags = sorted({f.stem.split(f"-s{f.stem.split('-s')[1].split('-')[0]}", 1)[1] for f in oracles})
        for a in alphas:
            for tag in tags:
                got = [json.loads(f.read_text()) for s in seeds
                       for f in [runs_dir / f"oracle-a{a:g}-s{s}{tag}.json"] if f.is_file()]
                if not got:
                    continue
                best = [max(g["oracle-meta-experts"], g["oracle-meta-global"]) - g["student"] for g in got]
                lines.append(f"| {a:g} | {oracle_label(tag)} | {_ms([g['student'] for g in got])} | "
                             f"{_ms([g['ensemble'] for g in got])} | {_ms([g['oracle-meta-experts'] for g in got])} | "
                             f"{_ms([g['oracle-meta-global'] for g in got])} | {100 * statistics.mean(best):+.1f} | "
                             f"{_ms([g['own-class-expert'] for g in got if g.get('own-class-expert') is not None])} | "
                             f"{len(got)} |")
        lines.append("")
        lines += ["What the meta model learns from against what it meets: a prototype is scored by each expert's "
                  "*head* on the features of the model the client *received* (it computes its prototypes before "
                  "training); the teacher runs each *full* expert on an image. On the same validation images: how "
                  "often the two agree (argmax, per expert), the mean of the heads' logits, and a meta model fitted "
                  "on the heads' logits of real images (the best prototypes could give it), scored on the full "
                  "experts (%). The same on the round's *aggregated* model's features (the backbone "
                  "`mosaic.meta-experts='heads'` uses), which diagnostics written before 2026-12-07 measured alone.", "",
                  "| α | round-1 clients | agreement, received | agreement, aggregated | mean of full experts | "
                  "meta on heads, scored on full: received | ... aggregated | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in alphas:
            for tag in tags:
                got = [json.loads(f.read_text()) for s in seeds
                       for f in [runs_dir / f"oracle-a{a:g}-s{s}{tag}.json"] if f.is_file()]
                got = [g for g in got if "head-vs-full-agreement" in g]
                if not got:
                    continue

                def both(key: str) -> tuple[str, str]:  # (received, aggregated); old files: aggregated only
                    new = [g for g in got if "backbones" in g]
                    return (_ms([g[key] for g in new]),
                            _ms([g[f"{key}-aggregated"] if "backbones" in g else g[key] for g in got]))

                agree, meta = both("head-vs-full-agreement"), both("oracle-meta-heads-on-full")
                lines.append(f"| {a:g} | {oracle_label(tag)} | {agree[0]} | {agree[1]} | "
                             f"{_ms([g['ensemble'] for g in got])} | {meta[0]} | {meta[1]} | {len(got)} |")
        lines.append("")
    # ---- client compute
    lines += [f"## Client compute in the {R} continuation rounds (per client, mean over the runs)", "",
              "Classifier SGD steps (batch 32; a look-ahead round trains the model twice) and generator steps "
              "(the distillation round).", "",
              "| method | " + " | ".join(f"α={a:g} classifier steps | α={a:g} generator steps" for a in alphas) + " |",
              "|---|" + "---|---|" * len(alphas)]
    for v in variants:
        cells = []
        for a in alphas:
            got = [g for s in seeds if (v, a, s) in runs for g in [client_steps(runs[(v, a, s)])] if g is not None]
            cells += [_ms([g[0] for g in got], pct=False), _ms([g[1] for g in got], pct=False)]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    # ---- measured client and server time
    lines += [f"## Measured time in the {R} continuation rounds (s, mean over the runs)", "",
              "Client: the clients' own wall time for their training replies (`client-seconds`, all clients "
              "together; generators and prototypes included, the gate's evaluation queries not). Server: the "
              "distillation (teacher, synthetic data, KD, checks, gate), over every distillation round.", "",
              "| method | " + " | ".join(f"α={a:g} client | α={a:g} server" for a in alphas) + " |",
              "|---|" + "---|---|" * len(alphas)]
    for v in variants:
        cells = []
        for a in alphas:
            got = [runs[(v, a, s)] for s in seeds if (v, a, s) in runs]
            # Runs of a shared round 1 made before its client seconds were passed on: add that
            # round's wall time (in-process: almost all of it is the clients' work).
            cells.append(_ms([g["client_seconds"] + (g["bench"].get("shared_seconds", 0.0)
                                                     if not g["rows"][1].get("client-seconds") else 0.0)
                              for g in got if g.get("client_seconds") is not None and len(g["rows"]) > 1],
                             pct=False))
            dist = [g.get("distillation") or {} for g in got]
            cells.append(_ms([d.get("distill-seconds-total", d.get("distill-seconds", 0.0)) for d in dist], pct=False))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    # ---- time
    lines += ["## Wall time (s, in-process, one process per shard on the 2 shared cores)", "",
              "| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
    for v in variants:
        cells = []
        for a in alphas:
            got = [runs[(v, a, s)] for s in seeds if (v, a, s) in runs]
            cells.append(_ms([g["bench"].get("variant_seconds", g.get("wall_seconds")) for g in got], pct=False))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    shared = [g["bench"]["shared_seconds"] for g in runs.values() if "shared_seconds" in g["bench"]]
    if shared:
        lines.append(f"\nShared round-1 client work of the distilling rows (once per α, seed): {_ms(shared, pct=False)} s; "
                     "a distilling row's own run costs that plus its row.")
    commits = sorted({g["bench"].get("commit", "?") for g in runs.values()})
    loads = [g["bench"].get("loadavg_after", [0])[0] for g in runs.values()]
    prov = provenance()
    lines += ["", f"_Runs at commit(s) {', '.join(commits)}; load average (1 min) after the runs "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}; table written at {prov['commit']} by "
              f"`bench/converged.py --table-only`._"]
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
