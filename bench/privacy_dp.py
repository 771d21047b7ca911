"""The privacy / accuracy trade-off of Mosaic's differential privacy (docs/privacy.md, "Differential privacy").

Mosaic on Fashion-MNIST, 10 clients, Dirichlet alpha = 0.1, the default schedule with the
clients' gate, at a total per-client epsilon (``dp.epsilon``) of inf (no DP), 8 and 1 (delta
1e-5): final accuracy, the accuracy before and after distillation, what the gate decided on
the clients' noisy scores, the epsilon each client spent (composed by the accountant, and
as its privacy ledger wrote it), and the clients' generator time with and without DP.

The real ServerApp and ClientApp on an in-process grid (clients one at a time, one torch
thread), one run per process::

    python bench/privacy_dp.py run --level inf    # then 8, then 1
    python bench/privacy_dp.py report                        # bench/results/privacy-dp.{md,json}

``--set "key=value ..."`` adds run-config overrides (e.g. a shorter schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, RUNS, git_commit, git_dirty, loadavg, machine  # noqa: E402

OUT = RUNS / "privacy-dp-total"
# level -> the dp-* settings: dp.epsilon is each client's total; the prototypes', counts' and
# gate scores' own epsilons are carved out of it and the generator gets the rest. Every level
# runs the clients' gate (under DP on noisy scores, in the plan). The audit is off under DP
# (its figures are not covered), so it is off at inf too: the levels compare alike.
LEVELS = {
    "inf": {},
    "8": {"dp.epsilon": 8.0, "dp.proto-epsilon": 1.0, "dp.count-epsilon": 0.5, "dp.gate-epsilon": 0.5},
    "1": {"dp.epsilon": 1.0, "dp.proto-epsilon": 0.5, "dp.count-epsilon": 0.25, "dp.gate-epsilon": 0.25},
}
BASE = {"dataset": "fmnist", "alpha": 0.1, "strategy": "mosaic", "seed": 42, "privacy-audit": False,
        "client-threads": 1, "server-threads": 1, "checkpoint": False}


def run(level: str, extra: dict) -> dict:
    import torch
    from flwr.app import Context, RecordDict

    import client_app.app as capp
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from server_app.app import main as server_main

    torch.set_num_threads(1)
    run_config = {**load_defaults(), **BASE, **LEVELS[level], **extra,
                  "output-dir": str(OUT), "run-name": f"eps-{level}"}
    grid = InProcessGrid(capp.app, run_config, 10)
    commit, dirty = git_commit(), git_dirty()  # the code the run executes (HEAD may move meanwhile)
    load0, t0 = loadavg(), time.perf_counter()
    server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    wall = time.perf_counter() - t0
    meta = {"level": level, "overrides": {**BASE, **LEVELS[level], **extra}, "wall_seconds": wall,
            "commit": commit, "dirty": dirty, "load_before": load0, "load_after": loadavg(),
            "machine": machine()}
    (OUT / f"eps-{level}" / "bench.json").write_text(json.dumps(meta, indent=1))
    return meta


def timing(steps: int, reps: int) -> dict:
    """The generator's training time with and without DP on the same client, back to back in
    one process (the same load for both): Fashion-MNIST, alpha 0.1, partition 0, the default
    gen-* settings, a fresh cnn_small classifier, D under DP-SGD at the 8 level's sigma."""
    import torch

    from mosaic_flwr.config import build_config
    from mosaic_flwr.data import dataset_info
    from mosaic_flwr.models.generators import build_discriminator, generator_for
    from mosaic_flwr.methods.mosaic.generator import train_generator
    from mosaic_flwr.privacy import dp as dpm
    from mosaic_flwr.core.task import client_data, make_model

    torch.set_num_threads(1)
    cfg = build_config({**BASE, **LEVELS["8"]})
    info = dataset_info("fmnist")
    x, y = client_data(cfg, 0, 10)
    sigma, q, _ = dpm.generator_mechanism(dpm.dp_settings(cfg.values), len(y), cfg.of('mosaic').gen_batch_size, cfg.of('mosaic').gen_steps,
                                          protos=True)
    out = {"clients-samples": len(y), "steps": steps, "batch": cfg.of('mosaic').gen_batch_size, "sigma": sigma, "plain": [], "dp": [],
           "plain-cpu": [], "dp-cpu": []}
    for rep in range(reps):
        for mode in ("plain", "dp"):
            torch.manual_seed(rep)
            g, d = generator_for(info), build_discriminator(info.in_channels, info.image_size, info.num_classes)
            clf = make_model(cfg)
            dp = None if mode == "plain" else dpm.DiscriminatorDP(
                cfg.of('dp').max_grad_norm, sigma, q, torch.bincount(y, minlength=10).double(), dpm.secret_generator())
            cpu0 = time.process_time()  # CPU time: less sensitive than wall time to other jobs on the cores
            st = train_generator(g, d, clf, x, y, steps=steps, batch_size=cfg.of('mosaic').gen_batch_size, lr=cfg.of('mosaic').gen_lr,
                                 seed=rep, eval_per_class=1, dp=dp)
            out[f"{mode}-cpu"].append((time.process_time() - cpu0) / steps)
            out[mode].append(st["seconds_per_step"])
            print(f"[timing] rep {rep} {mode}: {st['seconds_per_step'] * 1000:.1f} ms/step wall, "
                  f"{out[f'{mode}-cpu'][-1] * 1000:.1f} ms/step CPU", flush=True)
    out.update({"load": loadavg(), "commit": git_commit(), "dirty": git_dirty(), "machine": machine()})
    (RESULTS / "privacy-dp-timing.json").write_text(json.dumps(out, indent=1))
    return out


def _row(level: str) -> dict | None:
    d = OUT / f"eps-{level}"
    if not (d / "summary.json").is_file() or not (d / "bench.json").is_file():
        return None
    s = json.loads((d / "summary.json").read_text())
    b = json.loads((d / "bench.json").read_text())
    rounds = json.loads((d / "metrics.json").read_text())
    dist = next((r for r in rounds if "acc-after-distill" in r), {})
    dp = s.get("dp", {})
    clients = dp.get("clients", {}) if dp.get("enabled") else {}
    eps = [c["epsilon"] for c in clients.values() if "epsilon" in c]
    priv = s.get("privacy") or {}
    return {
        "level": level, "final_accuracy": s["final_accuracy"],
        "acc-before-distill": dist.get("acc-before-distill"), "acc-after-distill": dist.get("acc-after-distill"),
        "acc-teacher": dist.get("acc-teacher"), "gate-kept": dist.get("gate-kept"),
        "gate-final-kept": next((r["gate-final-kept"] for r in rounds if "gate-final-kept" in r), None),
        "gen-seconds-mean": dist.get("gen-seconds-mean"), "gen-fidelity-mean": dist.get("gen-fidelity-mean"),
        "dp": dp.get("enabled", False),
        "epsilon-max": max(eps) if eps else None, "epsilon-min": min(eps) if eps else None,
        "epsilon-generator-max": max((c["epsilon-generator"] for c in clients.values()), default=None),
        "ledger-epsilon-max": max((c["ledger-epsilon"] for c in clients.values() if "ledger-epsilon" in c),
                                  default=None),
        "gate-before": dist.get("gate-before"), "gate-after": dist.get("gate-after"),
        "sigma-generator-range": ([min(c["sigma-generator"] for c in clients.values()),
                                   max(c["sigma-generator"] for c in clients.values())] if clients else None),
        "audit": {k: priv.get(k) for k in ("mia-auc-pixel-median", "mia-auc-pixel-max", "mia-auc-feature-median",
                                           "mia-auc-feature-max", "dcr-ratio-pixel-median", "dcr-ratio-pixel-min",
                                           "dcr-ratio-feature-median", "dcr-ratio-feature-min",
                                           "near-copy-excess-pixel-max", "proto-nn-ratio-min-median",
                                           "proto-exact-total", "mia-significant-pixel", "mia-significant-feature")},
        "wall_seconds": b["wall_seconds"], "commit": b["commit"], "dirty": b["dirty"],
        "load": [b["load_before"], b["load_after"]], "overrides": b["overrides"],
    }


def _f(v, fmt="{:.4f}"):
    return "-" if v is None else fmt.format(v)


def report() -> None:
    from mosaic_flwr.config import renamed

    rows = [r for r in (_row(level) for level in LEVELS) if r is not None]
    if not rows:
        raise SystemExit(f"no finished runs under {OUT}")
    (RESULTS / "privacy-dp.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Mosaic under differential privacy: the privacy / accuracy trade-off", "",
             "Fashion-MNIST, cnn_small, 10 clients, Dirichlet alpha = 0.1, seed 42, the default schedule "
             "(6 warm-up rounds, distillation, 2 fine-tune rounds) with the clients' gate and its look-ahead, "
             "delta = 1e-5, RDP accountant (Opacus), the privacy audit off at every level (under DP its figures "
             "are not covered). `dp.epsilon` is each client's total: the counts', prototypes' and gate scores' "
             "own epsilons are carved out of it and the generator's DP-SGD gets the rest; every release is "
             "written in the client's privacy ledger first. In-process grid (`bench/privacy_dp.py`), clients "
             "one at a time, one torch thread, on the 2-core VM shared with other jobs (load averages below). "
             "One seed: differences of a point or two are within run-to-run noise.", "",
             "| level | dp.epsilon (total) / prototypes / counts / gate scores | epsilon per client, planned "
             "(max; min) | in the ledger after distillation (max) | generator sigma | final acc. "
             "| before -> after distillation | gate: noisy clients' scores before / after | gate kept (final) "
             "| generator s / client | fidelity | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = renamed(r["overrides"], warn=False)  # (a run from before the namespaces: the old names)
        setting = ("off" if not r["dp"] else
                   f"{o.get('dp.epsilon')} / {o.get('dp.proto-epsilon')} / {o.get('dp.count-epsilon')} / "
                   f"{o.get('dp.gate-epsilon')}")
        sig = r["sigma-generator-range"]
        lines.append(
            f"| {r['level']} | {setting} | {_f(r['epsilon-max'], '{:.2f}')}; {_f(r['epsilon-min'], '{:.2f}')} "
            f"| {_f(r.get('ledger-epsilon-max'), '{:.2f}')} "
            f"| {'-' if not sig else f'{sig[0]:.2f}-{sig[1]:.2f}'} | {_f(r['final_accuracy'])} "
            f"| {_f(r['acc-before-distill'])} -> {_f(r['acc-after-distill'])} "
            f"| {_f(r.get('gate-before'))} / {_f(r.get('gate-after'))} "
            f"| {r['gate-kept']} ({r['gate-final-kept']}) | {_f(r['gen-seconds-mean'], '{:.1f}')} "
            f"| {_f(r['gen-fidelity-mean'], '{:.3f}')} | {r['wall_seconds']:.0f} |")
    tpath = RESULTS / "privacy-dp-timing.json"
    if tpath.is_file():
        t = json.loads(tpath.read_text())
        plain, dp = (sum(t[k]) / len(t[k]) * 1000 for k in ("plain", "dp"))
        pc, dc = (sum(t[k]) / len(t[k]) * 1000 for k in ("plain-cpu", "dp-cpu"))
        lines += ["", f"Time cost of DP-SGD in the generator, measured back to back in one process "
                  f"(`bench/privacy_dp.py timing --steps {t['steps']} --reps {len(t['plain'])}`, commit {t['commit']}: "
                  f"client 0, {t['clients-samples']} images, steps of {t['batch']}, sigma {t['sigma']:.2f}, load "
                  f"{t['load'][0]}): CPU time {pc:.1f} ms/step without DP, {dc:.1f} ms/step with DP ({dc / pc:.2f}x); "
                  f"wall time {plain:.1f} vs {dp:.1f} ms/step ({dp / plain:.2f}x; per repetition: plain "
                  f"{', '.join(f'{v * 1000:.0f}' for v in t['plain'])}, DP {', '.join(f'{v * 1000:.0f}' for v in t['dp'])} ms)."]
    lines += ["", "Runs: " + "; ".join(f"{r['level']}: commit {r['commit']}{' (dirty)' if r['dirty'] else ''}, "
                                        f"load {r['load'][0][0]} -> {r['load'][1][0]}" for r in rows), ""]
    lines += [("Before the privacy ledger (commit ccf5fbe and earlier) `dp.epsilon` was the generator's alone, "
               "the clients' gate was refused under DP (its exact scores were not covered) and the audit's figures "
               "were sent under DP; that table, with the audit figures at every level, is "
               "`bench/results/privacy-dp.md` at ccf5fbe."), ""]
    (RESULTS / "privacy-dp.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--level", choices=list(LEVELS), required=True)
    r.add_argument("--set", default="", help="extra run-config overrides, 'key=value ...'")
    sub.add_parser("report")
    t = sub.add_parser("timing")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "timing":
        print(json.dumps(timing(args.steps, args.reps), indent=1, default=str))
        return 0
    if args.cmd == "report":
        report()
        return 0
    from flwr.common.config import parse_config_args
    extra = parse_config_args([args.set]) if args.set.strip() else {}
    print(json.dumps(run(args.level, extra), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
