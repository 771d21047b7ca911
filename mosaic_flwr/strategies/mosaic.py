"""Mosaic (and FedDF) as a Flower Strategy, over a bank of global models (see ``bank.py``).

Schedule (all config): rounds 1..W are warm-up rounds of federated averaging whose replies
also carry label counts (message ``train.mosaic``); the server keeps one expert per class,
the clients' models averaged with weights equal to their counts of that class, until the
distillation round (FedDF, whose teacher is the client models, builds none). Round W's
clients also send prototypes and their generator; after aggregating round W the server
trains the meta model (on the expert logits ``meta-data`` names; with ``meta-prior='global'``
the aggregated global model is one more token and the meta model's prior), distills the
teacher into the global model on generator samples, one batch at a time, checks student,
ensemble, teacher and distilled student on held-out generator samples, lets the
distillation gate (``distill-gate``) decide whether the distilled model replaces the global
one, and reports the accuracies of the distillation round. Rounds W+1..R are fine-tune
rounds of plain federated averaging at ``finetune-lr`` (``lr-schedule``). When the gate kept
the distilled model, the model before distillation goes on training beside it (the same
clients train both: plain federated averaging, the path the run would have taken without
distillation) for ``gate-rounds`` rounds (-1: to the end), and the gate then chooses again
between the two: a distillation that helps at its round but leaves a model that fine-tunes
worse is undone. With
``init-from`` the bank starts from another run's models (``warmup-rounds=1``: the first
round distils).

Counts are declared by the clients: ``max-client-share`` caps any one client's weight in
each expert, and a robust ``aggregation`` makes expert k the entry-wise median / trimmed mean
of the models of the clients that hold class k, unweighted (see ``mosaic/robust.py``).

``teacher``: ``meta`` (Mosaic), ``ensemble`` (Mosaic without meta model: the mean of the
experts' logits, the meta model's starting point) or ``average`` (FedDF: the mean of the client models' logits).

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

from ..checkpoint import ARTIFACTS, save_checkpoint
from ..config import lr_for_round, meta_data_for
from ..models.generators import generator_for
from ..mosaic.distill import distill_many
from ..mosaic.experts import (
    ModelMixture,
    StackedExperts,
    build_class_experts,
    robust_class_average,
    weighted_average_states,
)
from ..mosaic.meta import MetaModel, train_meta
from ..mosaic.moe import (
    ConcatExperts,
    GeneratorSampler,
    ensemble_teacher,
    expert_logits,
    meta_teacher,
    screen_by_prototypes,
    teacher_logits,
)
from ..mosaic.submodels import masked_average, robust_masked_average
from ..mosaic.training import logits_metrics
from ..records import CONFIG, MosaicReply, decode_logits_reply, decode_mosaic_reply, state_to_record
from ..results import save_generator_grid
from ..seeds import mix_seed
from ..task import Arch, build_arch
from .bank import BankStrategy, StateDict
from .base import ServerContext
from .method import Method

TEACHERS = ("meta", "ensemble", "average")


Replies = list[tuple[Arch, MosaicReply]]


class MosaicStrategy(BankStrategy):
    def __init__(self, sc: ServerContext, teacher: str = "meta"):
        if teacher not in TEACHERS:
            raise ValueError(f"teacher: unknown value {teacher!r}; allowed: {list(TEACHERS)}")
        super().__init__(sc)
        self.teacher = teacher
        self.gen_template = generator_for(self.info).state_dict()
        self.experts: dict[str, list[StateDict]] = {}      # family -> C class experts
        self.family_counts: dict[str, torch.Tensor] = {}   # family -> [C] label counts
        self.distill_report: dict[str, float] = {}
        # Look-ahead gate: the model(s) before distillation, trained beside the distilled ones
        # until round ``shadow_until`` (only while the gate has kept a distillation).
        self.shadow: dict[str, StateDict] | None = None
        self.shadow_until = 0
        # The distillation round's meta model, generators and prototypes: not needed after
        # that round, so written once (``distillation.pt``) beside the checkpoint and dropped.
        self.artifacts: dict = {}
        self.artifacts_file: str | None = None
        self.meta_data = meta_data_for(self.cfg.meta_data, self.heterogeneous,
                                       clients=", ".join(map(str, self.archs)))
        self.uses_prototypes = teacher == "meta" and self.meta_data not in ("generated", "clients")
        start = (sc.init_state or {}).get("strategy", {})
        if teacher != "average" and start.get("experts"):  # init-from a run stopped before distilling
            self.experts = {f: e for f, e in start["experts"].items() if f in self.families}
            self.family_counts = {f: c for f, c in start["family-counts"].items() if f in self.families}

    # ------------------------------------------------------------------ schedule
    def phase(self, server_round: int) -> str:
        w = self.cfg.warmup_rounds
        return "warmup" if server_round < w else "distill" if server_round == w else "finetune"

    def summary(self) -> None:
        c = self.cfg
        log(INFO, "\t├── Mosaic schedule: %d warm-up rounds, distillation after round %d, "
            "%d fine-tune rounds (lr %g); teacher: %s; meta-data: %s; meta-prior: %s; gate: %s%s; models: %s",
            c.warmup_rounds, c.warmup_rounds, c.num_server_rounds - c.warmup_rounds,
            lr_for_round(c, c.num_server_rounds), self.teacher, self.meta_data, c.meta_prior,
            c.distill_gate, "" if c.distill_gate == "off" or self.gate_until() == c.warmup_rounds
            else f" (decides again after round {self.gate_until()})", ", ".join(map(str, self.archs)))

    def gate_until(self) -> int:
        """The round after which the look-ahead gate makes its final choice (``gate-rounds``
        fine-tune rounds after the distillation round, at most the last round)."""
        c = self.cfg
        last = c.num_server_rounds
        return last if c.gate_rounds < 0 else min(last, c.warmup_rounds + c.gate_rounds)

    def round_config(self, server_round: int, config: ConfigRecord) -> tuple[str, dict]:
        phase = self.phase(server_round)
        c = self.cfg
        values = {**dict(config), "server-round": server_round, "lr": lr_for_round(c, server_round)}
        if phase == "finetune":
            return "train", values
        values["distill"] = phase == "distill"
        if phase == "distill":
            if c.distill_local_steps:  # the experts' last local training: longer, so they specialise
                values["local-steps"] = c.distill_local_steps
            values.update({"proto-k": c.proto_k if self.uses_prototypes else 0,
                           "gen-steps": c.gen_steps, "gen-batch-size": c.gen_batch_size,
                           "gen-lr": c.gen_lr, "gen-ce-weight": c.gen_ce_weight,
                           "gen-div-weight": c.gen_div_weight})
        return "train.mosaic", values

    # ------------------------------------------------------------------ aggregation
    def decode(self, server_round: int, msg: Message, arch: Arch) -> tuple[object, str | None]:
        """Fine-tune rounds: a baseline payload; warm-up/distillation rounds: a ``MosaicReply``
        (classifier, label counts equal to the client's declaration; prototypes and the
        generator of the declared architecture at the distillation round)."""
        phase = self.phase(server_round)
        if phase == "finetune":
            return super().decode(server_round, msg, arch)
        reply, problem = decode_mosaic_reply(
            msg, self.template(arch), num_classes=self.info.num_classes,
            feature_dim=self.module(arch).feature_dim,
            generator_template=self.gen_template if phase == "distill" else None,
            expect_prototypes=phase == "distill" and self.uses_prototypes,
            max_prototypes=self.cfg.proto_k * self.info.num_classes)
        if reply is None:
            return None, problem
        problem = self.sc.declared_problem(reply.node_id, reply.num_examples, reply.label_counts)
        return (None, problem) if problem else (reply, None)

    def apply_round(self, server_round: int, items: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        phase = self.phase(server_round)
        if phase == "finetune":  # plain federated averaging replies
            out = super().apply_round(server_round, items)
            self.sc.train_metrics["phase"] = phase
            if self.shadow is not None and out[0] is not None:
                self.shadow_round(server_round)
                out = (state_to_record(self.globals[self.primary]), out[1])
            return out
        decoded: dict[str, Replies] = defaultdict(list)
        for arch, reply in items:
            decoded[arch.model].append((arch, reply))
        # What each client received this round (prototypes live in its feature space): only
        # prototype screening reads it.
        screening = phase == "distill" and self.teacher == "meta" and self.meta_data == "screened"
        received = {r.node_id: self.state_for(a, server_round) for a, r in items} if screening else {}
        by_family = {f: [(a, r.state, float(r.num_examples)) for a, r in group]
                     for f, group in decoded.items()}
        losses = [(r.metrics.get("train-loss", 0.0), float(r.num_examples)) for _, r in items]
        arrays, metrics = self.finish_round(server_round, by_family, losses)
        self.sc.train_metrics["phase"] = phase
        if arrays is None:
            return arrays, metrics
        for family, group in decoded.items():
            self.update_experts(server_round, family, group)
        del decoded, by_family
        if phase == "distill":
            if self.teacher != "average":
                # The class experts now hold all the distillation needs of the clients'
                # classifiers: free them before the meta model and the KD loop (only
                # FedDF's teacher reads every client model).
                for _, r in items:
                    r.state = {}
            # The round's randomness (meta model init, dropout) is a function of seed and
            # round alone, not of what the process did before: a resumed run repeats it.
            with torch.random.fork_rng():
                torch.manual_seed(mix_seed(self.cfg.seed, "distill", server_round))
                self.distillation(server_round, list(items), received)
            # The fine-tune rounds never read the class experts: not kept in memory, nor in
            # this or any later checkpoint (a run resumed after this round does not need them).
            self.experts, self.family_counts = {}, {}
            arrays = state_to_record(self.globals[self.primary])
        return arrays, metrics

    def update_experts(self, server_round: int, family: str, items: Replies) -> None:
        """Family ``family``'s C class experts from this round's replies, and its label counts:
        label-count weighted, no client above ``max-client-share`` of an expert
        (``aggregation='mean'``), or the robust rule over the clients that hold the class,
        unweighted; masked over the clients' slices for width-scaled sub-models. FedDF's
        teacher reads the client models, not experts: it keeps only counts."""
        counts = torch.stack([r.label_counts for _, r in items])
        self.family_counts[family] = counts.sum(0)
        if self.teacher == "average":
            return
        plans = [self.plan(a, server_round) for a, _ in items]
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
        self.experts[family] = build_class_experts([r.state for _, r in items], weights,
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

    def client_mixture(self, replies: Replies) -> ModelMixture:
        """FedDF's teacher models: every client model in its own architecture, averaged."""
        groups: dict[Arch, list[StateDict]] = defaultdict(list)
        for arch, r in replies:
            groups[arch].append(r.state)
        n = len(replies)
        return ModelMixture([(StackedExperts(self.module(a), states, device=self.sc.device),
                              torch.full((1, len(states)), 1.0 / n)) for a, states in groups.items()])

    # ------------------------------------------------------------------ distillation
    def _accuracy(self, logits: torch.Tensor) -> float:
        return logits_metrics(logits, self.sc.test_y)["accuracy"]

    def _val_accuracy(self, teacher) -> float:
        """A teacher's accuracy on the validation split."""
        logits = teacher_logits(teacher, self.sc.val_x, device=self.sc.device)
        return logits_metrics(logits, self.sc.val_y)["accuracy"]

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

    def frozen(self, family: str) -> StackedExperts:
        """Family ``family``'s global model as it is now, as a one-model stack (a copy of the
        weights: later changes to the global model or the cached modules do not reach it)."""
        return StackedExperts(self.module(Arch(family)), [self.globals[family]], device=self.sc.device)

    def distill_gate(self, server_round: int, before: dict[str, StateDict], distilled: dict[str, StateDict],
                     report: dict) -> dict[str, bool]:
        """Whether each family keeps its distilled model (``distill-gate``): only when the
        check says it is more accurate than the model before distillation.

        ``clients``: every connected client scores both on its own data (message
        ``evaluate``; examples-weighted over the clients of the family). The clients trained
        the model before distillation on that very data, so the check leans towards keeping
        it: a conservative gate. ``validation``: the validation split (benchmarks only; a
        deployed server has none). ``off``: the distilled model is always kept."""
        if self.cfg.distill_gate == "off":
            report["gate-kept"] = 1.0
            return {f: True for f in distilled}
        return self.gate_choice(server_round, before, distilled, report, "gate",
                                ("distilled model kept", "distillation did not help; the model before "
                                 "distillation is kept"), ("before distillation", "after"))

    def gate_scores(self, server_round: int, before: dict[str, StateDict], after: dict[str, StateDict]
                    ) -> dict[str, dict[str, float]]:
        """``family -> {'before', 'after'} -> accuracy`` by ``distill-gate``'s check (families
        nobody could score are absent)."""
        if self.cfg.distill_gate == "validation":
            data = (self.sc.val_x, self.sc.val_y)
            return {f: {"before": self.evaluate_arch(Arch(f), before[f], data)["accuracy"],
                        "after": self.evaluate_arch(Arch(f), after[f], data)["accuracy"]} for f in after}
        return self.client_evaluate(server_round, {"before": before, "after": after})

    def gate_choice(self, server_round: int, before: dict[str, StateDict], after: dict[str, StateDict],
                    report: dict, prefix: str, outcomes: tuple[str, str],
                    names: tuple[str, str]) -> dict[str, bool]:
        """Per family, whether ``after`` is kept: only when the check scores it strictly
        higher than ``before`` (a family nobody scored keeps ``before``). Logged; the
        primary family's scores go into ``report`` as ``<prefix>-kept/-before/-after``."""
        scores = self.gate_scores(server_round, before, after)
        keep = {}
        for f in after:
            s = scores.get(f)
            keep[f] = s is not None and s["after"] > s["before"]
            if s is None:
                log(WARNING, "[gate] %s: no client scored the candidates; keeping the model before "
                    "distillation", f)
            else:
                log(INFO, "[gate] round %d, %s: %s accuracy %s %.4f, %s %.4f -> %s", server_round, f,
                    self.cfg.distill_gate, names[0], s["before"], names[1], s["after"], outcomes[not keep[f]])
        main = scores.get(self.primary)
        report.update({f"{prefix}-kept": float(keep[self.primary]),
                       **({f"{prefix}-before": main["before"], f"{prefix}-after": main["after"]} if main else {})})
        return keep

    def shadow_round(self, server_round: int) -> None:
        """Look-ahead gate, one fine-tune round: the models before distillation train on the
        same clients as the distilled ones (plain federated averaging: where the run would be
        without distillation). After round ``gate_until()`` the gate chooses between the two
        paths on its check, per family, and the shadow models are dropped."""
        sc, main_metrics = self.sc, self.sc.train_metrics
        distilled, self.globals = self.globals, self.shadow
        try:
            log(INFO, "[gate] round %d: the model before distillation trains too (look-ahead until round %d)",
                server_round, self.shadow_until)
            BankStrategy.apply_round(self, server_round, self.train_round(server_round))
            self.shadow = self.globals
        finally:
            self.globals, shadow_metrics, sc.train_metrics = distilled, sc.train_metrics, main_metrics
        main_metrics["shadow-clients"] = shadow_metrics.get("clients", 0)
        main_metrics["acc-undistilled"] = self.evaluate_arch(Arch(self.primary), self.shadow[self.primary])["accuracy"]
        val = self.evaluate_val(self.shadow[self.primary])
        if val is not None:
            main_metrics["val-undistilled"] = val
        if server_round < self.shadow_until:
            return
        report: dict[str, float] = {"gate-final-round": float(server_round)}
        keep = self.gate_choice(server_round, self.shadow, self.globals, report, "gate-final",
                                ("the distilled path is kept", "the path without distillation is better "
                                 "after fine-tuning: distillation undone"),
                                ("without distillation", "with distillation"))
        self.globals = {f: self.globals[f] if keep.get(f, True) else self.shadow[f] for f in self.globals}
        self.shadow = None
        report = {k: round(float(v), 5) for k, v in report.items()}
        self.distill_report.update(report)
        main_metrics.update(report)

    def distillation(self, server_round: int, replies: Replies, received: dict[int, StateDict]) -> None:
        """Meta model + data-free distillation into every family's global model.

        The test set is only scored for the report; nothing here selects on it.
        """
        sc, cfg, dev = self.sc, self.cfg, self.sc.device
        report: dict[str, float] = {}
        t_all = time.perf_counter()
        families = [f for f in self.families if f in self.family_counts]  # sampled in some round
        before = {f: self.evaluate_arch(Arch(f), self.globals[f])["accuracy"] for f in families}
        val_before = self.evaluate_val(self.globals[self.primary])
        gen_replies = [(a, r) for a, r in replies if r.generator is not None]
        counts = torch.stack([r.label_counts for _, r in gen_replies])
        generators, gen_states = [], []
        for _, r in gen_replies:
            g = generator_for(self.info)
            g.load_state_dict(r.generator)
            generators.append(g.to(dev).eval())
            # Kept once: on the CPU these share the module's storage (saved in the artifacts).
            gen_states.append({k: v.detach().cpu() for k, v in g.state_dict().items()})
            r.generator = None
        for key in ("gen-seconds", "gen-fidelity"):
            vals = [r.metrics[key] for _, r in gen_replies if key in r.metrics]
            if vals:
                report[f"{key}-mean"] = sum(vals) / len(vals)

        student = self.frozen(self.primary)  # the aggregated global model, as it is before KD
        if self.teacher == "average":
            clients = self.client_mixture(replies)
            teacher = lambda x: clients.logits(x)[0]
            report["acc-teacher"] = self._accuracy(teacher_logits(teacher, sc.test_x, device=dev))
        else:
            experts = self.expert_mixture()
            # meta-prior='global': the student is one more token and the meta model's prior.
            inputs = (ConcatExperts([experts, student]) if self.teacher == "meta" and cfg.meta_prior == "global"
                      else experts)
            # Reporting only: the experts' test logits, computed once for every teacher's score.
            test_z = expert_logits(inputs, sc.test_x)  # [E(+1), N, C]
            teacher = ensemble_teacher(experts)
            report["acc-ensemble"] = self._accuracy(test_z[:len(experts)].mean(0))
            report["acc-teacher"] = report["acc-ensemble"]
        if self.teacher == "meta":
            t0 = time.perf_counter()
            z, labels = self.meta_inputs(inputs, gen_replies, generators, counts, received, report, server_round)
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
        # What the server may legitimately measure: held-out labelled generator samples (a
        # seed of their own, drawn neither for the meta model nor for KD).
        check = GeneratorSampler(generators, counts, seed=mix_seed(cfg.seed, "gen-check"),
                                 batch_size=cfg.meta_samples_per_class * int((counts.sum(0) > 0).sum()))
        check_x, check_y, _ = check.draw()
        judges = {"student": lambda x: student.logits(x)[0], "teacher": teacher}
        if self.teacher != "average":
            judges["ensemble"] = ensemble_teacher(experts)
        for name, fn in judges.items():
            report[f"gen-{name}"] = logits_metrics(teacher_logits(fn, check_x, device=dev), check_y)["accuracy"]
        if sc.val_x is not None:  # the figures a benchmark may choose settings on
            report["val-before-distill"] = val_before
            if self.teacher != "average":
                report["val-ensemble"] = self._val_accuracy(ensemble_teacher(experts))
            report["val-teacher"] = self._val_accuracy(teacher)

        self.artifacts.update({
            "generators": [{"partition-id": sc.partition_of(r.node_id), "state": state}
                           for (_, r), state in zip(gen_replies, gen_states)],
            "prototypes": [{"partition-id": sc.partition_of(r.node_id), "features": r.prototypes[0],
                            "labels": r.prototypes[1]} for _, r in gen_replies if r.prototypes is not None]})
        sampler = GeneratorSampler(generators, counts, batch_size=cfg.kd_batch_size,
                                   seed=mix_seed(cfg.seed, "kd-samples"))
        save_generator_grid(sc.results.out_dir / "generator_samples.png", generators, counts,
                            self.info, seed=cfg.seed)
        # One teacher pass per batch, shared by every family's student, one batch at a time.
        students = {}
        for f in families:
            students[f] = self.module(Arch(f))
            students[f].load_state_dict(self.globals[f])
        kd = distill_many(students, teacher, sampler, steps=cfg.kd_steps, lr=cfg.kd_lr, a=cfg.kd_a,
                          b=cfg.kd_b, T=cfg.kd_temperature, student_bn=cfg.kd_student_bn, device=dev,
                          log_every=max(1, cfg.kd_steps // 5),
                          log=lambda f, line: log(INFO, "[distill %s] %s", f, line))
        before_states = {f: self.globals[f] for f in families}
        distilled = {f: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                     for f, m in students.items()}
        report["gen-after-distill"] = logits_metrics(teacher_logits(
            students[self.primary].eval(), check_x, device=dev), check_y)["accuracy"]
        if sc.val_x is not None:
            report["val-after-distill"] = self.evaluate_val(distilled[self.primary])
        keep = self.distill_gate(server_round, before_states, distilled, report)
        after = {}
        for f in families:
            self.globals[f] = distilled[f] if keep[f] else before_states[f]
            after[f] = self.evaluate_arch(Arch(f), self.globals[f])["accuracy"]
        self.shadow_until = self.gate_until()
        if self.cfg.distill_gate != "off" and any(keep.values()) and self.shadow_until > server_round:
            # Look-ahead: the path without distillation goes on beside the distilled one.
            self.shadow = {f: before_states[f] if keep.get(f) else self.globals[f] for f in self.globals}
            log(INFO, "[gate] the model before distillation trains beside the distilled one until round %d; "
                "the gate then chooses again", self.shadow_until)
        main = kd[self.primary]
        report.update({"kd-final-loss": main["final_loss"], "kd-agreement": main["final_agreement"],
                       "kd-teacher-label-agreement": main["teacher_label_agreement"],
                       "kd-seconds": main["seconds"]})
        report["acc-before-distill"] = before[self.primary]
        report["acc-after-distill"] = after[self.primary]
        if len(families) > 1:
            report.update({f"acc-before-distill/{f}": v for f, v in before.items()})
            report.update({f"acc-after-distill/{f}": v for f, v in after.items()})
        report["distill-seconds"] = time.perf_counter() - t_all
        log(INFO, "[mosaic] distillation round, held-out generator samples (server-side check): "
            "student %.4f | ensemble %s | teacher %.4f | distilled student %.4f",
            report["gen-student"], f"{report['gen-ensemble']:.4f}" if "gen-ensemble" in report else "-",
            report["gen-teacher"], report["gen-after-distill"])
        log(INFO, "[mosaic] distillation round, test set (reporting only): before %.4f | ensemble %s | "
            "teacher %.4f | after %.4f%s", report["acc-before-distill"],
            f"{report['acc-ensemble']:.4f}" if "acc-ensemble" in report else "-",
            report["acc-teacher"], report["acc-after-distill"],
            "" if len(families) == 1 else f" ({self.primary}; all: {after})")
        self.distill_report = {k: round(float(v), 5) for k, v in report.items()}
        self.sc.train_metrics.update(self.distill_report)

    def finish(self) -> None:
        super().finish()
        self.sc.results.extra["distillation"] = self.distill_report

    def state_dict(self) -> dict:
        """Besides the global models: the class experts (and the label counts they were
        formed with), the distillation report and, once written, the name of the file that
        holds the distillation round's meta model, generators and prototypes."""
        return {**super().state_dict(), "experts": self.experts, "family-counts": self.family_counts,
                "distill-report": self.distill_report, "artifacts-file": self.artifacts_file,
                "shadow": self.shadow, "shadow-until": self.shadow_until}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.experts, self.family_counts = state["experts"], state["family-counts"]
        self.distill_report, self.artifacts_file = state["distill-report"], state["artifacts-file"]
        self.shadow, self.shadow_until = state.get("shadow"), int(state.get("shadow-until", 0))

    def checkpoint(self, server_round: int) -> None:
        if self.artifacts:  # written once, before the checkpoint that names the file; then dropped
            if self.cfg.checkpoint:
                save_checkpoint(self.sc.results.out_dir, {"round": server_round, **self.artifacts},
                                filename=ARTIFACTS)
                self.artifacts_file = ARTIFACTS
            self.artifacts = {}
        super().checkpoint(server_round)


def run_mosaic(sc: ServerContext) -> None:
    MosaicStrategy(sc, teacher="meta" if sc.cfg.mosaic_meta else "ensemble").run()


def run_feddf(sc: ServerContext) -> None:
    MosaicStrategy(sc, teacher="average").run()


MOSAIC = Method(run_mosaic, "Mosaic: class experts fused by a meta model, distilled on the clients' generators",
                distils=True)
FEDDF = Method(run_feddf, "FedDF's ensemble distillation on the clients' generators", distils=True)
