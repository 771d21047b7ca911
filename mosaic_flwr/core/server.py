"""What every strategy runner receives, and the server-side evaluation/progress shared by all."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from mosaic_flwr.config import Config
from mosaic_flwr.models import MODELS
from mosaic_flwr.core.records import ClientInfo, decode_client_info, reply_bytes
from mosaic_flwr.core.results import RunResults
from mosaic_flwr.core.task import Arch


@dataclass
class ServerContext:
    """Everything a strategy runner needs; built once by the ServerApp."""

    cfg: Config
    grid: Grid
    device: torch.device
    test_x: torch.Tensor                   # reporting only: never used for selection
    test_y: torch.Tensor
    results: RunResults
    num_nodes: int
    clients: dict[int, ClientInfo] = field(default_factory=dict)   # node id -> what it reported
    # node id -> the label counts it is weighted by (``count-clip``; its declared ones where absent)
    bounded: dict[int, torch.Tensor] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)  # last round's, for the log
    resume_state: dict[str, Any] | None = None   # a checkpoint to continue from (``resume``)
    resumed_after: int | None = None             # its round (kept once the checkpoint is dropped)
    init_state: dict[str, Any] | None = None     # another run's checkpoint to start from (``init-from``)
    # ``validation-split``: training data no client holds, for choosing settings in benchmarks
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    _t_last: float = field(default_factory=time.perf_counter)

    def arch_of(self, node_id: int) -> Arch | None:
        """The architecture a node reported at discovery (``None``: unknown node); without
        discovery (unit tests) every node has ``model`` at full width."""
        if not self.clients:
            return Arch(self.cfg.model)
        info = self.clients.get(node_id)
        return None if info is None else Arch(info.model, info.capacity)

    def partition_of(self, node_id: int) -> int:
        """A node's partition id (its node id where discovery did not run: unit tests)."""
        info = self.clients.get(node_id)
        return node_id if info is None else info.partition_id

    def describe(self, node_ids: list[int]) -> str:
        """``node 12 (partition 3)``, for log lines that name clients."""
        names = [f"node {n}" + (f" (partition {self.clients[n].partition_id})" if n in self.clients else "")
                 for n in node_ids]
        return ", ".join(names)

    def declared_problem(self, node_id: int, num_examples: int,
                         label_counts: torch.Tensor | None = None) -> str | None:
        """Why a reply's ``num-examples`` (and label counts) contradict what the client
        declared at discovery (None when they agree, or without discovery)."""
        info = self.clients.get(node_id)
        if info is None:
            return None
        if num_examples != info.num_examples:
            return f"num-examples {num_examples}, but the client declared {info.num_examples} at discovery"
        if label_counts is not None and not torch.equal(label_counts.long(), info.label_counts):
            return "label counts differ from those the client declared at discovery"
        return None

    def counts_of(self, node_id: int, declared: torch.Tensor) -> torch.Tensor:
        """The label counts a node's reply is weighted by: its declared counts, bounded by
        ``count-clip`` (``bounded``); ``declared`` where discovery did not run (unit tests)."""
        return self.bounded.get(node_id, declared)

    def weight_of(self, node_id: int, num_examples: int) -> float:
        """The example count a node's reply is weighted by (``counts_of``'s total;
        ``num_examples``, the declared one, where discovery did not run)."""
        bounded = self.bounded.get(node_id)
        return float(num_examples if bounded is None else bounded.sum())

    def train_config(self, **overrides: Any) -> ConfigRecord:
        """The client-side training hyper-parameters for a round."""
        c = self.cfg
        values = {"lr": c.lr, "local-epochs": c.local_epochs, "local-steps": c.local_steps,
                  "batch-size": c.batch_size, "momentum": c.momentum,
                  "weight-decay": c.weight_decay}
        values.update(overrides)
        return ConfigRecord(values)

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


REPLY_TOO_LARGE = 413  # the error code of a reply dropped for its size (HTTP's "content too large")


def reply_limit(cfg) -> int:
    """``reply-max-mb`` in bytes: the largest reply a call keeps."""
    return int(cfg.reply_max_mb * 2**20)


def oversized(msg: Message, max_bytes: int | None, label: str) -> Message:
    """``msg``, or in its place an error reply from the same node when it holds more than
    ``max_bytes`` (logged once): the callers then drop it as they drop any error reply,
    before a byte of it is decoded."""
    if not max_bytes or msg.has_error() or (size := reply_bytes(msg)) <= max_bytes:
        return msg
    reason = f"reply of {size / 2**20:.1f} MB, more than reply-max-mb ({max_bytes / 2**20:g} MB)"
    log(WARNING, "%s: dropping the reply of node %s: %s", label, msg.metadata.src_node_id, reason)
    return Message(error=Error(code=REPLY_TOO_LARGE, reason=reason), metadata=msg.metadata)


class Straggler(NamedTuple):
    """When the last replies of a call stop being waited for (``straggler-*`` settings):
    once ``quorum`` of the replies are in, the rest get ``factor`` times the median time the
    replies so far took, and at least ``floor`` seconds, instead of the call's whole timeout."""

    quorum: float = 0.5
    factor: float = 3.0
    floor: float = 60.0

    @classmethod
    def of(cls, cfg) -> "Straggler":
        return cls(cfg.straggler_quorum, cfg.straggler_factor, cfg.straggler_floor)


def straggler_wait(arrivals: list[float], total: int, rule: Straggler) -> float | None:
    """Seconds the replies still missing get from now, by ``rule``, given the times (since
    the messages were sent) at which the ``len(arrivals)`` replies so far arrived; ``None``
    while fewer than the quorum (at least one) are in, or when none is missing."""
    if not arrivals or len(arrivals) >= total or len(arrivals) < max(1, math.ceil(rule.quorum * total)):
        return None
    return max(rule.floor, rule.factor * statistics.median(arrivals))


def discover_clients(grid: Grid, node_ids: list[int], num_classes: int,
                     timeout: float = 900.0, straggler: Straggler | None = Straggler(),
                     max_bytes: int | None = None) -> dict[int, ClientInfo]:
    """Ask every node (``query`` message) for its partition id, label counts and
    architecture. Nodes that fail or send garbage are logged and left out; raises
    ``ValueError`` with the first client's problem when no node could start. Silent nodes
    are waited for at most ``timeout`` s, and once ``straggler``'s quorum has answered, for
    what it gives them."""
    messages = [Message(RecordDict({}), dst_node_id=nid, message_type="query") for nid in node_ids]
    clients, problems, answered = {}, [], set()
    holders: dict[int, int] = {}  # partition id -> the node that claimed it first
    for msg in stream_replies(grid, messages, timeout, "discovery", straggler=straggler, max_bytes=max_bytes):
        answered.add(msg.metadata.src_node_id)
        info, problem = decode_client_info(msg, num_classes, MODELS)
        if info is not None and info.partition_id in holders:  # one node, one partition: the first claim stands
            info, problem = None, (f"partition-id {info.partition_id} is already held by node "
                                   f"{holders[info.partition_id]}; a second claim is refused")
        if info is None:
            problems.append(problem)
            log(WARNING, "Leaving out node %s: %s", msg.metadata.src_node_id, problem)
        else:
            clients[info.node_id] = info
            if info.partition_id >= 0:
                holders[info.partition_id] = info.node_id
    silent = sorted(set(node_ids) - answered)
    if silent:
        log(WARNING, "No answer from nodes %s within %.0f s; they are left out", silent, timeout)
    if not clients:
        raise ValueError(f"no client could start: {problems[0] if problems else 'no answer'}")
    return clients


PULL_CHUNK = 8  # message ids per pull: the most replies a round holds at once


def stream_replies(grid: Grid, messages: list[Message], timeout: float, label: str,
                   progress_every: float = 10.0, poll: float = 0.2,
                   describe: Callable[[Message], str] | None = None, chunk: int = PULL_CHUNK,
                   straggler: Straggler | None = None, max_bytes: int | None = None) -> Iterator[Message]:
    """Push ``messages`` and yield the replies as they arrive (Flower's ``push_messages`` /
    ``pull_messages``), so the caller can consume each one before the next is pulled;
    stops when every message has its reply or ``timeout`` seconds have passed. A pull asks
    for at most ``chunk`` message ids, so at most that many replies are held at once however
    many arrived while the server was busy (Flower's pull returns every ready reply it is
    asked for). Logs ``<label>: n of N replies`` at most every ``progress_every`` seconds
    (and once at the end), with what ``describe`` says of the last reply (e.g. a client's
    phase and seconds). With ``straggler``, once its quorum of replies is in the deadline
    shrinks to what ``straggler_wait`` gives the rest (logged once), never grows. A reply of
    more than ``max_bytes`` comes as an error reply from its node (:func:`oversized`)."""
    total = len(messages)
    ids = set(grid.push_messages(messages))
    del messages
    deadline = time.monotonic() + timeout
    t_start = last_log = time.monotonic()
    got, note, arrivals, cut = 0, "", [], False
    chunk = max(1, int(chunk))
    while ids:
        pulled = 0
        order = sorted(ids)
        for i in range(0, len(order), chunk):
            for msg in grid.pull_messages(order[i:i + chunk]):
                ids.discard(msg.metadata.reply_to_message_id)
                msg = oversized(msg, max_bytes, label)
                got += 1
                pulled += 1
                if describe is not None:
                    note = describe(msg)
                arrivals.append(time.monotonic() - t_start)
                if straggler is not None and not cut and (wait := straggler_wait(arrivals, total, straggler)):
                    cut = True
                    if time.monotonic() + wait < deadline:
                        deadline = time.monotonic() + wait
                        log(INFO, "[progress] %s: %d of %d replies in; the rest get %.0f s more (%g x the "
                            "median reply time %.1f s, at least %g s: straggler-factor, straggler-floor)",
                            label, got, total, wait, straggler.factor, statistics.median(arrivals),
                            straggler.floor)
                yield msg
            now = time.monotonic()
            if ids and now - last_log >= progress_every:
                last_log = now
                log(INFO, "[progress] %s: %d of %d replies (%.0f s)%s", label, got, total, now - t_start,
                    f"; last: {note}" if note else "")
        now = time.monotonic()
        if not ids or now >= deadline:
            break
        pending = getattr(grid, "pending", None)  # the in-process grid: nothing left to answer
        if pending is not None and not any(i in pending for i in ids):
            break
        if not pulled:
            time.sleep(min(poll, max(0.0, deadline - now)))
    if total:
        log(INFO, "[progress] %s: %d of %d replies (%.1f s)", label, got, total, time.monotonic() - t_start)
