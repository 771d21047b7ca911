#!/usr/bin/env python3
"""Speed benchmark: prints a short table and saves it (bench/results/<name>.md and .json).

1. Framework overhead: the same FedAvg work (clients, rounds, local SGD steps, server
   evaluation every round) as a plain PyTorch loop calling mosaic_flwr.core.training
   and through the real Flower simulation (scripts/flwr_sim.py, clients one at a time in
   one Ray actor, like the loop); total wall time (SuperLink and Ray start included) and
   the steady-state round (median of rounds 2..R), and their ratios.
2. The distillation teacher: C cnn_small experts on one batch, as C separate modules in a
   Python loop, as StackedExperts' loop (functional_call per expert) and batched (vmap);
   images per second (each image through every expert), C = 10 and 100, CPU and CUDA when
   present.
3. Per-phase time of one default Mosaic run, in-process (the ClientApp and ServerApp of
   this project driven by mosaic_flwr.testing.inprocess.InProcessGrid, clients one at a time, one
   torch thread each as in simulation): client training, generator training, prototypes,
   class experts, meta model, distillation, evaluation, and communication (protobuf
   serialisation of every message both ways, what Flower does before sending); with the
   bytes each client uploads per round and once (generator).
4. Peak memory: the ServerApp process and one client process (Ray actor) of a real
   simulation of Mosaic with 10 clients (short schedule: the objects held are the same).

    .venv/bin/python bench/speed.py                  # everything (about 10-15 min on 2 busy cores)
    .venv/bin/python bench/speed.py --only teacher   # one section: overhead, teacher, phases, memory
    .venv/bin/python bench/speed.py --quick          # shorter settings for every section
    .venv/bin/python bench/speed.py --threads 1      # server-side work on one torch thread

A section run alone replaces only its own results; the table keeps the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench.common import (RESULTS, RUNS, loadavg, machine, machine_line,  # noqa: E402
                          payload_bytes, provenance, run_cell, write_results)

SECTIONS = ("overhead", "teacher", "phases", "memory")
SERVER_THREADS = torch.get_num_threads()  # what the ServerApp process gets by default


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- 1. overhead
def plain_fedavg(overrides: dict, num_clients: int) -> dict:
    """FedAvg as a plain loop: each round every client trains (train_local, one thread) from
    the global model, the server averages by example counts and evaluates on the test set."""
    from client_app.app import round_seed
    from mosaic_flwr.config import build_config
    from mosaic_flwr.distill.experts import weighted_average_states
    from mosaic_flwr.core.training import evaluate, train_local
    from mosaic_flwr.core.task import client_data, initial_model, make_model, test_data

    t0 = time.perf_counter()
    cfg = build_config(overrides)
    data = [client_data(cfg, i, num_clients) for i in range(num_clients)]
    test_x, test_y = test_data(cfg)
    model = initial_model(cfg)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    setup = time.perf_counter() - t0
    rounds, accuracy = [], 0.0
    for r in range(1, cfg.num_server_rounds + 1):
        t = time.perf_counter()
        states, weights = [], []
        torch.set_num_threads(cfg.client_threads)
        for pid, (x, y) in enumerate(data):
            local = make_model(cfg)
            local.load_state_dict(global_state)
            train_local(local, x, y, steps=cfg.local_steps, epochs=cfg.local_epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, seed=round_seed(cfg, r, pid))
            states.append(local.state_dict())
            weights.append(len(y))
        torch.set_num_threads(SERVER_THREADS)
        global_state = weighted_average_states(states, weights)
        model.load_state_dict(global_state)
        accuracy = evaluate(model, test_x, test_y, batch_size=cfg.eval_batch_size)["accuracy"]
        rounds.append(time.perf_counter() - t)
    return {"setup_seconds": setup, "round_seconds": rounds, "total_seconds": time.perf_counter() - t0,
            "final_accuracy": accuracy}


def overhead(args) -> dict:
    from flwr.common.config import parse_config_args

    n, rounds, steps = args.clients, args.rounds, args.steps
    rc = f"alpha=0.1 seed=42 num-server-rounds={rounds} local-steps={steps}"
    runs_dir = RUNS / "speed"
    shutil.rmtree(runs_dir / "overhead-fedavg", ignore_errors=True)  # a measurement: always fresh
    load0 = loadavg()
    sim = run_cell(runs_dir, "overhead-fedavg", "fedavg", rc, num_supernodes=n,
                   cpus_per_client=args.cpus_per_client, tag="speed")
    if sim is None:
        raise RuntimeError("the Flower simulation of the overhead benchmark failed")
    load1 = loadavg()
    sim_rounds = [r["seconds"] for r in json.loads((runs_dir / "overhead-fedavg" / "metrics.json").read_text())
                  if r["round"] >= 1]
    plain = plain_fedavg({**parse_config_args([rc]), "strategy": "fedavg"}, n)
    load2 = loadavg()
    steady_sim = statistics.median(sim_rounds[1:] or sim_rounds)
    steady_plain = statistics.median(plain["round_seconds"][1:] or plain["round_seconds"])
    return {"clients": n, "rounds": rounds, "local_steps": steps, "cpus_per_client": args.cpus_per_client,
            "flower_launcher_seconds": sim["bench"]["launcher_seconds"],
            "flower_serverapp_seconds": sim["wall_seconds"], "flower_round_seconds": sim_rounds,
            "flower_final_accuracy": sim["final_accuracy"],
            "plain": plain, "steady_flower": steady_sim, "steady_plain": steady_plain,
            "ratio_total": sim["bench"]["launcher_seconds"] / plain["total_seconds"],
            "ratio_serverapp": sim["wall_seconds"] / plain["total_seconds"],
            "ratio_steady": steady_sim / steady_plain,
            "loadavg": {"before_flower": load0, "after_flower": load1, "after_plain": load2},
            "command": sim["bench"]["command"]}


def overhead_lines(o: dict) -> list[str]:
    p = o["plain"]
    return [f"## 1. Framework overhead (FedAvg, {o['clients']} clients, {o['rounds']} rounds x "
            f"{o['local_steps']} local steps, evaluation every round)", "",
            f"Flower: real simulation, `--cpus-per-client {o['cpus_per_client']}` (clients one "
            "at a time, as in the loop); the loop trains at the ClientApp's thread count and "
            "evaluates at the ServerApp's. Load average before/after Flower, after the loop: "
            f"{o['loadavg']['before_flower']} / {o['loadavg']['after_flower']} / {o['loadavg']['after_plain']}.", "",
            "| | plain PyTorch loop | Flower simulation | Flower / plain |", "|---|---|---|---|",
            f"| total wall, s (Flower: SuperLink + Ray start/stop included) | {p['total_seconds']:.1f} | "
            f"{o['flower_launcher_seconds']:.1f} | {o['ratio_total']:.2f} |",
            f"| ServerApp wall, s (Flower: Ray/SuperLink start excluded) | {p['total_seconds']:.1f} | "
            f"{o['flower_serverapp_seconds']:.1f} | {o['ratio_serverapp']:.2f} |",
            f"| steady-state round, s (median of rounds 2..R) | {o['steady_plain']:.2f} | "
            f"{o['steady_flower']:.2f} | {o['ratio_steady']:.2f} |",
            f"| fixed cost, s (total wall - R x steady round: start-up, discovery, data loading) | "
            f"{p['total_seconds'] - o['rounds'] * o['steady_plain']:.1f} | "
            f"{o['flower_launcher_seconds'] - o['rounds'] * o['steady_flower']:.1f} | |",
            f"| final accuracy | {p['final_accuracy']:.4f} | {o['flower_final_accuracy']:.4f} | |", ""]


# ----------------------------------------------------------------------------- 2. teacher
def _time_calls(fn, device: torch.device, min_seconds: float, max_calls: int = 50) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    calls, t0 = 0, time.perf_counter()
    while calls < max_calls and (calls < 2 or time.perf_counter() - t0 < min_seconds):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        calls += 1
    return (time.perf_counter() - t0) / calls


def teacher_row(cfg, device: torch.device, num: int, args) -> dict:
    """Images/s of ``num`` cnn_small experts with distinct weights, three ways."""
    from mosaic_flwr.distill.experts import StackedExperts
    from mosaic_flwr.core.task import make_model

    modules = []
    for e in range(num):
        torch.manual_seed(e)
        modules.append(make_model(cfg).to(device).eval())
    stacked = StackedExperts(modules[0], [m.state_dict() for m in modules], device=device)
    x = torch.randn(args.teacher_batch, 1, 28, 28, device=device)

    @torch.no_grad()
    def per_module():
        return torch.stack([m(x) for m in modules])

    ref = per_module()
    methods = {"modules-loop": per_module,
               "stacked-loop": lambda: stacked.logits(x, loop=True),
               "stacked-vmap": lambda: stacked.logits(x, loop=False)}
    row = {"device": device.type, "experts": num, "batch": args.teacher_batch, "loadavg": loadavg()}
    for name, fn in methods.items():
        err = (fn() - ref).abs().max().item()
        secs = _time_calls(fn, device, args.teacher_seconds)
        row[name] = {"images_per_s": args.teacher_batch / secs, "max_abs_diff": err}
    row["vmap_vs_modules"] = row["stacked-vmap"]["images_per_s"] / row["modules-loop"]["images_per_s"]
    return row


def teacher(args) -> dict:
    from mosaic_flwr.config import build_config

    torch.set_num_threads(SERVER_THREADS)
    cfg = build_config({})
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for num in args.experts:
            rows.append(teacher_row(cfg, device, num, args))
            print(f"[speed] teacher {rows[-1]}", flush=True)
    return {"rows": rows}


def teacher_lines(t: dict) -> list[str]:
    rows = t["rows"]
    lines = ["## 2. Distillation teacher: every expert's logits for a batch", "",
             "Images per second (an image counts once however many experts it goes through); "
             "cnn_small experts with distinct weights, batch "
             f"{rows[0]['batch'] if rows else '?'}, eval mode, no gradients. `stacked-loop` is "
             "what `StackedExperts.logits` does by default on CPU, `stacked-vmap` its default on CUDA.",
             "", "| device | experts C | modules loop | stacked loop | stacked vmap | vmap / modules | load avg |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['experts']} | {r['modules-loop']['images_per_s']:.0f} | "
                     f"{r['stacked-loop']['images_per_s']:.0f} | {r['stacked-vmap']['images_per_s']:.0f} | "
                     f"{r['vmap_vs_modules']:.2f} | {r['loadavg']} |")
    if not any(r["device"] == "cuda" for r in rows):
        lines.append("\nNo CUDA device on this machine: GPU rows not measured.")
    return lines + [""]


# ----------------------------------------------------------------------------- 3. phases
class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn, name: str):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed


@contextmanager
def patched(targets: list[tuple[object, str, str]], timers: Timers):
    """Temporarily wrap ``getattr(owner, attr)`` with a timer named ``name``."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    try:
        for owner, attr, name in targets:
            setattr(owner, attr, timers.wrap(getattr(owner, attr), name))
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def serde_seconds(content) -> tuple[float, int]:
    """Seconds to serialise a RecordDict as Flower does (protobuf) and read it back, and its size."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    t0 = time.perf_counter()
    data = recorddict_to_proto(content).SerializeToString()
    proto = RecordDictProto()
    proto.ParseFromString(data)
    recorddict_from_proto(proto)
    return time.perf_counter() - t0, len(data)


class InstrumentedClientApp:
    """Calls the ClientApp and records, per message: round, type, handler seconds, the
    serialisation time and bytes of the message and of the reply, and the reply's metrics.
    Restores the server's torch thread count after each call (the ClientApp sets its own)."""

    def __init__(self, app):
        self.app, self.calls = app, []

    def __call__(self, msg, context):
        config = msg.content.config_records.get("config")
        server_round = int(config.get("server-round", 0)) if config else 0
        down_s, down_wire = serde_seconds(msg.content)
        t0 = time.perf_counter()
        reply = self.app(msg, context)
        seconds = time.perf_counter() - t0
        torch.set_num_threads(SERVER_THREADS)
        up_s, up_wire = serde_seconds(reply.content)
        metrics = reply.content.metric_records.get("metrics")
        self.calls.append({"round": server_round, "type": msg.metadata.message_type,
                           "node": context.node_id, "seconds": seconds, "serde_seconds": down_s + up_s,
                           "down": payload_bytes(msg.content)["total"], "down_wire": down_wire,
                           "up": payload_bytes(reply.content), "up_wire": up_wire,
                           "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, float)}})
        return reply


def phases(args) -> dict:
    import resource
    import tempfile

    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    import client_app.app as capp
    import mosaic_flwr.methods.mosaic.client as mclient
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from mosaic_flwr.core.fedavg import FedAvgStrategy
    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy
    from server_app.app import main as server_main

    overrides = parse_config_args([args.phase_config]) if args.phase_config.strip() else {}
    timers = Timers()
    app = InstrumentedClientApp(capp.app)
    targets = [(capp, "train_local", "client-train"), (mclient, "train_local", "client-train"),
               (FedAvgStrategy, "collect", "server-collect"),
               (MosaicStrategy, "apply_round", "server-apply"),
               (MosaicStrategy, "update_experts", "server-experts"),
               (MosaicStrategy, "distillation", "server-distillation"),
               (FedAvgStrategy, "evaluate_all", "server-evaluate"),
               (FedAvgStrategy, "checkpoint", "server-checkpoint")]
    missing = [f"{o.__name__}.{a}" for o, a, _ in targets if a not in vars(o)]
    if missing:  # the strategy code moved on: time what is still there, say what is not
        print(f"[speed] phases: not timed (no such method any more): {missing}", flush=True)
        targets = [t for t in targets if t[1] in vars(t[0])]
    torch.set_num_threads(SERVER_THREADS)
    load0 = loadavg()
    with tempfile.TemporaryDirectory() as out, patched(targets, timers):
        run_config = {**load_defaults(), "strategy": "mosaic", **overrides, "output-dir": out,
                      "run-name": "phases"}
        grid = InProcessGrid(app, run_config, args.clients)
        t0 = time.perf_counter()
        server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                  run_config=run_config))
        wall = time.perf_counter() - t0
        summary = json.loads((Path(out) / "phases" / "summary.json").read_text())
    calls, d = app.calls, summary.get("distillation", {})
    train_calls = [c for c in calls if c["type"] != "query"]
    handler = sum(c["seconds"] for c in train_calls)
    client_train = timers.seconds["client-train"]
    proto = sum(c["metrics"].get("proto-seconds", 0.0) for c in calls)
    gen = sum(c["metrics"].get("gen-seconds", 0.0) for c in calls)
    distill = timers.seconds["server-distillation"]
    meta, kd = d.get("meta-seconds", 0.0), d.get("kd-seconds", 0.0)
    experts = timers.seconds["server-experts"]
    aggregate = timers.seconds["server-apply"] - distill - experts
    serde = sum(c["serde_seconds"] for c in calls)
    rows = [("client: local training (train_local)", "clients", client_train),
            ("client: generator training (once)", "clients", gen),
            ("client: prototypes (once)", "clients", proto),
            ("client: other (data, model build, encoding)", "clients", handler - client_train - gen - proto),
            ("server: reply validation and decoding", "server", timers.seconds["server-collect"]),
            ("server: aggregation (averaging)", "server", aggregate),
            ("server: class experts", "server", experts),
            ("server: meta model", "server", meta),
            ("server: distillation (KD steps)", "server", kd),
            ("server: distillation, rest (test-set scoring of experts/teacher/student for the "
             "report, generators, sample grid)", "server", distill - meta - kd),
            ("server: evaluation (test set, every round)", "server", timers.seconds["server-evaluate"]),
            ("server: checkpoints (every round)", "server", timers.seconds["server-checkpoint"]),
            ("communication: protobuf serialise + parse, both directions", "both", serde)]
    accounted = sum(r[2] for r in rows)
    rows.append(("rest (discovery, results files, in-process copies)", "", wall - accounted))
    uploads = defaultdict(list)
    for c in train_calls:
        phase = ("distill" if c["metrics"].get("gen-seconds") is not None else
                 "warm-up" if c["type"] == "train.mosaic" else "fine-tune")
        uploads[phase].append(c)
    bytes_rows = {}
    for phase, cs in uploads.items():
        c = cs[0]
        bytes_rows[phase] = {"records": c["up"], "wire": c["up_wire"], "down": c["down"],
                             "down_wire": c["down_wire"],
                             "rounds": sorted({x["round"] for x in cs}), "clients": len({x["node"] for x in cs})}
    return {"clients": args.clients, "config": args.phase_config or "(defaults)", "wall_seconds": wall,
            "rows": [{"phase": p, "where": w, "seconds": s} for p, w, s in rows],
            "bytes": bytes_rows, "distillation": d, "final_accuracy": summary["final_accuracy"],
            "final_val_accuracy": summary.get("final_val_accuracy"),
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg": {"before": load0, "after": loadavg()}}


def _accuracy_line(p: dict) -> str:
    d, val = p.get("distillation", {}), p.get("final_val_accuracy")
    line = f"final accuracy {p['final_accuracy']:.4f}"
    if val is not None:
        line += (f", final validation accuracy {val:.4f} (distillation report: gen-fidelity-mean "
                 f"{d.get('gen-fidelity-mean', float('nan')):.3f}, val-teacher {d.get('val-teacher', float('nan')):.4f}, "
                 f"val-after-distill {d.get('val-after-distill', float('nan')):.4f})")
    return line


def phases_lines(p: dict) -> list[str]:
    """Section 3; with ``p["previous"]`` (the phases result this run replaced, same config)
    a column with the previous run's seconds beside this run's."""
    prev = p.get("previous")
    lines = [f"## 3. Per-phase time of one Mosaic run ({p['clients']} clients, config "
             f"`{p['config']}`, in-process)", "",
             f"Wall {p['wall_seconds']:.1f} s, {_accuracy_line(p)}; load average "
             f"before/after {p['loadavg']['before']} / {p['loadavg']['after']}. Clients ran one at a "
             "time (one torch thread each, as in simulation), so client seconds are the sum over "
             "clients; in simulation two run at once on 2 cores.", ""]
    if prev:
        pp = prev["provenance"]
        lines += [f"Previous run (column `before`): commit `{pp['commit']}`"
                  + (" (uncommitted changes)" if pp["dirty"] else "") + f", measured {pp['date']}, "
                  f"wall {prev['wall_seconds']:.1f} s, {_accuracy_line(prev)}; load average "
                  f"{prev['loadavg']['before']} / {prev['loadavg']['after']}; command: `{pp['command']}`.", "",
                  "| phase | before, s | seconds | share |", "|---|---|---|---|"]
        before = {r["phase"]: r["seconds"] for r in prev["rows"]}
        for r in p["rows"]:
            b = f"{before[r['phase']]:.1f}" if r["phase"] in before else "-"
            lines.append(f"| {r['phase']} | {b} | {r['seconds']:.1f} | "
                         f"{100 * r['seconds'] / p['wall_seconds']:.1f}% |")
    else:
        lines += ["| phase | seconds | share |", "|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['phase']} | {r['seconds']:.1f} | {100 * r['seconds'] / p['wall_seconds']:.1f}% |")
    lines += ["", "Bytes per client per round (tensors' nbytes per record; `wire`: the serialised "
              "protobuf Flower sends):", "",
              "| round kind (rounds) | upload: records | upload total | upload wire | download wire |",
              "|---|---|---|---|---|"]
    for phase, b in p["bytes"].items():
        recs = ", ".join(f"{k} {mib(v)}" for k, v in b["records"].items() if k != "total")
        lines.append(f"| {phase} ({', '.join(map(str, b['rounds']))}) | {recs} | {mib(b['records']['total'])} | "
                     f"{mib(b['wire'])} | {mib(b['down_wire'])} |")
    return lines + [""]


# ----------------------------------------------------------------------------- 4. memory
def memory(args) -> dict:
    runs_dir = RUNS / "speed"
    shutil.rmtree(runs_dir / "memory-mosaic", ignore_errors=True)
    rc = args.memory_config
    s = run_cell(runs_dir, "memory-mosaic", "mosaic", rc, num_supernodes=10, monitor=True, tag="speed")
    if s is None:
        raise RuntimeError("the Mosaic simulation of the memory benchmark failed")
    return {"config": rc, "memory": s["bench"]["memory"], "loadavg": [s["bench"]["loadavg_before"],
            s["bench"]["loadavg_after"]], "command": s["bench"]["command"]}


def memory_lines(m: dict) -> list[str]:
    mem = m["memory"]

    def peak(role):
        return f"{mem[role]['peak_mib']:.0f} MiB" if role in mem else "-"

    return ["## 4. Peak memory (real simulation, Mosaic, 10 clients)", "",
            f"Run config `{m['config']}` (a short schedule: the server holds the same objects as "
            f"in a default run); load average before/after {m['loadavg'][0]} / {m['loadavg'][1]}.", "",
            "| process | peak RSS (VmHWM) |", "|---|---|",
            f"| server: flwr-simulation (ServerApp, and Ray's driver) | {peak('server')} |",
            f"| one client: a Ray ClientAppActor (runs clients one after another) | {peak('client')} |",
            f"| SuperLink (+ SuperExec) | {peak('superlink')} |",
            f"| Ray's own processes (largest) | {peak('ray')} |", ""]


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    global SERVER_THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS),
                    help="sections to run (the others keep their last results); none: only "
                         "rewrite the table")
    ap.add_argument("--quick", action="store_true", help="shorter settings for every section")
    ap.add_argument("--name", default="speed", help="results name (bench/results/<name>.md)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="overhead: rounds")
    ap.add_argument("--steps", type=int, default=50, help="overhead: local steps per round")
    ap.add_argument("--cpus-per-client", type=int, default=2,
                    help="overhead: Ray CPUs per client (2 on 2 cores: one client at a time)")
    ap.add_argument("--experts", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--teacher-batch", type=int, default=256)
    ap.add_argument("--teacher-seconds", type=float, default=3.0, help="teacher: time per measurement")
    ap.add_argument("--phase-config", default="", help="phases: run-config overrides (default: none)")
    ap.add_argument("--threads", type=int, default=SERVER_THREADS,
                    help="torch threads of server-side work (default: torch's default, as the "
                         "ServerApp process gets)")
    ap.add_argument("--keep-previous", action="store_true",
                    help="phases: show the replaced phases result (same config) in a 'before' column")
    ap.add_argument("--memory-config", default="num-server-rounds=2 warmup-rounds=1 local-steps=10 "
                    "mosaic.gen-steps=20 kd.steps=20 mosaic.meta-epochs=20", help="memory: run-config overrides")
    args = ap.parse_args(argv)
    SERVER_THREADS = args.threads
    if args.quick:
        args.rounds, args.steps, args.teacher_seconds = 3, 20, 1.0
        args.phase_config = args.phase_config or ("num-server-rounds=3 warmup-rounds=2 local-steps=20 "
                                                  "mosaic.gen-steps=60 kd.steps=30 mosaic.meta-epochs=40")
    # Sections may be (re)run one at a time: the others are kept from the last results.
    path = RESULTS / f"{args.name}.json"
    sections = json.loads(path.read_text()).get("sections", {}) if path.is_file() else {}
    body = []
    for section, run, render in (("overhead", overhead, overhead_lines), ("teacher", teacher, teacher_lines),
                                 ("phases", phases, phases_lines), ("memory", memory, memory_lines)):
        if section in args.only:
            print(f"[speed] {section} ...", flush=True)
            prov = {**provenance(), "server_threads": SERVER_THREADS}
            result = {**run(args), "provenance": {**prov, "loadavg_end": loadavg()}}
            old = sections.get(section)
            if section == "phases" and args.keep_previous and old and old.get("config") == result["config"]:
                result["previous"] = {k: v for k, v in old.items() if k != "previous"}
            sections[section] = result
        if section in sections:
            prov = sections[section]["provenance"]
            body += render(sections[section])
            body += [f"_Measured {prov['date']} at commit `{prov['commit']}`"
                     + (" (uncommitted changes)" if prov["dirty"] else "")
                     + f", server-side torch threads {prov['server_threads']}, load average "
                     f"{prov['loadavg']} -> {prov['loadavg_end']}; command: `{prov['command']}`_", ""]
    m = machine()
    md = "\n".join(["# Speed benchmark", "", f"Machine: {machine_line(m)}. Each section says when, at "
                    "which commit and under which load it was measured (the cores are shared: "
                    "figures are noisy).", ""] + body) + "\n"
    print(md)
    write_results(args.name, md, {"machine": m, "sections": sections})
    return 0

if __name__ == "__main__":
    sys.exit(main())
