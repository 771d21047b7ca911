"""DFRD (Luo et al., NeurIPS 2023, "DFRD: Data-Free Robustness Distillation for Heterogeneous
Federated Learning"), on the shared distillation core (``distill/server.py``).

Clients train as in FedAvg. After aggregating every round from ``warmup-rounds`` on, the
server trains a conditional generator against the round's client models and distils them
into the global model(s) on its samples and on those of the generator's exponential moving
average (EMA) copy, both kept across rounds:

- dynamic weighting: the teacher is the label-aware ensemble of the round's clients
  (``client_ensemble(..., 'label')``), recomputed every round from the clients that took
  part (a generated sample asked for class y takes each client's whole output weighted by
  its share of the round's class-y examples, ``teacher-weighting = 'sample'``; ``'class'``:
  class column c by the shares of class c);
- label sampling: requested labels drawn independently in proportion to the round's class
  counts (``server_generator.sampled_labels``);
- generator loss: ``CE(teacher, y)`` (fidelity) ``+ tran-weight * L_tran``
  (transferability: minus the teacher-student KL divergence on the boundary samples, those
  the teacher classifies as requested and the student does not) ``+ div-weight *
  diversity(z, x)`` (FedGen's diversity with the squared output distance);
- the EMA generator: after each block of generator steps ``G_ema <- ema-decay * G_ema +
  (1 - ema-decay) * G``; every KD batch holds ``kd.batch-size`` samples of G and as many of
  G_ema (equal weight in the KD loss), so the global model keeps learning on what earlier
  generators produced;
- alternation (``BlockSampler``): every ``gen-interval`` KD steps a fresh batch of noise
  and labels, ``gen-steps`` generator steps against the student as it is now, the EMA
  update, then the KD steps on both generators' samples.

The paper's text beyond its abstract was not available here; the choices this reading
makes are listed in docs/methods.md (FedFTG and DFRD).
"""

from __future__ import annotations

import copy

import torch

from mosaic_flwr.config import _choice, _below_one, _non_negative, _positive
from mosaic_flwr.distill.generators import (BlockSampler, Tally, boundary_mask, check_batch, diversity_loss,
                                       ema_update, fidelity_loss, generate, generator_seed, generator_steps,
                                       load_generator, module_state, new_generator, sampled_labels,
                                       transferability_loss)
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.distill.server import DistillStrategy, Source, Teacher
from mosaic_flwr.registry import Method

NAME = "dfrd"
GEN_BETAS = (0.5, 0.999)  # Adam betas of the authors' generators (their DFDG code, same framework)


class DFRDStrategy(DistillStrategy):
    """FedAvg; after every round from ``warmup-rounds`` on, data-free distillation on a server
    generator and its EMA copy (see the module docstring)."""

    every_round = True

    def __init__(self, sc):
        super().__init__(sc)
        self.generator = None  # built at the first distillation, kept across rounds
        self.ema = None        # its exponential moving average

    def describe(self) -> str:
        s = self.cfg.of(NAME)
        return (f"teacher: the label-aware client ensemble ({s.teacher_weighting} weighting); "
                f"source: a server generator ({s.gen_steps} step(s) "
                f"every {s.gen_interval} KD steps: fidelity + {s.tran_weight:g} transferability + "
                f"{s.div_weight:g} diversity) and its EMA copy (decay {s.ema_decay:g})")

    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        return self.client_ensemble(clients, "label", per_sample=self.cfg.of(NAME).teacher_weighting == "sample")

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        cfg, s, dev = self.cfg, self.cfg.of(NAME), self.sc.device
        if self.generator is None:
            self.generator = new_generator(self.info, generator_seed(cfg.seed, NAME), dev)
            self.ema = copy.deepcopy(self.generator)
        g, ema, nets, B = self.generator, self.ema, list(students.values()), cfg.of('kd').batch_size
        counts = self.class_counts(clients)
        # Held-out check: the EMA generator as the earlier rounds left it.
        check = check_batch(ema, counts, cfg.of('mosaic').meta_samples_per_class, mix_seed(cfg.seed, "gen-check", server_round))
        rng = torch.Generator().manual_seed(mix_seed(cfg.seed, NAME, server_round))
        optimizer = torch.optim.Adam(g.parameters(), lr=s.gen_lr, betas=GEN_BETAS)
        tally = Tally()

        def block(i: int):
            y = sampled_labels(counts, B, rng).to(dev)
            z = torch.randn(B, g.nz, generator=rng).to(dev)

            def loss(x):
                t = teacher(x, y)
                outs = [net(x) for net in nets]
                parts = {"fidelity": fidelity_loss(t, y),
                         "transfer": sum(transferability_loss(t, o, y, cfg.of('kd').temperature) for o in outs) / len(outs),
                         "diversity": diversity_loss(z, x, "l2"),
                         "boundary": sum(boundary_mask(t, o, y).float().mean() for o in outs) / len(outs)}
                return (parts["fidelity"] + s.tran_weight * parts["transfer"]
                        + s.div_weight * parts["diversity"]), parts

            tally.add(generator_steps(g, optimizer, z, y, s.gen_steps, loss, nets))
            ema_update(ema, g, s.ema_decay)
            report.update(tally.means("gen-train-"))
            y_ema = sampled_labels(counts, B, rng).to(dev)
            z_ema = torch.randn(B, g.nz, generator=rng).to(dev)
            return torch.cat([generate(g, z, y), generate(ema, z_ema, y_ema)]), torch.cat([y, y_ema])

        return Source(BlockSampler(s.gen_interval, block), check,
                      name="the server's generator and its EMA copy")

    # ------------------------------------------------------------------ run state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "dfrd-generator": module_state(self.generator),
                "dfrd-ema": module_state(self.ema)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        gen, ema = state.get("dfrd-generator"), state.get("dfrd-ema")
        self.generator = None if gen is None else load_generator(self.info, gen, self.sc.device)
        self.ema = None if ema is None else load_generator(self.info, ema, self.sc.device)


DFRD = Method(
    DFRDStrategy,
    "FedAvg whose server distils the label-aware client ensemble into the global model after every "
    "round on a conditional generator (fidelity, transferability, diversity) and its EMA copy "
    "(Luo et al., 2023; dfrd.*)",
    distils=True,
    settings={"teacher-weighting": (str, _choice("sample", "class")),
              "gen-steps": (int, _positive), "gen-interval": (int, _positive), "gen-lr": (float, _positive),
              "tran-weight": (float, _non_negative), "div-weight": (float, _non_negative),
              "ema-decay": (float, _below_one)}, title="DFRD")
