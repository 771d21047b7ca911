"""Mosaic as a Flower strategy, on the shared distillation core (``distill.py``).

Rounds 1..W (``warmup-rounds``) run Mosaic's client round (message ``train.mosaic``):
weights and label counts, from which the server keeps one expert per class (the clients'
models averaged with weights equal to their counts of that class). Round W's clients also
send prototypes and their generator; after aggregating round W the server trains the meta
model (on the expert logits ``meta-data`` names; with ``meta-prior='global'`` the
aggregated global model is one more token and the meta model's prior) and the core distils
the teacher (the EMA meta model over the experts, or with ``mosaic-meta=false`` their plain
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
  different feature spaces, so the meta model learns from labelled generator samples
  screened by the owners' prototypes (``meta-data='screened'``, the default there), and
  the teacher is distilled into every family's global model.
"""

from __future__ import annotations

import time
from collections import defaultdict
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from ..config import meta_data_for
from ..mosaic.experts import (
    ModelMixture,
    StackedExperts,
    build_class_experts,
    robust_class_average,
    weighted_average_states,
)
from ..mosaic.meta import MetaModel, train_meta
from ..mosaic.moe import ConcatExperts, GeneratorSampler, ensemble_teacher, expert_logits, meta_teacher, screen_by_prototypes
from ..mosaic.submodels import masked_average, robust_masked_average
from ..records import CONFIG, MosaicReply, decode_logits_reply, state_to_record
from ..seeds import mix_seed
from ..task import Arch, build_arch
from .base import ServerContext
from .bank import StateDict
from .distill import ClientModel, DistillStrategy, Source, Teacher
from .method import Method

TEACHERS = ("meta", "ensemble")
Replies = list[tuple[Arch, MosaicReply]]


class MosaicStrategy(DistillStrategy):
    def __init__(self, sc: ServerContext, teacher: str | None = None):
        teacher = teacher or ("meta" if sc.cfg.mosaic_meta else "ensemble")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher: unknown value {teacher!r}; allowed: {list(TEACHERS)}")
        super().__init__(sc)
        self.teacher = teacher
        self.experts: dict[str, list[StateDict]] = {}      # family -> C class experts
        self.family_counts: dict[str, torch.Tensor] = {}   # family -> [C] label counts
        self.meta_data = meta_data_for(self.cfg.meta_data, self.heterogeneous,
                                       clients=", ".join(map(str, self.archs)))
        self.uses_prototypes = teacher == "meta" and self.meta_data not in ("generated", "clients")
        self._received: dict[int, StateDict] = {}
        self._experts = None  # the expert mixture, during a distillation
        self._generators = None
        start = (sc.init_state or {}).get("strategy", {})
        if start.get("experts"):  # init-from a run stopped before distilling
            self.experts = {f: e for f, e in start["experts"].items() if f in self.families}
            self.family_counts = {f: c for f, c in start["family-counts"].items() if f in self.families}

    # ------------------------------------------------------------------ schedule
    def mosaic_message(self, phase: str) -> bool:
        return True  # every warm-up round reports label counts (the class experts)

    def proto_k(self) -> int:
        return self.cfg.proto_k if self.uses_prototypes else 0

    def describe(self) -> str:
        return f"teacher: {self.teacher}; meta-data: {self.meta_data}; meta-prior: {self.cfg.meta_prior}"

    def distils_family(self, family: str) -> bool:
        return family in self.family_counts  # sampled in some round

    # ------------------------------------------------------------------ aggregation
    def apply_round(self, server_round: int, items: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # What each client received this round (prototypes live in its feature space): only
        # prototype screening reads it.
        screening = (self.phase(server_round) == "distill" and self.teacher == "meta"
                     and self.meta_data == "screened")
        self._received = {c.node_id: self.state_for(a, server_round) for a, c in items} if screening else {}
        try:
            return super().apply_round(server_round, items)
        finally:
            self._received = {}

    def aggregated(self, server_round: int, clients: list[ClientModel]) -> None:
        groups: dict[str, list[ClientModel]] = defaultdict(list)
        for c in clients:
            groups[c.arch.model].append(c)
        for family, group in groups.items():
            self.update_experts(server_round, family, group)
        if self.phase(server_round) == "distill":
            # The class experts now hold all the distillation needs of the clients'
            # classifiers: free them before the meta model and the KD loop.
            for c in clients:
                c.state = {}
                c.reply.state = {}

    def run_distillation(self, server_round: int, clients: list) -> None:
        try:
            super().run_distillation(server_round, clients)
        finally:
            self._experts = self._generators = None
        # The fine-tune rounds never read the class experts: not kept in memory, nor in
        # this or any later checkpoint (a run resumed after this round does not need them).
        self.experts, self.family_counts = {}, {}

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
        self.experts[family] = build_class_experts([c.state for c in items], weights,
                                                   previous=self.experts.get(family), average=average,
                                                   max_share=self.cfg.max_client_share)

    def expert_mixture(self) -> StackedExperts | ModelMixture:
        """The C class experts as one model: the family's experts when there is one family;
        otherwise expert k mixes the families' class-k experts in output space, weighted by
        each family's share of class k (equal shares for a class nobody holds)."""
        dev = self.sc.device
        families = [f for f in self.families if f in self.family_counts]
        stacks = [StackedExperts(self.module(Arch(f)), self.experts[f], device=dev) for f in families]
        if len(stacks) == 1:
            return stacks[0]
        counts = torch.stack([self.family_counts[f] for f in families]).double()  # [F, C]
        totals = counts.sum(0)
        share = torch.where(totals > 0, counts / totals.clamp_min(1), 1.0 / len(families))
        return ModelMixture([(st, torch.diag(share[i]).float()) for i, st in enumerate(stacks)])

    # ------------------------------------------------------------------ the teacher
    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        """The class experts' mixture and, with the meta model, the EMA meta model over them
        trained on ``meta-data`` (``meta_inputs``); test-set scores for the report only."""
        cfg, dev, sc = self.cfg, self.sc.device, self.sc
        generators, counts, gen_replies = self.client_generators(clients, report)
        self._generators = (generators, counts)
        experts = self._experts = self.expert_mixture()
        # meta-prior='global': the student is one more token and the meta model's prior.
        inputs = (ConcatExperts([experts, self.frozen(self.primary)])
                  if self.teacher == "meta" and cfg.meta_prior == "global" else experts)
        # Reporting only: the experts' test logits, computed once for every teacher's score.
        test_z = expert_logits(inputs, sc.test_x)  # [E(+1), N, C]
        teacher = ensemble_teacher(experts)
        report["acc-ensemble"] = self._accuracy(test_z[:len(experts)].mean(0))
        report["acc-teacher"] = report["acc-ensemble"]
        if self.teacher == "meta":
            t0 = time.perf_counter()
            z, labels = self.meta_inputs(inputs, gen_replies, generators, counts, self._received, report,
                                         server_round)
            meta = MetaModel(len(inputs), self.info.num_classes, arch=cfg.meta_arch,
                             prior="last" if inputs is not experts else "mean")
            meta, mstats = train_meta(meta, z, labels, epochs=cfg.meta_epochs, lr=cfg.meta_lr,
                                      ema_decay=cfg.meta_ema, holdout_frac=cfg.meta_holdout,
                                      patience=cfg.meta_patience, seed=cfg.seed, device=dev)
            report.update({"meta-seconds": time.perf_counter() - t0, "meta-inputs": len(labels),
                           "meta-holdout-accuracy": mstats["holdout_accuracy"],
                           "meta-holdout-accuracy-at-init": mstats["initial_holdout_accuracy"],
                           "meta-epochs-run": mstats["epochs_run"]})
            teacher = meta_teacher(inputs, meta)
            self.artifacts["meta"] = {k: v.detach().cpu() for k, v in meta.state_dict().items()}
            with torch.no_grad():
                meta_test = torch.cat([meta(test_z[:, i:i + 1024].permute(1, 0, 2).to(dev)).cpu()
                                       for i in range(0, test_z.shape[1], 1024)])
            report["acc-teacher"] = self._accuracy(meta_test)
        self.artifacts["prototypes"] = [
            {"partition-id": sc.partition_of(r.node_id), "features": r.prototypes[0], "labels": r.prototypes[1]}
            for _, r in gen_replies if r.prototypes is not None]
        return teacher

    def extra_judges(self) -> dict[str, Teacher]:
        return {"ensemble": ensemble_teacher(self._experts)}

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        return self.generator_source(*self._generators)

    def meta_inputs(self, experts, gen_replies: Replies, generators, counts: torch.Tensor,
                    received: dict[int, StateDict], report: dict, server_round: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta model's training set: expert logits ``[M, E, C]`` and labels ``[M]``.

        ``prototypes`` (the authors'): the clients' prototypes through each expert's head.
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
            if len(experts) > len(states):  # meta-prior='global': the student is the last token
                states.append(self.globals[self.primary])
            z, labels = self.client_meta_logits(server_round, states, report)
            return z, labels
        if self.meta_data in ("prototypes", "both"):
            feats = torch.cat([r.prototypes[0] for _, r in gen_replies])
            labels = torch.cat([r.prototypes[1] for _, r in gen_replies])
            parts.append((experts.head_logits(feats.to(dev)).cpu(), labels))
        if self.meta_data in ("generated", "both", "screened"):
            n_classes = int((counts.sum(0) > 0).sum())
            sampler = GeneratorSampler(generators, counts, seed=mix_seed(self.cfg.seed, "meta-samples"),
                                       batch_size=self.cfg.meta_samples_per_class * n_classes)
            x, y, owners = sampler.draw()
            if self.meta_data == "screened":
                models = []
                for arch, r in gen_replies:
                    model = build_arch(self.cfg, arch).to(dev)
                    model.load_state_dict(received[r.node_id])
                    models.append(model)
                keep = screen_by_prototypes(x, y, owners, models, [r.prototypes for _, r in gen_replies])
                report["meta-screen-kept"] = keep.float().mean().item()
                if keep.any():
                    x, y = x[keep.to(x.device)], y[keep]
                else:
                    log(WARNING, "[mosaic] prototype screening kept no sample; using all of them")
            parts.append((expert_logits(experts, x).permute(1, 0, 2), y))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def client_meta_logits(self, server_round: int, states: list[StateDict], report: dict
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``meta-data='clients'``: every connected client receives the models ``states``
        (each distinct one once) and replies with their logits on at most
        ``meta-samples-per-class`` of its own images of each class, with the labels (message
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
                                                        "samples-per-class": cfg.meta_samples_per_class})})
            for j, record in enumerate(records):
                content[f"model-{j}"] = record
            messages.append(Message(content, dst_node_id=nid, message_type="query.logits"))
        log(INFO, "[mosaic] meta model data: %d distinct models to %d clients, logits of their own images",
            len(records), len(messages))
        got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for msg in sc.grid.send_and_receive(messages, timeout=cfg.round_timeout):
            node = msg.metadata.src_node_id
            info = sc.clients.get(node)
            reply, problem = (None, "unknown node") if info is None else decode_logits_reply(
                msg, num_models=len(records), num_classes=C, max_per_class=cfg.meta_samples_per_class,
                counts=info.label_counts)
            if problem or node in got:
                log(WARNING, "Meta-logits reply from %s left out: %s", sc.describe([node]),
                    problem or "a second reply")
                continue
            got[node] = reply
        report["meta-client-replies"] = len(got)
        if not got:
            raise RuntimeError("meta-data='clients': no client returned valid logits; the meta model has no data")
        order = sorted(got, key=sc.partition_of)
        z = torch.cat([got[n][0][:, index] for n in order])  # [M, E, C]
        return z, torch.cat([got[n][1] for n in order])

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict:
        """Besides the core's state: the class experts (and the label counts they were
        formed with), until the distillation round."""
        return {**super().state_dict(), "experts": self.experts, "family-counts": self.family_counts}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.experts, self.family_counts = state["experts"], state["family-counts"]


MOSAIC = Method(MosaicStrategy, "Mosaic: class experts fused by a meta model, distilled on the clients' generators",
                distils=True)
