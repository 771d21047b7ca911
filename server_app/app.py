"""The ServerApp: build config, data, model and strategy; run it; save results. Thin."""

from __future__ import annotations

import time
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from mosaic_flwr.core.checkpoint import CheckpointError, config_changes, load_checkpoint, warm_start_changes
from mosaic_flwr.config import Config, ConfigError, build_config, local_work, resolve_device
from mosaic_flwr.data import DatasetNotFoundError, PartitionError, dataset_info
from mosaic_flwr.core.robust import bound_counts
from mosaic_flwr.privacy import dp as dpm
from mosaic_flwr.core.records import ClientInfo
from mosaic_flwr.core.results import RunResults, atomic_write, rows_to_csv, save_partition, tensorboard_available
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.registry import STRATEGIES, get_strategy
from mosaic_flwr.core.fedavg import RoundFailed
from mosaic_flwr.core.server import Straggler, discover_clients, reply_limit
from mosaic_flwr.core.task import Arch, clients_per_round, test_data, test_set_fingerprint, validation_data

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


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, *, poll: float = 1.0,
                   log_every: float = 10.0) -> list[int]:
    """Node ids once at least ``minimum`` nodes are connected and their number has been
    stable for ``poll`` seconds (nodes starting together are all taken). Logs ``n of N
    connected`` every ``log_every`` seconds while waiting; ``ConfigError`` naming
    ``min-train-clients`` when fewer than ``minimum`` are connected after ``timeout`` s."""
    start = time.monotonic()
    next_log = start
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) >= minimum:
            time.sleep(poll)
            if sorted(grid.get_node_ids()) == nodes:
                return nodes
            if now - start >= timeout:  # enough nodes, but the set keeps changing: take it now
                log(INFO, "[mosaic-flwr] %d nodes connected (min-train-clients %d), still changing after %g s "
                    "(connect-timeout); starting with them", len(nodes), minimum, timeout)
                return nodes
            continue
        if now - start >= timeout:
            raise ConfigError(f"min-train-clients: only {len(nodes)} of {minimum} nodes connected after "
                              f"{timeout:g} s (connect-timeout); start more SuperNodes (in simulation: "
                              "num-supernodes), lower min-train-clients or raise connect-timeout")
        if now >= next_log:
            log(INFO, "[mosaic-flwr] waiting for nodes: %d of %d connected (min-train-clients), "
                "up to %.0f s more (connect-timeout)", len(nodes), minimum, timeout - (now - start))
            next_log = now + log_every
        time.sleep(min(poll, max(0.0, timeout - (now - start))))


def check_min_replies(cfg: Config, num_clients: int) -> None:
    """``min-replies`` must be reachable: at most the clients a round samples."""
    per_round = clients_per_round(cfg, num_clients)
    if cfg.min_replies > per_round:
        raise ConfigError(f"min-replies: {cfg.min_replies} exceeds the {per_round} clients a round samples "
                          f"({num_clients} clients connected, fraction-train={cfg.fraction_train:g}, "
                          f"min-train-clients={cfg.min_train_clients}); every round would fail")


def setup(grid: Grid, context: Context) -> ServerContext:
    """Everything that can fail on bad input, done before any training starts."""
    cfg = build_config(context.run_config)
    strategy = get_strategy(cfg.strategy)  # noqa: F841  (validates availability early)
    device = resolve_device(cfg.device)
    if cfg.server_threads:  # 0: torch's default (one per core)
        torch.set_num_threads(cfg.server_threads)
    resume_state = resume_checkpoint(cfg) if cfg.resume else None
    # A resumed run's state is in its own checkpoint; init-from only starts a fresh one.
    init_state = warm_start(cfg) if cfg.init_from and resume_state is None else None
    out = Path(cfg.resume).expanduser().resolve() if cfg.resume else run_dir(cfg)
    results = RunResults(out, cfg.to_dict())  # checks the directory is writable
    test_x, test_y = test_data(cfg)            # raises DatasetNotFoundError with the paths
    val_x, val_y = validation_data(cfg) or (None, None)
    if STRATEGIES[cfg.strategy].prepare is not None:  # e.g. FedDF's transfer set: fails here if missing
        STRATEGIES[cfg.strategy].prepare(cfg)
    results.extra["test_set_sha256"] = test_set_fingerprint(cfg)
    if resume_state is not None:
        check_same_data(resume_state, cfg, results.extra["test_set_sha256"])
    if init_state is not None:
        check_same_data(init_state, cfg, results.extra["test_set_sha256"], what="init-from")
    nodes = wait_for_nodes(grid, cfg.min_train_clients, cfg.connect_timeout)
    info = dataset_info(cfg.dataset)
    # The clients report their label counts and architectures; the server never sees data.
    clients = discover_clients(grid, nodes, info.num_classes, straggler=Straggler.of(cfg),
                              max_bytes=reply_limit(cfg))
    check_min_replies(cfg, len(clients))
    bounded = bound_declared_counts(cfg, clients, results)
    if dpm.enabled(cfg.values):
        problem = dpm.check_delta(cfg.of('dp').delta, [c.num_examples for c in clients.values()])
        if problem:
            raise ConfigError(problem)
    results.extra["dp"] = dpm.run_entry(cfg.values)
    save_assignment(out, results, clients)
    if resume_state is not None:
        check_same_clients(resume_state["assignment"], results.extra["assignment"])
    if init_state is not None:
        check_same_clients(init_state["assignment"], results.extra["assignment"], what="init-from")
        missing = sorted({c.model for c in clients.values()} - set(init_state["strategy"]["globals"]))
        if missing:
            raise ConfigError(f"init-from: {cfg.init_from} has no global model of {missing}")
        results.extra["init_from"] = init_state["summary"]
    table = np.stack([c.label_counts.numpy() for c in sorted(clients.values(), key=_by_partition)])
    save_partition(out, table, info.class_names,
                   title=f"{cfg.dataset} {cfg.partition} (alpha={cfg.alpha:g}), {len(clients)} clients")
    results.extra["partition_label_counts"] = table.tolist()
    for what, state in (("resume", resume_state), ("init-from", init_state)):
        saved = None if state is None else state["extra"].get("partition_label_counts")
        if saved is not None and saved != table.tolist():
            raise ValueError(f"{what}: the clients' label counts differ from the checkpoint's (their data "
                             "is not the data that run trained on)")
    log(INFO, "[mosaic-flwr] strategy=%s dataset=%s model=%s partition=%s alpha=%g clients=%d "
        "rounds=%d device=%s", cfg.strategy, cfg.dataset, cfg.model, cfg.partition, cfg.alpha,
        len(clients), cfg.num_server_rounds, device)
    log(INFO, "[mosaic-flwr] local work per round and client: %s", local_work(cfg))
    log(INFO, "[mosaic-flwr] %s", dpm.describe(results.extra["dp"]))
    if val_x is not None:
        log(INFO, "[mosaic-flwr] validation split: %d training images held out (no client holds them)",
            len(val_y))
    log(INFO, "[mosaic-flwr] results -> %s", out)
    if tensorboard_available():
        log(INFO, "[mosaic-flwr] live per-round scalars: tensorboard --logdir %s", results.tensorboard_dir)
    return ServerContext(cfg=cfg, grid=grid, device=device, test_x=test_x,
                         test_y=test_y, results=results, num_nodes=len(clients), clients=clients, bounded=bounded,
                         resume_state=resume_state, init_state=init_state, val_x=val_x, val_y=val_y)


def bound_declared_counts(cfg: Config, clients: dict, results) -> dict:
    """The label counts each client is weighted by (``count-clip``), logged where they are
    not the declared ones and recorded in ``summary.json`` (``count-clipped``)."""
    bounded = bound_counts({n: c.label_counts for n, c in clients.items()}, cfg.count_clip)
    clipped = {}
    for node, counts in bounded.items():
        info = clients[node]
        if not torch.equal(counts, info.label_counts):
            clipped[str(info.partition_id)] = {"declared": info.num_examples, "weighted-as": int(counts.sum())}
            log(WARNING, "[robust] node %s (partition %s) declares %d examples, more than count-clip (%g) x "
                "the median client's: weighted as %d", node, info.partition_id, info.num_examples,
                cfg.count_clip, int(counts.sum()))
    results.extra["count-clipped"] = clipped
    return bounded


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


def warm_start(cfg: Config) -> dict:
    """The final checkpoint of the run ``init-from`` names, if its clients' data and models
    are this run's (``ConfigError`` listing every key that differs), with a ``summary`` of
    what this run starts from (saved in its ``summary.json``)."""
    source = Path(cfg.init_from).expanduser().resolve()
    try:
        state = load_checkpoint(source)
    except CheckpointError as exc:
        raise ConfigError(str(exc).replace("resume:", "init-from:", 1)) from None
    changes = warm_start_changes(state["config"], cfg.to_dict())
    if changes:
        raise ConfigError(f"init-from: {source} trained other data or models than this run "
                          f"({'; '.join(changes)}); start from a run of the same data set, partition, "
                          "seed and models")
    rounds = state.get("rounds") or [{}]
    state["summary"] = {"run": str(source), "strategy": state["config"].get("strategy"),
                        "after_round": int(state["round"]), "accuracy": rounds[-1].get("accuracy"),
                        "val_accuracy": rounds[-1].get("val-accuracy")}
    log(INFO, "[mosaic-flwr] starting from %s: its %s global model after round %d (accuracy %s)", source,
        state["summary"]["strategy"], state["round"], state["summary"]["accuracy"])
    return state


def check_same_data(state: dict, cfg: Config, fingerprint: str, what: str = "resume") -> None:
    """A resumed run reads the same data, wherever ``data-dir`` now points: its test set has
    the checkpoint's fingerprint (a checkpoint without one needs the same ``data-dir``)."""
    saved = state.get("extra", {}).get("test_set_sha256")
    before = state["config"].get("data-dir")
    if saved is None and before != cfg.data_dir:
        raise ConfigError(f"{what}: data-dir: {before!r} -> {cfg.data_dir!r}, and the checkpoint has no data "
                          "fingerprint to check it is the same data; give the same data-dir")
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"{what}: the {cfg.dataset} test set read now (data-dir={cfg.data_dir!r}) is not the "
                          f"checkpoint's (sha256 {fingerprint}..., saved {saved}...): "
                          + ("a resumed run must read the same data" if what == "resume" else
                             "a run must start from a model of the same data"))


def check_same_clients(saved: list[dict], now: list[dict], what: str = "resume") -> None:
    """A run resumes (or starts from another's model) on the clients of the checkpoint's run
    (partition ids, data sizes, architectures)."""
    def key(rows):
        return sorted((r["partition-id"], r["model"], float(r["capacity"]), r["num-examples"]) for r in rows)
    if key(saved) != key(now):
        raise ValueError(f"{what}: the connected clients (partition, model, capacity, examples) "
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
    finish_run(sc, time.perf_counter() - t0)


def finish_run(sc: ServerContext, wall_seconds: float, title: str | None = None, **extra) -> dict:
    """Write the run's summary (what ran, on what, and how long) and log where it went."""
    cfg = sc.cfg
    summary = sc.results.finish(
        {"strategy": cfg.strategy, **extra, "dataset": cfg.dataset, "model": cfg.model,
         "partition": cfg.partition, "alpha": cfg.alpha, "num_clients": sc.num_nodes,
         "seed": cfg.seed, "device": str(sc.device), "local_work": local_work(cfg),
         **({"resumed_after_round": sc.resumed_after} if sc.resumed_after is not None else {}),
         "wall_seconds": round(wall_seconds, 2)},
        title=title or f"{cfg.strategy} on {cfg.dataset} ({cfg.partition}, alpha={cfg.alpha:g}, "
                       f"{sc.num_nodes} clients)")
    log(INFO, "[mosaic-flwr] done: final accuracy %.4f, best %.4f (round %s), %.1f s",
        summary["final_accuracy"], summary["best_accuracy"], summary["best_round"],
        summary["wall_seconds"])
    log(INFO, "[mosaic-flwr] results written to %s", sc.results.out_dir)
    return summary
