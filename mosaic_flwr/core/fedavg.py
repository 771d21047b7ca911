"""Federated averaging over clients of different architectures (a bank of global models).

Every client trains an ``Arch``: a model family (registry name) at a width ``capacity``
(see ``mosaic_flwr.core.task.client_arch``; the server learns each node's at discovery). The
server keeps one full-width global model per family present:

- a client of capacity 1 receives its family's global model; a client of capacity r < 1
  receives the width-r slice of it (``submodel='fixed'``: the first channels, HeteroFL;
  ``'rolling'``: a window that moves by one channel per round, FedRolex);
- aggregation averages each parameter entry over the clients of that family that hold it,
  weighted by their example counts with no client above ``max-client-share`` of the weight
  (or, with ``aggregation='median'`` / ``'trimmed-mean'``, the robust rule over those
  clients, unweighted); entries nobody trained keep their value; families never average
  with each other.

With one family at full width this is plain FedAvg. FedProx is the same with the proximal
term switched on in the clients' train config. ``MosaicStrategy`` builds on this class.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mosaic_flwr.core.checkpoint import CheckpointError, rng_state, save_checkpoint, set_rng_state
from mosaic_flwr.config import heterogeneous, lr_for_round, split_list
from mosaic_flwr.data import dataset_info
from mosaic_flwr.models import Classifier
from mosaic_flwr.core.robust import cap_shares
from mosaic_flwr.core.submodels import IndexPlan, masked_average, model_plan, robust_masked_average, slice_state
from mosaic_flwr.core.training import evaluate
from mosaic_flwr.core.records import (
    ARRAYS,
    CLIENT_CPU_SECONDS,
    CLIENT_SECONDS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    WORK_KEYS,
    decode_evaluate_reply,
    decode_reply,
    state_to_record,
)
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.core.task import Arch, build_arch, clients_per_round
from mosaic_flwr.core.streaming import RunningSum
from mosaic_flwr.core.server import ServerContext, Straggler, reply_limit, stream_replies

StateDict = dict[str, torch.Tensor]


def _drain(items: list):
    """Pop a (reversed) list's items one by one: each can be freed once read."""
    while items:
        yield items.pop()


class RoundFailed(RuntimeError):
    """A round could not gather enough valid replies; the run stops (resumable)."""


class FedAvgStrategy(FedAvg):
    def __init__(self, sc: ServerContext):
        cfg = sc.cfg
        n = min(cfg.min_train_clients, sc.num_nodes)
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=n, min_available_nodes=n)
        self.sc, self.cfg = sc, cfg
        self.info = dataset_info(cfg.dataset)
        archs = {sc.arch_of(node) for node in sc.clients} or {Arch(cfg.model)}
        listed = split_list(cfg.client_models) + [cfg.model]
        # Families in the order client-models lists them; the first is the headline model.
        self.families = sorted({a.model for a in archs}, key=lambda f: (listed + [f]).index(f))
        self.primary = self.families[0]
        self.archs = sorted(archs, key=lambda a: (self.families.index(a.model), -a.capacity))
        self.heterogeneous = heterogeneous([a.model for a in self.archs], [a.capacity for a in self.archs])
        self._modules: dict[Arch, Classifier] = {}
        self._templates: dict[Arch, StateDict] = {}
        self._plans: dict[tuple, IndexPlan] = {}
        start = (sc.init_state or {}).get("strategy", {}).get("globals", {})
        self.globals: dict[str, StateDict] = {f: start[f] if f in start else self._initial_state(f)
                                              for f in self.families}
        self.rejected = 0
        # Streaming aggregation (``streams``): family -> running sums of the round's replies.
        self._round_sums: dict[str, RunningSum] | None = None
        self._replied: set[int] = set()
        # For a round replayed into other server variants (``mosaic_flwr.testing.replay``): keep
        # every client's model (no streaming) and a copy of every reply collected.
        self.keep_models = False
        self.recorded: list[Message] | None = None

    # ------------------------------------------------------------------ models
    def _initial_state(self, family: str) -> StateDict:
        """Family ``family``'s initial weights (the same as ``initial_model`` for ``model``)."""
        torch.manual_seed(self.cfg.seed)
        return {k: v.detach().cpu() for k, v in build_arch(self.cfg, Arch(family)).state_dict().items()}

    def module(self, arch: Arch) -> Classifier:
        """A (cached) module of ``arch`` on the server's device, for evaluation and as a template."""
        if arch not in self._modules:
            with torch.random.fork_rng():  # its weights are always overwritten: leave the RNG alone
                self._modules[arch] = build_arch(self.cfg, arch).to(self.sc.device)
        return self._modules[arch]

    def template(self, arch: Arch) -> StateDict:
        """What a reply from a client of ``arch`` must look like (keys, shapes, dtypes)."""
        if arch not in self._templates:
            self._templates[arch] = {k: v.detach().cpu() for k, v in self.module(arch).state_dict().items()}
        return self._templates[arch]

    def plan(self, arch: Arch, server_round: int, mode: str | None = None) -> IndexPlan | None:
        """Which entries of the family's global model a client of ``arch`` holds this round
        (``None``: all of them)."""
        if arch.capacity == 1.0:
            return None
        mode = mode or self.cfg.submodel
        key = (arch, mode, server_round if mode == "rolling" else 0)
        if key not in self._plans:
            self._plans[key] = model_plan(self.module(Arch(arch.model)), self.module(arch),
                                          mode=mode, offset=key[2])
        return self._plans[key]

    def state_for(self, arch: Arch, server_round: int, mode: str | None = None) -> StateDict:
        """The model a client of ``arch`` receives in ``server_round``."""
        full = self.globals[arch.model]
        plan = self.plan(arch, server_round, mode)
        return full if plan is None else slice_state(full, plan)

    # ------------------------------------------------------------------ rounds
    def round_config(self, server_round: int, config: ConfigRecord) -> tuple[str, dict]:
        """Message type and train config of a round (subclasses add phases); the learning
        rate follows ``lr-schedule`` (``config.lr_for_round``)."""
        return "train", {**dict(config), "server-round": server_round,
                         "lr": lr_for_round(self.cfg, server_round)}

    def sample(self, server_round: int, attempt: int = 0, grid: Grid | None = None) -> list[int]:
        """This round's clients, among the nodes known since discovery that are connected.

        The draw depends only on the run seed, the round, the attempt and the clients'
        partition ids (not on node ids, which change when a run is resumed), so a resumed
        run samples what the uninterrupted run would have. Waits up to ``round-timeout`` for
        ``min-replies`` known nodes to be connected, then fails the round."""
        sc, cfg = self.sc, self.cfg
        grid = grid or sc.grid
        known = sorted(sc.clients or grid.get_node_ids(), key=sc.partition_of)
        deadline = time.monotonic() + cfg.round_timeout
        while True:
            connected = set(grid.get_node_ids())
            available = [n for n in known if n in connected]
            if len(available) >= cfg.min_replies:
                break
            if time.monotonic() >= deadline:
                raise RoundFailed(f"round {server_round}: only {len(available)} of {len(known)} known "
                                  f"clients connected after {cfg.round_timeout:g} s (round-timeout); "
                                  f"min-replies is {cfg.min_replies}")
            log(INFO, "Waiting for clients: %d of %d connected (min-replies %d)",
                len(available), len(known), cfg.min_replies)
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        gone = [n for n in known if n not in connected]
        if gone:
            log(WARNING, "round %d: %s not connected; not sampled", server_round, sc.describe(gone))
        joined = sorted(connected - set(known))
        if joined and sc.clients:
            log(WARNING, "Nodes %s joined after discovery (architecture unknown); not sampled", joined)
        num = clients_per_round(cfg, len(known))
        rng = random.Random(mix_seed(cfg.seed, "sample", server_round, attempt))
        return sorted(rng.sample(available, min(num, len(available))), key=sc.partition_of)

    def messages_for(self, server_round: int, node_ids: list[int],
                     config: ConfigRecord | None = None) -> list[Message]:
        """One message per node: its architecture's model (or slice) and the round's config."""
        message_type, values = self.round_config(server_round, config or self.train_config())
        records: dict[Arch, ArrayRecord] = {}
        messages = []
        for nid in node_ids:
            arch = self.sc.arch_of(nid)
            if arch not in records:
                records[arch] = state_to_record(self.state_for(arch, server_round))
            messages.append(Message(RecordDict({ARRAYS: records[arch],
                                                CONFIG: ConfigRecord(self.values_for(server_round, nid, values))}),
                                    dst_node_id=nid, message_type=message_type))
        log(INFO, "configure_train: round %d, %d clients (%s)", server_round, len(node_ids), message_type)
        return messages

    def values_for(self, server_round: int, node_id: int, values: dict) -> dict:
        """A node's train config this round (Mosaic's collection rounds: only clients that
        have not uploaded a generator yet are asked for one)."""
        return values

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's hook (the round loop is ``run``): this round's messages."""
        return self.messages_for(server_round, self.sample(server_round, grid=grid), config)

    def train_round(self, server_round: int) -> list:
        """Send a round, collect the valid replies (sorted by partition id). A round with
        fewer than ``min-replies`` valid replies is sent again (``round-retries`` times, to a
        fresh sample) and then fails with ``RoundFailed``: never aggregated short."""
        sc, cfg = self.sc, self.cfg
        sc.train_metrics = {"clients": 0, "rejected": 0, "no-reply": 0}
        for attempt in range(cfg.round_retries + 1):
            node_ids = self.sample(server_round, attempt)
            replies = stream_replies(sc.grid, self.messages_for(server_round, node_ids), cfg.round_timeout,
                                     f"round {server_round}", describe=self.describe_reply,
                                     straggler=Straggler.of(cfg), max_bytes=reply_limit(cfg))
            items = self.collect(server_round, replies)
            silent = sorted(set(node_ids) - self._replied)
            if silent:
                sc.train_metrics["no-reply"] += len(silent)
                log(WARNING, "round %d: no reply from %s in time (round-timeout %g s, or the straggler deadline "
                    "logged above); left out", server_round, sc.describe(silent), cfg.round_timeout)
            if len(items) >= cfg.min_replies:
                if attempt:
                    sc.train_metrics["retries"] = attempt
                return items
            more = attempt < cfg.round_retries
            log(WARNING, "round %d: %d valid replies, min-replies is %d; %s", server_round, len(items),
                cfg.min_replies, f"sending the round again ({attempt + 1}/{cfg.round_retries})"
                if more else "giving up")
        raise RoundFailed(f"round {server_round}: fewer than min-replies={cfg.min_replies} valid replies "
                          f"after {cfg.round_retries + 1} attempts; the run stops here (resume it from "
                          f"the checkpoint of round {server_round - 1} once clients are back)")

    def reject(self, msg: Message, arch: Arch | None, problem: str) -> None:
        self.rejected += 1
        self.sc.train_metrics["rejected"] = self.sc.train_metrics.get("rejected", 0) + 1
        node = msg.metadata.src_node_id
        log(WARNING, "Dropping reply from %s (expected architecture %s): %s",
            self.sc.describe([node]), arch, problem)

    def describe_reply(self, msg: Message) -> str:
        """For the progress line: who answered last and what it reported spending."""
        node = msg.metadata.src_node_id
        try:
            seconds = float(msg.content.metric_records[METRICS].get(CLIENT_SECONDS, float("nan")))
        except Exception:  # noqa: BLE001  (an error reply, a malformed one: validated later)
            seconds = float("nan")
        return f"{self.sc.describe([node])}" + (f", {seconds:.1f} s of client work" if math.isfinite(seconds) else "")

    def streams(self, server_round: int) -> bool:
        """Whether this round's replies are summed as they arrive (``RunningSum``: memory
        independent of the number of replies) instead of kept until the round is complete.
        Only the example-weighted mean streams; a robust ``aggregation`` (median, trimmed
        mean: every client's value of an entry at once) and ``max-client-share`` (every
        weight before any is used) keep the round's models."""
        return self.cfg.aggregation == "mean" and self.cfg.max_client_share >= 1 and not self.keep_models

    def absorb(self, server_round: int, arch: Arch, payload):
        """A valid reply's payload as it arrives: streaming, its state goes into the round's
        running sum and is dropped from the payload."""
        if self._round_sums is None:
            return payload
        state, weight, loss = payload
        self.add_to_sums(server_round, arch, state, weight)
        return None, weight, loss

    def add_to_sums(self, server_round: int, arch: Arch, state: StateDict, weight: float) -> None:
        sums = self._round_sums.setdefault(arch.model, RunningSum())
        sums.add(state, weight, self.plan(arch, server_round), self.globals[arch.model])

    def collect(self, server_round: int, replies: Iterable[Message]) -> list:
        """The valid replies' payloads as ``(arch, payload)``, sorted by partition id (so the
        aggregate does not depend on arrival order); every other reply is logged and counted.

        Replies are read one at a time (a list is emptied as it is read): each message (its
        serialised arrays) can be freed once decoded; when the round ``streams`` its model
        goes into the running sums at once and only the small rest of the payload is kept."""
        kept: dict[int, tuple] = {}
        self._round_sums = {} if self.streams(server_round) else None
        self._replied = set()
        if isinstance(replies, list):
            replies.reverse()
            replies = _drain(replies)
        for msg in replies:
            if self.recorded is not None:
                self.recorded.append(copy.deepcopy(msg))
            node = msg.metadata.src_node_id
            self._replied.add(node)
            arch = self.sc.arch_of(node)
            if arch is None:
                self.reject(msg, arch, "unknown node")
                continue
            if node in kept:
                self.reject(msg, arch, "a second reply in the same round")
                continue
            payload, problem = self.decode(server_round, msg, arch)
            if problem:
                self.reject(msg, arch, problem)
                continue
            kept[node] = (arch, self.absorb(server_round, arch, payload))
            m = self.sc.train_metrics
            for key in WORK_KEYS:  # the client work it reports, summed over the round
                seconds = msg.content.metric_records[METRICS].get(key)
                if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
                    m[key] = round(m.get(key, 0.0) + float(seconds), 3)
        return [kept[n] for n in sorted(kept, key=self.sc.partition_of)]

    def decode(self, server_round: int, msg: Message, arch: Arch) -> tuple[object, str | None]:
        """A baseline reply's payload ``(state, weight, train loss)``, or the problem."""
        state, problem = decode_reply(msg, self.template(arch))
        if problem:
            return None, problem
        metrics = msg.content.metric_records[METRICS]
        node = msg.metadata.src_node_id
        problem = self.sc.declared_problem(node, int(metrics[NUM_EXAMPLES]))
        if problem:
            return None, problem
        weight = self.sc.weight_of(node, int(metrics[NUM_EXAMPLES]))  # count-clip
        return (state, weight, float(metrics.get("train-loss", 0.0))), None

    def apply_round(self, server_round: int, items: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_family: dict[str, list[tuple[Arch, StateDict, float]]] = defaultdict(list)
        for arch, (state, weight, _) in items:
            by_family[arch.model].append((arch, state, weight))
        losses = [(loss, weight) for _, (_, weight, loss) in items]
        return self.finish_round(server_round, by_family, losses)

    def aggregate_states(self, server_round: int, by_family: dict[str, list[tuple[Arch, StateDict, float]]]
                         ) -> None:
        """Masked average of each family's replies into its global model: weighted by example
        counts, no client above ``max-client-share`` of the weight (``aggregation='mean'``),
        or the entry-wise robust rule over the clients holding each entry, unweighted.
        A streamed round reads its running sums instead (the same mean, in float64)."""
        if self._round_sums is not None:
            sums, self._round_sums = self._round_sums, None
            for family in by_family:
                self.globals[family] = sums[family].result(self.globals[family])
            return
        for family, items in by_family.items():
            states = [s for _, s, _ in items]
            plans = [self.plan(a, server_round) for a, _, _ in items]
            if self.cfg.aggregation != "mean":
                self.globals[family] = robust_masked_average(
                    self.globals[family], states, plans, self.cfg.aggregation,
                    trim=self.cfg.trim_fraction)
                continue
            weights = [w for _, _, w in items]
            if self.cfg.max_client_share < 1:
                weights = cap_shares(weights, self.cfg.max_client_share)
            self.globals[family] = masked_average(self.globals[family], states, plans, weights)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook (used by tests): validate and aggregate one round's replies."""
        self.sc.train_metrics = {"clients": 0, "rejected": 0}
        return self.apply_round(server_round, self.collect(server_round, list(replies)))

    def finish_round(self, server_round: int, by_family: dict, losses: list[tuple[float, float]]
                     ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        clients = sum(len(v) for v in by_family.values())
        self.sc.train_metrics["clients"] = clients
        if not clients:
            log(WARNING, "round %d: no valid reply; the global models are unchanged", server_round)
            return None, None
        self.sc.train_metrics["train-loss"] = sum(l * w for l, w in losses) / sum(w for _, w in losses)
        self.aggregate_states(server_round, dict(by_family))
        return state_to_record(self.globals[self.primary]), MetricRecord({"clients": clients})

    # ------------------------------------------------------------------ evaluation
    def connected_clients(self) -> list[int]:
        """The known clients that are connected now (every connected node when none is
        known yet), in partition order: whom the server asks outside the training rounds."""
        sc = self.sc
        connected = set(sc.grid.get_node_ids())
        return [n for n in sorted(sc.clients or connected, key=sc.partition_of) if n in connected]

    def client_evaluate(self, server_round: int, candidates: dict[str, dict[str, StateDict]]
                        ) -> dict[str, dict[str, float]]:
        """Federated evaluation of candidate global models on the clients' own data (message
        ``evaluate``; only counts of correct predictions leave a client). Returns
        ``family -> name -> accuracy`` over the clients that scored the family's candidates
        validly (families nobody scored are absent): ``kd.gate-statistic='pooled'`` their pooled
        accuracy, each client weighted by its examples (bounded by ``count-clip``);
        ``'median'`` the median of the clients' own accuracies, one vote each, so a minority
        cannot move it with forged counts or scores.

        With one model family every connected client receives that family's model (the
        fixed slice for a width below 1) of each candidate (``name -> family -> state``).
        With several, every client scores every family's candidates (``candidate-<name>.<family>``:
        its own family at its width, the others at full width), so a family's model is
        judged on all the clients' data, not only on the few classes its own clients hold."""
        sc, names = self.sc, list(candidates)
        families = sorted({f for per in candidates.values() for f in per})
        across = len(families) > 1
        nodes = self.connected_clients()
        records: dict[tuple[str, Arch], ArrayRecord] = {}

        def record(name: str, arch: Arch) -> ArrayRecord:
            if (name, arch) not in records:
                full, plan = candidates[name][arch.model], self.plan(arch, 0, mode="fixed")
                records[(name, arch)] = state_to_record(full if plan is None else slice_state(full, plan))
            return records[(name, arch)]

        keys = [f"{n}.{f}" for n in names for f in families] if across else names
        messages = []
        for nid in nodes:
            arch = sc.arch_of(nid)
            config = {"server-round": server_round, "candidates": keys}
            if across:
                config["families"] = families
            content = RecordDict({CONFIG: ConfigRecord(config)})
            for name in names:
                if not across:
                    content[f"candidate-{name}"] = record(name, arch)
                    continue
                for f in families:
                    content[f"candidate-{name}.{f}"] = record(name, arch if arch is not None and arch.model == f
                                                              else Arch(f))
            messages.append(Message(content, dst_node_id=nid, message_type="evaluate"))
        correct: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(names, 0.0))
        examples: dict[str, float] = defaultdict(float)
        per_client: dict[str, dict[str, list[float]]] = defaultdict(lambda: {name: [] for name in names})
        for msg in stream_replies(sc.grid, messages, self.cfg.round_timeout, f"evaluate (round {server_round})",
                                  straggler=Straggler.of(self.cfg), max_bytes=reply_limit(self.cfg)):
            node = msg.metadata.src_node_id
            arch = sc.arch_of(node)
            counts, problem = decode_evaluate_reply(msg, keys)
            if problem is None and arch is None:
                problem = "unknown node"
            if problem is None:
                problem = sc.declared_problem(node, counts[NUM_EXAMPLES])
            if problem:
                log(WARNING, "Evaluation reply from %s left out: %s", sc.describe([node]), problem)
                continue
            n = counts[NUM_EXAMPLES]
            scale = sc.weight_of(node, n) / n  # count-clip
            for f in (families if across else [arch.model]):
                examples[f] += n * scale
                for name in names:
                    right = counts[f"{name}.{f}" if across else name]
                    correct[f][name] += right * scale
                    per_client[f][name].append(right / n)
        if self.cfg.of('kd').gate_statistic == "median":  # each client one vote, whatever it declares or forges
            return {f: {name: statistics.median(per_client[f][name]) for name in names} for f in per_client}
        return {f: {name: correct[f][name] / n for name in names} for f, n in examples.items() if n > 0}

    def evaluate_arch(self, arch: Arch, state: StateDict | None = None,
                      data: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Metrics of ``arch``'s model (default: the fixed slice of its family's global model,
        i.e. what a client of that width would use after training) on ``data`` (default:
        the test set)."""
        model = self.module(arch)
        model.load_state_dict(self.state_for(arch, 0, mode="fixed") if state is None else state)
        x, y = data or (self.sc.test_x, self.sc.test_y)
        return evaluate(model, x, y, batch_size=self.cfg.eval_batch_size, device=self.sc.device)

    def evaluate_all(self) -> tuple[dict[str, float], dict[str, float]]:
        """Headline metrics (the primary family's full-width global model) and, under
        heterogeneity, ``acc/<arch>`` for every family at full width and every width
        clients hold, plus ``acc-clients``: the mean over clients of their model's accuracy."""
        headline = self.evaluate_arch(Arch(self.primary))
        if not self.heterogeneous:
            return headline, {}
        per = {Arch(self.primary): headline["accuracy"]}
        for arch in [Arch(f) for f in self.families] + self.archs:
            if arch not in per:
                per[arch] = self.evaluate_arch(arch)["accuracy"]
        extra = {f"acc/{a}": round(v, 5) for a, v in per.items()}
        held = [self.sc.arch_of(n) for n in self.sc.clients]
        extra["acc-clients"] = round(sum(per[a] for a in held) / len(held), 5)
        return headline, extra

    def evaluate_val(self, state: StateDict | None = None) -> float | None:
        """The headline model's accuracy on the validation split (``None`` without one)."""
        if self.sc.val_x is None:
            return None
        return self.evaluate_arch(Arch(self.primary), state, (self.sc.val_x, self.sc.val_y))["accuracy"]

    def evaluate_round(self, server_round: int) -> None:
        metrics, extra = self.evaluate_all()
        val = self.evaluate_val()
        if val is not None:
            extra["val-accuracy"] = round(val, 5)
        self.sc.record_round(server_round, metrics, **extra)

    # ------------------------------------------------------------------ run, checkpoint
    def run(self) -> None:
        """The round loop: evaluate round 0, then train, aggregate, evaluate and checkpoint
        every round; a resumed run restores the checkpoint and goes on after its round."""
        sc, cfg = self.sc, self.cfg
        sc.results.extra["headline_model"] = self.primary
        log(INFO, "Starting %s: %d rounds, %d clients", type(self).__name__, cfg.num_server_rounds,
            len(sc.clients))
        self.summary()
        sc.init_state = None  # read by the constructors; do not hold another run's checkpoint
        if sc.resume_state is not None:
            start = sc.resumed_after = self.restore(sc.resume_state)
            sc.resume_state = None
            log(INFO, "[mosaic-flwr] resumed after round %d of %d", start, cfg.num_server_rounds)
        else:
            start = 0
            self.evaluate_round(0)
            self.checkpoint(0)
        self.play(start + 1, cfg.num_server_rounds)
        self.finish()

    def play(self, first: int, last: int) -> None:
        """Rounds ``first``..``last`` as a run plays them: train, aggregate, evaluate, checkpoint."""
        for server_round in range(first, last + 1):
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", server_round, self.cfg.num_server_rounds)
            self.apply_round(server_round, self.train_round(server_round))
            self.evaluate_round(server_round)
            self.checkpoint(server_round)

    def finish(self) -> None:
        sc = self.sc
        sc.results.extra["rejected_replies"] = self.rejected
        # What the clients reported spending on training replies (benchmarks: client compute)
        sc.results.extra["client_seconds"] = round(sum(r.get(CLIENT_SECONDS, 0.0) for r in sc.results.rounds), 2)
        if any(CLIENT_CPU_SECONDS in r for r in sc.results.rounds):
            sc.results.extra["client_cpu_seconds"] = round(sum(r.get(CLIENT_CPU_SECONDS, 0.0) for r in sc.results.rounds), 2)
        last = sc.results.rounds[-1] if sc.results.rounds else {}
        by_arch = {k[4:]: v for k, v in last.items() if k.startswith("acc/")}
        if by_arch:
            sc.results.extra["final_accuracy_by_model"] = by_arch
            sc.results.extra["final_accuracy_clients"] = last.get("acc-clients")

    def state_dict(self) -> dict:
        """What the strategy carries from one round to the next (for the checkpoint)."""
        return {"globals": self.globals, "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.globals) - set(state["globals"])
        if missing:
            raise CheckpointError(f"resume: the checkpoint has no global model for {sorted(missing)}")
        self.globals = {f: state["globals"][f] for f in self.families}
        self.rejected = int(state["rejected"])

    def checkpoint(self, server_round: int) -> None:
        """Save the whole server state after ``server_round`` (atomically; ``checkpoint``)."""
        if not self.cfg.checkpoint:
            return
        sc = self.sc
        t0 = time.perf_counter()
        path = save_checkpoint(sc.results.out_dir, {
            "round": server_round, "config": self.cfg.to_dict(),
            "assignment": sc.results.extra.get("assignment", []), "strategy": self.state_dict(),
            "rng": rng_state(), "rounds": sc.results.rounds, "extra": sc.results.extra})
        seconds = time.perf_counter() - t0
        stats = sc.results.extra.setdefault("checkpoint", {"seconds-total": 0.0, "writes": 0})
        stats["seconds-total"] = round(stats["seconds-total"] + seconds, 4)
        stats["writes"] += 1
        stats["bytes"] = path.stat().st_size
        log(INFO, "[checkpoint] round %d -> %s (%.1f MB, %.2f s)", server_round, path,
            stats["bytes"] / 2**20, seconds)

    def restore(self, state: dict) -> int:
        """Load a checkpoint's strategy state, metrics and RNG states; its round."""
        self.load_state_dict(state["strategy"])
        self.sc.results.restore(state["rounds"], state["extra"])
        set_rng_state(state["rng"])
        return int(state["round"])

    def train_config(self) -> ConfigRecord:
        return self.sc.train_config()

