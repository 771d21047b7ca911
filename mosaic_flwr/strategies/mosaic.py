"""Mosaic (and FedDF) as a Flower Strategy.

Schedule (all config): rounds 1..W are warm-up rounds of federated averaging whose replies
also carry label counts (message ``train.mosaic``); the server keeps one expert per class,
the clients' models averaged with weights equal to their counts of that class. Round W's
clients also send prototypes and their generator; after aggregating round W the server
trains the meta model on the prototypes, distills the teacher into the global model on
generator samples, and reports the accuracies of the distillation round. Rounds W+1..R are
fine-tune rounds of plain federated averaging at ``finetune-lr``.

``teacher``: ``meta`` (Mosaic), ``ensemble`` (Mosaic without meta model: the sum of the
experts' logits) or ``average`` (FedDF: the mean of the client models' logits).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..data import dataset_info
from ..models.generators import generator_for
from ..mosaic.distill import distill
from ..mosaic.experts import StackedExperts, build_class_experts, weighted_average_states
from ..mosaic.meta import MetaModel, train_meta
from ..mosaic.moe import (GeneratorSampler, average_teacher, ensemble_teacher, expert_logits,
                          meta_teacher, teacher_logits)
from ..mosaic.training import logits_metrics
from ..records import (ARRAYS, METRICS, NUM_EXAMPLES, MosaicReply, decode_mosaic_reply,
                       record_to_state, state_to_record)
from ..results import save_generator_grid
from .base import ServerContext, filter_replies

TEACHERS = ("meta", "ensemble", "average")


class MosaicStrategy(FedAvg):
    def __init__(self, sc: ServerContext, teacher: str = "meta"):
        cfg = sc.cfg
        n = min(cfg.min_train_clients, sc.num_nodes)
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=n, min_available_nodes=n)
        if teacher not in TEACHERS:
            raise ValueError(f"teacher: unknown value {teacher!r}; allowed: {list(TEACHERS)}")
        self.sc, self.cfg, self.teacher = sc, cfg, teacher
        self.info = dataset_info(cfg.dataset)
        self.template = {k: v.detach().cpu() for k, v in sc.model.state_dict().items()}
        self.gen_template = generator_for(self.info).state_dict()
        self.experts: list[dict] | None = None
        self.rejected = 0
        self.distill_report: dict[str, float] = {}
        self.uses_prototypes = teacher == "meta" and sc.cfg.meta_data != "generated"

    # ------------------------------------------------------------------ schedule
    def phase(self, server_round: int) -> str:
        w = self.cfg.warmup_rounds
        return "warmup" if server_round < w else "distill" if server_round == w else "finetune"

    def summary(self) -> None:
        log(INFO, "\t├── Mosaic schedule: %d warm-up rounds, distillation after round %d, "
            "%d fine-tune rounds (lr %g); teacher: %s", self.cfg.warmup_rounds,
            self.cfg.warmup_rounds, self.cfg.num_server_rounds - self.cfg.warmup_rounds,
            self.cfg.finetune_lr, self.teacher)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        num = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, num)
        phase = self.phase(server_round)
        c = self.cfg
        values = dict(config)
        values["server-round"] = server_round
        if phase == "finetune":
            values["lr"] = c.finetune_lr
            message_type = "train"
        else:
            message_type = "train.mosaic"
            values["distill"] = phase == "distill"
            if phase == "distill":
                values.update({"proto-k": c.proto_k if self.uses_prototypes else 0,
                               "gen-steps": c.gen_steps, "gen-batch-size": c.gen_batch_size,
                               "gen-lr": c.gen_lr, "gen-ce-weight": c.gen_ce_weight,
                               "gen-div-weight": c.gen_div_weight})
        log(INFO, "configure_train: round %d (%s), %d clients", server_round, phase, len(node_ids))
        return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(values)}),
                        dst_node_id=nid, message_type=message_type) for nid in node_ids]

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        phase = self.phase(server_round)
        decoded: list[MosaicReply] = []
        if phase == "finetune":  # plain FedAvg replies
            valid, rejected = filter_replies(list(replies), self.template)
            states = [record_to_state(m.content.array_records[ARRAYS]) for m in valid]
            weights = [float(m.content.metric_records[METRICS][NUM_EXAMPLES]) for m in valid]
            losses = [float(m.content.metric_records[METRICS].get("train-loss", 0.0)) for m in valid]
        else:
            states, weights, losses, rejected = [], [], [], 0
            for msg in replies:
                reply, problem = decode_mosaic_reply(
                    msg, self.template, num_classes=self.info.num_classes,
                    feature_dim=self.sc.model.feature_dim,
                    generator_template=self.gen_template if phase == "distill" else None,
                    expect_prototypes=phase == "distill" and self.uses_prototypes)
                if reply is None:
                    rejected += 1
                    log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, problem)
                    continue
                decoded.append(reply)
                states.append(reply.state)
                weights.append(float(reply.num_examples))
                losses.append(reply.metrics.get("train-loss", 0.0))
        self.rejected += rejected
        self.sc.train_metrics = {"clients": len(states), "rejected": rejected, "phase": phase}
        if not states:
            log(WARNING, "round %d: no valid reply; the global model is unchanged", server_round)
            return None, None
        self.sc.train_metrics["train-loss"] = sum(
            loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)
        global_state = weighted_average_states(states, weights)
        if phase != "finetune":
            counts = torch.stack([r.label_counts for r in decoded])
            self.experts = build_class_experts([r.state for r in decoded], counts, previous=self.experts)
        if phase == "distill":
            global_state = self.distillation(global_state, decoded)
        return state_to_record(global_state), MetricRecord({"clients": len(states)})

    # ------------------------------------------------------------------ distillation
    def _accuracy(self, logits: torch.Tensor) -> float:
        return logits_metrics(logits, self.sc.test_y)["accuracy"]

    def meta_inputs(self, experts: StackedExperts, replies: list[MosaicReply], generators,
                    counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta model's training set: expert logits ``[M, E, C]`` and labels ``[M]``.

        ``prototypes`` (the authors'): the clients' prototypes through each expert's head.
        ``generated``: labelled generator samples through each expert's full forward, the
        same inputs the teacher reads during distillation. ``both``: the union.
        """
        dev, parts = self.sc.device, []
        if self.cfg.meta_data in ("prototypes", "both"):
            feats = torch.cat([r.prototypes[0] for r in replies if r.prototypes is not None])
            labels = torch.cat([r.prototypes[1] for r in replies if r.prototypes is not None])
            parts.append((experts.head_logits(feats.to(dev)).cpu(), labels))
        if self.cfg.meta_data in ("generated", "both"):
            n_classes = int((counts.sum(0) > 0).sum())
            sampler = GeneratorSampler(generators, counts, seed=self.cfg.seed + 1,
                                       batch_size=self.cfg.meta_samples_per_class * n_classes)
            x, y = sampler()
            parts.append((expert_logits(experts, x).permute(1, 0, 2), y))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def distillation(self, global_state: dict, replies: list[MosaicReply]) -> dict:
        """Meta model + data-free distillation; returns the distilled global state.

        The test set is only scored for the report; nothing here selects on it.
        """
        sc, cfg, dev = self.sc, self.cfg, self.sc.device
        report: dict[str, float] = {}
        t_all = time.perf_counter()
        report["acc-before-distill"] = sc.evaluate_state(global_state)["accuracy"]
        gen_replies = [r for r in replies if r.generator is not None]
        counts = torch.stack([r.label_counts for r in gen_replies])
        generators = []
        for r in gen_replies:
            g = generator_for(self.info)
            g.load_state_dict(r.generator)
            generators.append(g.to(dev).eval())
        for key in ("gen-seconds", "gen-fidelity"):
            vals = [r.metrics[key] for r in gen_replies if key in r.metrics]
            if vals:
                report[f"{key}-mean"] = sum(vals) / len(vals)

        template = sc.model
        if self.teacher == "average":
            clients = StackedExperts(template, [r.state for r in replies], device=dev)
            teacher = average_teacher(clients)
            report["acc-teacher"] = self._accuracy(teacher_logits(teacher, sc.test_x, device=dev))
        else:
            experts = StackedExperts(template, self.experts, device=dev)
            # Reporting only: the experts' test logits, computed once for every teacher's score.
            test_z = expert_logits(experts, sc.test_x)  # [E, N, C]
            teacher = ensemble_teacher(experts)
            report["acc-ensemble"] = self._accuracy(test_z.sum(0))
            report["acc-teacher"] = report["acc-ensemble"]
        if self.teacher == "meta":
            t0 = time.perf_counter()
            z, labels = self.meta_inputs(experts, replies, generators, counts)
            meta = MetaModel(len(experts), self.info.num_classes, arch=cfg.meta_arch)
            meta, mstats = train_meta(meta, z, labels, epochs=cfg.meta_epochs, lr=cfg.meta_lr,
                                      ema_decay=cfg.meta_ema, holdout_frac=cfg.meta_holdout,
                                      patience=cfg.meta_patience, seed=cfg.seed, device=dev)
            report.update({"meta-seconds": time.perf_counter() - t0, "meta-inputs": len(labels),
                           "meta-holdout-accuracy": mstats["holdout_accuracy"],
                           "meta-holdout-accuracy-at-init": mstats["initial_holdout_accuracy"],
                           "meta-epochs-run": mstats["epochs_run"]})
            teacher = meta_teacher(experts, meta)
            with torch.no_grad():
                meta_test = torch.cat([meta(test_z[:, i:i + 1024].permute(1, 0, 2).to(dev)).cpu()
                                       for i in range(0, test_z.shape[1], 1024)])
            report["acc-teacher"] = self._accuracy(meta_test)

        sampler = GeneratorSampler(generators, counts, batch_size=cfg.kd_batch_size, seed=cfg.seed)
        save_generator_grid(sc.results.out_dir / "generator_samples.png", generators, counts,
                            self.info, seed=cfg.seed)
        student = sc.model
        student.load_state_dict(global_state)
        kd = distill(student, teacher, sampler, steps=cfg.kd_steps, lr=cfg.kd_lr, a=cfg.kd_a,
                     b=cfg.kd_b, T=cfg.kd_temperature, student_bn=cfg.kd_student_bn, device=dev,
                     log_every=max(1, cfg.kd_steps // 5), log=lambda s: log(INFO, "[distill] %s", s))
        distilled = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        report.update({"kd-seconds": kd["seconds"], "kd-final-loss": kd["final_loss"],
                       "kd-agreement": kd["final_agreement"],
                       "kd-teacher-label-agreement": kd["teacher_label_agreement"]})
        report["acc-after-distill"] = sc.evaluate_state(distilled)["accuracy"]
        report["distill-seconds"] = time.perf_counter() - t_all
        log(INFO, "[mosaic] distillation round: before %.4f | ensemble %s | teacher %.4f | after %.4f",
            report["acc-before-distill"],
            f"{report['acc-ensemble']:.4f}" if "acc-ensemble" in report else "-",
            report["acc-teacher"], report["acc-after-distill"])
        self.distill_report = {k: round(float(v), 5) for k, v in report.items()}
        self.sc.train_metrics.update(self.distill_report)
        return distilled


def _run(sc: ServerContext, teacher: str) -> None:
    strategy = MosaicStrategy(sc, teacher=teacher)
    strategy.start(grid=sc.grid, initial_arrays=state_to_record(sc.model.state_dict()),
                   num_rounds=sc.cfg.num_server_rounds, train_config=sc.train_config(),
                   evaluate_fn=sc.evaluate_fn())
    sc.results.extra["rejected_replies"] = strategy.rejected
    sc.results.extra["distillation"] = strategy.distill_report


def run_mosaic(sc: ServerContext) -> None:
    _run(sc, "meta" if sc.cfg.mosaic_meta else "ensemble")


def run_feddf(sc: ServerContext) -> None:
    _run(sc, "average")
