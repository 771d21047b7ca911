#!/usr/bin/env python3
"""Scaling: the Mosaic run with 10, 50 and 100 simulated clients on the same data (the
60,000 Fashion-MNIST training images split among them), through the real Flower simulation
(scripts/flwr_sim.py); wall time and peak RSS of the server process (flwr-simulation: the
ServerApp and Ray's driver) and of a client process (a Ray ClientAppActor). Saved as
bench/results/<name>.md and .json.

The question: does server memory grow with the number of clients, or only with the number
of classes and model families? Next to the measured peaks the table gives what the Mosaic
server holds at the distillation round: every client's model, generator and prototypes
(their sizes from the models, the prototypes from the partition).

    .venv/bin/python bench/scaling.py                      # 10, 50, 100 clients, short schedule
    .venv/bin/python bench/scaling.py --clients 10 50 --run-config "num-server-rounds=8"

Finished cells are reused (RUNS/<name>/mosaic-n<N>/, outside the repository); --fresh runs them again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (RUNS, git_commit, git_dirty, header_lines, loadavg,  # noqa: E402
                          provenance, run_cell, write_results)

SHORT = ("num-server-rounds=2 warmup-rounds=1 local-steps=10 mosaic.gen-steps=20 kd.steps=20 "
         "mosaic.meta-epochs=20")


def held_at_distillation(shared: str, label_counts: list[list[int]], strategy: str = "mosaic") -> dict:
    """Bytes of what the server decodes from the clients' replies in its largest round: each
    client's model state and, for Mosaic (the distillation round), its generator state and
    prototypes (``mosaic.proto-k`` centres per class held, fewer when the class has fewer samples)."""
    from flwr.common.config import parse_config_args

    from mosaic_flwr.config import build_config
    from mosaic_flwr.data import dataset_info
    from mosaic_flwr.models.generators import generator_for
    from mosaic_flwr.core.task import clients_per_round, make_model

    cfg = build_config({**(parse_config_args([shared]) if shared.strip() else {}), "strategy": strategy})
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
    return {"clients": n, "model_bytes": model_bytes, "generator_bytes": gen_bytes,
            "prototype_bytes": proto_bytes,
            "total_bytes": n * (model_bytes + gen_bytes) + proto_bytes,
            "experts_bytes": cfg_classes(cfg) * model_bytes}


def cfg_classes(cfg) -> int:
    from mosaic_flwr.data import dataset_info

    return dataset_info(cfg.dataset).num_classes


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


def probe_child(n: int, run_config: str, code: str | None = None) -> dict:
    """One Mosaic run in this process (ServerApp + ClientApp over the in-process grid), with
    the live tensors and RSS measured where the server holds the most: on entering the
    distillation and the KD loop. Clients run one at a time and keep at most two partitions
    cached, so what grows with ``n`` is what the server keeps."""
    import resource
    import tempfile
    import threading

    if code:  # another version of the app (``--compare``): its packages come first
        sys.path.insert(0, code)
        for name in [m for m in sys.modules if m.split(".")[0] in ("mosaic_flwr", "client_app", "server_app")]:
            del sys.modules[name]
    import torch
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    import mosaic_flwr.distill.server as core_module
    from client_app.app import app
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from server_app.app import main as server_main

    torch.set_num_threads(1)
    probes: dict[str, dict] = {}

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    def probed(fn, where):
        def wrapper(*a, **kw):
            probes[where] = {"live_tensor_mib": live_tensor_mib(), "rss_mib": rss_mib()}
            if where == "distillation":  # (self, server_round, clients): the round's ClientModels
                clients = a[2]
                probes[where]["replies"] = len(clients)
                probes[where]["replies_mib"] = sum(
                    sum(v.nbytes for v in c.state.values())
                    + (sum(v.nbytes for v in (c.reply.generator or {}).values()) if c.reply else 0)
                    for c in clients) / 2**20
                bank = getattr(a[0], "bank", None)
                if bank is not None:
                    probes[where]["bank_generators"] = len(bank)
            return fn(*a, **kw)
        return wrapper

    core_module.DistillStrategy.distillation = probed(core_module.DistillStrategy.distillation, "distillation")
    core_module.distill_many = probed(core_module.distill_many, "kd")
    peak = {"rss_mib": 0.0}
    stop = threading.Event()

    def poll():  # the process's RSS over the run (server and clients share it here)
        while not stop.wait(0.2):
            peak["rss_mib"] = max(peak["rss_mib"], rss_mib())
    threading.Thread(target=poll, daemon=True).start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        rc = {**load_defaults(), "strategy": "mosaic",
              **(parse_config_args([run_config]) if run_config.strip() else {}),
              "output-dir": out, "run-name": "probe"}
        server_main(InProcessGrid(app, rc, n), Context(run_id=1, node_id=1, node_config={},
                                                       state=RecordDict(), run_config=rc))
    stop.set()
    return {"clients": n, "wall_seconds": time.perf_counter() - t0, "probes": probes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def probe(n: int, run_config: str, cache: Path, fresh: bool = False, code: str | None = None) -> dict | None:
    """``probe_child`` in a fresh process (so peaks do not mix); kept in ``cache`` (a JSON
    file) and reused unless ``fresh`` or the run config changed."""
    if cache.is_file() and not fresh:
        kept = json.loads(cache.read_text())
        if kept.get("run_config") == run_config:
            return kept
    cmd = [sys.executable, __file__, "--probe-child", str(n), "--run-config", run_config]
    if code:
        cmd += ["--probe-code", code]
    t0 = time.perf_counter()
    print(f"[scaling] probe: {n} clients{' (' + code + ')' if code else ''}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".log").write_text(out.stdout[-20000:] + out.stderr[-200000:])
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"[scaling] probe with {n} clients failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    result = {**json.loads(lines[-1]), "loadavg": loadavg(), "run_config": run_config,
              "commit": git_commit(), "dirty": git_dirty(), "code": code or "this checkout",
              "command": " ".join(cmd), "process_seconds": round(time.perf_counter() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 50, 100])
    ap.add_argument("--run-config", default=SHORT, help=f"run-config overrides (default: {SHORT!r})")
    ap.add_argument("--cpus-per-client", type=int, default=1)
    ap.add_argument("--strategy", default="mosaic", help="mosaic, or a control (e.g. fedavg)")
    ap.add_argument("--name", help="results name (default: scaling, or scaling-<strategy>)")
    ap.add_argument("--fresh", action="store_true", help="run finished cells again")
    ap.add_argument("--probe", action="store_true",
                    help="Mosaic only: also run each size in-process and measure the tensors the "
                         "server holds at the distillation round")
    ap.add_argument("--probe-clients", nargs="+", type=int, help="sizes to probe (default: --clients)")
    ap.add_argument("--probe-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--probe-code", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_child:
        print(json.dumps(probe_child(args.probe_child, args.run_config, args.probe_code)), flush=True)
        return 0
    args.name = args.name or ("scaling" if args.strategy == "mosaic" else f"scaling-{args.strategy}")
    prov = provenance()
    runs_dir = RUNS / args.name
    rows = []
    for n in args.clients:
        name = f"{args.strategy}-n{n}"
        memo = runs_dir / name / "bench.json"
        if args.fresh or (runs_dir / name).is_dir() and '"memory"' not in (memo.read_text() if memo.is_file() else ""):
            shutil.rmtree(runs_dir / name, ignore_errors=True)
        s = run_cell(runs_dir, name, args.strategy, args.run_config, num_supernodes=n,
                     cpus_per_client=args.cpus_per_client, monitor=True, tag="scaling")
        if s is None:
            print(f"[scaling] {n} clients failed; see {runs_dir / name}.log", flush=True)
            continue
        held = held_at_distillation(args.run_config, s["partition_label_counts"], args.strategy)
        rows.append({"clients": n, "launcher_seconds": s["bench"]["launcher_seconds"],
                     "serverapp_seconds": s["wall_seconds"], "memory": s["bench"]["memory"],
                     "held": held, "final_accuracy": s["final_accuracy"],
                     "distillation": {k: v for k, v in (s.get("distillation") or {}).items()
                                      if k.endswith("seconds")},
                     "loadavg": [s["bench"]["loadavg_before"], s["bench"]["loadavg_after"]],
                     "command": s["bench"]["command"], "commit": s["bench"]["commit"]})
    probes = [p for n in (args.probe_clients or args.clients) if args.probe
              for p in [probe(n, args.run_config, runs_dir / f"probe-n{n}.json", args.fresh)] if p]
    prov["loadavg_end"] = loadavg()
    lines = header_lines(f"Scaling: {args.strategy} with {', '.join(map(str, args.clients))} clients", prov)
    lines += [f"Real Flower simulation (scripts/flwr_sim.py, `--cpus-per-client {args.cpus_per_client}`), "
              f"Fashion-MNIST split among the clients (Dirichlet α = 0.1, same 60,000 images), run "
              f"config `{args.run_config}`; runs at commit(s) "
              f"{', '.join(sorted({r['commit'] for r in rows}))}. Peak RSS = VmHWM of each process, "
              "polled every 0.5 s.", "",
              "| clients | wall s (launcher) | ServerApp s | server peak RSS | client actor peak RSS | "
              "the largest round's replies, held at once without streaming (sampled clients x "
              "(model + Mosaic's generator) + prototypes) | "
              "final acc | load avg before / after |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r["memory"]
        lines.append(f"| {r['clients']} | {r['launcher_seconds']:.0f} | {r['serverapp_seconds']:.0f} | "
                     f"{mem.get('server', {}).get('peak_mib', float('nan')):.0f} MiB | "
                     f"{mem.get('client', {}).get('peak_mib', float('nan')):.0f} MiB | "
                     f"{r['held']['total_bytes'] / 2**20:.0f} MiB | {r['final_accuracy']:.4f} | "
                     f"{r['loadavg'][0]} / {r['loadavg'][1]} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        peak = lambda r: r["memory"].get("server", {}).get("peak_mib", float("nan"))  # noqa: E731
        slope = (peak(b) - peak(a)) / (b["clients"] - a["clients"])
        held = (b["held"]["total_bytes"] - a["held"]["total_bytes"]) / (b["clients"] - a["clients"]) / 2**20
        lines += ["", f"Server peak grows by {slope:.1f} MiB per added client from {a['clients']} to "
                  f"{b['clients']} clients; the client payloads the server decodes in its largest "
                  f"round grow by {held:.2f} MiB per client (model "
                  f"{a['held']['model_bytes'] / 2**20:.2f} MiB + generator "
                  f"{a['held']['generator_bytes'] / 2**20:.2f} MiB + prototypes). The C class "
                  f"experts alone are {a['held']['experts_bytes'] / 2**20:.1f} MiB whatever the "
                  "number of clients."]
    if probes:
        lines += ["", "In-process probe (`--probe`): the same runs with the ServerApp and the ClientApp in "
                  "one process (mosaic_flwr.testing.inprocess.InProcessGrid, clients one at a time, at most two "
                  "partitions cached), measured on entering the distillation and the KD loop: live "
                  "torch tensors (distinct storages), RSS, and the decoded replies the strategy "
                  "passes to the distillation.", "",
                  "| clients | decoded replies at distillation | live tensors at distillation | "
                  "live tensors in KD loop | RSS in KD loop | peak RSS | wall s | load avg after |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in probes:
            d, k = p["probes"].get("distillation", {}), p["probes"].get("kd", {})
            lines.append(f"| {p['clients']} | {d.get('replies_mib', float('nan')):.0f} MiB | "
                         f"{d.get('live_tensor_mib', float('nan')):.0f} MiB | "
                         f"{k.get('live_tensor_mib', float('nan')):.0f} MiB | {k.get('rss_mib', float('nan')):.0f} MiB | "
                         f"{p['peak_rss_mib']:.0f} MiB | {p['wall_seconds']:.0f} | {p['loadavg']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(args.name, md, {**prov, "run_config": args.run_config, "rows": rows, "probes": probes})
    return 0 if len(rows) == len(args.clients) else 1


if __name__ == "__main__":
    sys.exit(main())
