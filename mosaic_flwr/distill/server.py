"""The shared core of the server-side distillation methods (Mosaic, FedDF, DENSE, FedFTG, DFRD).

Schedule (all config): rounds 1..W-1 are warm-up rounds of federated averaging; after
aggregating round W (``warmup-rounds``) the server distils a teacher into the global
model(s); rounds W+1..R are fine-tune rounds of federated averaging at ``finetune-lr``
(``lr-schedule``). A method with ``every_round`` (FedFTG, DFRD) distils after every round
from W on. With ``init-from`` the bank starts from another run's models (``warmup-rounds=1``:
the first round distils).

A method supplies two things (``teacher_for``, ``source_for``): the teacher, built from the
round's client models (their plain or label-aware ensemble: ``client_ensemble``; Mosaic's
class experts and meta model), and the synthetic inputs the teacher is distilled on (the
clients' uploaded generators: ``client_generators``; public unlabelled data; a generator
the server trains). Everything else is here, the same for every method:

- the KD loop (``mosaic.distill.distill_many``: one teacher pass per batch, every family's
  global model a student);
- the checks at the distillation round: student, teacher and distilled student on
  held-out labelled synthetic samples (``gen-*``, what a server may measure), on the
  validation split (``val-*``, benchmarks only) and on the test set (``acc-*``, reporting
  only: nothing selects on it);
- the distillation gate (``kd.gate``): the distilled model replaces the global one only
  if the clients' data (or the validation split) says it is more accurate; for a one-shot
  method the look-ahead (``kd.gate-rounds``) then trains the model before distillation beside
  the distilled one and chooses again after the fine-tune rounds;
- the report (``summary.json``'s ``distillation``, the round's metrics) and the checkpoint of
  the gate's state.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from torch import Tensor, nn

from mosaic_flwr.core.checkpoint import ARTIFACTS, save_checkpoint
from mosaic_flwr.config import lr_for_round
from mosaic_flwr.core.schedule import gate_until
from mosaic_flwr.models.generators import generator_for, is_unconditional
from mosaic_flwr.distill.kd import distill_many
from mosaic_flwr.distill.teachers import ClientEnsemble, label_weights, teacher_logits, uniform_weights
from mosaic_flwr.distill.experts import StackedExperts
from mosaic_flwr.distill.samplers import GeneratorSampler, UnconditionalSampler
from mosaic_flwr.core.training import logits_metrics
from mosaic_flwr.core.records import CLIENT_SECONDS, WORK_KEYS, MosaicReply, decode_mosaic_reply, state_to_record
from mosaic_flwr.privacy import dp as dpm
from mosaic_flwr.privacy.audit import validate_figures
from mosaic_flwr.privacy.report import THRESHOLDS, client_entry, plot_privacy, summarise, summary_line
from mosaic_flwr.core.results import save_generator_grid, write_json
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.core.task import Arch, balanced_subset, build_arch
from mosaic_flwr.core.fedavg import FedAvgStrategy, StateDict

Teacher = Callable[[Tensor], Tensor]
Sample = Callable[[int], tuple[Tensor, Tensor]]


class RememberingTeacher:
    """A teacher that keeps its logits on the last KD batch: the source asks for the teacher's
    labels of a batch (``y_requested``) and the KD loop then for its logits on the same tensor;
    one pass serves both. Any other input is computed afresh."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self._last: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def remember(self, x: Tensor) -> Tensor:
        logits = self.teacher(x)
        self._last = (x, logits)
        return logits

    def __call__(self, x: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        return self.teacher(x)


GEN_METRICS = ("gen-seconds", "gen-fidelity", "gen-coverage")  # a generator upload's statistics, averaged


@dataclass
class ClientModel:
    """One client's reply at a warm-up or distillation round: what the teachers are built from."""

    node_id: int
    arch: Arch
    state: StateDict
    weight: float                     # its example count
    loss: float                       # its training loss
    label_counts: Tensor | None       # reported (Mosaic's round) or declared at discovery; None without
    reply: MosaicReply | None = None  # Mosaic's client round: generator, prototypes, metrics

    @property
    def expert_state(self) -> StateDict:
        """What this client adds to the class experts: the model of its expert pass where it
        uploaded one (``kd.expert-pass``), else the model it trained (and the global model averages)."""
        r = self.reply
        return r.expert_state if r is not None and r.expert_state is not None else self.state


@dataclass
class Source:
    """Where the KD batches come from: ``sample(step) -> (x, y_requested)`` (``y_requested``:
    the labels asked of a conditional source, or the teacher's argmax where there is none),
    and an optional held-out labelled batch ``check`` for the server-side check."""

    sample: Sample
    check: tuple[Tensor, Tensor] | None = None
    name: str = "synthetic"


class DistillStrategy(FedAvgStrategy):
    """Federated averaging with a server-side distillation (see the module docstring)."""

    every_round = False  # distil after every round >= warmup-rounds (else once, after it)

    def __init__(self, sc):
        super().__init__(sc)
        self.distill_report: dict[str, float] = {}
        # Look-ahead gate: the model(s) before distillation, trained beside the distilled ones
        # until round ``shadow_until`` (only while the gate has kept a distillation).
        self.shadow: dict[str, StateDict] | None = None
        self.shadow_until = 0
        # What the distillation round leaves for inspection (generators, meta model, ...):
        # written once (``distillation.pt``) beside the checkpoint and dropped.
        self.artifacts: dict = {}
        self.artifacts_file: str | None = None
        self._gen_template: StateDict | None = None
        self.privacy_report: dict = {}  # the clients' privacy audit (summary.json's ``privacy``)

    # ------------------------------------------------------------------ method hooks
    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        """The teacher of this distillation (``x -> logits``, no gradient needed)."""
        raise NotImplementedError

    def source_for(self, server_round: int, clients: list, teacher: Teacher,
                   students: dict[str, nn.Module], report: dict) -> Source:
        """The KD batches. ``students`` (family -> module) are the models being distilled,
        trained in place while ``sample`` is called: an adversarial source reads them."""
        raise NotImplementedError

    def extra_judges(self) -> dict[str, Teacher]:
        """Further models the checks score besides student and teacher (e.g. Mosaic's plain
        expert ensemble)."""
        return {}

    def describe(self) -> str:
        """The method's part of the schedule's log line."""
        return ""

    # ------------------------------------------------------------------ schedule
    def phase(self, server_round: int) -> str:
        w = self.cfg.warmup_rounds
        if server_round < w:
            return "warmup"
        if server_round == w or (self.every_round and server_round > w):
            return "distill"
        return "finetune"

    def one_shot(self) -> bool:
        return not self.every_round

    def summary(self) -> None:
        c = self.cfg
        when = (f"distillation after every round from {c.warmup_rounds}" if self.every_round
                else f"distillation after round {c.warmup_rounds}, {c.num_server_rounds - c.warmup_rounds} "
                     "fine-tune rounds")
        look = ("" if c.of('kd').gate == "off" or not self.one_shot() or self.gate_until() == c.warmup_rounds
                else f" (decides again after round {self.gate_until()})")
        log(INFO, "\t├── %s schedule: %d warm-up rounds, %s (lr %g); %sgate: %s%s; models: %s",
            type(self).__name__, c.warmup_rounds, when, lr_for_round(c, c.num_server_rounds),
            f"{self.describe()}; " if self.describe() else "", c.of('kd').gate, look,
            ", ".join(map(str, self.archs)))

    def gate_until(self) -> int:
        """The round after which the look-ahead gate makes its final choice (``core.schedule.gate_until``)."""
        return gate_until(self.cfg.values)

    # ------------------------------------------------------------------ rounds
    def mosaic_message(self, phase: str) -> bool:
        """Whether the clients of a ``phase`` round run Mosaic's client round (message
        ``train.mosaic``: label counts; at the distillation round also the generator and, with
        ``proto_k()`` > 0, prototypes) instead of plain training (``train``)."""
        return False

    def proto_k(self) -> int:
        """Prototypes per class the clients compute at the distillation round (0: none)."""
        return 0

    def round_config(self, server_round: int, config) -> tuple[str, dict]:
        phase = self.phase(server_round)
        c = self.cfg
        values = {**dict(config), "server-round": server_round, "lr": lr_for_round(c, server_round)}
        if phase == "finetune" or not self.mosaic_message(phase):
            return "train", values
        values["distill"] = phase == "distill"
        if phase == "distill":
            # The local training whose models become the experts: its own settings where given
            # (longer, so they specialise; or the authors' short plain SGD, so they drift little).
            # With kd.expert-pass they train a second model instead (upload_values).
            if not c.of('kd').expert_pass:
                values.update(self.expert_training())
            values.update(self.upload_values())
        return "train.mosaic", values

    def expert_training(self) -> dict:
        """The ``kd.local-*`` settings that differ from the regular training (local-steps,
        batch-size, momentum, weight-decay, lr keys): the training whose models become the experts."""
        c = self.cfg
        expert = {"local-steps": c.of('kd').local_steps or None, "batch-size": c.of('kd').local_batch_size or None,
                  "momentum": None if c.of('kd').local_momentum < 0 else c.of('kd').local_momentum,
                  "weight-decay": None if c.of('kd').local_weight_decay < 0 else c.of('kd').local_weight_decay,
                  "lr": None if c.of('kd').local_lr < 0 else c.of('kd').local_lr}
        return {k: v for k, v in expert.items() if v is not None}

    def upload_values(self) -> dict:
        """What a client uploading its generator and prototypes is told: their settings,
        whether to audit them (``privacy-audit``) and, with ``kd.expert-pass``, the training of its
        expert model (``expert-local-steps``, ...)."""
        c = self.cfg
        values = {"proto-k": self.proto_k(), "proto-min-records": c.of('mosaic').proto_min_records,
                  "privacy-audit": dpm.audits(c.values), "gen-steps": c.of('mosaic').gen_steps,
                  "gen-batch-size": c.of('mosaic').gen_batch_size, "gen-lr": c.of('mosaic').gen_lr,
                  "gen-ce-weight": c.of('mosaic').gen_ce_weight, "gen-div-weight": c.of('mosaic').gen_div_weight,
                  "generator": c.of('mosaic').generator, "dcgan-width": c.of('mosaic').dcgan_width}
        if c.of('kd').expert_pass:  # a second pass from the received model, uploaded as the expert
            values.update({f"expert-{k}": v for k, v in self.expert_training().items()})
        return values

    def decode(self, server_round: int, msg: Message, arch: Arch) -> tuple[object, str | None]:
        """Fine-tune rounds: a baseline payload. Warm-up and distillation rounds: a
        ``ClientModel`` (the teachers read every client model); from ``train.mosaic`` with its
        ``MosaicReply`` (label counts equal to the client's declaration; the generator of the
        declared architecture and prototypes at the distillation round)."""
        phase = self.phase(server_round)
        if phase == "finetune":
            return super().decode(server_round, msg, arch)
        node = msg.metadata.src_node_id
        if not self.mosaic_message(phase):
            payload, problem = super().decode(server_round, msg, arch)
            if problem:
                return None, problem
            info = self.sc.clients.get(node)
            state, weight, loss = payload
            counts = None if info is None else self.sc.counts_of(node, info.label_counts)
            return ClientModel(node, arch, state, weight, loss, counts), None
        distill = self.expects_upload(server_round, node)
        reply, problem = decode_mosaic_reply(
            msg, self.template(arch), num_classes=self.info.num_classes,
            feature_dim=self.module(arch).feature_dim,
            generator_template=self.generator_template() if distill else None,
            expect_prototypes=self.expects_prototypes(server_round, node),
            expect_expert=distill and self.cfg.of('kd').expert_pass,
            max_prototypes=self.cfg.of('mosaic').proto_k * self.info.num_classes)
        if reply is None:
            return None, problem
        problem = self.sc.declared_problem(reply.node_id, reply.num_examples, reply.label_counts)
        if problem:
            return None, problem
        # from here on the counts it is weighted by (count-clip): experts, bank, draws, family mix
        reply.declared_counts, reply.label_counts = reply.label_counts, self.sc.counts_of(reply.node_id,
                                                                                          reply.label_counts)
        return ClientModel(reply.node_id, arch, reply.state, float(reply.label_counts.sum()),
                           float(reply.metrics.get("train-loss", 0.0)), reply.label_counts, reply), None

    def streams(self, server_round: int) -> bool:
        """Fine-tune rounds stream (plain averaging); warm-up and distillation rounds keep
        the clients' models, which the teachers read (FedDF's, DENSE's, FedFTG's and DFRD's
        ensembles of client models are as large as the round), unless a method says otherwise."""
        return super().streams(server_round) and (self.phase(server_round) == "finetune"
                                                  or self.streams_teacher_rounds)

    streams_teacher_rounds = False  # Mosaic: its teacher is built from running sums too

    def absorb(self, server_round: int, arch: Arch, payload):
        if not isinstance(payload, ClientModel):
            return super().absorb(server_round, arch, payload)
        if self._round_sums is not None:
            self.add_to_sums(server_round, arch, payload.state, payload.weight)
            payload.state = {}
            if payload.reply is not None:
                payload.reply.state, payload.reply.expert_state = {}, None
        return payload

    def expects_upload(self, server_round: int, node_id: int) -> bool:
        """Whether a ``train.mosaic`` reply of this node must carry the generator (and the
        prototypes): the distillation round's (Mosaic: its collection rounds' first-time clients)."""
        return self.phase(server_round) == "distill"

    def expects_prototypes(self, server_round: int, node_id: int) -> bool:
        """Whether a ``train.mosaic`` reply of this node must carry prototypes: every upload's
        (Mosaic: and the prototype bank's rounds, ``mosaic.proto-rounds``)."""
        return self.expects_upload(server_round, node_id) and self.proto_k() > 0

    def apply_round(self, server_round: int, items: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        phase = self.phase(server_round)
        if phase == "finetune":  # plain federated averaging replies
            out = super().apply_round(server_round, items)
            self.sc.train_metrics["phase"] = phase
            if self.shadow is not None and out[0] is not None:
                self.shadow_round(server_round)
                out = (state_to_record(self.globals[self.primary]), out[1])
            return out
        clients: list[ClientModel] = [c for _, c in items]
        by_family: dict[str, list] = defaultdict(list)
        for c in clients:
            by_family[c.arch.model].append((c.arch, c.state, c.weight))
        out = self.finish_round(server_round, by_family, [(c.loss, c.weight) for c in clients])
        self.sc.train_metrics["phase"] = phase
        if out[0] is None:
            return out
        del by_family
        if phase == "distill":
            self.privacy_audit(server_round, clients)
        self.aggregated(server_round, clients)
        if phase == "distill":
            self.run_distillation(server_round, clients)
            out = (state_to_record(self.globals[self.primary]), out[1])
        return out

    def generator_template(self) -> StateDict:
        """What an uploaded generator must look like (built once, leaving the RNG alone)."""
        if self._gen_template is None:
            with torch.random.fork_rng():
                self._gen_template = self.new_generator().state_dict()
        return self._gen_template

    def new_generator(self) -> nn.Module:
        """A generator of the kind the clients train (``mosaic.generator``, ``mosaic.dcgan-width``), to load
        an upload into."""
        return generator_for(self.info, self.cfg.of('mosaic').generator, self.cfg.of('mosaic').dcgan_width)

    def labelling_teacher(self, teacher: Teacher) -> Teacher:
        """``teacher``, remembering its logits on the last KD batch where the source labels its
        batches by the teacher's argmax (the unconditional ``mosaic.generator='dcgan'``), so one pass a
        batch serves the labels and the KD loss; otherwise ``teacher`` itself."""
        return RememberingTeacher(teacher) if self.cfg.of('mosaic').generator == "dcgan" else teacher

    def aggregated(self, server_round: int, clients: list) -> None:
        """Called after a warm-up or distillation round's aggregation, before distilling
        (Mosaic updates its class experts here)."""

    def run_distillation(self, server_round: int, clients: list) -> None:
        """``distillation`` with the round's randomness a function of seed and round alone (not
        of what the process did before): a resumed run repeats it."""
        with torch.random.fork_rng():
            torch.manual_seed(mix_seed(self.cfg.seed, "distill", server_round))
            self.distillation(server_round, clients)

    # ------------------------------------------------------------------ teachers and sources
    def frozen(self, family: str) -> StackedExperts:
        """Family ``family``'s global model as it is now, as a one-model stack (a copy of the
        weights: later changes to the global model or the cached modules do not reach it)."""
        return StackedExperts(self.module(Arch(family)), [self.globals[family]], device=self.sc.device)

    def client_module(self, arch: Arch, state: StateDict) -> nn.Module:
        """A client's model (its own architecture and width) on the server's device."""
        with torch.random.fork_rng():  # its weights are overwritten: leave the RNG alone
            model = build_arch(self.cfg, arch)
        model.load_state_dict(state)
        return model.to(self.sc.device)

    def client_ensemble(self, clients: list, weighting: str = "uniform", *, per_sample: bool = False
                        ) -> ClientEnsemble:
        """The clients' models as one teacher: their plain average (``uniform``: FedDF, DENSE)
        or the label-aware ensemble (``label``: each client weighted by its share of the
        class's examples, FedFTG and DFRD: class by class, or with ``per_sample`` each sample's
        whole output by the shares of the class it was generated for); differentiable in its
        input."""
        C = self.info.num_classes
        if weighting == "label":
            counts = torch.stack([c.label_counts if c.label_counts is not None else torch.ones(C)
                                  for c in clients])
            weights = label_weights(counts)
        elif weighting == "uniform":
            weights = uniform_weights(len(clients), C)
        else:
            raise ValueError(f"client_ensemble: unknown weighting {weighting!r}")
        models = [self.client_module(c.arch, c.state) for c in clients]
        return ClientEnsemble(models, weights, per_sample=per_sample).to(self.sc.device)

    def class_counts(self, clients: list) -> Tensor:
        """``[C]``: the round's clients' label counts summed (ones where undeclared)."""
        C = self.info.num_classes
        return torch.stack([c.label_counts if c.label_counts is not None else torch.ones(C, dtype=torch.long)
                            for c in clients]).sum(0)

    def client_generators(self, clients: list, report: dict) -> tuple[list[nn.Module], Tensor, list]:
        """The generators the clients uploaded (Mosaic's client round), loaded on the server's
        device, with their label counts ``[N, C]`` and the replies that held them (``(arch,
        MosaicReply)``); saved in the artifacts and dropped from the replies."""
        sc, dev = self.sc, self.sc.device
        replies = [(c.arch, c.reply) for c in clients if c.reply is not None and c.reply.generator is not None]
        if not replies:
            raise RuntimeError("distillation: no client uploaded a generator")
        counts = torch.stack([r.label_counts for _, r in replies])
        generators, states = [], []
        for _, r in replies:
            g = self.new_generator()
            g.load_state_dict(r.generator)
            generators.append(g.to(dev).eval())
            # Kept once: on the CPU these share the module's storage (saved in the artifacts).
            states.append({k: v.detach().cpu() for k, v in g.state_dict().items()})
            r.generator = None
        for key in GEN_METRICS:
            vals = [r.metrics[key] for _, r in replies if key in r.metrics]
            if vals:
                report[f"{key}-mean"] = sum(vals) / len(vals)
        self.record_dp({sc.partition_of(r.node_id): r.metrics for _, r in replies}, report)
        self.artifacts["generators"] = [{"partition-id": sc.partition_of(r.node_id), "state": state}
                                        for (_, r), state in zip(replies, states)]
        return generators, counts, replies

    def record_dp(self, per_client: dict, report: dict) -> None:
        """With differential privacy on: what each uploading client spent (its own accounting,
        its ``dp-*`` reply metrics by partition id) into the run's ``dp`` entry, the round's
        ``dp-epsilon-max`` and the log."""
        entry = self.sc.results.extra.get("dp")
        if entry and entry.get("enabled"):
            from mosaic_flwr.privacy.dp import describe, record_clients
            record_clients(entry, per_client)
            report["dp-epsilon-max"] = entry["epsilon"]
            log(INFO, "[mosaic-flwr] %s", describe(entry))

    def generator_source(self, generators: list[nn.Module], counts: Tensor, teacher: Teacher | None = None
                         ) -> Source:
        """KD batches from the clients' generators: conditional ones, labels uniform over the
        classes some client holds, each made by a holder of the class, and a check batch with a
        seed of its own; unconditional ones (``mosaic.generator='dcgan'``), ``unconditional_source``."""
        if generators and is_unconditional(generators[0]):
            return self.unconditional_source(generators, counts, teacher)
        cfg = self.cfg
        check = GeneratorSampler(generators, counts, seed=mix_seed(cfg.seed, "gen-check"),
                                 batch_size=cfg.of('mosaic').meta_samples_per_class * int((counts.sum(0) > 0).sum()))
        check_x, check_y, _ = check.draw()
        sampler = GeneratorSampler(generators, counts, batch_size=cfg.of('kd').batch_size,
                                   seed=mix_seed(cfg.seed, "kd-samples"))
        save_generator_grid(self.sc.results.out_dir / "generator_samples.png", generators, counts,
                            self.info, seed=cfg.seed)
        return Source(sampler, (check_x, check_y), name="the clients' generators")

    def unconditional_source(self, generators: list[nn.Module], counts: Tensor, teacher: Teacher | None
                             ) -> Source:
        """KD batches from unconditional generators, as the authors: the same number of
        samples from every generator each step (``kd.batch-size // generators``, at least 1:
        theirs is 32 each), labelled by the teacher's argmax (one teacher pass, shared with the
        KD loss, when ``teacher`` is a ``RememberingTeacher``: ``labelling_teacher``). No check
        batch: with no requested label there is nothing to check against."""
        if teacher is None:
            raise ValueError("unconditional_source: the teacher labels the batches; pass it")
        if not isinstance(teacher, RememberingTeacher):
            teacher = RememberingTeacher(teacher)
        per = max(1, self.cfg.of('kd').batch_size // len(generators))
        sampler = UnconditionalSampler(generators, per, seed=mix_seed(self.cfg.seed, "kd-samples"),
                                       label=lambda x: teacher.remember(x).argmax(dim=1))
        save_generator_grid(self.sc.results.out_dir / "generator_samples.png", generators, counts,
                            self.info, seed=self.cfg.seed)
        log(INFO, "[distill] unconditional generators: %d samples from each of %d generators per KD step, "
            "labelled by the teacher's argmax", per, len(generators))
        return Source(sampler, None, name="the clients' unconditional generators")

    # ------------------------------------------------------------------ evaluation helpers
    def _accuracy(self, logits: Tensor) -> float:
        """Accuracy of a teacher's logits on :meth:`report_test`'s images (report only)."""
        return logits_metrics(logits, self.report_test()[1])["accuracy"]

    def report_test(self) -> tuple[Tensor, Tensor]:
        """The test images the teachers are scored on for the distillation report (reporting
        only: nothing selects on them): ``kd.report-test-subset`` images of the server's test
        set, class-balanced and the same for every run seed, or all of it (``0``). Scoring
        every expert on the whole test set cost more than the distillation itself."""
        sc, n = self.sc, self.cfg.of('kd').report_test_subset
        if not n or n >= len(sc.test_y):
            return sc.test_x, sc.test_y
        if getattr(self, "_report_test", None) is None:
            idx = balanced_subset(sc.test_y, n, mix_seed("report-test-subset", n))
            self._report_test = (sc.test_x[idx], sc.test_y[idx])
        return self._report_test

    def _val_accuracy(self, teacher: Teacher) -> float:
        """A teacher's accuracy on the validation split."""
        logits = teacher_logits(teacher, self.sc.val_x, device=self.sc.device)
        return logits_metrics(logits, self.sc.val_y)["accuracy"]

    # ------------------------------------------------------------------ the distillation
    def distillation(self, server_round: int, clients: list) -> None:
        """Teacher, source, KD into every family's global model, checks, gate, report.

        The test set is only scored for the report; nothing here selects on it."""
        sc, cfg, dev = self.sc, self.cfg, self.sc.device
        report: dict[str, float] = {}
        t_all = time.perf_counter()
        families = [f for f in self.families if self.distils_family(f)]
        before = {f: self.evaluate_arch(Arch(f), self.globals[f])["accuracy"] for f in families}
        val_before = self.evaluate_val(self.globals[self.primary])
        student = self.frozen(self.primary)  # the aggregated global model, as it is before KD
        teacher = self.teacher_for(server_round, clients, report)
        test_x, test_y = self.report_test()
        report["report-test-images"] = len(test_y)
        if "acc-teacher" not in report:
            report["acc-teacher"] = self._accuracy(teacher_logits(teacher, test_x, device=dev))
        if getattr(teacher, "conditional", False):
            # A conditional teacher (FedFTG's, DFRD's) is only defined for samples made for a
            # class: the real images' own class as the asked one shows what it tells the
            # student about a sample that looks like the class it was generated for.
            report["acc-teacher-asked"] = self._accuracy(
                teacher_logits(teacher, test_x, labels=test_y, device=dev))
        students = {}
        for f in families:
            students[f] = self.module(Arch(f))
            students[f].load_state_dict(self.globals[f])
        source = self.source_for(server_round, clients, teacher, students, report)
        judges = {"student": lambda x: student.logits(x)[0], "teacher": teacher, **self.extra_judges()}
        if source.check is not None:  # held-out labelled synthetic samples: what a server may measure
            check_x, check_y = source.check
            for name, fn in judges.items():
                report[f"gen-{name}"] = logits_metrics(teacher_logits(fn, check_x, labels=check_y, device=dev),
                                                        check_y)["accuracy"]
        if sc.val_x is not None:  # the figures a benchmark may choose settings on
            report["val-before-distill"] = val_before
            for name, fn in judges.items():
                if name != "student":
                    report[f"val-{name}"] = self._val_accuracy(fn)
            if getattr(teacher, "conditional", False):
                report["val-teacher-asked"] = logits_metrics(teacher_logits(
                    teacher, sc.val_x, labels=sc.val_y, device=dev), sc.val_y)["accuracy"]
        # One teacher pass per batch, shared by every family's student, one batch at a time.
        kd = distill_many(students, teacher, source.sample, steps=cfg.of('kd').steps, lr=cfg.of('kd').lr, a=cfg.of('kd').a,
                          b=cfg.of('kd').b, T=cfg.of('kd').temperature, student_bn=cfg.of('kd').student_bn, device=dev,
                          log_every=max(1, cfg.of('kd').steps // 5),
                          log=lambda f, line: log(INFO, "[distill %s] %s", f, line))
        before_states = {f: self.globals[f] for f in families}
        distilled = {f: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                     for f, m in students.items()}
        if source.check is not None:
            report["gen-after-distill"] = logits_metrics(teacher_logits(
                students[self.primary].eval(), check_x, device=dev), check_y)["accuracy"]
        if sc.val_x is not None:
            report["val-after-distill"] = self.evaluate_val(distilled[self.primary])
        keep = self.distill_gate(server_round, before_states, distilled, report)
        after = {}
        for f in families:
            self.globals[f] = distilled[f] if keep[f] else before_states[f]
            # A refused distillation leaves the model ``before`` scored: not scored again.
            after[f] = self.evaluate_arch(Arch(f), self.globals[f])["accuracy"] if keep[f] else before[f]
        self.shadow_until = self.gate_until()
        if (self.one_shot() and cfg.of('kd').gate != "off" and any(keep.values())
                and self.shadow_until > server_round):
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
        report["distill-seconds-total"] = self.distill_report.get("distill-seconds-total", 0.0) + report["distill-seconds"]
        if source.check is not None:
            log(INFO, "[distill] round %d, held-out samples of %s (server-side check): student %.4f | "
                "ensemble %s | teacher %.4f | distilled student %.4f", server_round, source.name,
                report["gen-student"], f"{report['gen-ensemble']:.4f}" if "gen-ensemble" in report else "-",
                report["gen-teacher"], report["gen-after-distill"])
        log(INFO, "[distill] round %d, test set (reporting only): before %.4f | ensemble %s | "
            "teacher %.4f | after %.4f%s", server_round, report["acc-before-distill"],
            f"{report['acc-ensemble']:.4f}" if "acc-ensemble" in report else "-",
            report["acc-teacher"], report["acc-after-distill"],
            "" if len(families) == 1 else f" ({self.primary}; all: {after})")
        report = {k: round(float(v), 5) for k, v in report.items()}
        if self.every_round:  # one report per distillation round; the last one is the summary's
            self.distill_report = {**report, "distill-rounds": self.distill_report.get("distill-rounds", 0) + 1}
        else:
            self.distill_report = report
        self.sc.train_metrics.update(report)

    def privacy_audit(self, server_round: int, clients: list) -> None:
        """The clients' audit of what they uploaded (``privacy-audit``; their ``privacy-*``
        metrics, validated: a client whose figures are hostile keeps its model in the round and
        its audit is marked rejected), with what their exact label counts disclose:
        ``privacy.json`` (thresholds, summary, one entry per client), ``privacy.png``, a log line
        and ``summary.json``'s ``privacy``. Replies without audit figures (audit off, an older
        client, another method) are left out; nothing is written when none has any.
        ``earlier_audits`` adds the entries of uploads in earlier rounds (Mosaic's collection
        rounds)."""
        entries = list(self.earlier_audits())
        for c in clients:
            r = c.reply
            entry = None if r is None else self.audit_entry(server_round, r)
            if entry is not None:
                entries.append(entry)
        if not entries:
            return
        entries.sort(key=lambda e: e["partition-id"])
        summary = {"round": server_round, **summarise(entries)}
        out = self.sc.results.out_dir
        write_json(out / "privacy.json", {"round": server_round, "thresholds": THRESHOLDS, "summary": summary,
                                          "clients": entries})
        plot_privacy(entries, out / "privacy.png", f"{self.cfg.strategy}, {self.cfg.dataset}, alpha "
                     f"{self.cfg.alpha:g}: uploads up to round {server_round}")
        log(INFO, "[privacy] %s", summary_line(server_round, summary))
        self.privacy_report = summary

    def audit_entry(self, server_round: int, r: MosaicReply) -> dict | None:
        """An uploader's privacy.json entry from its reply's ``privacy-*`` figures (validated;
        None without any), with the round of the upload."""
        if not any(k.startswith("privacy-") for k in r.metrics):
            return None
        figures, problem = validate_figures(r.metrics, self.info.num_classes)
        pid = self.sc.partition_of(r.node_id)
        if problem:
            log(WARNING, "[privacy] client %s: audit figures rejected: %s", pid, problem)
        declared = r.label_counts if r.declared_counts is None else r.declared_counts
        return {**client_entry(pid, declared, figures, r.metrics.get(CLIENT_SECONDS), problem),
                "round": server_round}

    def earlier_audits(self) -> list[dict]:
        return []

    def distils_family(self, family: str) -> bool:
        """Whether family ``family``'s global model is a student (Mosaic: families sampled in
        some round)."""
        return True

    # ------------------------------------------------------------------ the gate
    def distill_gate(self, server_round: int, before: dict[str, StateDict], distilled: dict[str, StateDict],
                     report: dict) -> dict[str, bool]:
        """Whether each family keeps its distilled model (``kd.gate``): only when the
        check says it is more accurate than the model before distillation.

        ``clients``: every connected client scores both on its own data (message
        ``evaluate``; examples-weighted over the clients of the family). The clients trained
        the model before distillation on that very data, so the check leans towards keeping
        it: a conservative gate. ``validation``: the validation split (benchmarks only; a
        deployed server has none). ``off``: the distilled model is always kept."""
        if self.cfg.of('kd').gate == "off":
            report["gate-kept"] = 1.0
            return {f: True for f in distilled}
        return self.gate_choice(server_round, before, distilled, report, "gate",
                                ("distilled model kept", "distillation did not help; the model before "
                                 "distillation is kept"), ("before distillation", "after"))

    def gate_scores(self, server_round: int, before: dict[str, StateDict], after: dict[str, StateDict]
                    ) -> dict[str, dict[str, float]]:
        """``family -> {'before', 'after'} -> accuracy`` by ``kd.gate``'s check (families
        nobody could score are absent)."""
        if self.cfg.of('kd').gate == "validation":
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
                    self.cfg.of('kd').gate, names[0], s["before"], names[1], s["after"], outcomes[not keep[f]])
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
            FedAvgStrategy.apply_round(self, server_round, self.train_round(server_round))
            self.shadow = self.globals
        finally:
            self.globals, shadow_metrics, sc.train_metrics = distilled, sc.train_metrics, main_metrics
        main_metrics["shadow-clients"] = shadow_metrics.get("clients", 0)
        for key in WORK_KEYS:  # the look-ahead's client work counts as the round's
            if key in shadow_metrics:
                main_metrics[key] = round(main_metrics.get(key, 0.0) + shadow_metrics[key], 3)
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

    # ------------------------------------------------------------------ run state
    def finish(self) -> None:
        super().finish()
        self.sc.results.extra["distillation"] = self.distill_report
        if self.privacy_report:
            self.sc.results.extra["privacy"] = self.privacy_report

    def state_dict(self) -> dict:
        """Besides the global models: the distillation report, the look-ahead gate's models
        and, once written, the name of the file that holds the distillation's artifacts."""
        return {**super().state_dict(), "distill-report": self.distill_report,
                "artifacts-file": self.artifacts_file, "shadow": self.shadow, "shadow-until": self.shadow_until,
                "privacy-report": self.privacy_report}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.distill_report, self.artifacts_file = state["distill-report"], state["artifacts-file"]
        self.shadow, self.shadow_until = state.get("shadow"), int(state.get("shadow-until", 0))
        self.privacy_report = state.get("privacy-report", {})  # (a checkpoint from before the audit: none)

    def checkpoint(self, server_round: int) -> None:
        if self.artifacts:  # written once, before the checkpoint that names the file; then dropped
            if self.cfg.checkpoint:
                save_checkpoint(self.sc.results.out_dir, {"round": server_round, **self.artifacts},
                                filename=ARTIFACTS)
                self.artifacts_file = ARTIFACTS
            self.artifacts = {}
        super().checkpoint(server_round)

