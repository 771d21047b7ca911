"""Mosaic as a Flower strategy, on the shared distillation core (``distill.py``).

Rounds 1..W (``warmup-rounds``) run Mosaic's client round (message ``train.mosaic``):
weights and label counts, from which the server keeps one expert per class (the clients'
models averaged with weights equal to their counts of that class). Round W's clients also
send prototypes and their generator; after aggregating round W the server trains the meta
model (on the expert logits ``mosaic.meta-data`` names; with ``mosaic.meta-prior='global'`` the
aggregated global model is one more token and the meta model's prior) and the core distils
the teacher (the EMA meta model over the experts, or with ``mosaic.meta=false`` their plain
mean) into the global model on the clients' generators, checks it, gates it and reports.

Counts are declared by the clients: ``max-client-share`` caps any one client's weight in
each expert, and a robust ``aggregation`` makes expert k the entry-wise median / trimmed mean
of the models of the clients that hold class k, unweighted (see ``mosaic/robust.py``).

Under model heterogeneity (``client-models`` / ``client-capacities``):

- width-scaled sub-models: each family's class experts are masked averages of the clients'
  slices, weighted by class counts (entries no holder of the class trained keep the global
  model's value), or with a robust ``aggregation`` each entry's median / trimmed mean over
  the holders of the class whose slice holds it;
- several families: each family has its own C class experts; expert ``k`` of the mixture
  is the families' class-``k`` experts combined in output space, weighted by each family's
  share of class ``k`` (``ModelMixture``). Prototypes of different families live in
  different feature spaces, so by default the meta model learns from labelled generator
  samples screened by the owners' prototypes (``mosaic.meta-data='screened'``); with every client at
  its family's full width, ``mosaic.meta-data='prototypes'`` passes each family's prototypes through
  that family's class experts' heads instead (measured worse: ``config.meta_data_for``). The
  teacher is distilled into every family's global model.

``mosaic.generator='dcgan'``: the clients upload the authors' unconditional DCGAN instead of our
conditional generator. The bank keeps them by the same per-class ranking; the KD batches take
the same number of samples from every kept generator, labelled by the teacher's argmax
(``DistillStrategy.unconditional_source``); a meta model on generator samples (``mosaic.meta-data``
'generated', 'both', 'screened') is refused (``check_generator``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from mosaic_flwr.config import (ConfigError, _at_least, _below_one, _choice, _non_negative, _positive, config_heterogeneous,
                                config_width_scaled, meta_data_for, meta_experts_for, width_scaled)
from mosaic_flwr.core.schedule import proto_rounds
from mosaic_flwr.distill.experts import (
    ModelMixture,
    StackedExperts,
    build_class_experts,
    robust_class_average,
    weighted_average_states,
)
from mosaic_flwr.methods.mosaic.meta import MetaModel, meta_beats_mean, sign_test_p, train_meta
from mosaic_flwr.distill.samplers import GeneratorSampler
from mosaic_flwr.distill.teachers import ConcatExperts, HeadExperts, ensemble_teacher, expert_logits, meta_teacher
from mosaic_flwr.methods.mosaic.prototypes import screen_by_prototypes
from mosaic_flwr.core.streaming import ClassSums, GeneratorBank
from mosaic_flwr.core.submodels import masked_average, robust_masked_average
from mosaic_flwr.core.records import CONFIG, MosaicReply, decode_logits_reply, state_to_record
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.core.task import Arch, build_arch
from mosaic_flwr.core.server import ServerContext, Straggler, reply_limit, stream_replies
from mosaic_flwr.core.fedavg import StateDict
from mosaic_flwr.distill.server import GEN_METRICS, ClientModel, DistillStrategy, Source, Teacher
from mosaic_flwr.registry import Method

TEACHERS = ("meta", "ensemble")
Replies = list[tuple[Arch, MosaicReply]]


class Owner(NamedTuple):
    """A banked generator's owner, where the distillation reads it (prototype screening)."""

    node_id: int
    prototypes: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class _Stage:
    """What one attempt of a round collects; committed when the round is aggregated (a
    round sent again after too few replies starts a fresh stage)."""

    bank: GeneratorBank
    streamed: bool
    experts: dict[str, ClassSums] = field(default_factory=dict)
    protos: list[dict] = field(default_factory=list)
    uploaded: set[int] = field(default_factory=set)
    metrics: dict[str, list] = field(default_factory=dict)
    audits: list[dict] = field(default_factory=list)


class MosaicStrategy(DistillStrategy):
    def __init__(self, sc: ServerContext, teacher: str | None = None):
        teacher = teacher or ("meta" if sc.cfg.of('mosaic').meta else "ensemble")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher: unknown value {teacher!r}; allowed: {list(TEACHERS)}")
        super().__init__(sc)
        self.teacher = teacher
        self.experts: dict[str, list[StateDict]] = {}      # family -> C class experts
        self.family_counts: dict[str, torch.Tensor] = {}   # family -> [C] label counts
        self.meta_data = meta_data_for(self.cfg.of('mosaic').meta_data, self.heterogeneous,
                                       clients=", ".join(map(str, self.archs)),
                                       widths=width_scaled(a.capacity for a in self.archs))
        self.uses_prototypes = teacher == "meta" and self.meta_data not in ("generated", "clients")
        # what the meta model fuses, from the meta data and the architectures resolved above
        self.meta_experts = meta_experts_for(self.cfg.of('mosaic').meta_experts, self.meta_data, self.heterogeneous,
                                             proto_rounds(self.cfg.values))
        self._received: dict[int, StateDict] = {}
        self._round_start: StateDict | None = None  # the distillation round's received model ('heads')
        self._experts = None  # the expert mixture, during a distillation
        self._stacks: dict[str, StackedExperts] = {}  # family -> its C class experts, during a distillation
        self._generators = None
        # Collected from the clients' uploads (generators, prototypes) over the collection
        # rounds (``mosaic.collect-rounds``: rounds W-c+1..W); the generators in a bounded bank.
        self.bank = GeneratorBank(self.info.num_classes, self.cfg.of('mosaic').generator_bank_size)
        self.protos: list[dict] = []       # {"partition-id", "node", "family", "round", "features", "labels"}
        self.uploaded: set[int] = set()    # partition ids whose generator the server received
        self.gen_metrics: dict[str, list] = {}   # "gen-seconds", "dp-epsilon", ... -> [[partition id, value], ...]
        self.audits: list[dict] = []       # privacy.json entries of the uploads before the distillation round
        self.collected: dict[str, ClassSums] = {}          # family -> class sums of the window
        self.warm_experts: dict[str, list[StateDict]] = {}  # the experts before the window
        self._stage: _Stage | None = None
        self._asked: set[int] = set()
        self._asked_round = -1
        start = (sc.init_state or {}).get("strategy", {})
        if start.get("experts"):  # init-from a run stopped before distilling
            self.experts = {f: e for f, e in start["experts"].items() if f in self.families}
            self.family_counts = {f: c for f, c in start["family-counts"].items() if f in self.families}

    # ------------------------------------------------------------------ schedule
    def mosaic_message(self, phase: str) -> bool:
        return True  # every warm-up round reports label counts (the class experts)

    def proto_k(self) -> int:
        return self.cfg.of('mosaic').proto_k if self.uses_prototypes else 0

    def describe(self) -> str:
        meta = (f"; mosaic.meta-data: {self.meta_data}; mosaic.meta-experts: {self.meta_experts}; "
                f"mosaic.meta-prior: {self.cfg.of('mosaic').meta_prior}") if self.teacher == "meta" else ""
        return f"teacher: {self.teacher}{meta}"

    def distils_family(self, family: str) -> bool:
        return family in self.family_counts  # sampled in some round

    # ------------------------------------------------------------------ collection rounds
    streams_teacher_rounds = True  # the class experts are running sums too

    def collect_from(self) -> int:
        """The first collection round: ``mosaic.collect-rounds`` rounds end at the distillation round."""
        return self.cfg.warmup_rounds - self.cfg.of('mosaic').collect_rounds + 1

    def collecting(self, server_round: int) -> bool:
        """Rounds in which sampled clients that have not uploaded a generator yet train and
        upload it (with prototypes), and the class experts accumulate their models."""
        return self.collect_from() <= server_round <= self.cfg.warmup_rounds

    def banking(self, server_round: int) -> bool:
        """``mosaic.proto-rounds`` > 1: the rounds ending at the distillation round whose sampled
        clients upload prototypes (the prototype bank), with or without a generator."""
        w, n = self.cfg.warmup_rounds, proto_rounds(self.cfg.values)
        return n > 1 and self.proto_k() > 0 and w - n + 1 <= server_round <= w

    def round_config(self, server_round: int, config) -> tuple[str, dict]:
        message_type, values = super().round_config(server_round, config)
        if self.collecting(server_round) and self.phase(server_round) != "distill":
            values.update({"distill": True, **self.upload_values()})
        if self.banking(server_round):  # prototypes from every sampled client, uploading or not
            up = self.upload_values()
            values.update({"prototypes": True, **{k: up[k] for k in ("proto-k", "proto-min-records", "privacy-audit")}})
        return message_type, values

    def expects_prototypes(self, server_round: int, node_id: int) -> bool:
        return super().expects_prototypes(server_round, node_id) or self.banking(server_round)

    def messages_for(self, server_round: int, node_ids: list[int], config=None) -> list[Message]:
        self._asked, self._asked_round = set(), server_round
        return super().messages_for(server_round, node_ids, config)

    def values_for(self, server_round: int, node_id: int, values: dict) -> dict:
        """A collection round asks for a generator only from clients that have not uploaded one."""
        if not self.collecting(server_round) or not values.get("distill"):
            return values
        if self.sc.partition_of(node_id) in self.uploaded:
            return {**values, "distill": False}
        self._asked.add(node_id)
        return values

    def expects_upload(self, server_round: int, node_id: int) -> bool:
        if self.collecting(server_round) and self._asked_round == server_round:
            return node_id in self._asked
        return super().expects_upload(server_round, node_id)

    def collect(self, server_round: int, replies) -> list:
        self._stage = _Stage(bank=self.bank.copy(), streamed=self.streams(server_round))
        return super().collect(server_round, replies)

    def absorb(self, server_round: int, arch: Arch, payload):
        """As a reply arrives: its model into the class sums (warm-up rounds: every client;
        collection rounds: clients uploading for the first time), its generator into the
        bank, its prototypes kept; then the core drops its model (streaming)."""
        st = self._stage
        if isinstance(payload, ClientModel) and st is not None and payload.label_counts is not None:
            r = payload.reply
            new = r is not None and r.generator is not None
            if st.streamed and (new or not self.collecting(server_round)):
                st.experts.setdefault(arch.model, ClassSums(self.info.num_classes)).add(
                    payload.expert_state, payload.label_counts, self.plan(arch, server_round), self.globals[arch.model])
            # an upload: a first-time generator (with prototypes), or prototypes alone (the bank)
            if new or (r is not None and r.prototypes is not None and self.banking(server_round)):
                pid = self.sc.partition_of(r.node_id)
                if new:
                    st.bank.offer(pid, r.label_counts, r.generator, node=r.node_id, prototypes=r.prototypes,
                                  family=arch.model, capacity=float(arch.capacity))
                    st.uploaded.add(pid)
                    for key, value in r.metrics.items():  # generator statistics, privacy spent
                        if key in GEN_METRICS or key.startswith("dp-"):
                            st.metrics.setdefault(key, []).append([pid, float(value)])
                if r.prototypes is not None:
                    st.protos.append({"partition-id": pid, "node": r.node_id, "family": arch.model,
                                      "round": server_round, "features": r.prototypes[0], "labels": r.prototypes[1]})
                if self.phase(server_round) != "distill":  # (the distillation round's: the core's audit)
                    entry = self.audit_entry(server_round, r)
                    if entry is not None:
                        st.audits.append(entry)
            if new:
                r.generator = None
        return super().absorb(server_round, arch, payload)

    # ------------------------------------------------------------------ aggregation
    def apply_round(self, server_round: int, items: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # What each client received this round (prototypes live in its feature space): only
        # prototype screening reads it.
        screening = (self.phase(server_round) == "distill" and self.teacher == "meta"
                     and self.meta_data == "screened")
        self._received = {c.node_id: self.state_for(a, server_round) for a, c in items} if screening else {}
        # The model this round's clients received, in whose features their prototypes live: what
        # the experts' heads read with mosaic.meta-experts='heads' (the round's aggregate is another space).
        heads = (self.phase(server_round) == "distill" and self.teacher == "meta"
                 and self.meta_experts == "heads")
        self._round_start = {k: v.clone() for k, v in self.globals[self.primary].items()} if heads else None
        try:
            return super().apply_round(server_round, items)
        finally:
            self._received, self._round_start = {}, None

    def aggregated(self, server_round: int, clients: list[ClientModel]) -> None:
        st, self._stage = self._stage, None
        if st is not None:  # the round's uploads join what earlier rounds collected
            self.bank = st.bank
            # kept in a canonical order, not the replies' arrival order: a checkpoint is the same
            # whatever order the round's replies came in
            self.protos = sorted(self.protos + st.protos, key=lambda p: (p["partition-id"], p.get("round", 0)))
            self.uploaded |= st.uploaded
            for key, rows in st.metrics.items():
                self.gen_metrics[key] = sorted(self.gen_metrics.get(key, []) + rows)
            self.audits = sorted(self.audits + st.audits, key=lambda e: (e["round"], e["partition-id"]))
        collecting = self.collecting(server_round)
        if collecting and server_round == self.collect_from():
            self.warm_experts, self.collected = dict(self.experts), {}
        groups: dict[str, list[ClientModel]] = defaultdict(list)
        for c in clients:
            groups[c.arch.model].append(c)
        for family, group in groups.items():
            if st is None or not st.streamed:
                self.update_experts(server_round, family, group)
                continue
            sums = st.experts.get(family)
            previous = self.experts.get(family)
            if collecting:
                if sums is not None:
                    if family in self.collected:
                        self.collected[family].merge(sums)
                    else:
                        self.collected[family] = sums
                sums, previous = self.collected.get(family), self.warm_experts.get(family)
            if sums is None:  # no first-time uploader of this family yet: experts unchanged
                continue
            g = self.globals[family]
            self.experts[family] = sums.experts(previous, fallback=g, base=g)
            self.family_counts[family] = sums.counts.clone()
        if self.phase(server_round) == "distill":
            # The class experts now hold all the distillation needs of the clients'
            # classifiers: free them (and the running sums) before the meta model and the KD loop.
            self.collected, self.warm_experts = {}, {}
            for c in clients:
                c.state = {}
                c.reply.state, c.reply.expert_state = {}, None

    def earlier_audits(self) -> list[dict]:
        return self.audits

    def run_distillation(self, server_round: int, clients: list) -> None:
        try:
            super().run_distillation(server_round, clients)
        finally:
            self._experts = self._generators = None
            self._stacks = {}
        # The fine-tune rounds never read the class experts: not kept in memory, nor in
        # this or any later checkpoint (a run resumed after this round does not need them);
        # the same for what the collection rounds gathered.
        self.experts, self.family_counts = {}, {}
        self.bank = GeneratorBank(self.info.num_classes, self.cfg.of('mosaic').generator_bank_size)
        self.protos, self.uploaded, self.gen_metrics = [], set(), {}
        self.collected, self.warm_experts = {}, {}

    def client_generators(self, clients: list, report: dict) -> tuple[list, torch.Tensor, list]:
        """The generators in the bank (``mosaic.generator-bank-size`` per class, from the
        collection rounds' first-time clients), loaded on the server's device, with their
        label counts masked to the classes each is kept for, and their owners (architecture,
        node id, prototypes); saved in the artifacts. The bank is emptied (the modules hold them)."""
        dev = self.sc.device
        rows = self.bank.rows()
        if not rows:
            raise RuntimeError("distillation: no client uploaded a generator")
        generators, states, owners = [], [], []
        for _, _, e in rows:
            g = self.new_generator()
            g.load_state_dict(e["state"])
            generators.append(g.to(dev).eval())
            states.append({k: v.detach().cpu() for k, v in g.state_dict().items()})
            owners.append((Arch(e["family"], e["capacity"]), Owner(int(e["node"]), e.get("prototypes"))))
        counts = torch.stack([c for _, c, _ in rows])
        spent: dict[int, dict[str, float]] = {}
        for key, pairs in self.gen_metrics.items():
            if key.startswith("dp-"):
                for pid, v in pairs:
                    spent.setdefault(int(pid), {})[key] = v
            elif pairs:
                report[f"{key}-mean"] = sum(v for _, v in sorted(pairs)) / len(pairs)
        self.record_dp(dict(sorted(spent.items())), report)
        report["generators-uploaded"] = len(self.uploaded)
        report["generators-kept"] = len(rows)
        log(INFO, "[mosaic] distillation on %d generators (%d uploaded; mosaic.generator-bank-size %s)",
            len(rows), len(self.uploaded), self.cfg.of('mosaic').generator_bank_size or "unbounded")
        self.artifacts["generators"] = [{"partition-id": pid, "state": state}
                                        for (pid, _, _), state in zip(rows, states)]
        self.bank = GeneratorBank(self.info.num_classes, self.cfg.of('mosaic').generator_bank_size)
        return generators, counts, owners

    def collected_prototypes(self) -> list[dict]:
        """Every collected client's prototypes (with ``mosaic.proto-rounds`` > 1 every bank round's), in
        partition then round order (not arrival order)."""
        return sorted(self.protos, key=lambda p: (p["partition-id"], p.get("round", 0)))

    def update_experts(self, server_round: int, family: str, items: list[ClientModel]) -> None:
        """Family ``family``'s C class experts from this round's replies, and its label counts:
        label-count weighted, no client above ``max-client-share`` of an expert
        (``aggregation='mean'``), or the robust rule over the clients that hold the class,
        unweighted; masked over the clients' slices for width-scaled sub-models."""
        counts = torch.stack([c.label_counts for c in items])
        self.family_counts[family] = counts.sum(0)
        plans = [self.plan(c.arch, server_round) for c in items]
        rule, trim, base = self.cfg.aggregation, self.cfg.trim_fraction, self.globals[family]
        weights = counts
        if rule != "mean":
            # Robust experts read only who holds a class; classes with the same holders then
            # share one expert (build_class_experts caches by weight row).
            weights = (counts > 0).long()
            if any(p is not None for p in plans):
                def average(states, w):
                    return robust_masked_average(base, states, plans, rule, trim=trim, weights=w)
            else:
                average = robust_class_average(rule, trim)
        elif any(p is not None for p in plans):
            def average(states, w):
                return masked_average(base, states, plans, w)
        else:
            average = weighted_average_states
        self.experts[family] = build_class_experts([c.expert_state for c in items], weights,
                                                   previous=self.experts.get(family), average=average,
                                                   max_share=self.cfg.max_client_share)

    def expert_mixture(self) -> StackedExperts | ModelMixture:
        """The C class experts as one model: the family's experts when there is one family;
        otherwise expert k mixes the families' class-k experts in output space, weighted by
        each family's share of class k (equal shares for a class nobody holds)."""
        dev = self.sc.device
        families = [f for f in self.families if f in self.family_counts]
        stacks = [StackedExperts(self.module(Arch(f)), self.experts[f], device=dev) for f in families]
        self._stacks = dict(zip(families, stacks))
        if len(stacks) == 1:
            return stacks[0]
        counts = torch.stack([self.family_counts[f] for f in families]).double()  # [F, C]
        totals = counts.sum(0)
        share = torch.where(totals > 0, counts / totals.clamp_min(1), 1.0 / len(families))
        return ModelMixture([(st, torch.diag(share[i]).float()) for i, st in enumerate(stacks)])

    # ------------------------------------------------------------------ the teacher
    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        """The class experts' mixture and, with the meta model, the EMA meta model over them
        trained on ``mosaic.meta-data`` (``meta_inputs``); test-set scores for the report only."""
        cfg, dev = self.cfg, self.sc.device
        generators, counts, gen_replies = self.client_generators(clients, report)
        self._generators = (generators, counts)
        experts = self._experts = self.expert_mixture()
        # What the meta model fuses: the full experts, or (mosaic.meta-experts='heads') each expert's
        # head on the features of the model the round's clients received, the space their prototypes live in.
        fused = experts
        if self.teacher == "meta" and self.meta_experts == "heads":
            fused = HeadExperts(experts, self.client_module(Arch(self.primary), self._round_start))
        # mosaic.meta-prior='global': the student is one more token and the meta model's prior.
        inputs = (ConcatExperts([fused, self.frozen(self.primary)])
                  if self.teacher == "meta" and cfg.of('mosaic').meta_prior == "global" else fused)
        # Reporting only: the experts' test logits, computed once for every teacher's score.
        test_x = self.report_test()[0]
        test_z = expert_logits(inputs, test_x)  # [E(+1), N, C]
        teacher = ensemble_teacher(experts)  # the plain mean of the full experts
        full_z = test_z[:len(experts)] if fused is experts else expert_logits(experts, test_x)
        report["acc-ensemble"] = self._accuracy(full_z.mean(0))
        report["acc-teacher"] = report["acc-ensemble"]
        if fused is not experts:  # the heads' mean: the prior the meta model starts from (and its guard's)
            report["acc-heads-mean"] = self._accuracy(test_z[:len(fused)].mean(0))
        if self.teacher == "meta":
            t0 = time.perf_counter()
            z, labels, real = self.meta_inputs(inputs, gen_replies, generators, counts, self._received, report,
                                               server_round)
        if self.teacher == "meta" and not len(labels):
            log(WARNING, "[mosaic] no input for the meta model (no prototype, no screened generator sample): "
                "the experts' mean teaches")
            report.update({"meta-inputs": 0, "meta-used": 0})
        elif self.teacher == "meta":
            meta = MetaModel(len(inputs), self.info.num_classes, arch=cfg.of('mosaic').meta_arch,
                             prior="last" if inputs is not fused else "mean")
            # Model selection (early stopping and the guard) on held-out real-derived inputs
            # (prototypes, clients' images) whenever there are any, never on generator samples.
            meta, mstats = train_meta(meta, z, labels, epochs=cfg.of('mosaic').meta_epochs, lr=cfg.of('mosaic').meta_lr,
                                      ema_decay=cfg.of('mosaic').meta_ema, holdout_frac=cfg.of('mosaic').meta_holdout,
                                      patience=cfg.of('mosaic').meta_patience, seed=cfg.seed, device=dev,
                                      holdout_pool=real if bool(real.any()) else None)
            used = meta_beats_mean(mstats) or not cfg.of('mosaic').meta_guard
            report.update({"meta-seconds": time.perf_counter() - t0, "meta-inputs": len(labels),
                           "meta-real-inputs": int(real.sum()),
                           "meta-holdout": mstats["n_holdout"],
                           "meta-holdout-accuracy": mstats["holdout_accuracy"],
                           "meta-holdout-accuracy-at-init": mstats["initial_holdout_accuracy"],
                           "meta-holdout-mean-accuracy": mstats["holdout_mean_accuracy"],
                           "meta-epochs-run": mstats["epochs_run"], "meta-used": int(used),
                           "meta-guard-p": sign_test_p(mstats["holdout_only_meta"], mstats["holdout_only_mean"])})
            if used:
                teacher = meta_teacher(inputs, meta)
                self.artifacts["meta"] = {k: v.detach().cpu() for k, v in meta.state_dict().items()}
                with torch.no_grad():
                    meta_test = torch.cat([meta(test_z[:, i:i + 1024].permute(1, 0, 2).to(dev)).cpu()
                                           for i in range(0, test_z.shape[1], 1024)])
                report["acc-teacher"] = self._accuracy(meta_test)
            else:
                held = mstats["holdout_accuracy"]
                log(INFO, "[mosaic] meta model not used: on %d held-out %s inputs it reads %s against the "
                    "experts' mean %s (right where the mean is wrong: %d, the reverse: %d; not significantly "
                    "better); the teacher is the mean of the experts (mosaic.meta-guard)", mstats["n_holdout"],
                    "real-derived" if real.any() else "generated",
                    "-" if held is None else f"{100 * held:.1f} %",
                    "-" if mstats["holdout_mean_accuracy"] is None else f"{100 * mstats['holdout_mean_accuracy']:.1f} %",
                    mstats["holdout_only_meta"], mstats["holdout_only_mean"])
        self.artifacts["prototypes"] = [
            {"partition-id": p["partition-id"], "features": p["features"], "labels": p["labels"]}
            for p in self.collected_prototypes()]
        return self.labelling_teacher(teacher)

    def extra_judges(self) -> dict[str, Teacher]:
        return {"ensemble": ensemble_teacher(self._experts)}

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        return self.generator_source(*self._generators, teacher)

    def meta_inputs(self, experts, gen_replies: Replies, generators, counts: torch.Tensor,
                    received: dict[int, StateDict], report: dict, server_round: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The meta model's training set: expert logits ``[M, E, C]``, labels ``[M]`` and
        which inputs are real-derived (``[M]`` bool: prototypes and clients' images, not
        generator samples; model selection holds out real-derived inputs only).

        ``prototypes`` (the authors'): the clients' prototypes through each expert's head.
        Under model families a prototype lives in its family's feature space: it passes
        through that family's C class experts' heads, which stand in for the mixture's experts
        (expert k mixes the families' class-k experts; a family's class-k expert for a class
        none of its clients holds is that family's averaged model).
        ``generated``: labelled generator samples through each expert's full forward, the
        same inputs the teacher reads during distillation. ``both``: the union.
        ``screened``: generated samples kept only where the owner's prototypes agree with
        the label (nearest prototype, in the feature space of the model the owner received).
        ``clients``: the clients' own labelled images, scored on the clients by the models
        the server sends them (``client_meta_logits``): real data, no generator.
        """
        dev, parts = self.sc.device, []
        if self.meta_data == "clients":
            states = list(self.experts[self.primary])
            if len(experts) > len(states):  # mosaic.meta-prior='global': the student is the last token
                states.append(self.globals[self.primary])
            z, labels = self.client_meta_logits(server_round, states, report)
            return z, labels, torch.ones(len(labels), dtype=torch.bool)
        if self.meta_data in ("prototypes", "both"):
            protos = ([(p.get("family", self.primary), p["features"], p["labels"]) for p in self.collected_prototypes()]
                      or [(a.model, *r.prototypes) for a, r in gen_replies if r.prototypes is not None])
            protos = [p for p in protos if len(p[2])]  # a client may send none (mosaic.proto-min-records)
            if protos:
                if len(self._stacks) > 1:  # model families: each family's prototypes through its own heads
                    z = torch.cat([self._stacks[fam].head_logits(f.to(dev)).cpu() for fam, f, _ in protos])
                else:
                    z = experts.head_logits(torch.cat([f for _, f, _ in protos]).to(dev)).cpu()
                parts.append((z, torch.cat([l for _, _, l in protos]), True))
        if self.meta_data in ("generated", "both", "screened"):
            n_classes = int((counts.sum(0) > 0).sum())
            sampler = GeneratorSampler(generators, counts, seed=mix_seed(self.cfg.seed, "meta-samples"),
                                       batch_size=self.cfg.of('mosaic').meta_samples_per_class * n_classes)
            x, y, owners = sampler.draw()
            if self.meta_data == "screened":
                models = []
                for arch, r in gen_replies:
                    model = build_arch(self.cfg, arch).to(dev)
                    model.load_state_dict(received[r.node_id])
                    models.append(model)
                keep = screen_by_prototypes(x, y, owners, models, [r.prototypes for _, r in gen_replies])
                report["meta-screen-kept"] = keep.float().mean().item()
                if not keep.any():  # unscreened samples are not used: nothing vouches for them
                    log(WARNING, "[mosaic] prototype screening kept no generator sample: the meta model "
                        "gets none")
                x, y = x[keep.to(x.device)], y[keep]
            if len(y):
                parts.append((expert_logits(experts, x).permute(1, 0, 2), y, False))
        if not parts:  # nothing to fit the meta model on: the experts' mean teaches
            return (torch.zeros(0, len(experts), self.info.num_classes), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.bool))
        real = torch.cat([torch.full((len(p[1]),), p[2], dtype=torch.bool) for p in parts])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), real

    def client_meta_logits(self, server_round: int, states: list[StateDict], report: dict
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mosaic.meta-data='clients'``: every connected client receives the models ``states``
        (each distinct one once) and replies with their logits on at most
        ``mosaic.meta-samples-per-class`` of its own images of each class, with the labels (message
        ``query.logits``; validated by ``records.decode_logits_reply``). Returns the meta
        model's inputs ``[M, E, C]`` and labels ``[M]``, in partition order."""
        sc, cfg, C = self.sc, self.cfg, self.info.num_classes
        distinct: list[StateDict] = []  # classes with the same holders share one expert object
        seen: dict[int, int] = {}
        index = []
        for st in states:
            if id(st) not in seen:
                seen[id(st)] = len(distinct)
                distinct.append(st)
            index.append(seen[id(st)])
        records = [state_to_record(st) for st in distinct]
        messages = []
        for nid in self.connected_clients():
            content = RecordDict({CONFIG: ConfigRecord({"server-round": server_round, "num-models": len(records),
                                                        "samples-per-class": cfg.of('mosaic').meta_samples_per_class})})
            for j, record in enumerate(records):
                content[f"model-{j}"] = record
            messages.append(Message(content, dst_node_id=nid, message_type="query.logits"))
        log(INFO, "[mosaic] meta model data: %d distinct models to %d clients, logits of their own images",
            len(records), len(messages))
        got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for msg in stream_replies(sc.grid, messages, cfg.round_timeout, f"meta-model logits (round {server_round})",
                                  straggler=Straggler.of(cfg), max_bytes=reply_limit(cfg)):
            node = msg.metadata.src_node_id
            info = sc.clients.get(node)
            reply, problem = (None, "unknown node") if info is None else decode_logits_reply(
                msg, num_models=len(records), num_classes=C, max_per_class=cfg.of('mosaic').meta_samples_per_class,
                counts=info.label_counts)
            if problem or node in got:
                log(WARNING, "Meta-logits reply from %s left out: %s", sc.describe([node]),
                    problem or "a second reply")
                continue
            got[node] = reply
        report["meta-client-replies"] = len(got)
        if not got:
            raise RuntimeError("mosaic.meta-data='clients': no client returned valid logits; the meta model has no data")
        order = sorted(got, key=sc.partition_of)
        z = torch.cat([got[n][0][:, index] for n in order])  # [M, E, C]
        return z, torch.cat([got[n][1] for n in order])

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict:
        """Besides the core's state: the class experts (and the label counts they were
        formed with), until the distillation round."""
        return {**super().state_dict(), "experts": self.experts, "family-counts": self.family_counts,
                "bank": self.bank.state_dict(), "protos": self.protos, "uploaded": sorted(self.uploaded),
                "gen-metrics": self.gen_metrics, "audits": self.audits, "warm-experts": self.warm_experts,
                "collected": {f: s.state_dict() for f, s in self.collected.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.experts, self.family_counts = state["experts"], state["family-counts"]
        if "bank" in state:
            self.bank = GeneratorBank.from_state(state["bank"])
        self.protos = list(state.get("protos", []))
        self.uploaded = set(state.get("uploaded", []))
        self.gen_metrics = {k: list(v) for k, v in state.get("gen-metrics", {}).items()}
        self.audits = list(state.get("audits", []))
        self.warm_experts = dict(state.get("warm-experts", {}))
        self.collected = {f: ClassSums.from_state(s) for f, s in state.get("collected", {}).items()}


def check_generator(values: Mapping[str, Any]) -> None:
    """``mosaic.generator='dcgan'`` (unconditional: no sample is made for a class) with a meta
    model that learns from generator samples labelled by the requested class
    (``mosaic.meta-data`` 'generated', 'both', 'screened', or 'auto' under model heterogeneity)
    is refused."""
    if values["mosaic.generator"] != "dcgan" or not values["mosaic.meta"]:
        return
    meta_data = meta_data_for(values["mosaic.meta-data"], config_heterogeneous(values),
                              widths=config_width_scaled(values))
    if meta_data in ("generated", "both", "screened"):
        shown = f"{values['mosaic.meta-data']!r}" + (f" ({meta_data!r} here)" if values["mosaic.meta-data"] == "auto"
                                                     else "")
        raise ConfigError(f"mosaic.generator: 'dcgan' is unconditional, but mosaic.meta-data={shown} trains the meta "
                          "model on generator samples labelled by the class they were made for; use "
                          "mosaic.meta-data='prototypes' or 'clients', or mosaic.generator='conditional'")


def check_mosaic(values: Mapping[str, Any]) -> None:
    """``mosaic.collect-rounds``: the collection rounds end at the distillation round, so at most
    ``warmup-rounds`` of them; more than one accumulates the class experts as running sums
    over rounds (example-weighted mean only: ``aggregation='mean'``, ``max-client-share=1``)
    and cannot screen generated samples by prototypes (it needs the model every owner
    received, in the distillation round)."""
    check_generator(values)
    c, w = values["mosaic.collect-rounds"], values["warmup-rounds"]
    if c > w:
        raise ConfigError(f"mosaic.collect-rounds: {c} exceeds warmup-rounds {w} (the collection rounds end at "
                          "the distillation round, round warmup-rounds)")
    p = proto_rounds(values)
    if p > w:
        raise ConfigError(f"mosaic.proto-rounds: {p} exceeds warmup-rounds {w} (the prototype bank's rounds end at "
                          "the distillation round, round warmup-rounds)")
    meta_data = meta_data_for(values["mosaic.meta-data"], config_heterogeneous(values),
                              widths=config_width_scaled(values))
    if p > 1 and (not values["mosaic.meta"] or meta_data not in ("prototypes", "both")):
        raise ConfigError(f"mosaic.proto-rounds: {p} keeps prototypes for the meta model, which learns from "
                          f"mosaic.meta-data={values['mosaic.meta-data']!r} ({meta_data!r}), "
                          f"mosaic.meta={values['mosaic.meta']}; use mosaic.proto-rounds=1, or mosaic.meta=true "
                          "with mosaic.meta-data 'prototypes' or 'both'")
    if c > 1:
        if values["aggregation"] != "mean" or values["max-client-share"] < 1:
            raise ConfigError(f"mosaic.collect-rounds: {c} accumulates the class experts over rounds as running "
                              "sums, which needs aggregation='mean' and max-client-share=1 (got "
                              f"aggregation={values['aggregation']!r}, max-client-share={values['max-client-share']})")
        if meta_data_for(values["mosaic.meta-data"], config_heterogeneous(values),
                         widths=config_width_scaled(values)) == "screened":
            raise ConfigError(f"mosaic.collect-rounds: {c} with mosaic.meta-data='screened' (the default under "
                              "model heterogeneity): screening needs every generator's owner in the distillation "
                              "round; use mosaic.collect-rounds=1 or mosaic.meta-data='generated'")


# Mosaic's own settings, run-config keys mosaic.<key> (defaults: [tool.flwr.app.config.mosaic]). The
# clients' generator (gen-*, generator, dcgan-width) is feddf-gen's too, and the distillation core
# (distill/server.py) reads it for both: cfg.of('mosaic').gen_steps.
SETTINGS = {
    "meta": (bool, None),
    "collect-rounds": (int, _positive),
    "proto-rounds": (int, lambda v: None if v == -1 or v >= 1 else
                     f"must be -1 (every warm-up round) or a number of rounds >= 1, got {v}"),
    "generator-bank-size": (int, _non_negative),
    "proto-k": (int, _positive),
    "proto-min-records": (int, _positive),
    "gen-steps": (int, _positive),
    "gen-batch-size": (int, _at_least(2)),  # label-sharing noise pairs
    "gen-lr": (float, _positive),
    "gen-ce-weight": (float, _non_negative),
    "gen-div-weight": (float, _non_negative),
    "generator": (str, _choice("conditional", "dcgan")),  # the clients' generators (Mosaic, feddf-gen)
    "dcgan-width": (int, _positive),  # mosaic.generator='dcgan': channels of its last layer (the authors': 64)
    "meta-arch": (str, _choice("transformer", "gating")),
    "meta-data": (str, _choice("auto", "prototypes", "generated", "both", "screened", "clients")),
    "meta-guard": (bool, None),  # the meta model is the teacher only if it beats the experts' mean on held-out inputs
    "meta-experts": (str, _choice("auto", "full", "heads")),
    "meta-samples-per-class": (int, _positive),
    "meta-epochs": (int, _positive),
    "meta-lr": (float, _positive),
    "meta-patience": (int, _positive),
    "meta-holdout": (float, _below_one),
    "meta-ema": (float, _below_one),
    "meta-prior": (str, _choice("experts", "global")),
}

MOSAIC = Method(MosaicStrategy, "Mosaic: class experts fused by a meta model, distilled on the clients' generators",
                distils=True, settings=SETTINGS, check=check_mosaic)
