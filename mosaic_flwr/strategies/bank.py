"""Federated averaging over clients of different architectures (a bank of global models).

Every client trains an ``Arch``: a model family (registry name) at a width ``capacity``
(see ``mosaic_flwr.task.client_arch``; the server learns each node's at discovery). The
server keeps one full-width global model per family present:

- a client of capacity 1 receives its family's global model; a client of capacity r < 1
  receives the width-r slice of it (``submodel='fixed'``: the first channels, HeteroFL;
  ``'rolling'``: a window that moves by one channel per round, FedRolex);
- aggregation averages each parameter entry over the clients of that family that hold it,
  weighted by their example counts (entries nobody trained keep their value); families
  never average with each other.

With one family at full width this is plain FedAvg. FedProx is the same with the proximal
term switched on in the clients' train config. ``MosaicStrategy`` builds on this class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..config import split_list
from ..data import dataset_info
from ..models import Classifier
from ..mosaic.submodels import IndexPlan, masked_average, model_plan, slice_state
from ..mosaic.training import evaluate
from ..records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    record_to_state,
    reply_problem,
    state_to_record,
)
from ..task import Arch, build_arch
from .base import ServerContext

StateDict = dict[str, torch.Tensor]


class BankStrategy(FedAvg):
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
        self.heterogeneous = len(self.archs) > 1 or self.archs[0].capacity != 1.0
        self._modules: dict[Arch, Classifier] = {}
        self._templates: dict[Arch, StateDict] = {}
        self._plans: dict[tuple, IndexPlan] = {}
        self.globals: dict[str, StateDict] = {f: self._initial_state(f) for f in self.families}
        self.rejected = 0

    # ------------------------------------------------------------------ models
    def _initial_state(self, family: str) -> StateDict:
        """Family ``family``'s initial weights (the same as ``initial_model`` for ``model``)."""
        torch.manual_seed(self.cfg.seed)
        return {k: v.detach().cpu() for k, v in build_arch(self.cfg, Arch(family)).state_dict().items()}

    def module(self, arch: Arch) -> Classifier:
        """A (cached) module of ``arch`` on the server's device, for evaluation and as a template."""
        if arch not in self._modules:
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
        """Message type and train config of a round (subclasses add phases)."""
        return "train", {**dict(config), "server-round": server_round}

    def sample(self, grid: Grid) -> list[int]:
        """This round's clients: Flower's sampling, restricted to nodes known since discovery."""
        num = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, num)
        unknown = [n for n in node_ids if self.sc.arch_of(n) is None]
        if unknown:
            log(WARNING, "Nodes %s joined after discovery (architecture unknown); not sampled", unknown)
        return [n for n in node_ids if n not in unknown]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self.sample(grid)
        message_type, values = self.round_config(server_round, config)
        records: dict[Arch, ArrayRecord] = {}
        messages = []
        for nid in node_ids:
            arch = self.sc.arch_of(nid)
            if arch not in records:
                records[arch] = state_to_record(self.state_for(arch, server_round))
            messages.append(Message(RecordDict({ARRAYS: records[arch], CONFIG: ConfigRecord(values)}),
                                    dst_node_id=nid, message_type=message_type))
        log(INFO, "configure_train: round %d, %d clients (%s)", server_round, len(node_ids), message_type)
        return messages

    def reject(self, msg: Message, arch: Arch | None, problem: str) -> None:
        self.rejected += 1
        self.sc.train_metrics["rejected"] = self.sc.train_metrics.get("rejected", 0) + 1
        log(WARNING, "Dropping reply from node %s (expected architecture %s): %s",
            msg.metadata.src_node_id, arch, problem)

    def aggregate_states(self, server_round: int, by_family: dict[str, list[tuple[Arch, StateDict, float]]]
                         ) -> None:
        """Masked, weighted average of each family's replies into its global model."""
        for family, items in by_family.items():
            self.globals[family] = masked_average(
                self.globals[family], [s for _, s, _ in items],
                [self.plan(a, server_round) for a, _, _ in items], [w for _, _, w in items])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.sc.train_metrics = {"clients": 0, "rejected": 0}
        by_family: dict[str, list[tuple[Arch, StateDict, float]]] = defaultdict(list)
        losses = []
        for msg in replies:
            arch = self.sc.arch_of(msg.metadata.src_node_id)
            problem = "unknown node" if arch is None else reply_problem(msg, self.template(arch))
            if problem:
                self.reject(msg, arch, problem)
                continue
            metrics = msg.content.metric_records[METRICS]
            weight = float(metrics[NUM_EXAMPLES])
            by_family[arch.model].append((arch, record_to_state(msg.content.array_records[ARRAYS]), weight))
            losses.append((float(metrics.get("train-loss", 0.0)), weight))
        return self.finish_round(server_round, by_family, losses)

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
    def evaluate_arch(self, arch: Arch, state: StateDict | None = None) -> dict[str, float]:
        """Test metrics of ``arch``'s model (default: the fixed slice of its family's global
        model, i.e. what a client of that width would use after training)."""
        model = self.module(arch)
        model.load_state_dict(self.state_for(arch, 0, mode="fixed") if state is None else state)
        return evaluate(model, self.sc.test_x, self.sc.test_y, batch_size=self.cfg.eval_batch_size,
                        device=self.sc.device)

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

    def evaluate_fn(self):
        def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            metrics, extra = self.evaluate_all()
            self.sc.record_round(server_round, metrics, **extra)
            return MetricRecord(metrics)

        return fn

    def run(self) -> None:
        sc = self.sc
        sc.results.extra["headline_model"] = self.primary
        self.start(grid=sc.grid, initial_arrays=state_to_record(self.globals[self.primary]),
                   num_rounds=self.cfg.num_server_rounds, train_config=self.train_config(),
                   evaluate_fn=self.evaluate_fn())
        sc.results.extra["rejected_replies"] = self.rejected
        last = sc.results.rounds[-1] if sc.results.rounds else {}
        by_arch = {k[4:]: v for k, v in last.items() if k.startswith("acc/")}
        if by_arch:
            sc.results.extra["final_accuracy_by_model"] = by_arch
            sc.results.extra["final_accuracy_clients"] = last.get("acc-clients")

    def train_config(self) -> ConfigRecord:
        return self.sc.train_config()


class BankFedProx(BankStrategy):
    """FedProx over the bank: clients add ``mu/2 ||w - w_received||^2`` to their loss."""

    def train_config(self) -> ConfigRecord:
        return self.sc.train_config(**{"proximal-mu": self.cfg.proximal_mu})
