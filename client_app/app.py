"""The ClientApp: decode the message, call mosaic_flwr, encode the reply. Thin."""

from __future__ import annotations

import time
from functools import lru_cache
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from mosaic_flwr.config import Config, build_config, resolve_device
from mosaic_flwr.data import dataset_info
from mosaic_flwr.data.augment import augmenter
from mosaic_flwr.methods.mosaic.client import coarsen_counts, mosaic_client_round
from mosaic_flwr.methods.mosaic.prototypes import per_class_subset
from mosaic_flwr.core.training import label_counts, predict_logits, train_local
from mosaic_flwr.privacy import dp as dpm
from mosaic_flwr.privacy.ledger import BudgetExceeded, Ledger, ledger_name
from mosaic_flwr.core.records import (ARRAYS, CLIENT_CPU_SECONDS, CLIENT_SECONDS, CONFIG, META_LOGITS, METRICS, NUM_EXAMPLES,
                                 mosaic_payload, record_to_state, state_to_record)
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.registry import STRATEGIES, ClientStep
from mosaic_flwr.core.task import Arch, build_arch, client_arch, node_data, node_partition, unseen_data


def _work(t0: float, c0: float, device) -> dict[str, float]:
    """A train reply's client work since ``t0`` (``time.perf_counter``) and ``c0``
    (``time.process_time``): wall seconds, and on a CPU device the process's CPU seconds."""
    out = {CLIENT_SECONDS: time.perf_counter() - t0}
    if str(device).startswith("cpu"):
        out[CLIENT_CPU_SECONDS] = time.process_time() - c0
    return out


app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> Config:
    return build_config(dict(items), warn=False)  # an old key name: the ServerApp's log says so, once


def client_setup(context: Context) -> tuple[Config, int, int]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    torch.set_num_threads(cfg.client_threads)
    return cfg, *node_partition(context.node_config)


def round_seed(cfg: Config, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return mix_seed(cfg.seed, "client", server_round, partition_id)


def sgd_settings(c) -> dict:
    """Client SGD hyper-parameters from a message's ConfigRecord."""
    return {"epochs": int(c["local-epochs"]), "steps": int(c["local-steps"]),
            "batch_size": int(c["batch-size"]), "lr": float(c["lr"]),
            "momentum": float(c["momentum"]), "weight_decay": float(c["weight-decay"])}


def expert_settings(c) -> dict | None:
    """``kd.expert-pass``: the SGD settings of the client's expert model (the round's settings,
    with the ``expert-*`` keys the server sent in place of theirs), or None when none were sent."""
    if "expert-local-steps" not in c:
        return None
    settings = sgd_settings(c)
    settings["steps"] = int(c["expert-local-steps"])
    for key, name, kind in (("expert-batch-size", "batch_size", int), ("expert-momentum", "momentum", float),
                            ("expert-weight-decay", "weight_decay", float), ("expert-lr", "lr", float)):
        if key in c:
            settings[name] = kind(c[key])
    return settings


def _local_data(context: Context):
    """Config, partition id and this client's data (normalised images, labels)."""
    cfg, pid, _ = client_setup(context)
    x, y = node_data(cfg, context.node_config)
    return cfg, pid, x, y


def _received(msg: Message, context: Context):
    """What every train handler starts from: config, this client's data, the received model
    (this client's architecture, weights loaded), the message's ConfigRecord, and this
    round's seed."""
    cfg, pid, x, y = _local_data(context)
    model = build_arch(cfg, client_arch(cfg, context.node_config))
    model.load_state_dict(record_to_state(msg.content[ARRAYS]))
    c = msg.content[CONFIG]
    return cfg, x, y, model, c, round_seed(cfg, int(c.get("server-round", 0)), pid)


def client_ledger(cfg: Config, context: Context, y: torch.Tensor) -> Ledger | None:
    """This client's privacy ledger under DP (``mosaic_flwr.privacy.ledger``; None without DP):
    in the node config's ``ledger-dir`` (a deployed SuperNode's own folder, which the server
    cannot change), else, in simulation, in a folder per run under ``output-dir`` (the Flower
    run id and the run name: simulated clients are new in every run)."""
    settings = dpm.dp_settings(cfg.values)
    if settings is None:
        return None
    pid, num = node_partition(context.node_config)
    where = str(context.node_config.get("ledger-dir", "") or "")
    run = f"run-{context.run_id}" + (f"-{cfg.run_name}" if cfg.run_name else "")
    folder = Path(where).expanduser() if where else Path(cfg.output_dir).expanduser() / "privacy-ledger" / run
    return Ledger(folder / ledger_name(cfg.dataset, pid, num, y), budget=settings.epsilon, delta=settings.delta,
                  accountant=settings.accountant)


def released_counts(cfg: Config, context: Context, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label counts this client sends: the true ones without DP; with DP, noisy ones
    drawn once (secret noise, ``dp.count-epsilon``) and kept in the client's privacy ledger,
    so every message repeats the same release instead of spending more privacy, across
    restarts too. With ``count-floor``, classes below it are declared absent. Their sum is
    the example count every reply of this client declares."""
    counts = label_counts(y, num_classes)
    settings = dpm.dp_settings(cfg.values)
    if settings is not None:
        counts = client_ledger(cfg, context, y).noisy_counts(
            lambda: dpm.noisy_counts(counts, dpm.count_sigma(settings), dpm.secret_generator()), num_classes,
            dpm.count_sigma(settings), run=int(context.run_id))
    return coarsen_counts(counts, cfg.count_floor)


def _private(handler):
    """``handler``, with a refusal of the privacy ledger logged as one clear line (the reply is
    then Flower's error reply: nothing computed from the data is sent)."""
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except BudgetExceeded as exc:
            log(ERROR, "[privacy] %s", exc)
            raise
    guarded.__name__, guarded.__doc__ = handler.__name__, handler.__doc__
    return guarded


@app.query()
@_private
def query(msg: Message, context: Context) -> Message:
    """What the server learns about a client before training: its partition id, label counts
    (never data) and the architecture it trains (see ``mosaic_flwr.core.task.client_arch``)."""
    cfg, pid, x, y = _local_data(context)
    arch = client_arch(cfg, context.node_config)
    counts = released_counts(cfg, context, y, dataset_info(cfg.dataset).num_classes)
    content = RecordDict({
        METRICS: MetricRecord({"partition-id": pid, NUM_EXAMPLES: int(counts.sum()),
                               "counts": [int(c) for c in counts.tolist()]}),
        "arch": ConfigRecord({"model": arch.model, "capacity": arch.capacity}),
    })
    return Message(content=content, reply_to=msg)


@app.train()
@_private
def train(msg: Message, context: Context) -> Message:
    """Baseline round (FedAvg, FedProx, FedRS, FedBN, Mosaic's fine-tune rounds): train,
    return weights, with the hooks the run's method declares around the local training
    (``Method.client``: FedRS scales the logits of the classes this client lacks; FedBN keeps
    its own BatchNorm entries in its node state)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg, x, y, model, c, seed = _received(msg, context)
    info = dataset_info(cfg.dataset)
    side = STRATEGIES[cfg.strategy].client
    step = ClientStep(model, x, y, info.num_classes, c, context.state, msg.content)
    if side.before is not None:
        side.before(step)
    extra = dict(side.train_options(step)) if side.train_options is not None else {}
    stats = train_local(model, x, y, **sgd_settings(c), proximal_mu=float(c.get("proximal-mu", 0.0)),
                        seed=seed, device=resolve_device(cfg.device), augment=augmenter(cfg.augment, info),
                        **extra)
    if side.after is not None:
        side.after(step)
    # The declared example count is the released counts' sum (the discovery's declaration).
    n = int(released_counts(cfg, context, y, info.num_classes).sum())
    metrics = MetricRecord({NUM_EXAMPLES: n, "train-loss": stats["train-loss"],
                            **_work(t0, c0, resolve_device(cfg.device))})
    content = RecordDict({ARRAYS: state_to_record(model.state_dict()), METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_private
def evaluate_candidates(msg: Message, context: Context) -> Message:
    """Score the candidate models the server sends (``candidate-<name>``, this client's
    architecture; with ``families`` in the config, ``candidate-<name>.<family>``: that
    family's model, at this client's width for its own family and full width otherwise) on
    this client's data: how many examples each classifies correctly (with ``count-floor``, of
    the classes it declares; the example count is its declared one).

    Under DP the counts are one Gaussian release (``dp.noisy_scores``, ``dp.gate-epsilon``
    shared by the run's planned gate scores), written in the ledger before it is sent, and the
    example count is the released noisy total; a score the run did not plan is refused."""
    cfg, _, x, y = _local_data(context)
    arch = client_arch(cfg, context.node_config)
    families = set(msg.content[CONFIG].get("families", []))
    settings = dpm.dp_settings(cfg.values)
    if settings is not None and not settings.gate_releases:
        raise BudgetExceeded("privacy ledger: refusing to score candidate models: this run plans no gate "
                             f"scores (kd.gate={cfg.of('kd').gate!r}), so dp.epsilon reserves nothing for them")
    released = released_counts(cfg, context, y, dataset_info(cfg.dataset).num_classes)
    ledger = client_ledger(cfg, context, y)
    declared = released[y] > 0
    if not bool(declared.all()):  # classes declared absent are not scored either
        x, y = x[declared], y[declared]
    metrics = {NUM_EXAMPLES: len(y)}
    for name in msg.content[CONFIG]["candidates"]:
        family = name.rpartition(".")[2] if families else arch.model
        if family not in families | {arch.model}:
            raise ValueError(f"evaluate: candidate {name!r} names no family the server listed")
        model = build_arch(cfg, arch if family == arch.model else Arch(family))
        model.load_state_dict(record_to_state(msg.content[f"candidate-{name}"]))
        right = (predict_logits(model, x, device=resolve_device(cfg.device)).argmax(1) == y).sum() if len(y) else 0
        metrics[f"correct-{name}"] = int(right)
    if settings is not None:
        total = int(released.sum())
        sigma = dpm.gate_sigma(settings)
        scores = dpm.noisy_scores({k: v for k, v in metrics.items() if k != NUM_EXAMPLES}, total, sigma,
                                  dpm.secret_generator())
        ledger.charge({"gate": (sigma, 1.0, 1)}, run=int(context.run_id),
                      round=int(msg.content[CONFIG].get("server-round", 0)))
        metrics = {NUM_EXAMPLES: total, **scores}
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query("logits")
def meta_logits(msg: Message, context: Context) -> Message:
    """``mosaic.meta-data='clients'``: the logits of every model the server sends (``model-<j>``:
    the class experts, this client's architecture) on at most ``samples-per-class`` of this
    client's own images of each class, with their labels. Images never leave the client."""
    cfg, pid, x, y = _local_data(context)
    c = msg.content[CONFIG]
    keep = per_class_subset(y, int(c["samples-per-class"]),
                            seed=mix_seed(cfg.seed, "meta-logits", int(c["server-round"]), pid))
    arch = client_arch(cfg, context.node_config)
    device = resolve_device(cfg.device)
    logits = []
    for j in range(int(c["num-models"])):
        model = build_arch(cfg, arch)
        model.load_state_dict(record_to_state(msg.content[f"model-{j}"]))
        logits.append(predict_logits(model, x[keep], device=device))
    out = {"logits": torch.stack(logits, dim=1), "labels": y[keep].long()}
    return Message(content=RecordDict({META_LOGITS: state_to_record(out)}), reply_to=msg)


@app.train("mosaic")
@_private
def train_mosaic(msg: Message, context: Context) -> Message:
    """Mosaic warm-up round (weights + label counts); at the distillation round also the
    prototypes and the once-trained generator (the server's ``mosaic.generator``: conditional or dcgan)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg, x, y, model, c, seed = _received(msg, context)
    distill = bool(c.get("distill", False))
    bank = bool(c.get("prototypes", False)) and not distill  # proto-rounds: prototypes only
    gen = None
    if distill:
        gen = {"steps": int(c["gen-steps"]), "batch-size": int(c["gen-batch-size"]),
               "lr": float(c["gen-lr"]), "ce-weight": float(c["gen-ce-weight"]),
               "div-weight": float(c["gen-div-weight"]),
               "generator": str(c.get("generator", "conditional")), "dcgan-width": int(c.get("dcgan-width", 64))}
    expert = expert_settings(c) if distill else None
    info = dataset_info(cfg.dataset)
    settings = dpm.dp_settings(cfg.values)
    dp, ledger, releases = {}, None, {}
    if settings is not None:
        dp = {"dp": settings, "dp_rng": dpm.secret_generator(),
              "dp_counts": released_counts(cfg, context, y, info.num_classes)}
        ledger = client_ledger(cfg, context, y)
        protos = distill and int(c.get("proto-k", 0)) > 0
        if protos:
            releases["prototypes"] = dpm.plan(settings, protos=True)["prototypes"]
        if gen is not None:
            releases["generator"] = dpm.generator_mechanism(settings, len(y), gen["batch-size"], gen["steps"],
                                                            protos=protos)
        if releases:
            ledger.check(releases)  # refused before any work
    unseen = None
    if (distill or bank) and bool(c.get("privacy-audit", False)):
        data_dir = str(context.node_config.get("data-dir", "") or "")  # the node's own copy, as node_data
        try:
            unseen = unseen_data(cfg.replace(data_dir=str(Path(data_dir).expanduser())) if data_dir else cfg)
        except Exception as exc:  # noqa: BLE001  (a node without the data set's test split: no audit)
            log(WARNING, "privacy audit skipped: the test split is not readable here (%s)", exc)
    result = mosaic_client_round(
        model, x, y, info, train=sgd_settings(c),
        seed=seed, device=resolve_device(cfg.device), distill_round=distill, prototypes=bank,
        proto_k=int(c.get("proto-k", 0)),
        proto_min_records=int(c.get("proto-min-records", 1)), count_floor=cfg.count_floor, gen=gen,
        expert_train=expert,
        augment=augmenter(cfg.augment, info), audit_unseen=unseen, **dp)
    result.metrics.update(_work(t0, c0, resolve_device(cfg.device)))
    if ledger is not None and releases:  # written down before it is sent
        result.metrics["dp-ledger-epsilon"] = ledger.charge(releases, run=int(context.run_id),
                                                            round=int(c.get("server-round", 0)))
    if settings is not None and any(k.startswith("privacy-") for k in result.metrics):
        # dp.audit: the figures describe the private data and dp.epsilon does not cover them
        figures = {k: v for k, v in result.metrics.items() if k.startswith("privacy-")}
        log(INFO, "[privacy] audit under DP, kept on this node (not sent: dp.epsilon does not cover it): %s",
            {k: v for k, v in figures.items() if not isinstance(v, list)})
        result.metrics = {k: v for k, v in result.metrics.items() if k not in figures}
    return Message(content=mosaic_payload(result), reply_to=msg)
