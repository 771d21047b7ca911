"""FedGen (Zhu, Hong & Zhou, ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning", code ``zhuangdizhu/FedGen``): FedAvg whose server learns a conditional
generator in the classifier's feature space and broadcasts it to the clients as an inductive
bias for their local training.

Server side (``BankFedGen``), after every round's FedAvg aggregation: a generator
``G(z, y)`` (``FeatureGenerator``: uniform noise ``z`` concatenated with the one-hot label ->
``hidden-dim`` -> BatchNorm -> ReLU -> the classifier's feature width, as theirs) is trained
for ``gen-steps`` Adam steps (rate ``gen-lr`` times ``decay`` per round trained, weight decay
``gen-weight-decay``) on batches of ``gen-batch-size`` labels drawn uniformly from the labels
the round's clients hold, so that the round's client models' heads, each weighted per label
by the client's share of that label (``train_generator``: the weighted cross-entropy,
``teacher_loss``), classify ``G(z, y)`` as ``y``, plus ``div-weight`` times their diversity
loss (``diversity_loss``). Only the heads of the replies are kept (``decode``), not the
models, so the server's memory does not grow with whole models per client. The generator,
its optimiser and the count of rounds it trained are in the checkpoint (``state_dict``): a
resumed run is the uninterrupted one. It is sent (``fedgen-generator``, an ``ArrayRecord``)
with the global model from the round after its first training on.

Client side (``ClientSide.train_options``, run by the ClientApp's ``train`` handler): with a
generator in the message, every local step's loss is

    CE(model(x), y)
    + alpha_t * (gen-batch-size / batch-size) * CE(head(G(z', y')), y')
    + beta_t  * KL(softmax(head(G(z, y))).detach() || softmax(model(x)))

with ``y'`` drawn uniformly from the federation's labels (``fedgen-labels``) and ``y`` the
batch's labels; ``alpha_t = max(1e-4, alpha * decay**(t-1))`` in round ``t`` (``beta_t``
alike), as their ``exp_lr_scheduler``. Round 1 has no generator: no regulariser (theirs:
``regularization = glob_iter > 0``). The generator is frozen on the client (eval mode: its
BatchNorm's running statistics); the draws come from a seed the server sends per client and
round (``fedgen-seed``), so a client's round is reproducible.

Where we differ from their code, and why:

- **Labels a client regularises with**: the labels present in the federation (the union of
  the clients' declared counts), as their users' ``available_labels`` (the server's
  ``aggregate_user_data``), not only the client's own: the term exists to teach a client the
  classes it lacks.
- **Label weights of the heads**: each client's declared label counts (bounded by
  ``count-clip``), normalised per label over the round's clients. Theirs count the labels of
  the batches each user drew that round, every label starting at 1 (``clean_up_counts``), so
  a user with no example of a label still gets a small weight; labels qualify for sampling
  with more than 1 example somewhere (``MIN_SAMPLES_PER_LABEL``); ours with any.
- **Server objective**: their default (``ensemble_beta = 0``) has no adversarial student
  term; we do not implement it. ``ensemble_alpha = 1`` is fixed; ``div-weight`` is their
  ``ensemble_eta``.
- **Steps and batch**: their ``ensemble_epochs // n_teacher_iters`` x ``n_teacher_iters``
  = 50 steps of the local batch size (32) per round; ours ``gen-steps`` steps of
  ``gen-batch-size`` (default 50 and 32), the same batch size as the clients' synthetic batch
  (theirs ``gen_batch_size``, 32). The generator's rate decays with ``decay`` like the
  clients' weights (their ``ExponentialLR`` and ``exp_lr_scheduler``: both 0.98).
- **Order**: theirs trains the generator before ``aggregate_parameters``; the two do not
  interact (the student term is off), so we aggregate first.
- **Early stop**: theirs regularises only the first 20 local "epochs" (single steps with their
  ``K = 1``; with 20 local epochs that is every step); ours every local step.
- **Weights at 0**: ``alpha = 0`` (``beta = 0``) switches its term off; theirs would floor it
  at 1e-4.

Refused (``check_fedgen``): several model families or width-scaled sub-models (one generator
learns one feature space and every head must read it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message
from flwr.common.logger import log
from torch import nn

from mosaic_flwr.config import (ConfigError, _at_least, _non_negative_finite, _positive_finite, _unit_interval,
                      config_width_scaled, split_list)
from mosaic_flwr.core.records import record_to_state, state_to_record
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.core.task import Arch
from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.registry import ClientSide, ClientStep, Method

GEN_RECORD = "fedgen-generator"  # the generator's ArrayRecord in a train message
ALPHA, BETA = "fedgen-alpha", "fedgen-beta"  # the round's (decayed) weights
LABELS, SEED = "fedgen-labels", "fedgen-seed"
NOISE_DIM, HIDDEN_DIM, GEN_BATCH = "fedgen-noise-dim", "fedgen-hidden-dim", "fedgen-gen-batch-size"
MIN_WEIGHT = 1e-4  # their exp_lr_scheduler's floor


# ----------------------------------------------------------------------------- the generator
class FeatureGenerator(nn.Module):
    """``G(z, y)``: noise concatenated with the one-hot label -> hidden -> BatchNorm -> ReLU ->
    a feature vector of the classifier's penultimate width (their ``Generator``, one-hot)."""

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int = 32, hidden_dim: int = 256):
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.fc = nn.Linear(noise_dim + num_classes, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.out = nn.Linear(hidden_dim, feature_dim)

    def forward(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.num_classes).to(noise.dtype)
        return self.out(F.relu(self.bn(self.fc(torch.cat([noise, onehot], 1)))))

    def draw(self, labels: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` labels uniformly from ``labels`` and their noise (uniform in [0, 1), as
        theirs), drawn on the CPU from ``gen`` and moved to the generator's device."""
        y = labels[torch.randint(len(labels), (n,), generator=gen)]
        return y.to(self.fc.weight.device), self.noise(n, gen)

    def noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(n, self.noise_dim, generator=gen).to(self.fc.weight.device)


def diversity_loss(noise: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Their ``DiversityLoss('l1')``: ``exp(-mean_ij(|z_i - z_j|_2^2/d * |G_i - G_j|_1/D))``,
    small when different noise gives different features."""
    fd = (feats[:, None] - feats[None]).abs().mean(2)
    nd = (noise[:, None] - noise[None]).pow(2).mean(2)
    return torch.exp(-(nd * fd).mean())


def label_shares(counts: torch.Tensor) -> torch.Tensor:
    """Each client's share of each label among the round's clients (``counts``: clients x
    classes; a column sums to 1, or to 0 for a label nobody holds)."""
    counts = counts.double()
    return (counts / counts.sum(0).clamp(min=1e-12)).float()


def teacher_loss(feats: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor,
                 shares: torch.Tensor) -> torch.Tensor:
    """Sum over clients k of ``mean_i(share_k(y_i) * CE(head_k(feats_i), y_i))``: the heads
    (``weights`` K x C x D, ``biases`` K x C) weighted per label by the clients' ``shares``."""
    k, c = biases.shape
    logits = torch.einsum("nd,kcd->knc", feats, weights) + biases[:, None, :]
    ce = F.cross_entropy(logits.reshape(-1, c), y.repeat(k), reduction="none").view(k, -1)
    return (ce * shares[:, y]).mean(1).sum()


def train_generator(generator: FeatureGenerator, optimizer: torch.optim.Optimizer, weights: torch.Tensor,
                    biases: torch.Tensor, counts: torch.Tensor, *, steps: int, batch_size: int,
                    div_weight: float, seed: int) -> dict[str, float]:
    """``steps`` Adam steps of the generator on ``teacher_loss + div_weight * diversity_loss``
    for labels drawn uniformly from those some client holds (``counts`` > 0); the heads stay
    fixed. Returns the first and last steps' teacher loss and the last diversity loss."""
    device = generator.fc.weight.device
    weights, biases = weights.to(device), biases.to(device)
    shares = label_shares(counts).to(device)
    labels = torch.nonzero(counts.sum(0) > 0).flatten()
    gen = torch.Generator().manual_seed(seed)
    generator.train()
    first = last = div = float("nan")
    for step in range(steps):
        y, noise = generator.draw(labels, batch_size, gen)
        feats = generator(y, noise)
        teacher = teacher_loss(feats, y, weights, biases, shares)
        diversity = diversity_loss(noise, feats)
        optimizer.zero_grad(set_to_none=True)
        (teacher + div_weight * diversity).backward()
        optimizer.step()
        last, div = teacher.item(), diversity.item()
        if step == 0:
            first = last
    return {"fedgen-teacher-first": round(first, 5), "fedgen-teacher-last": round(last, 5),
            "fedgen-diversity": round(div, 5)}


def round_weight(weight: float, decay: float, server_round: int) -> float:
    """A client weight (``alpha``, ``beta``) in ``server_round``: ``max(1e-4, w * decay**(t-1))``,
    0 when ``w`` is 0 (their ``exp_lr_scheduler`` with ``glob_iter = t - 1``)."""
    return max(MIN_WEIGHT, weight * decay ** (server_round - 1)) if weight > 0 else 0.0


# ----------------------------------------------------------------------------- client side
class GeneratorRegulariser:
    """The clients' extra loss (``train_local``'s ``extra_loss``) with the received generator;
    see the module docstring. The generator is frozen: only the model's parameters get a
    gradient."""

    def __init__(self, generator: FeatureGenerator, labels: torch.Tensor, alpha: float, beta: float,
                 gen_batch: int, ratio: float, seed: int):
        self.generator = generator.eval().requires_grad_(False)
        self.labels, self.alpha, self.beta, self.gen_batch, self.ratio = labels, alpha, beta, gen_batch, ratio
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        g = self.generator.to(xb.device)
        loss = logits.new_zeros(())
        if self.beta > 0:
            with torch.no_grad():
                target = F.softmax(model.head(g(yb, g.noise(len(yb), self.gen))), 1)
            loss = loss + self.beta * F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
        if self.alpha > 0:
            y, noise = g.draw(self.labels, self.gen_batch, self.gen)
            with torch.no_grad():
                feats = g(y, noise)
            loss = loss + self.alpha * self.ratio * F.cross_entropy(model.head(feats), y)
        return loss


def generator_from(content: Any, num_classes: int, feature_dim: int, config: Mapping[str, Any]
                   ) -> FeatureGenerator | None:
    """The generator a train message carries (``None`` when it has none)."""
    if content is None or GEN_RECORD not in content.array_records:
        return None
    with torch.random.fork_rng(devices=[]):  # its weights are overwritten: leave the RNG alone
        generator = FeatureGenerator(num_classes, feature_dim, int(config[NOISE_DIM]), int(config[HIDDEN_DIM]))
    generator.load_state_dict(record_to_state(content.array_records[GEN_RECORD]))
    return generator


def regulariser(step: ClientStep) -> dict:
    """``train_local``'s ``extra_loss`` when the message carries a generator and a weight is
    above 0; nothing otherwise (plain FedAvg training)."""
    c = step.config
    generator = generator_from(step.content, step.num_classes, step.model.feature_dim, c)
    if generator is None:
        return {}
    alpha, beta = float(c[ALPHA]), float(c[BETA])
    if alpha == 0 and beta == 0:
        return {}
    gen_batch = int(c[GEN_BATCH])
    labels = torch.tensor([int(v) for v in c[LABELS]], dtype=torch.long)
    return {"extra_loss": GeneratorRegulariser(generator, labels, alpha, beta, gen_batch,
                                               gen_batch / int(c["batch-size"]), int(c[SEED]))}


# ----------------------------------------------------------------------------- server side
class BankFedGen(FedAvgStrategy):
    """FedAvg with FedGen's server-side generator (see the module docstring)."""

    def __init__(self, sc: ServerContext):
        super().__init__(sc)
        if self.heterogeneous:  # a SuperNode's --node-config may assign what the check did not see
            raise ConfigError(f"client-models: fedgen trains one generator for one feature space, but the "
                              f"clients hold {', '.join(f'{a.model}@{a.capacity:g}' for a in self.archs)}; "
                              "use one model at full width")
        s = self.cfg.of("fedgen")
        self.settings = s
        num_classes = self.info.num_classes
        self.feature_dim = self.module(Arch(self.primary)).feature_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.cfg.seed, "fedgen-generator"))
            self.generator = FeatureGenerator(num_classes, self.feature_dim, s.noise_dim, s.hidden_dim).to(sc.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=s.gen_lr, weight_decay=s.gen_weight_decay)
        self.generator_rounds = 0   # rounds the generator trained (it is sent once > 0)
        self._heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # node -> the round's head
        held = [info.label_counts > 0 for info in sc.clients.values()]
        present = torch.stack(held).any(0) if held else torch.ones(num_classes, dtype=torch.bool)
        self.labels = [int(c) for c in torch.nonzero(present).flatten()]

    # ------------------------------------------------------------------ messages
    def train_config(self) -> ConfigRecord:
        s = self.settings
        return self.sc.train_config(**{NOISE_DIM: s.noise_dim, HIDDEN_DIM: s.hidden_dim,
                                       GEN_BATCH: s.gen_batch_size, LABELS: self.labels})

    def round_config(self, server_round: int, config: ConfigRecord) -> tuple[str, dict]:
        kind, values = super().round_config(server_round, config)
        s = self.settings
        return kind, {**values, ALPHA: round_weight(s.alpha, s.decay, server_round),
                      BETA: round_weight(s.beta, s.decay, server_round)}

    def values_for(self, server_round: int, node_id: int, values: dict) -> dict:
        return {**values, SEED: mix_seed(self.cfg.seed, "fedgen-client", server_round, self.sc.partition_of(node_id))}

    def messages_for(self, server_round: int, node_ids: list[int], config: ConfigRecord | None = None
                     ) -> list[Message]:
        """The bank's messages, with the generator once it has trained (the same record for all)."""
        messages = super().messages_for(server_round, node_ids, config)
        if self.generator_rounds:
            record = state_to_record(self.generator.state_dict())
            for msg in messages:
                msg.content[GEN_RECORD] = record
        return messages

    # ------------------------------------------------------------------ replies
    def collect(self, server_round: int, replies) -> list:
        self._heads = {}  # a round sent again starts over
        return super().collect(server_round, replies)

    def decode(self, server_round: int, msg: Message, arch: Arch) -> tuple[object, str | None]:
        """The bank's decoding; a valid reply's head is kept for the generator (not its model)."""
        payload, problem = super().decode(server_round, msg, arch)
        if problem is None:
            state = payload[0]
            self._heads[msg.metadata.src_node_id] = (state["head.weight"].detach().float().clone(),
                                                     state["head.bias"].detach().float().clone())
        return payload, problem

    def apply_round(self, server_round: int, items: list):
        result = super().apply_round(server_round, items)
        heads, self._heads = self._heads, {}
        if heads:
            self.train_generator_round(server_round, heads)
        return result

    def train_generator_round(self, server_round: int, heads: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Train the generator on the round's heads, weighted by the clients' label counts."""
        sc, s = self.sc, self.settings
        nodes = sorted(heads, key=sc.partition_of)
        num_classes = self.info.num_classes
        counts = torch.stack([sc.counts_of(n, sc.clients[n].label_counts) if n in sc.clients
                              else torch.ones(num_classes) for n in nodes]).double()
        for group in self.optimizer.param_groups:
            group["lr"] = s.gen_lr * s.decay ** self.generator_rounds
        t0 = time.perf_counter()
        stats = train_generator(self.generator, self.optimizer, torch.stack([heads[n][0] for n in nodes]),
                                torch.stack([heads[n][1] for n in nodes]), counts, steps=s.gen_steps,
                                batch_size=s.gen_batch_size, div_weight=s.div_weight,
                                seed=mix_seed(self.cfg.seed, "fedgen-train", server_round))
        self.generator_rounds += 1
        sc.train_metrics.update(stats)
        sc.train_metrics["fedgen-gen-seconds"] = round(time.perf_counter() - t0, 3)
        log(INFO, "[fedgen] round %d: generator trained on %d heads, teacher loss %.4f -> %.4f, diversity %.4f",
            server_round, len(nodes), stats["fedgen-teacher-first"], stats["fedgen-teacher-last"],
            stats["fedgen-diversity"])

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {**super().state_dict(), "fedgen": {
            "generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "rounds": self.generator_rounds}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "fedgen" in state:
            self.generator.load_state_dict(state["fedgen"]["generator"])
            self.optimizer.load_state_dict(state["fedgen"]["optimizer"])
            self.generator_rounds = int(state["fedgen"]["rounds"])


# ----------------------------------------------------------------------------- config check
def check_fedgen(values: Mapping[str, Any]) -> None:
    """One model family at full width: one generator learns one feature space."""
    models = split_list(values["client-models"])
    if len(set(models)) > 1:
        raise ConfigError(f"client-models: fedgen trains one generator for one feature space, but "
                          f"{values['client-models']!r} assigns several model families; use one model")
    if config_width_scaled(values):
        raise ConfigError(f"client-capacities: fedgen needs every client's features at full width (the "
                          f"generator learns one feature space), but {values['client-capacities']!r} assigns "
                          "width-scaled sub-models; use capacity 1")


FEDGEN = Method(BankFedGen, "FedAvg whose server learns a generator of features from the clients' heads and "
                            "sends it to them as a regulariser (data-free KD; Zhu et al., 2021; fedgen.*)",
                settings={"alpha": (float, _non_negative_finite), "beta": (float, _non_negative_finite),
                          "decay": (float, _unit_interval), "gen-steps": (int, _at_least(1)),
                          "gen-batch-size": (int, _at_least(2)), "gen-lr": (float, _positive_finite),
                          "gen-weight-decay": (float, _non_negative_finite),
                          "div-weight": (float, _non_negative_finite), "noise-dim": (int, _at_least(1)),
                          "hidden-dim": (int, _at_least(1))},
                check=check_fedgen, client=ClientSide(train_options=regulariser), title="FedGen")
