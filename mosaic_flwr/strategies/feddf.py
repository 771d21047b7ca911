"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning"), on the shared distillation core (``distill.py``).

``feddf-gen``: the teacher is the plain average of the round's client models' logits (each in
its own architecture), distilled on samples of the generators the clients train on their
own data at the distillation round (Mosaic's client round without prototypes): FedDF's
ensemble with Mosaic's data-free source, the like-for-like comparison for Mosaic's teacher.
"""

from __future__ import annotations

from .distill import DistillStrategy, Source, Teacher
from .method import Method


class FedDFGenerators(DistillStrategy):
    """FedDF's averaged-client teacher, distilled on the clients' uploaded generators."""

    def mosaic_message(self, phase: str) -> bool:
        return phase == "distill"  # the clients train and upload their generator then

    def describe(self) -> str:
        return "teacher: the average of the client models; source: the clients' generators"

    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        self._generators = self.client_generators(clients, report)[:2]
        return self.client_ensemble(clients, "uniform")

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        generators, self._generators = self._generators, None
        return self.generator_source(*generators)


FEDDF_GEN = Method(FedDFGenerators, "FedDF's client-ensemble distillation on the clients' generators", distils=True)
