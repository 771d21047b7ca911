#!/usr/bin/env python3
"""The measurement studies of ``bench/run.py``: a spec whose ``driver`` is one of ``STUDIES`` is
run here, its parameters the spec's keys (each study's defaults below; an unknown key or a wrong
type is one line, exit 2, before any run), its results ``bench/results/<name>.md`` and ``.json``
(name: the spec's ``name``, else its file's stem). Runs live under ``<runs-root>/<name>/``.

    .venv/bin/python bench/run.py bench/studies/speed.toml --set sections=teacher   # KEY=VALUE: TOML, else text;
    .venv/bin/python bench/run.py bench/studies/scaling.toml --set clients=10,50    # a list key takes a,b,c
    .venv/bin/python bench/run.py bench/studies/privacy-dp.toml --table-only        # the table of the runs kept
    .venv/bin/python bench/run.py bench/studies/attack.toml --results-dir /tmp/r    # results elsewhere

Studies (what each measures: its spec in bench/studies/): ``speed`` (framework overhead, the
distillation teacher, per-phase time and bytes of a Mosaic run, peak memory), ``scaling`` (time and
memory with the number of clients), ``privacy-dp`` (accuracy at each DP level), ``privacy-audit``
(the audit of what clients upload), ``attack`` (a client that lies about its counts).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench.report import row, table  # noqa: E402
from bench.common import (RUNS, SpecError, flower_context, git_commit, git_dirty, header_lines,  # noqa: E402
                          loadavg, machine, machine_line, payload_bytes, provenance, run_cell, run_inprocess)

STUDIES: dict[str, tuple[dict, object]] = {}  # driver -> (its spec keys with their defaults, its function)


def study(driver: str, **defaults):
    """Register ``fn(spec, runs_dir, table_only, prov) -> (markdown, data, exit code)`` as ``driver``;
    ``defaults`` (Python names, ``_`` for the spec's ``-``) are its spec keys."""
    def register(fn):
        STUDIES[driver] = ({k.replace("_", "-"): v for k, v in defaults.items()}, fn)
        return fn
    return register


def driver_of(path: str | Path) -> str | None:
    """The measurement driver of the spec at ``path``; ``None`` for any other spec (or no spec)."""
    try:
        driver = tomllib.loads(Path(path).read_text()).get("driver")
    except (OSError, ValueError):
        return None
    return driver if driver in STUDIES else None


def _set_value(default, text: str):
    """A ``--set`` value: TOML (a bare word as text), the text itself for a text key, and for a list
    key its comma-separated items (``clients=10,50``, ``sections=teacher``)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if isinstance(default, list) and not isinstance(value, list):
        return [_set_value(default[0] if default else None, item) for item in text.split(",")]
    return text if isinstance(default, str) and not isinstance(value, str) else value


def _typed(value, default):
    """``value`` as of ``default``'s type (an int for a float, each item of a list), else ``None``."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, list) and isinstance(value, list) and default:
        value = [_typed(v, default[0]) for v in value]
        return None if None in value else value
    return value if type(value) is type(default) else None


def load_spec(path: str | Path, sets: list[str] = ()) -> dict:
    """The spec with its defaults, ``sets`` (``KEY=VALUE``) after its own values; a ``SpecError``
    names an unknown key or a value of the wrong type."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    defaults = STUDIES[raw["driver"]][0]
    for item in sets:
        key, _, text = item.partition("=")
        raw[key] = _set_value(defaults.get(key, ""), text)
    if unknown := sorted(set(raw) - {"driver", "name", *defaults}):
        raise SpecError(f"{path}: unknown key(s) {', '.join(unknown)} "
                        f"(a {raw['driver']} spec knows name, {', '.join(defaults)})")
    spec = {**defaults, "name": path.stem, **raw}
    for key, default in defaults.items():
        if (value := _typed(spec[key], default)) is None:
            raise SpecError(f"{path}: {key} = {spec[key]!r}: expected {type(default).__name__} like its default "
                            f"{default!r}")
        spec[key] = value
    return spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a measurement spec, e.g. bench/studies/speed.toml")
    ap.add_argument("--runs-root", default=str(RUNS), help="runs go to RUNS_ROOT/<name>/ (outside the repository)")
    ap.add_argument("--results-dir", help="write <name>.md and .json here instead of bench/results")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table from the runs kept")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="spec values instead of the spec's")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.study, args.set)
    except SpecError as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        return 2
    results, fn = common.RESULTS, STUDIES[spec["driver"]][1]
    common.RESULTS = Path(args.results_dir).resolve() if args.results_dir else results
    try:
        md, data, code = fn(spec, Path(args.runs_root).resolve() / spec["name"], args.table_only, provenance())
        print(md)
        print(common.write_results(spec["name"], md, data))
    finally:
        common.RESULTS = results
    return code


def _fmt(v, fmt="{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def _parse(run_config: str) -> dict:
    from flwr.common.config import parse_config_args

    return parse_config_args([run_config]) if run_config.strip() else {}


def _run_server(app, rc: dict, clients: int) -> float:
    """``rc`` (a whole run config) with the real ServerApp on an in-process grid of ``app``; wall seconds."""
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from server_app.app import main as server_main

    t0 = time.perf_counter()
    server_main(InProcessGrid(app, rc, clients), flower_context(rc))
    return time.perf_counter() - t0


# ============================================================================= speed
# The short schedule of the memory section and of scaling: the server holds what a default run's does.
SHORT = ("num-server-rounds=2 warmup-rounds=1 local-steps=10 mosaic.gen-steps=20 kd.steps=20 "
         "mosaic.meta-epochs=20")
THREADS = 0  # torch threads of the server-side work (speed: the spec's threads, else torch's default)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def plain_fedavg(overrides: dict, num_clients: int) -> dict:
    """FedAvg as a plain loop: each round every client trains (train_local, one thread) from
    the global model, the server averages by example counts and evaluates on the test set."""
    import torch

    from client_app.app import round_seed
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.task import client_data, initial_model, make_model, test_data
    from mosaic_flwr.core.training import evaluate, train_local
    from mosaic_flwr.distill.experts import weighted_average_states

    t0 = time.perf_counter()
    cfg = build_config(overrides)
    data = [client_data(cfg, i, num_clients) for i in range(num_clients)]
    test_x, test_y = test_data(cfg)
    model = initial_model(cfg)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    setup, rounds, accuracy = time.perf_counter() - t0, [], 0.0
    for r in range(1, cfg.num_server_rounds + 1):
        t = time.perf_counter()
        states, weights = [], []
        torch.set_num_threads(cfg.client_threads)
        for pid, (x, y) in enumerate(data):
            local = make_model(cfg)
            local.load_state_dict(global_state)
            train_local(local, x, y, steps=cfg.local_steps, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=round_seed(cfg, r, pid))
            states.append(local.state_dict())
            weights.append(len(y))
        torch.set_num_threads(THREADS)
        global_state = weighted_average_states(states, weights)
        model.load_state_dict(global_state)
        accuracy = evaluate(model, test_x, test_y, batch_size=cfg.eval_batch_size)["accuracy"]
        rounds.append(time.perf_counter() - t)
    return {"setup_seconds": setup, "round_seconds": rounds, "total_seconds": time.perf_counter() - t0,
            "final_accuracy": accuracy}


def overhead(s: dict, runs_dir: Path) -> dict:
    n, rounds, steps = s["clients"], s["rounds"], s["steps"]
    rc = f"alpha=0.1 seed=42 num-server-rounds={rounds} local-steps={steps}"
    shutil.rmtree(runs_dir / "overhead-fedavg", ignore_errors=True)  # a measurement: always fresh
    load0 = loadavg()
    sim = run_cell(runs_dir, "overhead-fedavg", "fedavg", rc, num_supernodes=n,
                   cpus_per_client=s["cpus-per-client"], tag="speed")
    if sim is None:
        raise RuntimeError("the Flower simulation of the overhead benchmark failed")
    load1 = loadavg()
    sim_rounds = [r["seconds"] for r in json.loads((runs_dir / "overhead-fedavg" / "metrics.json").read_text())
                  if r["round"] >= 1]
    plain = plain_fedavg({**_parse(rc), "strategy": "fedavg"}, n)
    steady_sim = statistics.median(sim_rounds[1:] or sim_rounds)
    steady_plain = statistics.median(plain["round_seconds"][1:] or plain["round_seconds"])
    launcher, serverapp = sim["bench"]["launcher_seconds"], sim["wall_seconds"]
    return {"clients": n, "rounds": rounds, "local_steps": steps, "cpus_per_client": s["cpus-per-client"],
            "flower_launcher_seconds": launcher, "flower_serverapp_seconds": serverapp,
            "flower_round_seconds": sim_rounds, "flower_final_accuracy": sim["final_accuracy"],
            "plain": plain, "steady_flower": steady_sim, "steady_plain": steady_plain,
            "ratio_total": launcher / plain["total_seconds"], "ratio_serverapp": serverapp / plain["total_seconds"],
            "ratio_steady": steady_sim / steady_plain,
            "loadavg": {"before_flower": load0, "after_flower": load1, "after_plain": loadavg()},
            "command": sim["bench"]["command"]}


def overhead_lines(o: dict) -> list[str]:
    p, load, r = o["plain"], o["loadavg"], o["rounds"]
    return [f"## 1. Framework overhead (FedAvg, {o['clients']} clients, {r} rounds x {o['local_steps']} local "
            "steps, evaluation every round)", "", f"Flower: real simulation, `--cpus-per-client {o['cpus_per_client']}` "
            "(clients one at a time, as in the loop); the loop trains at the ClientApp's thread count and evaluates "
            f"at the ServerApp's. Load average before/after Flower, after the loop: {load['before_flower']} / "
            f"{load['after_flower']} / {load['after_plain']}.", "",
            *table("", ["plain PyTorch loop", "Flower simulation", "Flower / plain"], [
                row("total wall, s (Flower: SuperLink + Ray start/stop included)", [
                    f"{p['total_seconds']:.1f}", f"{o['flower_launcher_seconds']:.1f}", f"{o['ratio_total']:.2f}"]),
                row("ServerApp wall, s (Flower: Ray/SuperLink start excluded)", [
                    f"{p['total_seconds']:.1f}", f"{o['flower_serverapp_seconds']:.1f}", f"{o['ratio_serverapp']:.2f}"]),
                row("steady-state round, s (median of rounds 2..R)", [
                    f"{o['steady_plain']:.2f}", f"{o['steady_flower']:.2f}", f"{o['ratio_steady']:.2f}"]),
                row("fixed cost, s (total wall - R x steady round: start-up, discovery, data loading)", [
                    f"{p['total_seconds'] - r * o['steady_plain']:.1f}",
                    f"{o['flower_launcher_seconds'] - r * o['steady_flower']:.1f}", ""]),
                row("final accuracy", [f"{p['final_accuracy']:.4f}", f"{o['flower_final_accuracy']:.4f}", ""])]), ""]


def _time_calls(fn, device, min_seconds: float, max_calls: int = 50) -> float:
    """Seconds per call (after one warm-up call)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < max_calls and (calls < 2 or time.perf_counter() - t0 < min_seconds):
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - t0) / calls


def teacher_row(cfg, device, num: int, s: dict) -> dict:
    """Images/s of ``num`` cnn_small experts with distinct weights, three ways."""
    import torch

    from mosaic_flwr.core.task import make_model
    from mosaic_flwr.distill.experts import StackedExperts

    modules = []
    for e in range(num):
        torch.manual_seed(e)
        modules.append(make_model(cfg).to(device).eval())
    stacked = StackedExperts(modules[0], [m.state_dict() for m in modules], device=device)
    batch = s["teacher-batch"]
    x = torch.randn(batch, 1, 28, 28, device=device)

    @torch.no_grad()
    def per_module():
        return torch.stack([m(x) for m in modules])

    ref = per_module()
    row = {"device": device.type, "experts": num, "batch": batch, "loadavg": loadavg()}
    for name, fn in {"modules-loop": per_module, "stacked-loop": lambda: stacked.logits(x, loop=True),
                     "stacked-vmap": lambda: stacked.logits(x, loop=False)}.items():
        err = (fn() - ref).abs().max().item()
        row[name] = {"images_per_s": batch / _time_calls(fn, device, s["teacher-seconds"]), "max_abs_diff": err}
    row["vmap_vs_modules"] = row["stacked-vmap"]["images_per_s"] / row["modules-loop"]["images_per_s"]
    return row


def teacher(s: dict, runs_dir: Path) -> dict:
    import torch

    from mosaic_flwr.config import build_config

    torch.set_num_threads(THREADS)
    cfg, rows = build_config({}), []
    for device in [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
        for num in s["experts"]:
            rows.append(teacher_row(cfg, device, num, s))
            print(f"[speed] teacher {rows[-1]}", flush=True)
    return {"rows": rows}


def teacher_lines(t: dict) -> list[str]:
    rows = t["rows"]
    return ["## 2. Distillation teacher: every expert's logits for a batch", "",
            "Images per second (an image counts once however many experts it goes through); cnn_small experts "
            f"with distinct weights, batch {rows[0]['batch'] if rows else '?'}, eval mode, no gradients. "
            "`stacked-loop` is what `StackedExperts.logits` does by default on CPU, `stacked-vmap` its default on "
            "CUDA.", "", *table("device", ["experts C", "modules loop", "stacked loop", "stacked vmap",
                                           "vmap / modules", "load avg"],
                                [row(r["device"], [str(r["experts"]), *(f"{r[k]['images_per_s']:.0f}" for k in (
                                    "modules-loop", "stacked-loop", "stacked-vmap")), f"{r['vmap_vs_modules']:.2f}",
                                    str(r["loadavg"])]) for r in rows]),
            *([] if any(r["device"] == "cuda" for r in rows) else
              ["", "No CUDA device on this machine: GPU rows not measured."]), ""]


@contextmanager
def timed(targets: list[tuple[object, str, str]], seconds: dict[str, float]):
    """Temporarily wrap ``owner.attr`` (a function of a module, or a method a class defines itself),
    adding its seconds to ``seconds[name]``, *exclusive* of the time spent in nested calls of the
    other targets (a timed call within a timed call counts once, for the inner one), so the names'
    seconds add up to the time they cover. A target the owner does not define is an error (its code
    moved: the phase would silently read zero)."""
    missing = [f"{getattr(o, '__name__', o)}.{a}" for o, a, _ in targets if a not in vars(o)]
    if missing:
        raise LookupError(f"timed: no such function or method (moved or renamed? update the targets): "
                          f"{', '.join(missing)}")
    saved = [(owner, attr, vars(owner)[attr]) for owner, attr, _ in targets]
    stack: list[float] = []  # per open timed call: the seconds of its nested timed calls

    def wrap(fn, name):
        @functools.wraps(fn)
        def timed_call(*a, **kw):
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                total = time.perf_counter() - t0
                seconds[name] += total - stack.pop()
                if stack:
                    stack[-1] += total
        return timed_call

    try:
        for owner, attr, name in targets:
            fn = vars(owner)[attr]
            if isinstance(fn, (staticmethod, classmethod)):
                setattr(owner, attr, type(fn)(wrap(fn.__func__, name)))
            else:
                setattr(owner, attr, wrap(fn, name))
        yield
    finally:
        for owner, attr, fn in reversed(saved):
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
        import torch

        config = msg.content.config_records.get("config")
        down_s, down_wire = serde_seconds(msg.content)
        t0 = time.perf_counter()
        reply = self.app(msg, context)
        seconds = time.perf_counter() - t0
        torch.set_num_threads(THREADS)
        up_s, up_wire = serde_seconds(reply.content)
        metrics = reply.content.metric_records.get("metrics")
        self.calls.append({"round": int(config.get("server-round", 0)) if config else 0,
                           "type": msg.metadata.message_type, "node": context.node_id, "seconds": seconds,
                           "serde_seconds": down_s + up_s, "down": payload_bytes(msg.content)["total"],
                           "down_wire": down_wire, "up": payload_bytes(reply.content), "up_wire": up_wire,
                           "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, float)}})
        return reply


def phases(s: dict, runs_dir: Path) -> dict:
    import resource

    import torch

    import client_app.app as capp
    import mosaic_flwr.distill.server as dserver
    import mosaic_flwr.methods.mosaic.client as mclient
    import mosaic_flwr.methods.mosaic.strategy as mstrategy
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.core.fedavg import FedAvgStrategy
    from mosaic_flwr.core.streaming import ClassSums

    seconds, app = defaultdict(float), InstrumentedClientApp(capp.app)
    DistillStrategy, MosaicStrategy = dserver.DistillStrategy, mstrategy.MosaicStrategy
    # Exclusive times (``timed``): a client's handling inside the server's reply loop counts for
    # the client, the KD loop inside the distillation for the KD row, and so on.
    targets = [(InstrumentedClientApp, "__call__", "client-app"),
               (capp, "train_local", "client-train"), (mclient, "train_local", "client-train"),
               (FedAvgStrategy, "collect", "server-collect"),
               (FedAvgStrategy, "add_to_sums", "server-aggregate"),      # streaming: the models' running sums
               (MosaicStrategy, "apply_round", "server-aggregate"),
               (MosaicStrategy, "update_experts", "server-experts"),     # the class experts (a kept round)
               (ClassSums, "add", "server-experts"),                     # ... (a streamed round)
               (ClassSums, "merge", "server-experts"), (ClassSums, "experts", "server-experts"),
               (MosaicStrategy, "meta_inputs", "server-meta"), (mstrategy, "train_meta", "server-meta"),
               (dserver, "distill_many", "server-kd"),
               (DistillStrategy, "distillation", "server-distillation"),
               (FedAvgStrategy, "evaluate_all", "server-evaluate"),
               (FedAvgStrategy, "checkpoint", "server-checkpoint"),
               (DistillStrategy, "checkpoint", "server-checkpoint")]
    torch.set_num_threads(THREADS)
    load0 = loadavg()
    with tempfile.TemporaryDirectory() as out, timed(targets, seconds):
        rc = {**load_defaults(), "strategy": "mosaic", **_parse(s["phase-config"]), "output-dir": out,
              "run-name": "phases"}
        wall = _run_server(app, rc, s["clients"])
        summary = json.loads((Path(out) / "phases" / "summary.json").read_text())
    calls, d = app.calls, summary.get("distillation", {})
    train_calls = [c for c in calls if c["type"] != "query"]
    query = sum(c["seconds"] for c in calls if c["type"] == "query")
    serde = sum(c["serde_seconds"] for c in calls)
    proto = sum(c["metrics"].get("proto-seconds", 0.0) for c in calls)
    gen = sum(c["metrics"].get("gen-seconds", 0.0) for c in calls)
    rows = [("client: local training (train_local)", "clients", seconds["client-train"]),
            ("client: generator training (once)", "clients", gen),
            ("client: prototypes (once)", "clients", proto),
            ("client: discovery (query replies: data, label counts)", "clients", query),
            ("client: other (data, model build, encoding, gate evaluation)", "clients",
             seconds["client-app"] - gen - proto - query - serde),
            ("server: reply validation and decoding", "server", seconds["server-collect"]),
            ("server: aggregation (averaging: running sums as replies arrive, the round's result)", "server",
             seconds["server-aggregate"]),
            ("server: class experts", "server", seconds["server-experts"]),
            ("server: meta model (its inputs and training)", "server", seconds["server-meta"]),
            ("server: distillation (KD steps)", "server", seconds["server-kd"]),
            ("server: distillation, rest (test-set scoring of experts/teacher/student for the "
             "report, generators, sample grid, gate)", "server", seconds["server-distillation"]),
            ("server: evaluation (test set, every round)", "server", seconds["server-evaluate"]),
            ("server: checkpoints (every round)", "server", seconds["server-checkpoint"]),
            ("communication: protobuf serialise + parse, both directions", "both", serde)]
    rows.append(("rest (discovery, results files, in-process copies)", "", wall - sum(r[2] for r in rows)))
    uploads = defaultdict(list)
    for c in train_calls:
        uploads["distill" if c["metrics"].get("gen-seconds") is not None else
                "warm-up" if c["type"] == "train.mosaic" else "fine-tune" if c["type"] == "train" else
                "gate evaluation" if c["type"] == "evaluate" else c["type"]].append(c)
    return {"clients": s["clients"], "config": s["phase-config"] or "(defaults)", "wall_seconds": wall,
            "rows": [{"phase": p, "where": w, "seconds": t} for p, w, t in rows],
            "bytes": {phase: {"records": cs[0]["up"], "wire": cs[0]["up_wire"], "down": cs[0]["down"],
                              "down_wire": cs[0]["down_wire"], "rounds": sorted({x["round"] for x in cs}),
                              "clients": len({x["node"] for x in cs})} for phase, cs in uploads.items()},
            "distillation": d, "final_accuracy": summary["final_accuracy"],
            "final_val_accuracy": summary.get("final_val_accuracy"),
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg": {"before": load0, "after": loadavg()}}


def _accuracy_line(p: dict) -> str:
    d, val, nan = p.get("distillation", {}), p.get("final_val_accuracy"), float("nan")
    line = f"final accuracy {p['final_accuracy']:.4f}"
    if val is not None:
        line += (f", final validation accuracy {val:.4f} (distillation report: gen-fidelity-mean "
                 f"{d.get('gen-fidelity-mean', nan):.3f}, val-teacher {d.get('val-teacher', nan):.4f}, "
                 f"val-after-distill {d.get('val-after-distill', nan):.4f})")
    return line


def phases_lines(p: dict) -> list[str]:
    """Section 3; with ``p["previous"]`` (the phases result this run replaced, same config)
    a column with the previous run's seconds beside this run's."""
    prev, wall = p.get("previous"), p["wall_seconds"]
    lines = [f"## 3. Per-phase time of one Mosaic run ({p['clients']} clients, config `{p['config']}`, in-process)",
             "", f"Wall {wall:.1f} s, {_accuracy_line(p)}; load average before/after {p['loadavg']['before']} / "
             f"{p['loadavg']['after']}. Clients ran one at a time (one torch thread each, as in simulation), so "
             "client seconds are the sum over clients; in simulation two run at once on 2 cores.", ""]
    before = {r["phase"]: f"{r['seconds']:.1f}" for r in prev["rows"]} if prev else {}
    if prev:
        pp = prev["provenance"]
        lines += [f"Previous run (column `before`): commit `{pp['commit']}`"
                  + (" (uncommitted changes)" if pp["dirty"] else "") + f", measured {pp['date']}, "
                  f"wall {prev['wall_seconds']:.1f} s, {_accuracy_line(prev)}; load average "
                  f"{prev['loadavg']['before']} / {prev['loadavg']['after']}; command: `{pp['command']}`.", ""]
    lines += table("phase", ["before, s"] * bool(prev) + ["seconds", "share"], [
        row(r["phase"], [before.get(r["phase"], "-")] * bool(prev) + [f"{r['seconds']:.1f}",
                                                                    f"{100 * r['seconds'] / wall:.1f}%"])
        for r in p["rows"]])
    return lines + ["", "Bytes per client per round (tensors' nbytes per record; `wire`: the serialised protobuf "
                    "Flower sends):", "",
                    *table("round kind (rounds)", ["upload: records", "upload total", "upload wire", "download wire"], [
                        row(f"{phase} ({', '.join(map(str, b['rounds']))})", [
                            ", ".join(f"{k} {mib(v)}" for k, v in b["records"].items() if k != "total"),
                            mib(b["records"]["total"]), mib(b["wire"]), mib(b["down_wire"])])
                        for phase, b in p["bytes"].items()]), ""]


def memory(s: dict, runs_dir: Path) -> dict:
    shutil.rmtree(runs_dir / "memory-mosaic", ignore_errors=True)
    rc = s["memory-config"]
    r = run_cell(runs_dir, "memory-mosaic", "mosaic", rc, num_supernodes=10, monitor=True, tag="speed")
    if r is None:
        raise RuntimeError("the Mosaic simulation of the memory benchmark failed")
    return {"config": rc, "memory": r["bench"]["memory"], "loadavg": [r["bench"]["loadavg_before"],
            r["bench"]["loadavg_after"]], "command": r["bench"]["command"]}


def memory_lines(m: dict) -> list[str]:
    peak = {role: f"{m['memory'][role]['peak_mib']:.0f} MiB" if role in m["memory"] else "-"
            for role in ("server", "client", "superlink", "ray")}
    return ["## 4. Peak memory (real simulation, Mosaic, 10 clients)", "",
            f"Run config `{m['config']}` (a short schedule: the server holds the same objects as "
            f"in a default run); load average before/after {m['loadavg'][0]} / {m['loadavg'][1]}.", "",
            *table("process", ["peak RSS (VmHWM)"], [
                row("server: flwr-simulation (ServerApp, and Ray's driver)", [peak["server"]]),
                row("one client: a Ray ClientAppActor (runs clients one after another)", [peak["client"]]),
                row("SuperLink (+ SuperExec)", [peak["superlink"]]),
                row("Ray's own processes (largest)", [peak["ray"]])]), ""]


SECTIONS = {"overhead": (overhead, overhead_lines), "teacher": (teacher, teacher_lines),
            "phases": (phases, phases_lines), "memory": (memory, memory_lines)}


@study("speed", sections=list(SECTIONS), clients=10, rounds=5, steps=50, cpus_per_client=2, experts=[10, 100],
       teacher_batch=256, teacher_seconds=3.0, phase_config="", threads=0, keep_previous=False, memory_config=SHORT)
def speed(s: dict, runs_dir: Path, table_only: bool, prov: dict):
    global THREADS
    import torch

    THREADS = s["threads"] or torch.get_num_threads()  # torch's default: what the ServerApp process gets
    if unknown := set(s["sections"]) - set(SECTIONS):
        raise SystemExit(f"speed: unknown section(s) {sorted(unknown)} (of {', '.join(SECTIONS)})")
    path = common.RESULTS / f"{s['name']}.json"  # the sections not run now: kept from the last results
    sections = json.loads(path.read_text()).get("sections", {}) if path.is_file() else {}
    body = []
    for section, (measure, render) in SECTIONS.items():
        if section in s["sections"] and not table_only:
            print(f"[speed] {section} ...", flush=True)
            started = {**provenance(), "server_threads": THREADS}
            result = {**measure(s, runs_dir), "provenance": {**started, "loadavg_end": loadavg()}}
            old = sections.get(section)
            if section == "phases" and s["keep-previous"] and old and old.get("config") == result["config"]:
                result["previous"] = {k: v for k, v in old.items() if k != "previous"}
            sections[section] = result
        if section in sections:
            p = sections[section]["provenance"]
            body += render(sections[section]) + [
                f"_Measured {p['date']} at commit `{p['commit']}`" + (" (uncommitted changes)" if p["dirty"] else "")
                + f", server-side torch threads {p['server_threads']}, load average "
                f"{p['loadavg']} -> {p['loadavg_end']}; command: `{p['command']}`_", ""]
    m = machine()
    md = "\n".join(["# Speed benchmark", "", f"Machine: {machine_line(m)}. Each section says when, at "
                    "which commit and under which load it was measured (the cores are shared: "
                    "figures are noisy).", ""] + body) + "\n"
    return md, {"machine": m, "sections": sections}, 0


# ============================================================================= scaling
def held_at_distillation(shared: str, label_counts: list[list[int]], strategy: str = "mosaic") -> dict:
    """Bytes of what the server decodes from the clients' replies in its largest round: each
    client's model state and, for Mosaic (the distillation round), its generator state and
    prototypes (``mosaic.proto-k`` centres per class held, fewer when the class has fewer samples)."""
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.task import clients_per_round, make_model
    from mosaic_flwr.data import dataset_info
    from mosaic_flwr.models.generators import generator_for

    cfg = build_config({**_parse(shared), "strategy": strategy})
    model = make_model(cfg)
    model_bytes = sum(v.nbytes for v in model.state_dict().values())
    gen_bytes = sum(v.nbytes for v in generator_for(dataset_info(cfg.dataset)).state_dict().values())
    protos = sum(min(cfg.of('mosaic').proto_k, c) for row in label_counts for c in row if c > 0)
    proto_bytes = protos * (model.feature_dim * 4 + 8)
    if strategy != "mosaic":
        gen_bytes = proto_bytes = 0
    # The largest round's replies: the clients a round samples (fraction-train), their
    # prototypes in proportion. What a server that keeps a round's replies holds (``main``
    # before issue 19); a streaming round holds one at a time.
    n = clients_per_round(cfg, len(label_counts))
    proto_bytes = proto_bytes * n // len(label_counts)
    return {"clients": n, "model_bytes": model_bytes, "generator_bytes": gen_bytes, "prototype_bytes": proto_bytes,
            "total_bytes": n * (model_bytes + gen_bytes) + proto_bytes,
            "experts_bytes": dataset_info(cfg.dataset).num_classes * model_bytes}


def live_tensor_mib() -> float:
    """MiB of distinct tensor storages reachable by Python's garbage collector."""
    import gc

    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # noqa: BLE001  (meta tensors, storages being freed)
            pass
    return sum(seen.values()) / 2**20


def held_from_clients(strategy, clients: list) -> dict:
    """What a distillation strategy holds from the clients' uploads on entering ``distillation``, in
    MiB: the models and generators still in the round's replies (``clients``), Mosaic's class experts,
    its bank's generators, the prototypes, and their sum. A streaming round sums the replies into the
    experts and the bank as they arrive, so its replies hold nothing by then."""
    def nbytes(state) -> int:
        return sum(v.nbytes for v in (state or {}).values())

    replies = sum(nbytes(c.state) + (nbytes(c.reply.generator) + nbytes(c.reply.expert_state)
                                     if c.reply is not None else 0) for c in clients)
    experts = sum(nbytes(e) for family in getattr(strategy, "experts", {}).values() for e in family)
    bank = getattr(strategy, "bank", None)
    generators = sum(nbytes(e["state"]) for _, _, e in bank.rows()) if bank is not None else 0
    protos = sum(p["features"].nbytes + p["labels"].nbytes for p in getattr(strategy, "protos", []))
    out = {"replies": len(clients), "replies_mib": replies / 2**20, "experts_mib": experts / 2**20,
           "bank_mib": generators / 2**20, "prototypes_mib": protos / 2**20,
           "held_mib": (replies + experts + generators + protos) / 2**20}
    if bank is not None:
        out["bank_generators"] = len(bank)
    return out


def probe_child(n: int, run_config: str, code: str | None = None) -> dict:
    """One Mosaic run in this process (ServerApp + ClientApp over the in-process grid), with
    the live tensors and RSS measured where the server holds the most: on entering the
    distillation and the KD loop. Clients run one at a time and keep at most two partitions
    cached, so what grows with ``n`` is what the server keeps."""
    import resource

    if code:  # another version of the app (bench/archive/scaling_compare.py): its packages come first
        sys.path.insert(0, code)
        for name in [m for m in sys.modules if m.split(".")[0] in ("mosaic_flwr", "client_app", "server_app")]:
            del sys.modules[name]
    import torch

    import mosaic_flwr.distill.server as core_module
    from client_app.app import app
    from mosaic_flwr.config import load_defaults

    torch.set_num_threads(1)
    probes: dict[str, dict] = {}

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def probed(fn, where):
        def wrapper(*a, **kw):
            probes[where] = {"live_tensor_mib": live_tensor_mib(), "rss_mib": rss_mib()}
            if where == "distillation":  # (self, server_round, clients): the round's ClientModels
                probes[where].update(held_from_clients(a[0], a[2]))
            return fn(*a, **kw)
        return wrapper

    core_module.DistillStrategy.distillation = probed(core_module.DistillStrategy.distillation, "distillation")
    core_module.distill_many = probed(core_module.distill_many, "kd")
    with tempfile.TemporaryDirectory() as out:
        wall = _run_server(app, {**load_defaults(), "strategy": "mosaic", **_parse(run_config), "output-dir": out,
                                 "run-name": "probe"}, n)
    return {"clients": n, "wall_seconds": wall, "probes": probes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def probe(n: int, run_config: str, cache: Path, fresh: bool = False, code: str | None = None) -> dict | None:
    """``probe_child`` in a fresh process (so peaks do not mix); kept in ``cache`` (a JSON
    file) and reused unless ``fresh`` or the run config changed."""
    if cache.is_file() and not fresh and (kept := json.loads(cache.read_text())).get("run_config") == run_config:
        return kept
    cmd = [sys.executable, __file__, "probe-child", str(n), run_config, *([code] if code else [])]
    t0 = time.perf_counter()
    print(f"[scaling] probe: {n} clients{' (' + code + ')' if code else ''}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".log").write_text(out.stdout[-20000:] + out.stderr[-200000:])
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"[scaling] probe with {n} clients failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    result = {**json.loads(lines[-1]), "loadavg": loadavg(), "run_config": run_config,
              "commit": git_commit(), "dirty": git_dirty(), "code": code or "this checkout",
              "command": " ".join(cmd), "process_seconds": round(time.perf_counter() - t0, 1)}
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


@study("scaling", clients=[10, 50, 100], run_config=SHORT, cpus_per_client=1, strategy="mosaic", fresh=False,
       probe=False, probe_clients=[])
def scaling(s: dict, runs_dir: Path, table_only: bool, prov: dict):
    rows, nan = [], float("nan")
    for n in s["clients"]:
        name = f"{s['strategy']}-n{n}"
        memo = runs_dir / name / "bench.json"
        if not table_only and (s["fresh"] or (runs_dir / name).is_dir()
                               and '"memory"' not in (memo.read_text() if memo.is_file() else "")):
            shutil.rmtree(runs_dir / name, ignore_errors=True)
        if table_only and not (runs_dir / name / "summary.json").is_file():
            continue
        r = run_cell(runs_dir, name, s["strategy"], s["run-config"], num_supernodes=n,
                     cpus_per_client=s["cpus-per-client"], monitor=True, tag="scaling")
        if r is None:
            print(f"[scaling] {n} clients failed; see {runs_dir / name}.log", flush=True)
            continue
        b = r["bench"]
        rows.append({"clients": n, "launcher_seconds": b["launcher_seconds"], "serverapp_seconds": r["wall_seconds"],
                     "memory": b["memory"], "held": held_at_distillation(s["run-config"], r["partition_label_counts"],
                                                                         s["strategy"]),
                     "final_accuracy": r["final_accuracy"],
                     "distillation": {k: v for k, v in (r.get("distillation") or {}).items() if k.endswith("seconds")},
                     "loadavg": [b["loadavg_before"], b["loadavg_after"]], "command": b["command"],
                     "commit": b["commit"]})
    sizes = s["probe-clients"] or s["clients"]
    probes = [p for n in sizes if s["probe"] and (not table_only or (runs_dir / f"probe-n{n}.json").is_file())
              for p in [probe(n, s["run-config"], runs_dir / f"probe-n{n}.json", s["fresh"])] if p]
    prov["loadavg_end"] = loadavg()
    lines = header_lines(f"Scaling: {s['strategy']} with {', '.join(map(str, s['clients']))} clients", prov)
    lines += [f"Real Flower simulation (scripts/flwr_sim.py, `--cpus-per-client {s['cpus-per-client']}`), "
              f"Fashion-MNIST split among the clients (Dirichlet α = 0.1, same 60,000 images), run "
              f"config `{s['run-config']}`; runs at commit(s) "
              f"{', '.join(sorted({r['commit'] for r in rows}))}. Peak RSS = VmHWM of each process, "
              "polled every 0.5 s.", ""]

    def peak(r, role):
        return r["memory"].get(role, {}).get("peak_mib", nan)

    lines += table("clients", [
        "wall s (launcher)", "ServerApp s", "server peak RSS", "client actor peak RSS", "the largest round's replies, "
        "held at once without streaming (sampled clients x (model + Mosaic's generator) + prototypes)", "final acc",
        "load avg before / after"], [row(str(r["clients"]), [
            f"{r['launcher_seconds']:.0f}", f"{r['serverapp_seconds']:.0f}", f"{peak(r, 'server'):.0f} MiB",
            f"{peak(r, 'client'):.0f} MiB", f"{r['held']['total_bytes'] / 2**20:.0f} MiB", f"{r['final_accuracy']:.4f}",
            f"{r['loadavg'][0]} / {r['loadavg'][1]}"]) for r in rows])
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        slope = (peak(b, "server") - peak(a, "server")) / (b["clients"] - a["clients"])
        held = (b["held"]["total_bytes"] - a["held"]["total_bytes"]) / (b["clients"] - a["clients"]) / 2**20
        lines += ["", f"Server peak grows by {slope:.1f} MiB per added client from {a['clients']} to "
                  f"{b['clients']} clients; the client payloads the server decodes in its largest "
                  f"round grow by {held:.2f} MiB per client (model {a['held']['model_bytes'] / 2**20:.2f} MiB + "
                  f"generator {a['held']['generator_bytes'] / 2**20:.2f} MiB + prototypes). The C class "
                  f"experts alone are {a['held']['experts_bytes'] / 2**20:.1f} MiB whatever the number of clients."]
    if probes:
        lines += ["", "In-process probe (`probe = true`): the same runs with the ServerApp and the ClientApp in "
                  "one process (mosaic_flwr.testing.inprocess.InProcessGrid, clients one at a time, at most two "
                  "partitions cached), measured on entering the distillation and the KD loop: live "
                  "torch tensors (distinct storages), RSS, and what the strategy holds from the clients' "
                  "uploads (`held_from_clients`): the replies' own models and generators, which a streaming "
                  "round has already summed into the class experts and moved into the generator bank as "
                  "they arrived (so 0), and the class experts, the bank's generators and the prototypes.",
                  "", *table("clients", [
                      "held from the uploads at distillation (class experts + bank generators + prototypes)",
                      "of which still in the replies", "live tensors at distillation", "live tensors in KD loop",
                      "RSS in KD loop", "peak RSS", "wall s", "load avg after"], [
                      row(str(p["clients"]), [
                          f"{at.get('held_mib', nan):.0f} MiB ({at.get('experts_mib', nan):.0f} + "
                          f"{at.get('bank_mib', nan):.0f} + {at.get('prototypes_mib', nan):.1f})"
                          if "held_mib" in at else "-",
                          *(f"{d.get(k, nan):.0f} MiB" for d, k in ((at, "replies_mib"), (at, "live_tensor_mib"),
                                                                    (kd, "live_tensor_mib"), (kd, "rss_mib"))),
                          f"{p['peak_rss_mib']:.0f} MiB", f"{p['wall_seconds']:.0f}", str(p["loadavg"])])
                      for p in probes for at, kd in [(p["probes"].get("distillation", {}), p["probes"].get("kd", {}))]])]
    data = {**prov, "run_config": s["run-config"], "rows": rows, "probes": probes}
    return "\n".join(lines) + "\n", data, 0 if len(rows) == len(s["clients"]) else 1


# ============================================================================= privacy-dp
# level -> the dp-* settings: dp.epsilon is each client's total; the prototypes', counts' and
# gate scores' own epsilons are carved out of it and the generator gets the rest. Every level
# runs the clients' gate (under DP on noisy scores, in the plan). The audit is off under DP
# (its figures are not covered), so it is off at inf too: the levels compare alike.
LEVELS = {
    "inf": {},
    "8": {"dp.epsilon": 8.0, "dp.proto-epsilon": 1.0, "dp.count-epsilon": 0.5, "dp.gate-epsilon": 0.5},
    "1": {"dp.epsilon": 1.0, "dp.proto-epsilon": 0.5, "dp.count-epsilon": 0.25, "dp.gate-epsilon": 0.25},
}
DP_BASE = {"dataset": "fmnist", "alpha": 0.1, "strategy": "mosaic", "seed": 42, "privacy-audit": False,
           "client-threads": 1, "server-threads": 1, "checkpoint": False}


def dp_run(level: str, extra: dict, out: Path) -> dict:
    """One level's run into ``out/eps-<level>`` (the real apps, in-process, one torch thread) and its bench.json."""
    import torch

    import client_app.app as capp
    from mosaic_flwr.config import load_defaults

    torch.set_num_threads(1)
    rc = {**load_defaults(), **DP_BASE, **LEVELS[level], **extra, "output-dir": str(out), "run-name": f"eps-{level}"}
    commit, dirty, load0 = git_commit(), git_dirty(), loadavg()  # the code the run executes (HEAD may move)
    wall = _run_server(capp.app, rc, 10)
    meta = {"level": level, "overrides": {**DP_BASE, **LEVELS[level], **extra}, "wall_seconds": wall,
            "commit": commit, "dirty": dirty, "load_before": load0, "load_after": loadavg(), "machine": machine()}
    (out / f"eps-{level}" / "bench.json").write_text(json.dumps(meta, indent=1))
    return meta


def dp_timing(steps: int, reps: int) -> dict:
    """The generator's training time with and without DP on the same client, back to back in
    one process (the same load for both): Fashion-MNIST, alpha 0.1, partition 0, the default
    gen-* settings, a fresh cnn_small classifier, D under DP-SGD at the 8 level's sigma."""
    import torch

    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.task import client_data, make_model
    from mosaic_flwr.data import dataset_info
    from mosaic_flwr.methods.mosaic.generator import train_generator
    from mosaic_flwr.models.generators import build_discriminator, generator_for
    from mosaic_flwr.privacy import dp as dpm

    torch.set_num_threads(1)
    cfg = build_config({**DP_BASE, **LEVELS["8"]})
    gen_cfg, info = cfg.of("mosaic"), dataset_info("fmnist")
    x, y = client_data(cfg, 0, 10)
    sigma, q, _ = dpm.generator_mechanism(dpm.dp_settings(cfg.values), len(y), gen_cfg.gen_batch_size,
                                          gen_cfg.gen_steps, protos=True)
    out = {"clients-samples": len(y), "steps": steps, "batch": gen_cfg.gen_batch_size, "sigma": sigma, "plain": [],
           "dp": [], "plain-cpu": [], "dp-cpu": []}
    for rep in range(reps):
        for mode in ("plain", "dp"):
            torch.manual_seed(rep)
            g, d = generator_for(info), build_discriminator(info.in_channels, info.image_size, info.num_classes)
            dp = None if mode == "plain" else dpm.DiscriminatorDP(
                cfg.of("dp").max_grad_norm, sigma, q, torch.bincount(y, minlength=10).double(), dpm.secret_generator())
            cpu0 = time.process_time()  # CPU time: less sensitive than wall time to other jobs on the cores
            st = train_generator(g, d, make_model(cfg), x, y, steps=steps, batch_size=gen_cfg.gen_batch_size,
                                 lr=gen_cfg.gen_lr, seed=rep, eval_per_class=1, dp=dp)
            out[f"{mode}-cpu"].append((time.process_time() - cpu0) / steps)
            out[mode].append(st["seconds_per_step"])
            print(f"[timing] rep {rep} {mode}: {st['seconds_per_step'] * 1000:.1f} ms/step wall, "
                  f"{out[f'{mode}-cpu'][-1] * 1000:.1f} ms/step CPU", flush=True)
    out.update({"load": loadavg(), "commit": git_commit(), "dirty": git_dirty(), "machine": machine()})
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "privacy-dp-timing.json").write_text(json.dumps(out, indent=1))
    return out


def dp_row(level: str, out: Path) -> dict | None:
    d = out / f"eps-{level}"
    if not (d / "summary.json").is_file() or not (d / "bench.json").is_file():
        return None
    s, b = json.loads((d / "summary.json").read_text()), json.loads((d / "bench.json").read_text())
    rounds = json.loads((d / "metrics.json").read_text())
    dist, dp, priv = next((r for r in rounds if "acc-after-distill" in r), {}), s.get("dp", {}), s.get("privacy") or {}
    clients = dp.get("clients", {}) if dp.get("enabled") else {}
    eps = [c["epsilon"] for c in clients.values() if "epsilon" in c]
    return {
        "level": level, "final_accuracy": s["final_accuracy"],
        **{k: dist.get(k) for k in ("acc-before-distill", "acc-after-distill", "acc-teacher", "gate-kept")},
        "gate-final-kept": next((r["gate-final-kept"] for r in rounds if "gate-final-kept" in r), None),
        "gen-seconds-mean": dist.get("gen-seconds-mean"), "gen-fidelity-mean": dist.get("gen-fidelity-mean"),
        "dp": dp.get("enabled", False), "epsilon-max": max(eps) if eps else None, "epsilon-min": min(eps) if eps else None,
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


@study("privacy-dp", levels=list(LEVELS), run_config="", timing=False, timing_steps=100, timing_reps=2)
def privacy_dp(s: dict, out: Path, table_only: bool, prov: dict):
    from mosaic_flwr.config import renamed

    if unknown := set(s["levels"]) - set(LEVELS):
        raise SystemExit(f"privacy-dp: unknown level(s) {sorted(unknown)} (of {', '.join(LEVELS)})")
    for level in [] if table_only else s["levels"]:
        if dp_row(level, out) is None:
            print(json.dumps(dp_run(level, _parse(s["run-config"]), out), indent=1, default=str), flush=True)
    if s["timing"] and not table_only:
        dp_timing(s["timing-steps"], s["timing-reps"])
    if not (rows := [r for r in (dp_row(level, out) for level in s["levels"]) if r is not None]):
        raise SystemExit(f"no finished runs under {out}")
    lines = ["# Mosaic under differential privacy: the privacy / accuracy trade-off", "",
             "Fashion-MNIST, cnn_small, 10 clients, Dirichlet alpha = 0.1, seed 42, the default schedule "
             "(6 warm-up rounds, distillation, 2 fine-tune rounds) with the clients' gate and its look-ahead, "
             "delta = 1e-5, RDP accountant (Opacus), the privacy audit off at every level (under DP its figures "
             "are not covered). `dp.epsilon` is each client's total: the counts', prototypes' and gate scores' "
             "own epsilons are carved out of it and the generator's DP-SGD gets the rest; every release is "
             "written in the client's privacy ledger first. In-process grid (`bench/run.py "
             "bench/studies/privacy-dp.toml`), clients one at a time, one torch thread, on the 2-core VM shared "
             "with other jobs (load averages below). One seed: differences of a point or two are within "
             "run-to-run noise.", "",
             "| level | dp.epsilon (total) / prototypes / counts / gate scores | epsilon per client, planned "
             "(max; min) | in the ledger after distillation (max) | generator sigma | final acc. "
             "| before -> after distillation | gate: noisy clients' scores before / after | gate kept (final) "
             "| generator s / client | fidelity | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = renamed(r["overrides"], warn=False)  # (a run from before the namespaces: the old names)
        setting = ("off" if not r["dp"] else f"{o.get('dp.epsilon')} / {o.get('dp.proto-epsilon')} / "
                   f"{o.get('dp.count-epsilon')} / {o.get('dp.gate-epsilon')}")
        sig = r["sigma-generator-range"]
        lines.append(
            f"| {r['level']} | {setting} | {_fmt(r['epsilon-max'], '{:.2f}')}; {_fmt(r['epsilon-min'], '{:.2f}')} "
            f"| {_fmt(r.get('ledger-epsilon-max'), '{:.2f}')} | {'-' if not sig else f'{sig[0]:.2f}-{sig[1]:.2f}'} "
            f"| {_fmt(r['final_accuracy'])} | {_fmt(r['acc-before-distill'])} -> {_fmt(r['acc-after-distill'])} "
            f"| {_fmt(r.get('gate-before'))} / {_fmt(r.get('gate-after'))} | {r['gate-kept']} ({r['gate-final-kept']}) "
            f"| {_fmt(r['gen-seconds-mean'], '{:.1f}')} | {_fmt(r['gen-fidelity-mean'], '{:.3f}')} "
            f"| {r['wall_seconds']:.0f} |")
    if (tpath := common.RESULTS / "privacy-dp-timing.json").is_file():
        t = json.loads(tpath.read_text())
        plain, dp, pc, dc = (statistics.fmean(t[k]) * 1000 for k in ("plain", "dp", "plain-cpu", "dp-cpu"))
        lines += ["", f"Time cost of DP-SGD in the generator, measured back to back in one process "
                  f"(`timing = true`, {t['steps']} steps, {len(t['plain'])} repetitions, commit {t['commit']}: "
                  f"client 0, {t['clients-samples']} images, steps of {t['batch']}, sigma {t['sigma']:.2f}, load "
                  f"{t['load'][0]}): CPU time {pc:.1f} ms/step without DP, {dc:.1f} ms/step with DP ({dc / pc:.2f}x); "
                  f"wall time {plain:.1f} vs {dp:.1f} ms/step ({dp / plain:.2f}x; per repetition: plain "
                  f"{', '.join(f'{v * 1000:.0f}' for v in t['plain'])}, DP {', '.join(f'{v * 1000:.0f}' for v in t['dp'])} ms)."]
    lines += ["", "Runs: " + "; ".join(f"{r['level']}: commit {r['commit']}{' (dirty)' if r['dirty'] else ''}, "
                                        f"load {r['load'][0][0]} -> {r['load'][1][0]}" for r in rows), "",
              "Before the privacy ledger (commit ccf5fbe and earlier) `dp.epsilon` was the generator's alone, "
              "the clients' gate was refused under DP (its exact scores were not covered) and the audit's figures "
              "were sent under DP; that table, with the audit figures at every level, is "
              "`bench/results/privacy-dp.md` at ccf5fbe.", ""]
    return "\n".join(lines), rows, 0


# ============================================================================= privacy-audit
def audit_lines(name: str, results: dict, command: str) -> list[str]:
    lines = [f"# Privacy audit of what Mosaic clients upload ({name})", "", f"Command: `{command}`", "",
             f"Runs at commit {results['commit']}"
             + (f", summaries recomputed from the clients' figures at {results['tabulated-at']}"
                if results.get("tabulated-at") else "") + f"; {results['machine']}.", ""]
    for alpha, r in results["runs"].items():
        s = r["summary"]
        lines += [f"## alpha = {alpha}", "",
                  f"Run: {r['config']}; audit at round {s['round']}, {s['clients-audited']} of {s['clients']} "
                  f"clients; flagged: {s['flagged'] or 'none'}.", "",
                  "| client | examples | classes held (rare <= 5) | DCR ratio pixel | DCR ratio feature | "
                  "near copies pixel (baseline) | MIA AUC pixel [95 % CI] | MIA AUC feature | prototypes "
                  "(exact records, classes < k, single-record) | proto NN ratio min | audit s (share of round) | flags |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["clients"]:
            def f(k, d=3):
                return _fmt(c.get(k), f"{{:.{d}f}}")

            def n(k):
                return int(c.get(k, 0))
            lines.append(
                f"| {c['partition-id']} | {sum(c['label-counts'])} | {n('label-classes-held')} "
                f"({n('label-rare-classes')}) | {f('dcr-ratio-pixel')} | {f('dcr-ratio-feature')} | "
                f"{f('near-copy-pixel')} ({f('near-copy-baseline-pixel')}) | {f('mia-auc-pixel')} "
                f"[{f('mia-auc-pixel-low')}, {f('mia-auc-pixel-high')}] | {f('mia-auc-feature')} | "
                f"{n('proto-count')} ({n('proto-exact')}, {n('proto-few-classes')}, {n('proto-single-record')}) | "
                f"{f('proto-nn-ratio-min')} | {f('seconds', 1)} ({100 * c.get('seconds-fraction', 0):.1f} %) | "
                f"{'+'.join(c['flags']) or '-'} |")
        lines.append("")
        for sp in ("pixel", "feature"):
            small, large = f"class-dcr-ratio-{sp}-small", f"class-dcr-ratio-{sp}-large"
            if small + "-median" in s and large + "-median" in s:
                lines.append(
                    f"- per class, {sp}: classes of <= 5 records: median DCR ratio {s[small + '-median']:.3f}, "
                    f"{s[small + '-below-1']} of {s[small + '-classes']} below 1 (one-sided sign test p = "
                    f"{s[small + '-sign-p']:.2g}); larger classes: {s[large + '-median']:.3f}, {s[large + '-below-1']} "
                    f"of {s[large + '-classes']} below 1 (p = {s[large + '-sign-p']:.2g})")
        lines += [f"- prototypes that are a record's features: {s.get('proto-exact-total', 0)} of "
                  f"{int(sum(c.get('proto-count', 0) for c in r['clients']))} ({s.get('proto-single-record-total', 0)} "
                  f"single-record classes); classes sent as the mean of < k records: {s.get('proto-few-classes-total', 0)}; "
                  f"label counts of 1-5 records disclosed: {s.get('label-rare-classes-total', 0)} classes",
                  f"- audit cost: {s.get('seconds-mean', 0):.2f} s per client, {100 * s.get('seconds-fraction-mean', 0):.1f} % "
                  "of the client's distillation round", "", "Summary: `" + json.dumps(s) + "`", ""]
    return lines


@study("privacy-audit", alphas=[0.1, 0.01], rounds=0, clients=10, run_config="",
       machine="2-core VM shared with other jobs, one thread per run")
def privacy_audit(s: dict, out: Path, table_only: bool, prov: dict):
    """Each alpha's run (the defaults and ``run-config``) up to ``rounds`` (0: the distillation
    round, where the audit happens); ``table_only``: the summaries recomputed from the clients' figures."""
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.privacy.report import summarise

    results = {"commit": prov["commit"], "machine": s["machine"], "runs": {}}
    previous = common.RESULTS / f"{s['name']}.json"
    if table_only and previous.is_file():  # the runs' own commit; the summaries' is now
        results.update({"commit": json.loads(previous.read_text())["commit"], "tabulated-at": prov["commit"]})
    for alpha in s["alphas"]:
        d = out / f"privacy-a{alpha:g}"
        if not table_only:
            rc = {**load_defaults(), "alpha": alpha, "server-threads": 1, "client-threads": 1, "output-dir": str(out),
                  "run-name": d.name, **_parse(s["run-config"])}
            rc["num-server-rounds"] = s["rounds"] or rc["warmup-rounds"]
            print(f"alpha {alpha:g}: {run_inprocess(rc, s['clients'])['wall_seconds']:.0f} s", flush=True)
        privacy = json.loads((d / "privacy.json").read_text())
        summary = {"round": privacy["round"], **summarise(privacy["clients"])}
        results["runs"][f"{alpha:g}"] = {
            "config": f"alpha={alpha:g}, {s['clients']} clients, num-server-rounds={s['rounds'] or privacy['round']}",
            "summary": summary, "clients": privacy["clients"], "thresholds": privacy["thresholds"], "run-dir": str(d),
            "final_accuracy": json.loads((d / "summary.json").read_text()).get("final_accuracy")}
    return "\n".join(audit_lines(s["name"], results, prov["command"])) + "\n", results, 0


# ============================================================================= attack
REPORT = ("acc-before-distill", "acc-ensemble", "acc-teacher", "acc-after-distill")
TIMES = ("gen-seconds-mean", "meta-seconds", "kd-seconds", "distill-seconds")


@study("attack", clients=5, alpha=0.1, seed=42, factor=1000, poison="random", rounds=4, warmup_rounds=3,
       local_steps=30, gen_steps=40, kd_steps=50)
def attack(s: dict, runs_dir: Path, table_only: bool, prov: dict):
    """The attacker (partition 0, ``inflating_attacker``) against no defence and the robust settings;
    each case one in-process run (in a temporary directory: nothing to tabulate without running)."""
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.faults import inflating_attacker

    if table_only:
        raise SystemExit("attack: nothing kept to tabulate (its runs are temporary): run it")
    base = {"strategy": "mosaic", "dataset": "fmnist", "alpha": s["alpha"], "seed": s["seed"],
            "num-server-rounds": s["rounds"], "warmup-rounds": s["warmup-rounds"], "local-steps": s["local-steps"],
            "mosaic.gen-steps": s["gen-steps"], "kd.steps": s["kd-steps"], "checkpoint": False, "server-threads": 1}
    cases = [("clean", False, {}), ("attack, mean", True, {}), ("attack, median", True, {"aggregation": "median"}),
             ("attack, mean + max-client-share 0.3", True, {"max-client-share": 0.3})]  # (name, attacked, changes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, attacked, changes) in enumerate(cases):
            t0 = time.perf_counter()
            hook = inflating_attacker(0, s["factor"], s["poison"], s["seed"]) if attacked else None
            rc = {**load_defaults(), "output-dir": str(Path(tmp) / str(i)), "run-name": "run", **base, **changes}
            summary = run_inprocess(rc, s["clients"], hook=hook)
            d = summary.get("distillation", {})
            rows.append({"case": name, "attacked": attacked, "config": changes,
                         "final_accuracy": summary["final_accuracy"], **{k: d.get(k) for k in REPORT + TIMES},
                         "attacker_replies": hook.replies if hook else None,
                         "gate": {k: d.get(k) for k in ("gate-before", "gate-after", "gate-kept")},
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    prov["loadavg_end"] = loadavg()
    lines = header_lines(f"Attack: one of {s['clients']} clients declares {s['factor']}x its label counts and sends "
                         f"a {s['poison']} model (Fashion-MNIST, Dirichlet {s['alpha']}, seed {s['seed']})", prov)
    lines += [f"Mosaic, cnn_small, {s['rounds']} rounds (distillation after round {s['warmup-rounds']}), "
              f"local-steps {s['local-steps']}, mosaic.gen-steps {s['gen-steps']}, kd.steps {s['kd-steps']}; "
              "in-process (bench/run.py bench/studies/attack.toml); the attacker is partition 0 and lies in "
              "every reply (`inflate_reply`): discovery, training rounds (its model poisoned) and the "
              "distillation gate's evaluation replies (its correct predictions scaled with its example count).", "",
              "| case | final accuracy | before distill | expert ensemble | meta teacher | after distill "
              "| gate: clients' score before / after (kept) | s |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {_fmt(r['final_accuracy'])} | " + " | ".join(_fmt(r[k]) for k in REPORT)
              + f" | {_fmt(r['gate']['gate-before'])} / {_fmt(r['gate']['gate-after'])} "
              f"({_fmt(r['gate']['gate-kept'], '{:.0f}')}) | {r['seconds']:.0f} |" for r in rows]
    args = {**{k.replace("-", "_"): s[k] for k in STUDIES["attack"][0]}, "name": s["name"]}
    return "\n".join(lines) + "\n", {"provenance": prov, "args": args, "rows": rows}, 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe-child"]:  # scaling's probe: one in-process run, its figures as JSON on stdout
        print(json.dumps(probe_child(int(sys.argv[2]), sys.argv[3], (sys.argv[4:] or [None])[0])), flush=True)
        sys.exit(0)
    sys.exit(main())
