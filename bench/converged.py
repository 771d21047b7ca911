#!/usr/bin/env python3
"""Mosaic from a converged FedAvg: the authors' two-stage protocol on Fashion-MNIST.

Stage 1, once per (alpha, seed): FedAvg trains to its plateau (``PRETRAIN_ROUNDS`` rounds,
constant lr, a validation split held out of the clients' data) in an in-process federation
(``mosaic_flwr.testing.inprocess.InProcessGrid`` driving the real ClientApp handlers, no Ray); its
run directory (``pretrain-a<alpha>-s<seed>``) holds the checkpoint every method starts from.

Stage 2: every method continues from that checkpoint (``init-from``) for ``CONTINUE_ROUNDS``
rounds with the same client budget and the same learning-rate schedule (round 1 at ``lr``,
then ``finetune-lr``; ``lr-schedule='step'`` with ``warmup-rounds=1``): FedAvg trains; FedDF
and the Mosaic variants distil after round 1 (whose clients also train their generator and
compute prototypes) and fine-tune after it. The distilling variants share round 1's client
replies (one federation per (alpha, seed): ``mosaic_flwr.testing.replay.Fork``), so they differ in
the server side alone. Stage 3: the centralised reference per seed (the same model and SGD
on the union of the clients' data, as many sample passes as the whole federated run).

Every run directory holds a run's files (``summary.json``, ``metrics.json``); a finished
one is never rerun, so each stage resumes cell by cell. An interrupted run goes on from the
checkpoint of its last round (``resumable``), except the distilling variants that share round 1
(Mosaic's group, ``replay_group``), which start again.

    .venv/bin/python bench/converged.py --stage pretrain --shard 0/2   # and 1/2, in parallel
    .venv/bin/python bench/converged.py --stage continue --shard 0/2   # and 1/2
    .venv/bin/python bench/converged.py --stage central
    .venv/bin/python bench/converged.py --table-only

Another data set or model: ``--run-config conf/cifar10-cpu.toml`` (files and ``key=value``
strings, for every run; the grid's alpha and seed win, stage 1 is FedAvg at a constant rate),
with ``--name`` for its own runs and tables. CIFAR-10 needs ``scripts/setup.sh --data cifar10``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (EQUAL_COMPUTE, RUNS, Cell, cell_done, flower_context, run_inprocess, runnable,  # noqa: E402
                          loadavg, pretrain_name, run_central, variant_name, write_bench_note, write_refusal)
from bench.protocol_report import client_units, report  # noqa: E402

ALPHAS = (0.1, 0.01, 1.0)
SEEDS = (42, 43, 44)
PRETRAIN_ROUNDS = 30
SHARED = {"validation-split": 0.1, "server-threads": 1}  # one thread: processes share 2 cores


CONTINUE_ROUNDS = 3
CONTINUE = {"warmup-rounds": 1, "num-server-rounds": CONTINUE_ROUNDS, "lr-schedule": "step", "checkpoint": False}
# name -> (strategy, overrides): every registered method as it ships (the registry's order), then
# the named variants (bench/variants.toml: Mosaic as the authors run it, each lever of
# the teacher on its own, the equal-compute rows).
VARIANTS = runnable()


def equal_compute_rounds(runs_dir: Path, variant: str, alpha: float, seed: int, rounds: int) -> dict | None:
    """How many rounds ``variant`` (an ``EQUAL_COMPUTE`` key) gets in cell (alpha, seed): the
    target's client work in its own plain rounds (``client_units``; at least ``rounds``).
    ``None`` while the target's run of this cell is missing."""
    _, target = EQUAL_COMPUTE[variant]
    f = runs_dir / variant_name(target, alpha, seed) / "metrics.json"
    if not cell_done(f.parent) or not f.is_file():
        return None
    rows = json.loads(f.read_text())
    units = client_units(rows)
    if units is None:
        return None
    return {"rounds": max(rounds, round(units)), "target": target, "target_units": round(units, 2),
            "target_client_seconds": round(sum(r.get("client-seconds", 0.0) for r in rows), 2)}


def refusal(rc: dict) -> str | None:
    """The ConfigError a run config meets before any training (e.g. FedBN on a model without
    BatchNorm), or None."""
    from mosaic_flwr.config import ConfigError, build_config

    try:
        build_config(rc)
    except ConfigError as e:
        return str(e)
    return None


def refused(out: Path) -> bool:
    return (out / "refused.json").is_file()


def shares_round1(variant: str) -> bool:
    """Whether a variant runs Mosaic's client round at the distillation round (generators,
    prototypes): those share one round 1 of client work; every other variant (FedAvg and
    the methods whose clients only train) is one whole in-process run, and so is a variant
    that distils at a later round (its own ``warmup-rounds``)."""
    from mosaic_flwr.registry import STRATEGIES
    from mosaic_flwr.distill.server import DistillStrategy

    method = STRATEGIES.get(VARIANTS[variant][0])
    cls = method.strategy if method else None
    return bool(cls and issubclass(cls, DistillStrategy) and cls.mosaic_message is not DistillStrategy.mosaic_message
                and VARIANTS[variant][1].get("warmup-rounds", CONTINUE["warmup-rounds"]) == CONTINUE["warmup-rounds"])


# Settings that change round 1's client work: variants that differ in them cannot share it.
ROUND1_KEYS = ("kd.local-steps", "kd.local-batch-size", "kd.local-momentum", "kd.local-weight-decay", "mosaic.proto-k",
               "mosaic.proto-min-records", "count-floor", "kd.expert-pass", "mosaic.generator", "mosaic.dcgan-width", "kd.local-lr")


OVERRIDES: dict = {}  # --set key=value: applied to every run last (smoke tests on tiny settings)
BASE: dict = {}       # --run-config files / strings (e.g. conf/cifar10-cpu.toml): the data set and models


def pretrain_config(alpha: float, seed: int, runs_dir: Path) -> dict:
    """Stage 1's run config: FedAvg at a constant rate for ``PRETRAIN_ROUNDS`` rounds (or
    ``--pretrain-rounds``), over ``--run-config``'s data set and models."""
    from mosaic_flwr.config import load_defaults

    return {**load_defaults(), **SHARED, **BASE, "strategy": "fedavg", "alpha": alpha, "seed": seed,
            "lr-schedule": "constant", "output-dir": str(runs_dir), "run-name": pretrain_name(alpha, seed),
            **{k: v for k, v in OVERRIDES.items() if k not in ("kd.steps", "pretrain-rounds")},
            "num-server-rounds": OVERRIDES.get("pretrain-rounds", PRETRAIN_ROUNDS)}


def resumable(rc: dict, out: Path) -> dict:
    """``rc`` writing a checkpoint after every round and, when an interrupted run of it left
    one in ``out``, going on from that round (``resume``: the run checks that the config is the
    checkpoint's, and its metrics continue the saved ones)."""
    return {**rc, "checkpoint": True, **({"resume": str(out)} if (out / "checkpoint.pt").is_file() else {})}


def pretrain(alpha: float, seed: int, runs_dir: Path, num_clients: int) -> None:
    name = pretrain_name(alpha, seed)
    if cell_done(runs_dir / name):
        return
    rc = resumable(pretrain_config(alpha, seed, runs_dir), runs_dir / name)
    print(f"[converged] pre-training FedAvg alpha={alpha:g} seed={seed}, {rc['num-server-rounds']} rounds"
          + (" (resumed)" if rc.get("resume") else ""), flush=True)
    s = run_inprocess(rc, num_clients, f"FedAvg pre-training (alpha={alpha:g}, seed {seed})")
    print(f"[converged]   final {s['final_accuracy']:.4f}, best {s['best_accuracy']:.4f}", flush=True)


def continue_group(alpha: float, seed: int, variants: list[str], runs_dir: Path, num_clients: int) -> None:
    """Every variant from the pre-trained checkpoint of (alpha, seed); the distilling ones
    from one shared round 1 of client work per setting of ``ROUND1_KEYS``."""

    from mosaic_flwr.config import load_defaults

    pre = runs_dir / pretrain_name(alpha, seed)
    if not cell_done(pre):
        print(f"[converged] {pre.name} not finished: run --stage pretrain first", flush=True)
        return
    todo = [v for v in variants
            if not cell_done(runs_dir / variant_name(v, alpha, seed)) and not refused(runs_dir / variant_name(v, alpha, seed))]
    keys = {round1_key(VARIANTS[v][1]) for v in variants if shares_round1(v)}
    missing = [k for k in keys if not oracle_file(runs_dir, alpha, seed, k).is_file()]
    if not todo and not missing:
        return

    def run_config(variant: str) -> dict:
        strategy, over = VARIANTS[variant]
        return {**load_defaults(), **SHARED, **CONTINUE, **BASE, "strategy": strategy, "alpha": alpha, "seed": seed,
                "init-from": str(pre), "output-dir": str(runs_dir),
                "run-name": variant_name(variant, alpha, seed), **over,
                **{k: v for k, v in OVERRIDES.items() if k != "pretrain-rounds"}}

    for v in list(todo):  # refused before any training (e.g. FedBN without BatchNorm): say why, once
        why = refusal(run_config(v))
        if why:
            write_refusal(runs_dir / variant_name(v, alpha, seed), v, why)
            print(f"[converged] alpha={alpha:g} seed={seed}: {v} refused: {why}", flush=True)
            todo.remove(v)
    if missing and not todo and not (pre / "checkpoint.pt").is_file():
        print(f"[converged] alpha={alpha:g} seed={seed}: every run is finished; the teacher-ceiling diagnostic "
              f"(oracle) is missing and {pre.name}'s checkpoint is gone, so it is left out", flush=True)
        return

    def note(out: Path, **extra) -> None:
        write_bench_note(out, driver="bench/converged.py (in-process)", **extra)

    def plain(variant: str) -> None:
        rc = resumable(run_config(variant), runs_dir / variant_name(variant, alpha, seed))
        print(f"[converged] alpha={alpha:g} seed={seed}: {variant}" + (" (resumed)" if rc.get("resume") else ""),
              flush=True)
        s = run_inprocess(rc, num_clients, f"{variant} from FedAvg (alpha={alpha:g}, seed {seed})")
        print(f"[converged]   {variant}: final {s['final_accuracy']:.4f} (validation "
              f"{s.get('final_val_accuracy', float('nan')):.4f})", flush=True)

    def group(key: tuple) -> None:
        distilling = [v for v in todo if shares_round1(v) and round1_key(VARIANTS[v][1]) == key]
        first = next(v for v in variants if shares_round1(v) and round1_key(VARIANTS[v][1]) == key)
        # Round 1 writes into a scratch run directory of its own, never into a variant's (a
        # finished variant's metrics would be overwritten by the shared round 0).
        base_rc = {**run_config(first), "run-name": oracle_file(runs_dir, alpha, seed, key).stem.replace("oracle", "round1")}
        replay_group(alpha, seed, distilling, base_rc, run_config, note, num_clients,
                     oracle_file(runs_dir, alpha, seed, key))

    def equal_compute(variant: str) -> bool:
        rounds = run_config(variant)["num-server-rounds"]
        eq = equal_compute_rounds(runs_dir, variant, alpha, seed, rounds)
        if eq is None:
            return False
        rc = resumable({**run_config(variant), "num-server-rounds": eq["rounds"]},
                       runs_dir / variant_name(variant, alpha, seed))
        print(f"[converged] alpha={alpha:g} seed={seed}: {variant}: {eq['rounds']} rounds: {eq['target']}'s clients "
              f"worked {eq['target_units']:.1f} plain rounds' time ({eq['target_client_seconds']:.0f} s)"
              + (" (resumed)" if rc.get("resume") else ""), flush=True)
        s = run_inprocess(rc, num_clients, f"{variant} from FedAvg, {eq['rounds']} rounds (alpha={alpha:g}, seed {seed})",
                          equal_compute=eq)
        print(f"[converged]   {variant}: final {s['final_accuracy']:.4f}", flush=True)
        return True

    # In the order asked (``variants``): a group of distilling variants at its first member's
    # place (they share its round 1), an equal-compute one as soon as its target has finished.
    groups_done, waiting = set(), []
    for v in todo:
        if v in EQUAL_COMPUTE:
            if not equal_compute(v):
                waiting.append(v)
        elif shares_round1(v):
            if (key := round1_key(VARIANTS[v][1])) not in groups_done:
                groups_done.add(key)
                group(key)
        else:
            plain(v)
        for w in list(waiting):  # its target may have just finished
            if equal_compute(w):
                waiting.remove(w)
    for key in missing:
        if key not in groups_done:
            group(key)  # round 1 for the oracle alone
    for w in waiting:
        print(f"[converged] alpha={alpha:g} seed={seed}: {w} waits for {' and '.join(EQUAL_COMPUTE[w])}"
              " of this cell (add them to --variants)", flush=True)


def round1_key(overrides: dict) -> tuple:
    return tuple((k, overrides.get(k)) for k in ROUND1_KEYS)


def oracle_file(runs_dir: Path, alpha: float, seed: int, key: tuple) -> Path:
    from mosaic_flwr.config import RENAMED

    old_name = {new: old for old, new in RENAMED.items()}  # the files' names keep the keys' old names
    tag = "".join(f"-{old_name.get(k, k)}{v}" for k, v in key if v is not None)
    return runs_dir / f"oracle-a{alpha:g}-s{seed}{tag}.json"


def oracle_teacher(strategy, items: list, seed: int) -> dict:
    """How far better meta-model data could lift the teacher at most: the class experts of
    round 1 and a meta model trained on REAL labelled images (half of the validation split,
    which no deployed server has), all scored on the other half. If even this teacher is
    not clearly above the student, the experts themselves limit Mosaic's teacher, not the
    generator samples or prototypes the meta model learns from. Diagnostic only."""
    import copy
    from collections import defaultdict

    import torch

    from mosaic_flwr.methods.mosaic.meta import MetaModel, train_meta
    from mosaic_flwr.distill.teachers import ConcatExperts, expert_logits
    from mosaic_flwr.core.task import Arch

    cfg, sc = strategy.cfg, strategy.sc
    decoded = defaultdict(list)
    for arch, reply in copy.deepcopy(items):
        decoded[arch.model].append(reply)  # a ClientModel
    received = copy.deepcopy(strategy.globals[strategy.primary])  # the model round 1's clients started from
    for family, group in decoded.items():
        strategy.update_experts(1, family, group)
    strategy.aggregate_states(1, {f: [(c.arch, c.state, c.weight) for c in g] for f, g in decoded.items()})
    experts, student = strategy.expert_mixture(), strategy.frozen(strategy.primary)
    x, y = sc.val_x, sc.val_y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    fit, score = perm[: len(y) // 2], perm[len(y) // 2:]
    z = expert_logits(ConcatExperts([experts, student]), x)  # [E + 1, N, C]: the student last

    def acc(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == y[score]).float().mean())

    out = {"student": acc(z[-1, score]), "ensemble": acc(z[:-1, score].mean(0)),
           # each image scored by the expert of its own (true) class: the experts' best case
           "own-class-expert": float((z[y[score], score].argmax(1) == y[score]).float().mean())
           if len(z) - 1 == int(y.max()) + 1 else None, "fit": len(fit), "scored": len(score)}
    def fit_meta(inputs: torch.Tensor, prior: str = "mean") -> MetaModel:
        meta = MetaModel(len(inputs), int(z.shape[2]), arch=cfg.of('mosaic').meta_arch, prior=prior)
        return train_meta(meta, inputs[:, fit].permute(1, 0, 2), y[fit], epochs=cfg.of('mosaic').meta_epochs, lr=cfg.of('mosaic').meta_lr,
                          ema_decay=cfg.of('mosaic').meta_ema, holdout_frac=cfg.of('mosaic').meta_holdout, patience=cfg.of('mosaic').meta_patience,
                          seed=cfg.seed)[0]

    for prior, inputs in (("experts", z[:-1]), ("global", z)):
        meta = fit_meta(inputs, "mean" if prior == "experts" else "last")
        with torch.no_grad():
            out[f"oracle-meta-{prior}"] = acc(meta(inputs[:, score].permute(1, 0, 2)))
    # What the meta model learns from against what it meets: a prototype is scored by each
    # expert's head on the features of the model the client RECEIVED (it computes its
    # prototypes before training), while the teacher runs each FULL expert on an image. On the
    # same real images: how often the two agree (argmax, per expert), the mean of the heads'
    # logits, and a meta model fitted on the heads' logits of real images (the best
    # prototypes could give it) but scored on the full experts. The same on the round's
    # AGGREGATED model's features (keys ``-aggregated``; ``mosaic.meta-experts='heads'`` runs the
    # teacher on those), which the rows before 2026-12-07 reported without the suffix.
    if hasattr(experts, "head_logits"):
        for suffix, backbone in (("", received), ("-aggregated", strategy.globals[strategy.primary])):
            model = copy.deepcopy(strategy.module(Arch(strategy.primary)))
            model.load_state_dict(backbone)
            model.eval()
            with torch.no_grad():
                feats = torch.cat([model.features(x[i:i + 512]) for i in range(0, len(x), 512)])
                heads = experts.head_logits(feats).permute(1, 0, 2).cpu()  # [E, N, C]
            full = z[:-1]
            out[f"head-vs-full-agreement{suffix}"] = float((heads.argmax(2) == full.argmax(2)).float().mean())
            out[f"head-mean{suffix}"] = acc(heads[:, score].mean(0))
            meta = fit_meta(heads)
            with torch.no_grad():
                out[f"oracle-meta-heads-on-heads{suffix}"] = acc(meta(heads[:, score].permute(1, 0, 2)))
                out[f"oracle-meta-heads-on-full{suffix}"] = acc(meta(full[:, score].permute(1, 0, 2)))
        out["backbones"] = "received (no suffix) and aggregated"
    return out


def replay_group(alpha: float, seed: int, distilling: list[str], base_rc: dict, run_config, note,
                 num_clients: int, oracle: Path | None = None) -> None:
    """Round 1 (the distillation round's client work) once, then each variant's server side
    and fine-tune rounds from it (``mosaic_flwr.testing.replay.Fork``); with ``oracle``, also
    write there what a teacher trained on real images would score (``oracle_teacher``)."""
    import torch

    from client_app.app import app as client_app
    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from mosaic_flwr.testing.replay import Fork
    from server_app.app import finish_run, setup

    grid = InProcessGrid(client_app, base_rc, num_clients)
    t0, load0 = time.perf_counter(), loadavg()
    # Round 1 as every variant of the group needs it: prototypes included (a variant whose
    # meta model reads none ignores them).
    meta_data = base_rc.get("mosaic.meta-data", "auto")
    sc = setup(grid, flower_context({**base_rc, "strategy": "mosaic",
                              "mosaic.meta-data": "auto" if meta_data in ("generated", "clients") else meta_data}))
    print(f"[converged] alpha={alpha:g} seed={seed}: round 1's client work (training, generators, "
          f"prototypes), once for {', '.join(distilling) or 'the oracle teacher'}", flush=True)
    # Every client model of round 1 kept (not streamed into running sums) for the oracle; each
    # variant collects its own copy of the replies (its bank, its sums).
    fork = Fork.at(MosaicStrategy(sc), 1, keep_models=True)
    shared_seconds = time.perf_counter() - t0
    if oracle is not None and not oracle.is_file():
        with torch.random.fork_rng():
            got = oracle_teacher(fork.strategy, fork.items, seed)
        oracle.write_text(json.dumps(got, indent=1) + "\n")
        print(f"[converged]   teacher trained on real images (diagnostic): {got}", flush=True)
    for variant in distilling:
        t1 = time.perf_counter()
        print(f"[converged]   {variant}: distillation after round 1, fine-tune rounds", flush=True)
        sv = setup(grid, flower_context(run_config(variant)))
        fork.run(sv)
        note(sv.results.out_dir, loadavg_before=load0, shared_seconds=round(shared_seconds, 2),
             variant_seconds=round(time.perf_counter() - t1, 2))
        s = finish_run(sv, shared_seconds + time.perf_counter() - t1, variant=variant,
                       title=f"{variant} from FedAvg (alpha={alpha:g}, seed {seed})")
        print(f"[converged]   {variant}: final {s['final_accuracy']:.4f} (validation "
              f"{s.get('final_val_accuracy', float('nan')):.4f})", flush=True)


def central(seed: int, runs_dir: Path, num_clients: int) -> None:
    cell = Cell("central", None, seed)
    if not cell_done(runs_dir / cell.name):
        rounds = OVERRIDES.get("pretrain-rounds", PRETRAIN_ROUNDS) + OVERRIDES.get(
            "num-server-rounds", BASE.get("num-server-rounds", CONTINUE_ROUNDS))
        values = {**SHARED, **BASE, **{k: v for k, v in OVERRIDES.items() if k != "pretrain-rounds"},
                  "num-server-rounds": rounds}
        run_central(cell, runs_dir, " ".join(f"{k}={json.dumps(v)}" for k, v in values.items()), num_clients)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["pretrain", "continue", "central"], default="pretrain")
    ap.add_argument("--name", default="converged")
    ap.add_argument("--runs-dir", help="default: $MOSAIC_FLWR_RUNS/NAME (~/.cache/mosaic-flwr/bench-runs/NAME)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--no-table", action="store_true", help="run, but write no table (bench/headline.py writes its own)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="run-config values applied to every run, last (smoke tests on tiny settings)")
    ap.add_argument("--pretrain-rounds", type=int, default=None, help=f"default {PRETRAIN_ROUNDS}")
    ap.add_argument("--run-config", action="append", default=[], metavar="FILE_OR_KEYS",
                    help="run-config files / 'key=value' strings for every run (e.g. conf/cifar10-cpu.toml: the "
                         "data set, models and continuation schedule); the grid's alpha and seed win")
    ap.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--num-clients", type=int, default=10)
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th (alpha, seed) starting at K")
    args = ap.parse_args(argv)
    OVERRIDES.clear()  # a fresh configuration per call (bench/headline.py calls main per data set)
    BASE.clear()
    if args.pretrain_rounds:
        OVERRIDES["pretrain-rounds"] = args.pretrain_rounds
    if args.set:
        from flwr.common.config import parse_config_args
        OVERRIDES.update(parse_config_args([" ".join(args.set)]))
    if args.run_config:
        from mosaic_flwr.config import PROJECT_ROOT, build_config, load_defaults, merge_run_config
        BASE.update(merge_run_config(args.run_config, cwd=PROJECT_ROOT))
        build_config({**load_defaults(), **BASE})  # a bad file stops here, before any run
    runs_dir = Path(args.runs_dir).resolve() if args.runs_dir else (RUNS / args.name).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    k, n = (int(v) for v in args.shard.split("/"))
    groups = [(a, s) for s in args.seeds for a in args.alphas]
    if not args.table_only:
        if args.stage == "central":
            for i, s in enumerate(args.seeds):
                if i % n == k:
                    central(s, runs_dir, args.num_clients)
        for i, (a, s) in enumerate(groups):
            if i % n != k:
                continue
            if args.stage == "pretrain":
                pretrain(a, s, runs_dir, args.num_clients)
            elif args.stage == "continue":
                continue_group(a, s, args.variants, runs_dir, args.num_clients)
    if args.table_only or (args.stage == "continue" and not args.no_table):
        print(report(runs_dir, args.alphas, args.seeds, args.variants, name=args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
