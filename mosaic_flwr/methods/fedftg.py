"""FedFTG (Zhang et al., CVPR 2022, "Fine-tuning Global Model via Data-Free Knowledge
Distillation for Non-IID Federated Learning"), on the shared distillation core (``distill/server.py``).

Clients train as in FedAvg. After aggregating every round from ``warmup-rounds`` on, the
server fine-tunes the global model(s) on hard samples of a conditional generator it trains
itself, which persists across rounds (as in the authors' code):

- teacher: the round's client models as the label-aware ensemble (``client_ensemble(...,
  'label')``): as the authors, a generated sample asked for class y takes each client's
  whole output weighted by its share of the round's class-y examples (``teacher-weighting
  = 'sample'``; ``'class'``: class column c by the shares of class c);
- labels: the round's class counts in exact proportion, shuffled
  (``server_generator.proportional_labels``: the authors' ``generate_labels``), drawn once
  for the round;
- generator loss: ``CE(teacher, y) + hard-weight * (-mean |student - teacher|) +
  div-weight * diversity(z, x)`` (fidelity, hardness, FedGen's diversity with the L1
  output distance; Adam at ``gen-lr``);
- alternation (``BlockSampler``): every ``gen-interval`` KD steps a fresh batch of noise
  and labels, ``gen-steps`` generator steps on it against the student as it is now, then
  the student's KD steps on that batch (the authors: one generator step per client, then
  five student steps on the same batch, ten times a round).

The KD loop, its loss and optimiser (``kd.*``), the checks and the gate are the core's.
What differs from the authors' code is listed in docs/methods.md (FedFTG and DFRD).
"""

from __future__ import annotations

import math

import torch

from mosaic_flwr.config import _choice, _non_negative, _positive
from mosaic_flwr.distill.generators import (BlockSampler, Tally, check_batch, diversity_loss, fidelity_loss,
                                       generate, generator_seed, generator_steps, hardness_loss,
                                       load_generator, module_state, new_generator, proportional_labels)
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.distill.server import DistillStrategy, Source, Teacher
from mosaic_flwr.registry import Method

NAME = "fedftg"


class FedFTGStrategy(DistillStrategy):
    """FedAvg; after every round from ``warmup-rounds`` on, data-free fine-tuning of the
    global model on a server generator's hard samples (see the module docstring)."""

    every_round = True

    def __init__(self, sc):
        super().__init__(sc)
        self.generator = None  # built at the first distillation, kept across rounds

    def describe(self) -> str:
        s = self.cfg.of(NAME)
        return (f"teacher: the label-aware client ensemble ({s.teacher_weighting} weighting); "
                f"source: a server generator, {s.gen_steps} "
                f"step(s) every {s.gen_interval} KD steps (fidelity + {s.hard_weight:g} hardness + "
                f"{s.div_weight:g} diversity)")

    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        return self.client_ensemble(clients, "label", per_sample=self.cfg.of(NAME).teacher_weighting == "sample")

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        cfg, s, dev = self.cfg, self.cfg.of(NAME), self.sc.device
        if self.generator is None:
            self.generator = new_generator(self.info, generator_seed(cfg.seed, NAME), dev)
        g, nets, B = self.generator, list(students.values()), cfg.of('kd').batch_size
        counts = self.class_counts(clients)
        check = check_batch(g, counts, cfg.of('mosaic').meta_samples_per_class, mix_seed(cfg.seed, "gen-check", server_round))
        rng = torch.Generator().manual_seed(mix_seed(cfg.seed, NAME, server_round))
        labels = proportional_labels(counts, math.ceil(cfg.of('kd').steps / s.gen_interval) * B, rng)
        optimizer = torch.optim.Adam(g.parameters(), lr=s.gen_lr)
        tally = Tally()

        def block(i: int):
            y = labels[i * B:(i + 1) * B].to(dev)
            z = torch.randn(len(y), g.nz, generator=rng).to(dev)

            def loss(x):
                t = teacher(x, y)
                parts = {"fidelity": fidelity_loss(t, y),
                         "hardness": sum(hardness_loss(t, net(x)) for net in nets) / len(nets),
                         "diversity": diversity_loss(z, x, "l1")}
                return (parts["fidelity"] + s.hard_weight * parts["hardness"]
                        + s.div_weight * parts["diversity"]), parts

            tally.add(generator_steps(g, optimizer, z, y, s.gen_steps, loss, nets))
            report.update(tally.means("gen-train-"))
            return generate(g, z, y), y

        return Source(BlockSampler(s.gen_interval, block), check, name="the server's generator")

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "fedftg-generator": module_state(self.generator)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("fedftg-generator")
        self.generator = None if saved is None else load_generator(self.info, saved, self.sc.device)


FEDFTG = Method(
    FedFTGStrategy,
    "FedAvg whose server fine-tunes the global model after every round on hard samples of a "
    "conditional generator it trains against the label-aware client ensemble (Zhang et al., 2022; fedftg.*)",
    distils=True,
    settings={"teacher-weighting": (str, _choice("sample", "class")),
              "gen-steps": (int, _positive), "gen-interval": (int, _positive), "gen-lr": (float, _positive),
              "hard-weight": (float, _non_negative), "div-weight": (float, _non_negative)}, title="FedFTG")
