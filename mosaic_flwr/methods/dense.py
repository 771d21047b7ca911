"""DENSE (Zhang et al., NeurIPS 2022, "DENSE: Data-Free One-Shot Federated Learning"), on the
shared distillation core (``distill/server.py``).

One-shot as published: one round of local training (``warmup-rounds=1,
num-server-rounds=1``), then the server distils the clients' ensemble into the global model
on samples of a generator it trains itself, from the client models alone (no data, nothing
uploaded but the models). After warm-up rounds or with fine-tune rounds the core's schedule
does the rest.

**Teacher**: the plain average of the client models' logits (``client_ensemble('uniform')``;
their ``Ensemble_A``), each model in its own architecture and width.

**Source** (``DenseSynthesizer``): a pool of synthesised batches, filled inside the KD loop.
Every ``dense.gen-interval`` KD steps (from the first) the server trains the generator for
``dense.gen-steps`` Adam steps (``dense.gen-lr``, betas (0.5, 0.999)) on one batch of
``dense.gen-batch-size`` noise vectors ``z`` and target labels ``y`` drawn uniformly over the
classes; ``z`` is learnable and trained with the generator (as in their code: this is what
lets an unconditional generator meet a per-sample target). The loss, on ``x = aug(G(z))``:

- ``oh``: ``CE(ensemble(x), y)``: the ensemble labels each sample confidently as its target;
- ``bn``: DeepInversion's statistics term: for every BatchNorm layer of every client model,
  ``||mu_batch - running_mean||_2 + ||var_batch - running_var||_2`` of the layer's input,
  summed over a model's layers and averaged over the models (0 for models without BatchNorm);
- ``adv``: minus the student/ensemble disagreement, ``-mean_i(m_i * KL(p_t(x_i) || p_s(x_i)))``
  with ``m_i = 1`` where the student's and the ensemble's argmax differ (their mask: the
  generator is pushed towards samples the student gets wrong, not towards making it wrong
  everywhere); averaged over the students (every family's global model).

``L = dense.bn-weight * bn + dense.oh-weight * oh + dense.adv-weight * adv``. As in their code
the batch of the phase with the lowest loss goes into the pool with its targets (the oldest
samples leave the pool beyond ``dense.pool-size`` samples; 0 keeps all, as theirs), and every
KD step draws ``kd.batch-size`` pool samples uniformly (with replacement), augmented by
``augment`` (CIFAR/SVHN: crop + flip, as their KD loader), with their targets as the
requested labels (``kd-teacher-label-agreement`` is then how often the ensemble gives a
sample its target). ``Source.check`` is None: the targets are requests, not labels.

Where this differs from their code (``zj-jayzhang/DENSE``, ``helpers/synthesizers.py``,
``loop_df_fl.py``; docs/methods.md lists them too):

- KD uses the shared ``kd.*`` loss and Adam; theirs is ``T^2 * KL(p_t/T || p_s/T)`` with
  ``T=20`` and SGD (lr 0.005, momentum 0.9), one pass over the whole pool per synthesis:
  ``kd.a=1 kd.b=0 kd.temperature=20`` gives their loss.
- Their generator is reset (DCGAN init) before every synthesis; ours by default continues
  from the last phase (the paper's Algorithm 1 trains one generator throughout), which makes
  the small CPU-sized ``gen-steps`` useful; ``dense.reset-generator=true`` is theirs.
- Their BatchNorm hooks are registered on ``Ensemble_A.modules()``, which holds the client
  models in a plain list, so no hook is ever registered and their BN term is always 0; ours
  hooks every client model's BatchNorm layers (the paper's intent), averaged over models
  rather than summed so the weight does not scale with the number of clients.
- Their student is a freshly initialised model; ours is the core's student, the aggregated
  global model (the distillation gate then compares the two).
- Their student stays in train mode while the generator reads it (its BatchNorm running
  statistics move with every synthetic batch); ours is read in eval mode, its mode restored.
- Their generator's output (sigmoid, [0, 1]) feeds models trained on unnormalised pixels;
  ours is mapped into the classifiers' normalised input space, ``(sigmoid - mean) / std``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import INFO

import torch
import torch.nn.functional as F
from flwr.common.logger import log
from torch import Tensor, nn

from mosaic_flwr.config import _non_negative, _positive
from mosaic_flwr.data.augment import augmenter
from mosaic_flwr.models.generators import dcgan_init
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.distill.server import DistillStrategy, Source, Teacher
from mosaic_flwr.registry import Method

Augment = Callable[[Tensor, torch.Generator], Tensor]


# ----------------------------------------------------------------------------- generator
class DenseGenerator(nn.Module):
    """DENSE's unconditional generator ``G(z)``: noise ``[B, nz]`` -> normalised images.

    Their architecture (``models/generator.py``): linear -> ``(2w, S/4, S/4)`` -> BN ->
    upsample x2 -> conv 3x3 ``2w`` -> BN, LeakyReLU(0.2) -> upsample x2 -> conv 3x3 ``w`` ->
    BN, LeakyReLU(0.2) -> conv 3x3 -> ``C`` channels -> sigmoid, then ``(x - mean) / std``
    into the classifiers' input space (``mean``/``std`` fixed by the data set, not weights).
    """

    def __init__(self, nz: int, width: int, channels: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"DenseGenerator: image size {image_size} must be a multiple of 4")
        self.nz, self.s0, w = int(nz), image_size // 4, int(width)
        self.l1 = nn.Linear(self.nz, 2 * w * self.s0 * self.s0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * w),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, channels, 3, padding=1),
            nn.Sigmoid(),
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        h = self.l1(z).view(len(z), -1, self.s0, self.s0)
        return (self.net(h) - self.mean) / self.std


# ----------------------------------------------------------------------------- losses
class BNStatistics:
    """DeepInversion's BatchNorm term for ``models``, while in a ``with`` block: forward hooks
    on every ``BatchNorm2d`` record ``||mean - running_mean||_2 + ||var - running_var||_2`` of
    the layer's input batch; ``loss()`` is the sum over a model's layers, averaged over the
    models (a model without BatchNorm counts 0). The hooks are removed on leaving."""

    def __init__(self, models: Sequence[nn.Module]):
        self.models = list(models)
        self.layers = [[m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] for model in self.models]
        self.terms: dict[int, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> "BNStatistics":
        for layers in self.layers:
            for layer in layers:
                self.handles.append(layer.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.terms = [], {}

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
        self.terms[id(module)] = (torch.linalg.vector_norm(module.running_var - var)
                                  + torch.linalg.vector_norm(module.running_mean - mean))

    def loss(self) -> Tensor:
        total = None
        for layers in self.layers:
            for layer in layers:
                term = self.terms.get(id(layer))
                if term is not None:
                    total = term if total is None else total + term
        return torch.zeros(()) if total is None else total / len(self.models)


def disagreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Their adversarial quantity (maximised by the generator): the batch mean of
    ``KL(p_t || p_s)`` over the samples whose argmax differs (0 on the others)."""
    mask = (student_logits.argmax(1) != teacher_logits.argmax(1)).float()
    kl = (F.softmax(teacher_logits, 1) * (F.log_softmax(teacher_logits, 1) - F.log_softmax(student_logits, 1))).sum(1)
    return (kl * mask).mean()


# ----------------------------------------------------------------------------- the synthesiser
class DenseSynthesizer:
    """DENSE's generator training and pool (see the module docstring); ``sample(step)`` is the
    core's ``Source.sample``: it trains the generator every ``interval`` steps against the
    current ``students`` (read, never changed) and draws a KD batch from the pool."""

    def __init__(self, teacher: nn.Module, generator: DenseGenerator, students: Sequence[nn.Module], *,
                 num_classes: int, steps: int, lr: float, batch_size: int, interval: int = 1,
                 bn: float = 1.0, oh: float = 1.0, adv: float = 1.0, pool_size: int = 0,
                 kd_batch_size: int = 64, reset: bool = False, augment: Augment | None = None,
                 seed: int = 0, device: torch.device | str = "cpu"):
        members = getattr(teacher, "members", [teacher])
        self.teacher, self.generator = teacher, generator.to(device)
        self.students = list(students)
        self.bn_stats = BNStatistics(members)
        self.num_classes, self.steps, self.lr, self.batch_size = num_classes, steps, lr, batch_size
        self.interval, self.kd_batch_size, self.pool_size, self.reset = interval, kd_batch_size, pool_size, reset
        self.weights = {"bn": bn, "oh": oh, "adv": adv}
        self.augment, self.device = augment, torch.device(device)
        self.rng = torch.Generator().manual_seed(seed)
        self.pool_x: Tensor | None = None
        self.pool_y: Tensor | None = None
        self.phases, self.seconds = 0, 0.0
        self.last: dict[str, float] = {}    # the last phase's best batch: its loss parts
        self.first: dict[str, float] = {}   # the first phase's
        self.trace: list[dict[str, float]] = []  # the last phase's loss parts, step by step

    def _aug(self, x: Tensor) -> Tensor:
        return x if self.augment is None else self.augment(x, self.rng)

    def losses(self, x: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The generator's loss parts on generated batch ``x`` (augmented here) for
        ``targets``, and ``loss`` their weighted sum (see the module docstring)."""
        x = self._aug(x)
        with self.bn_stats:
            t = self.teacher(x)
            bn = self.bn_stats.loss().to(x.device)
        oh = F.cross_entropy(t, targets)
        if self.students:
            adv = -torch.stack([disagreement(s(x), t) for s in self.students]).mean()
        else:
            adv = torch.zeros((), device=x.device)
        w = self.weights
        return {"loss": w["bn"] * bn + w["oh"] * oh + w["adv"] * adv, "bn": bn, "oh": oh, "adv": adv,
                "hit": (t.argmax(1) == targets).float().mean()}

    def synthesize(self) -> dict[str, float]:
        """One generator phase: ``steps`` Adam steps on generator and ``z``; the batch with the
        lowest loss joins the pool. Returns that batch's loss parts."""
        t0 = time.perf_counter()
        g, dev = self.generator, self.device
        if self.reset:
            dcgan_init(g)
        z = torch.randn(self.batch_size, g.nz, generator=self.rng).to(dev).requires_grad_(True)
        targets = torch.randint(self.num_classes, (self.batch_size,), generator=self.rng).to(dev)
        opt = torch.optim.Adam([{"params": g.parameters()}, {"params": [z]}], lr=self.lr, betas=(0.5, 0.999))
        modes = [s.training for s in self.students]
        grads = [[p.requires_grad for p in s.parameters()] for s in self.students]
        for s in self.students:  # read in eval mode, no weight gradients; restored below
            s.eval().requires_grad_(False)
        g.train()
        best, best_x, best_parts = float("inf"), None, {}
        self.trace = []
        try:
            for _ in range(self.steps):
                x = g(z)
                parts = self.losses(x, targets)
                values = dict(zip(parts, torch.stack([v.detach() for v in parts.values()]).tolist()))
                self.trace.append(values)
                if best_x is None or values["loss"] < best:
                    best, best_x, best_parts = values["loss"], x.detach(), values
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
        finally:
            for s, mode, flags in zip(self.students, modes, grads):
                s.train(mode)
                for p, flag in zip(s.parameters(), flags):
                    p.requires_grad_(flag)
        self.add(best_x, targets)
        self.phases += 1
        self.seconds += time.perf_counter() - t0
        if not self.first:
            self.first = best_parts
        self.last = best_parts
        return best_parts

    def add(self, x: Tensor, y: Tensor) -> None:
        """``x`` (un-augmented, detached) and its targets into the pool, oldest out beyond
        ``pool_size`` samples (0: no bound)."""
        x, y = x.detach(), y.detach()
        self.pool_x = x if self.pool_x is None else torch.cat([self.pool_x, x])
        self.pool_y = y if self.pool_y is None else torch.cat([self.pool_y, y])
        if self.pool_size and len(self.pool_y) > self.pool_size:
            self.pool_x, self.pool_y = self.pool_x[-self.pool_size:], self.pool_y[-self.pool_size:]

    def draw(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``batch_size`` pool samples, uniformly with replacement, augmented."""
        idx = torch.randint(len(self.pool_y), (batch_size,), generator=self.rng).to(self.pool_y.device)
        return self._aug(self.pool_x[idx]), self.pool_y[idx]

    def sample(self, step: int) -> tuple[Tensor, Tensor]:
        if step % self.interval == 0 or self.pool_y is None:
            self.synthesize()
        return self.draw(self.kd_batch_size)


# ----------------------------------------------------------------------------- the strategy
class DenseStrategy(DistillStrategy):
    """DENSE: the clients' average distilled on the samples of a generator the server trains
    against the ensemble and the student (see the module docstring)."""

    def describe(self) -> str:
        d = self.cfg.of("dense")
        return (f"teacher: the average of the client models; source: DENSE's server-side generator "
                f"({d.gen_steps} steps every {d.gen_interval} KD steps; bn {d.bn_weight:g}, oh {d.oh_weight:g}, "
                f"adv {d.adv_weight:g})")

    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        return self.client_ensemble(clients, "uniform")

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        cfg, d, info = self.cfg, self.cfg.of("dense"), self.info
        generator = DenseGenerator(d.noise_dim, d.gen_width, info.in_channels, info.image_size, info.mean, info.std)
        synth = DenseSynthesizer(
            teacher, generator, list(students.values()), num_classes=info.num_classes, steps=d.gen_steps,
            lr=d.gen_lr, batch_size=d.gen_batch_size, interval=d.gen_interval, bn=d.bn_weight,
            oh=d.oh_weight, adv=d.adv_weight, pool_size=d.pool_size, kd_batch_size=cfg.of('kd').batch_size,
            reset=d.reset_generator, augment=augmenter(cfg.augment, info),
            seed=mix_seed(cfg.seed, "dense", server_round), device=self.sc.device)

        def sample(step: int) -> tuple[Tensor, Tensor]:
            out = synth.sample(step)
            if step == cfg.of('kd').steps - 1:  # the last KD step: the report and the artifacts
                self.dense_report(synth, report)
            return out

        return Source(sample, None, name="DENSE's generator")

    def dense_report(self, synth: DenseSynthesizer, report: dict) -> None:
        report.update({"dense-phases": synth.phases, "dense-pool": len(synth.pool_y),
                       "dense-gen-seconds": synth.seconds,
                       **{f"dense-first-{k}": v for k, v in synth.first.items()},
                       **{f"dense-last-{k}": v for k, v in synth.last.items()}})
        log(INFO, "[dense] %d generator phases (%.1f s), pool %d; last phase: bn %.4f, oh %.4f, adv %.4f, "
            "ensemble hits its target %.3f (first phase %.3f)", synth.phases, synth.seconds, len(synth.pool_y),
            synth.last["bn"], synth.last["oh"], synth.last["adv"], synth.last["hit"], synth.first["hit"])
        self.artifacts["dense-generator"] = {k: v.detach().cpu().clone()
                                             for k, v in synth.generator.state_dict().items()}
        keep = min(64, len(synth.pool_y))
        self.artifacts["dense-samples"] = {"x": synth.pool_x[-keep:].cpu().clone(),
                                           "targets": synth.pool_y[-keep:].cpu().clone()}


DENSE = Method(
    DenseStrategy, "DENSE (Zhang et al., 2022): the clients' ensemble distilled on a server-trained "
                   "generator (ensemble confidence, BatchNorm statistics, adversarial to the student)",
    distils=True,
    settings={
        "gen-steps": (int, _positive),
        "gen-interval": (int, _positive),
        "gen-batch-size": (int, _positive),
        "gen-lr": (float, _positive),
        "gen-width": (int, _positive),
        "noise-dim": (int, _positive),
        "bn-weight": (float, _non_negative),
        "oh-weight": (float, _non_negative),
        "adv-weight": (float, _non_negative),
        "pool-size": (int, _non_negative),
        "reset-generator": (bool, None),
    }, title="DENSE")
