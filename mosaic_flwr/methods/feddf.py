"""FedDF (Lin et al., NeurIPS 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning"), on the shared distillation core (``distill/server.py``). Two variants:

``feddf``: FedDF as published. After a round's aggregation the server distils the ensemble of
the round's client models (the plain average of their logits, the paper's AVGLOGITS; each
model in its own architecture, ``client_ensemble(..., "uniform")``) into the fused (averaged)
global model of every family, on an unlabelled public *transfer set* (``feddf.transfer-set``):

- ``auto`` (the default): MNIST for Fashion-MNIST, Fashion-MNIST for MNIST, CIFAR-100 for
  CIFAR-10 (the paper's choice; torchvision's copy: ``scripts/setup.sh --data cifar100``
  where online), CIFAR-10 for CIFAR-100 and SVHN, ``holdout`` for ``synthetic``;
- a registered data set of the federation's image shape: its training split, ``transfer-size``
  images of it drawn with the run seed; its labels are never read;
- ``holdout``: the validation split's images (``validation-split`` > 0; the training images
  no client holds), without their labels. The fallback where nothing public fits (CIFAR-10
  offline): it is *in-distribution*, an easier setting than the paper's, and the ``val-*``
  figures and ``kd.gate='validation'`` then score on images the student was distilled on.

The transfer images enter the federation's input space: uint8 images normalised with the
federation's mean and std. Channels and size must match (MNIST and Fashion-MNIST are both
28x28x1, CIFAR-10/100 and SVHN 32x32x3); a mismatch is a ``ConfigError`` naming both sets,
raised when the config is built, and a missing set fails in the ServerApp's setup (``prepare``)
naming where it looked and how to obtain it, before any client trains.

Schedule: ``feddf.every-round = true`` (the default, as published) distils after every round
from ``warmup-rounds`` on; ``false`` distils once, after round ``warmup-rounds``, as Mosaic.

Differences from the paper (the shared core's KD, ``kd.*`` settings):
- the paper distils with Adam at 1e-3, cosine-annealed over up to 10^4 batches of 128,
  validating every 100 batches on a held-out set and stopping after 2000 batches without
  improvement (keeping the best model on it); here Adam at a constant ``kd.lr`` for
  ``kd.steps`` batches of ``kd.batch-size``, with the shared gate (``kd.gate``) deciding
  whether the distilled model replaces the average;
- the paper's loss is the KL divergence at temperature 1: ``kd.a=1 kd.b=0 kd.temperature=1``
  (the shared default mixes in cross-entropy and JSD);
- the paper distils from the first round at a constant client rate: ``warmup-rounds=1
  lr-schedule='constant'``, and has no gate: ``kd.gate='off'``. ``conf/feddf-published.toml``
  holds these settings (an overlay on a data set's file);
- the paper's transfer sets for CIFAR-10 are CIFAR-100 and STL-10 (STL-10 is 96x96: not offered).

``feddf-gen``: the teacher is the same average of the round's client models' logits,
distilled on samples of the generators the clients train on their own data at the
distillation round (Mosaic's client round without prototypes): FedDF's ensemble with Mosaic's
data-free source, the like-for-like comparison for Mosaic's teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log
from torch import Tensor

from mosaic_flwr.config import Config, ConfigError, _positive
from mosaic_flwr.data import DATASETS, DatasetNotFoundError, dataset_info, load_dataset, normalize
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.core.task import validation_split
from mosaic_flwr.distill.server import DistillStrategy, RememberingTeacher, Source, Teacher
from mosaic_flwr.registry import Method

HOLDOUT = "holdout"
TRANSFER_CHOICES = ("auto", HOLDOUT, *DATASETS)
# ``auto``: the federation's data set -> its transfer set.
AUTO_TRANSFER = {"fmnist": "mnist", "mnist": "fmnist", "cifar10": "cifar100", "cifar100": "cifar10",
                 "svhn": "cifar10", "synthetic": HOLDOUT}
# How to obtain each data set where it is missing.
OBTAIN = {"fmnist": "bash scripts/setup.sh", "mnist": "bash scripts/setup.sh --data mnist",
          "cifar10": "bash scripts/setup.sh --data cifar10",
          "cifar100": "bash scripts/setup.sh --data cifar100 (torchvision's download, online; offline: "
                      "feddf.transfer-set='holdout' with validation-split > 0, in-distribution)",
          "svhn": "download=true on a machine that is online", "synthetic": "nothing (generated)"}


def _transfer_choice(v) -> str | None:
    return None if v in TRANSFER_CHOICES else f"unknown value {v!r}; allowed: {list(TRANSFER_CHOICES)}"


def transfer_set_name(dataset: str, setting: str) -> str:
    """The transfer set ``feddf.transfer-set`` names for a federation on ``dataset``."""
    return AUTO_TRANSFER.get(dataset, HOLDOUT) if setting == "auto" else setting


def _shape(name: str) -> str:
    info = dataset_info(name)
    return f"{info.image_size}x{info.image_size}x{info.in_channels}"


def compatible_transfer_sets(dataset: str) -> list[str]:
    """The transfer sets to suggest for a federation on ``dataset``: the other real data sets of
    its shape, and ``holdout`` (``synthetic``, for tests, is accepted but not suggested)."""
    return [n for n in DATASETS if n not in (dataset, "synthetic") and _shape(n) == _shape(dataset)] + [HOLDOUT]


def check_feddf(values: Mapping[str, Any]) -> None:
    """The transfer set fits the federation (before training; reads no file)."""
    dataset, setting = values["dataset"], values["feddf.transfer-set"]
    name = transfer_set_name(dataset, setting)
    named = f"{name!r}" + (f" (auto for {dataset})" if setting == "auto" else "")
    fits = ", ".join(compatible_transfer_sets(dataset))
    if name == HOLDOUT:
        if values["validation-split"] == 0:
            raise ConfigError(f"feddf.transfer-set: {named} distils on the validation split's images, but "
                              f"validation-split is 0; set validation-split > 0 or choose a transfer set "
                              f"of the federation's shape ({dataset}: {fits})")
        return
    if name == dataset:
        raise ConfigError(f"feddf.transfer-set: {named} is the federation's own data set, whose training "
                          f"split is the clients' data; choose 'holdout' (the validation split's images, "
                          f"unlabelled) or another data set of its shape: {fits}")
    if _shape(name) != _shape(dataset):
        raise ConfigError(f"feddf.transfer-set: {named} images are {_shape(name)} but the federation's "
                          f"({dataset}) are {_shape(dataset)}; the transfer set is not resized or "
                          f"recoloured: choose one of {fits}")


def transfer_images(cfg: Config) -> Tensor:
    """``[N, C, H, W]`` float images of the run's transfer set in the federation's normalised
    input space (``N = min(feddf.transfer-size, the set's size)``, drawn with the run seed; the
    same for every call). Labels are never read (``holdout``: the validation split, chosen by
    the shared validation machinery). Raises ``DatasetNotFoundError`` naming where it looked
    and how to obtain the set."""
    return _transfer_cached(cfg)


@lru_cache(maxsize=1)
def _transfer_cached(cfg: Config) -> Tensor:
    s = cfg.of("feddf")
    name = transfer_set_name(cfg.dataset, s.transfer_set)
    if name == HOLDOUT:
        train, _ = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.download)
        images = train.x[torch.as_tensor(validation_split(cfg), dtype=torch.long)]
    else:
        try:
            train, _ = load_dataset(name, cfg.data_dir or None, cfg.download)
        except DatasetNotFoundError as exc:
            how = OBTAIN[name]
            hint = "" if how.split(" (")[0].removeprefix("bash ") in str(exc) else f"; to obtain it: {how}"
            raise DatasetNotFoundError(f"feddf.transfer-set: {name!r} (FedDF's unlabelled transfer set) is "
                                       f"missing: {exc}{hint}") from None
        images = train.x
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, "feddf-transfer"))
    pick = torch.randperm(len(images), generator=g)[:s.transfer_size].sort().values
    return normalize(images[pick], dataset_info(cfg.dataset))


def prepare_feddf(cfg: Config) -> None:
    """The ServerApp's setup: load the transfer set (cached for the strategy) so that a missing
    one fails before any client trains."""
    x = transfer_images(cfg)
    log(INFO, "[feddf] transfer set: %d unlabelled images of %s, in %s's input space", len(x),
        transfer_set_name(cfg.dataset, cfg.of("feddf").transfer_set), cfg.dataset)


class TransferSampler:
    """KD batches of ``batch_size`` images of ``images`` (no labels): shuffled passes over the
    set, drawn with a generator of their own (the seed). ``y_requested`` is the teacher's
    argmax, so ``kd-teacher-label-agreement`` is 1 by construction (no labels are asked for)."""

    def __init__(self, images: Tensor, batch_size: int, seed: int, teacher: RememberingTeacher,
                 device: torch.device | str = "cpu"):
        if len(images) == 0:
            raise ValueError("TransferSampler: no images")
        self.images, self.batch_size, self.teacher, self.device = images, batch_size, teacher, device
        self.rng = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(images), generator=self.rng)
        self.pos = 0

    def indices(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.images), generator=self.rng), 0
            take = min(need, len(self.order) - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(parts)

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        x = self.images[self.indices()].to(self.device)
        return x, self.teacher.remember(x).argmax(dim=1)


class FedDF(DistillStrategy):
    """FedDF as published: the average of the client models' logits, distilled on an unlabelled
    public transfer set after every round (see the module docstring)."""

    def __init__(self, sc):
        super().__init__(sc)
        self.transfer_name = transfer_set_name(self.cfg.dataset, self.cfg.of("feddf").transfer_set)
        self.transfer = transfer_images(self.cfg)

    @property
    def every_round(self) -> bool:
        return bool(self.cfg.of("feddf").every_round)

    def describe(self) -> str:
        return (f"teacher: the average of the client models' logits; source: {len(self.transfer)} "
                f"unlabelled images of {self.transfer_name}")

    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        return RememberingTeacher(self.client_ensemble(clients, "uniform"))

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        if not isinstance(teacher, RememberingTeacher):  # a subclass's teacher: one more pass a batch
            teacher = RememberingTeacher(teacher)
        report["transfer-images"] = float(len(self.transfer))
        sampler = TransferSampler(self.transfer, self.cfg.of('kd').batch_size,
                                  mix_seed(self.cfg.seed, "feddf-kd", server_round), teacher, self.sc.device)
        return Source(sampler, None, name=f"the transfer set ({self.transfer_name})")


class FedDFGenerators(DistillStrategy):
    """FedDF's averaged-client teacher, distilled on the clients' uploaded generators."""

    def mosaic_message(self, phase: str) -> bool:
        return phase == "distill"  # the clients train and upload their generator then

    def describe(self) -> str:
        return "teacher: the average of the client models; source: the clients' generators"

    def teacher_for(self, server_round: int, clients: list, report: dict) -> Teacher:
        self._generators = self.client_generators(clients, report)[:2]
        return self.labelling_teacher(self.client_ensemble(clients, "uniform"))

    def source_for(self, server_round: int, clients: list, teacher: Teacher, students: dict, report: dict
                   ) -> Source:
        generators, self._generators = self._generators, None
        return self.generator_source(*generators, teacher)


FEDDF = Method(FedDF, "FedDF as published (Lin et al., 2020): the client models' averaged logits distilled "
                      "into the averaged model on an unlabelled public transfer set (feddf.transfer-set)",
               distils=True,
               settings={"transfer-set": (str, _transfer_choice), "transfer-size": (int, _positive),
                         "every-round": (bool, None)},
               check=check_feddf, prepare=prepare_feddf, title="FedDF")
FEDDF_GEN = Method(FedDFGenerators, "FedDF's client-ensemble distillation on the clients' generators", distils=True)
