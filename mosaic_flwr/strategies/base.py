"""What every strategy runner receives, and the server-side evaluation/progress shared by all."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..config import Config
from ..models import MODELS, Classifier
from ..mosaic.training import evaluate
from ..records import ClientInfo, decode_client_info, record_to_state, reply_problem
from ..results import RunResults
from ..task import Arch


@dataclass
class ServerContext:
    """Everything a strategy runner needs; built once by the ServerApp."""

    cfg: Config
    grid: Grid
    device: torch.device
    model: Classifier                      # the global model (initial weights loaded)
    test_x: torch.Tensor                   # reporting only: never used for selection
    test_y: torch.Tensor
    results: RunResults
    num_nodes: int
    clients: dict[int, ClientInfo] = field(default_factory=dict)   # node id -> what it reported
    train_metrics: dict[str, float] = field(default_factory=dict)  # last round's, for the log
    _t_last: float = field(default_factory=time.perf_counter)

    def arch_of(self, node_id: int) -> Arch | None:
        """The architecture a node reported at discovery (``None``: unknown node); without
        discovery (unit tests) every node has ``model`` at full width."""
        if not self.clients:
            return Arch(self.cfg.model)
        info = self.clients.get(node_id)
        return None if info is None else Arch(info.model, info.capacity)

    def needs_bank(self) -> bool:
        """Whether clients hold anything but ``model`` at full width (model heterogeneity)."""
        return bool(self.clients) and {self.arch_of(n) for n in self.clients} != {Arch(self.cfg.model)}

    def train_config(self, **overrides: Any) -> ConfigRecord:
        """The client-side training hyper-parameters for a round."""
        c = self.cfg
        values = {"lr": c.lr, "local-epochs": c.local_epochs, "local-steps": c.local_steps,
                  "batch-size": c.batch_size, "momentum": c.momentum,
                  "weight-decay": c.weight_decay}
        values.update(overrides)
        return ConfigRecord(values)

    def evaluate_state(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state)
        return evaluate(self.model, self.test_x, self.test_y,
                        batch_size=self.cfg.eval_batch_size, device=self.device)

    def record_round(self, server_round: int, metrics: dict[str, float], **extra: Any) -> None:
        """Append a round to the results and print the one-line progress report."""
        now = time.perf_counter()
        seconds, self._t_last = now - self._t_last, now
        row = {"round": server_round, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
               "seconds": round(seconds, 3), **self.train_metrics, **extra}
        self.train_metrics = {}
        self.results.log_round(row)
        total = self.cfg.num_server_rounds
        train = f"  train-loss {row['train-loss']:.4f}" if "train-loss" in row else ""
        phase = f"  [{extra['phase']}]" if "phase" in extra else ""
        log(INFO, "[progress] round %d/%d  accuracy %.4f  loss %.4f%s  %.1f s%s",
            server_round, total, row["accuracy"], row["loss"], train, seconds, phase)

    def evaluate_fn(self) -> Callable[[int, ArrayRecord], MetricRecord]:
        """Server-side evaluation hook for Flower strategies: evaluates and records a round."""

        def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            metrics = self.evaluate_state(record_to_state(arrays))
            self.record_round(server_round, metrics)
            return MetricRecord(metrics)

        return fn


def filter_replies(replies: list[Message], template: dict[str, torch.Tensor]) -> tuple[list[Message], int]:
    """Keep replies whose payload validates against ``template``; log and count the rest."""
    valid, rejected = [], 0
    for msg in replies:
        problem = reply_problem(msg, template)
        if problem is None:
            valid.append(msg)
        else:
            rejected += 1
            log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, problem)
    return valid, rejected


def discover_clients(grid: Grid, node_ids: list[int], num_classes: int,
                     timeout: float = 900.0) -> dict[int, ClientInfo]:
    """Ask every node (``query`` message) for its partition id, label counts and
    architecture. Nodes that fail or send garbage are logged and left out; raises
    ``ValueError`` with the first client's problem when no node could start."""
    messages = [Message(RecordDict({}), dst_node_id=nid, message_type="query") for nid in node_ids]
    clients, problems, answered = {}, [], set()
    for msg in grid.send_and_receive(messages, timeout=timeout):
        answered.add(msg.metadata.src_node_id)
        info, problem = decode_client_info(msg, num_classes, MODELS)
        if info is None:
            problems.append(problem)
            log(WARNING, "Leaving out node %s: %s", msg.metadata.src_node_id, problem)
        else:
            clients[info.node_id] = info
    silent = sorted(set(node_ids) - answered)
    if silent:
        log(WARNING, "No answer from nodes %s within %.0f s; they are left out", silent, timeout)
    if not clients:
        raise ValueError(f"no client could start: {problems[0] if problems else 'no answer'}")
    return clients
