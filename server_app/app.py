"""The ServerApp: build config, data, model and strategy; run it; save results. Thin."""

from __future__ import annotations

import time
from datetime import datetime
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from mosaic_flwr.checkpoint import config_changes, load_checkpoint
from mosaic_flwr.config import Config, ConfigError, build_config, resolve_device
from mosaic_flwr.data import DatasetNotFoundError, PartitionError, dataset_info
from mosaic_flwr.records import ClientInfo
from mosaic_flwr.results import RunResults, atomic_write, rows_to_csv, save_partition
from mosaic_flwr.strategies import ServerContext, get_strategy
from mosaic_flwr.strategies.bank import RoundFailed
from mosaic_flwr.strategies.base import discover_clients
from mosaic_flwr.task import Arch, test_data

app = ServerApp()


def run_dir(cfg: Config) -> Path:
    """``<output-dir>/<run-name>``; an automatic name never reuses an existing directory."""
    base = Path(cfg.output_dir).expanduser().resolve()
    if cfg.run_name:
        return base / cfg.run_name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    split = cfg.partition + (f"{cfg.alpha:g}" if cfg.partition == "dirichlet" else "")
    name = f"{cfg.strategy}-{cfg.dataset}-{split}-{cfg.model}-s{cfg.seed}-{stamp}"
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}-{n}"
    return candidate


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 120.0) -> list[int]:
    """Node ids once at least ``minimum`` nodes (and a stable count) are connected."""
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            time.sleep(1.0)
            again = sorted(grid.get_node_ids())
            if again == nodes:
                return nodes
        time.sleep(1.0)
    raise ValueError(f"min-train-clients: only {len(nodes)} nodes connected after {timeout:.0f} s, "
                     f"need {minimum}")


def setup(grid: Grid, context: Context) -> ServerContext:
    """Everything that can fail on bad input, done before any training starts."""
    cfg = build_config(context.run_config)
    strategy = get_strategy(cfg.strategy)  # noqa: F841  (validates availability early)
    device = resolve_device(cfg.device)
    if cfg.server_threads:  # 0: torch's default (one per core)
        torch.set_num_threads(cfg.server_threads)
    resume_state = resume_checkpoint(cfg) if cfg.resume else None
    out = Path(cfg.resume).expanduser().resolve() if cfg.resume else run_dir(cfg)
    results = RunResults(out, cfg.to_dict())  # checks the directory is writable
    test_x, test_y = test_data(cfg)            # raises DatasetNotFoundError with the paths
    nodes = wait_for_nodes(grid, min(cfg.min_train_clients, 2))
    info = dataset_info(cfg.dataset)
    # The clients report their label counts and architectures; the server never sees data.
    clients = discover_clients(grid, nodes, info.num_classes)
    save_assignment(out, results, clients)
    if resume_state is not None:
        check_same_clients(resume_state["assignment"], results.extra["assignment"])
    table = np.stack([c.label_counts.numpy() for c in sorted(clients.values(), key=_by_partition)])
    save_partition(out, table, info.class_names,
                   title=f"{cfg.dataset} {cfg.partition} (alpha={cfg.alpha:g}), {len(clients)} clients")
    results.extra["partition_label_counts"] = table.tolist()
    log(INFO, "[mosaic-flwr] strategy=%s dataset=%s model=%s partition=%s alpha=%g clients=%d "
        "rounds=%d device=%s", cfg.strategy, cfg.dataset, cfg.model, cfg.partition, cfg.alpha,
        len(clients), cfg.num_server_rounds, device)
    log(INFO, "[mosaic-flwr] results -> %s", out)
    return ServerContext(cfg=cfg, grid=grid, device=device, test_x=test_x,
                         test_y=test_y, results=results, num_nodes=len(clients), clients=clients,
                         resume_state=resume_state)


def resume_checkpoint(cfg: Config) -> dict:
    """The checkpoint of the run ``resume`` names, if this run's config may continue it."""
    state = load_checkpoint(Path(cfg.resume))
    changes = config_changes(state["config"], cfg.to_dict())
    if changes:
        raise ConfigError(f"resume: the run config differs from the checkpoint's ({'; '.join(changes)}); "
                          "give the same settings to continue that run")
    if state["round"] >= cfg.num_server_rounds:
        log(INFO, "[mosaic-flwr] the checkpoint is after round %d: nothing left to train "
            "(raise num-server-rounds to extend the run)", state["round"])
    log(INFO, "[mosaic-flwr] resuming %s after round %d", cfg.resume, state["round"])
    return state


def check_same_clients(saved: list[dict], now: list[dict]) -> None:
    """A run resumes on the clients it started with (partition ids, data sizes, architectures)."""
    def key(rows):
        return sorted((r["partition-id"], r["model"], float(r["capacity"]), r["num-examples"]) for r in rows)
    if key(saved) != key(now):
        raise ValueError(f"resume: the connected clients (partition, model, capacity, examples) "
                         f"{key(now)} differ from the checkpoint's {key(saved)}")


def _by_partition(info: ClientInfo) -> tuple[int, int]:
    return info.partition_id, info.node_id


def save_assignment(out: Path, results: RunResults, clients: dict[int, ClientInfo]) -> None:
    """Log which architecture each client trains and save it (assignment.csv, summary.json)."""
    rows = [{"node-id": c.node_id, "partition-id": c.partition_id, "model": c.model,
             "capacity": c.capacity, "num-examples": c.num_examples}
            for c in sorted(clients.values(), key=_by_partition)]
    atomic_write(out / "assignment.csv", rows_to_csv(rows))
    results.extra["assignment"] = rows
    groups: dict[str, list[int]] = {}
    for c in sorted(clients.values(), key=_by_partition):
        groups.setdefault(str(Arch(c.model, c.capacity)), []).append(c.partition_id)
    log(INFO, "[mosaic-flwr] architectures (partition ids): %s",
        "; ".join(f"{arch}: {pids}" for arch, pids in groups.items()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.perf_counter()
    try:
        sc = setup(grid, context)
    except (ConfigError, DatasetNotFoundError, PartitionError, ValueError) as exc:
        log(ERROR, "[mosaic-flwr] configuration error: %s", exc)
        # An Exception (not SystemExit) so that Flower marks the run as failed.
        raise RuntimeError(f"configuration error: {exc}") from None
    try:
        get_strategy(sc.cfg.strategy)(sc)
    except RoundFailed as exc:
        log(ERROR, "[mosaic-flwr] %s", exc)
        raise
    cfg = sc.cfg
    summary = sc.results.finish(
        {"strategy": cfg.strategy, "dataset": cfg.dataset, "model": cfg.model,
         "partition": cfg.partition, "alpha": cfg.alpha, "num_clients": sc.num_nodes,
         "seed": cfg.seed, "device": str(sc.device),
         **({"resumed_after_round": sc.resume_state["round"]} if sc.resume_state else {}),
         "wall_seconds": round(time.perf_counter() - t0, 2)},
        title=f"{cfg.strategy} on {cfg.dataset} ({cfg.partition}, alpha={cfg.alpha:g}, "
              f"{sc.num_nodes} clients)")
    log(INFO, "[mosaic-flwr] done: final accuracy %.4f, best %.4f (round %s), %.1f s",
        summary["final_accuracy"], summary["best_accuracy"], summary["best_round"],
        summary["wall_seconds"])
    log(INFO, "[mosaic-flwr] results written to %s", sc.results.out_dir)
