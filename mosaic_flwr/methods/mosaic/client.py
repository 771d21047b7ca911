"""A client's work in a Mosaic round, as one pure function (the ClientApp only adapts it)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.common.logger import log
from torch import Tensor

from mosaic_flwr.data import DatasetInfo
from mosaic_flwr.data.augment import Augment
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.models import Classifier
from mosaic_flwr.models.generators import build_discriminator, discriminator_for, generator_for, sample
from mosaic_flwr.privacy import dp as dpm
from mosaic_flwr.privacy.audit import PREFIX, audit_generator, audit_prototypes
from mosaic_flwr.methods.mosaic.dcgan import train_dcgan
from mosaic_flwr.methods.mosaic.generator import train_generator
from mosaic_flwr.methods.mosaic.prototypes import class_prototypes, per_class_subset
from mosaic_flwr.core.training import extract_features, label_counts, train_local


@dataclass
class MosaicClientResult:
    state: dict[str, Tensor]
    label_counts: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    prototypes: tuple[Tensor, Tensor] | None = None
    generator: dict[str, Tensor] | None = None
    expert_state: dict[str, Tensor] | None = None  # kd.expert-pass: a second model, trained from the received one


def coarsen_counts(counts: Tensor, floor: int) -> Tensor:
    """``count-floor``: a class this client holds fewer than ``floor`` examples of is declared
    absent (its count sent as 0), so no upload tells that it holds one, two, ... of them
    (0: the counts as they are)."""
    return counts if floor <= 0 else torch.where(counts < floor, torch.zeros_like(counts), counts)


def _dcgan_round(model: Classifier, x: Tensor, y: Tensor, info: DatasetInfo, gen: dict, *, seed: int,
                 device: torch.device, augment: Augment | None, metrics: dict) -> dict[str, Tensor]:
    """``mosaic.generator='dcgan'``: the authors' unconditional generator, guided by the client's
    freshly trained ``model`` (``mosaic.dcgan``); its state to upload, statistics into ``metrics``."""
    torch.manual_seed(seed)
    width = int(gen.get("dcgan-width", 64))
    g, d = generator_for(info, "dcgan", width), discriminator_for(info, "dcgan", width)
    stats = train_dcgan(g, d, model, x, y, steps=gen["steps"], batch_size=gen["batch-size"], device=device,
                        seed=seed, augment=augment)
    metrics.update({"gen-seconds": stats["seconds"], "gen-coverage": stats["coverage"]})
    return {k: v.detach().cpu() for k, v in g.state_dict().items()}


def mosaic_client_round(model: Classifier, x: Tensor, y: Tensor, info: DatasetInfo, *,
                        train: dict, seed: int, device: torch.device, distill_round: bool = False,
                        prototypes: bool = False, proto_k: int = 0, proto_min_records: int = 1, count_floor: int = 0,
                        gen: dict | None = None, expert_train: dict | None = None,
                        augment: Augment | None = None,
                        audit_unseen: tuple[Tensor, Tensor] | None = None,
                        dp: dpm.DPSettings | None = None, dp_counts: Tensor | None = None,
                        dp_rng: torch.Generator | None = None) -> MosaicClientResult:
    """Local training; at the distillation round also prototypes and the generator.

    Prototypes are k-means centres of the penultimate features of the model as received
    (the round's global model, the backbone the server's experts start from), computed before
    local training, from at most ``MAX_PER_CLASS`` samples of each class, each the mean of at
    least ``proto_min_records`` records (a class with fewer sends none). The generator is
    trained after local training, guided by the client's freshly trained model, on the
    client's own classes; it is uploaded once. ``gen["generator"]``: ``'conditional'`` (the
    default, ``mosaic.generator``) or ``'dcgan'`` (the authors' unconditional one,
    ``mosaic.dcgan``, ``gen["dcgan-width"]`` wide; not under DP, and its privacy audit is
    skipped with a logged reason: the audit is per requested class).

    ``augment`` (CIFAR: crop + flip) applies wherever the authors' code reads its augmented
    training loader: local training batches, the generator's real batches, and the images
    the prototypes are computed from.

    ``count_floor`` (``coarsen_counts``): classes held fewer times than that are declared absent,
    and send no prototype.

    ``prototypes`` (``mosaic.proto-rounds`` > 1): a warm-up round before the distillation round that
    asks for prototypes only (the prototype bank), computed and audited as at the distillation
    round; not under DP (the privacy plan covers one release).

    ``expert_train`` (``kd.expert-pass``; ``train_local`` settings): at the distillation round a
    second copy of the received model trains with these settings (its own seed) and is
    uploaded beside the trained model as this client's contribution to the class experts, so
    the experts can drift little from the model the prototypes' features come from while the
    averaged model trains as usual.

    With ``dp`` (``mosaic_flwr.privacy.dp``): ``dp_counts`` (the client's noisy label counts,
    drawn once per run) replace the true ones in the reply; the prototypes are one noisy mean
    per class; D trains under DP-SGD; the noise and sampling come from ``dp_rng`` (secret).
    At the distillation round the metrics carry the privacy spent (``dp.epsilon`` in total,
    and per mechanism).

    ``audit_unseen`` (``privacy-audit``: unseen images and labels, the data set's test split):
    at the distillation round the client audits what it uploads (``mosaic_flwr.privacy.audit``:
    its prototypes against its records' features, its generator against its training images
    and the unseen ones) and reports the figures as ``privacy-*`` metrics, with their cost
    (``privacy-seconds``). Nothing of the uploads changes.
    """
    held = label_counts(y, info.num_classes)
    counts = held
    metrics: dict[str, float] = {}
    audit: dict[str, float] = {}
    audit_seconds = 0.0
    protos = None
    if dp is not None:
        if dp_counts is None or dp_rng is None:
            raise ValueError("mosaic_client_round: dp needs dp_counts (the noisy counts) and dp_rng")
        counts = dp_counts.long().cpu()
    counts = coarsen_counts(counts, count_floor)
    if prototypes and dp is not None and not distill_round:
        raise ValueError("mosaic_client_round: prototypes outside the distillation round are not covered by DP")
    uploads = distill_round or prototypes  # this round's reply carries prototypes (and, distilling, more)
    if distill_round and proto_k > 0 and dp is not None:
        t0 = time.perf_counter()
        xk = x if augment is None else augment(x, dp_rng)
        feats = extract_features(model, xk, device=device)
        protos = dpm.dp_class_means(feats, y, counts, clip=dp.proto_clip,
                                    sigma=dpm.gaussian_sigma(dp.proto_epsilon, dp.delta, dp.accountant), rng=dp_rng)
        metrics["proto-seconds"] = time.perf_counter() - t0
        if audit_unseen is not None:
            t0 = time.perf_counter()
            audit.update(audit_prototypes(*protos, feats, y, 1))
            audit_seconds += time.perf_counter() - t0
    elif uploads and proto_k > 0:
        t0 = time.perf_counter()
        keep = per_class_subset(y, seed=seed)  # at most MAX_PER_CLASS samples of a class
        xk = x[keep]
        if augment is not None:
            xk = augment(xk, torch.Generator().manual_seed(mix_seed(seed, "proto-augment")))
        feats = extract_features(model, xk, device=device)
        protos = class_prototypes(feats, y[keep], proto_k, seed=seed, min_records=proto_min_records)
        if count_floor > 0:  # no prototype of a class declared absent
            declared = counts[protos[1]] > 0
            protos = (protos[0][declared], protos[1][declared])
        metrics["proto-seconds"] = time.perf_counter() - t0
        if audit_unseen is not None:
            t0 = time.perf_counter()
            audit.update(audit_prototypes(*protos, feats, y[keep], proto_k))
            # classes held and sent no prototype: too few records (the audit sees the subset,
            # and a class of more than MAX_PER_CLASS records is never withheld)
            audit["proto-withheld-classes"] = float(((held > 0) & ((held < proto_min_records) | (counts == 0))).sum())
            audit_seconds += time.perf_counter() - t0
    expert_state = None
    if distill_round and expert_train is not None:  # from the received model, before it trains
        expert = copy.deepcopy(model)
        estats = train_local(expert, x, y, seed=mix_seed(seed, "expert"), device=device, augment=augment,
                             **expert_train)
        expert_state = {k: v.detach().cpu() for k, v in expert.state_dict().items()}
        metrics.update({"expert-train-loss": estats["train-loss"], "expert-seconds": estats["seconds"]})
        del expert
    stats = train_local(model, x, y, seed=seed, device=device, augment=augment, **train)
    metrics.update({"train-loss": stats["train-loss"], "train-seconds": stats["seconds"]})
    generator_state, sgd = None, None
    if distill_round and gen is not None and gen.get("generator", "conditional") == "dcgan":
        if dp is not None:
            raise ValueError("mosaic_client_round: mosaic.generator='dcgan' cannot train under DP (its "
                             "discriminator has BatchNorm)")
        generator_state = _dcgan_round(model, x, y, info, gen, seed=seed, device=device, augment=augment,
                                       metrics=metrics)
        if audit_unseen is not None:
            log(INFO, "privacy audit of the generator skipped: the dcgan generator is unconditional, and the "
                "audit compares samples of a class with the training and unseen images of that class")
    elif distill_round and gen is not None:
        torch.manual_seed(seed)
        g = generator_for(info)
        d = build_discriminator(info.in_channels, info.image_size, info.num_classes)
        gdp, sgd = None, None
        if dp is not None:
            sgd = dpm.generator_mechanism(dp, len(y), gen["batch-size"], gen["steps"], protos=protos is not None)
            gdp = dpm.DiscriminatorDP(dp.max_grad_norm, sgd[0], sgd[1], counts.double(), dp_rng)
        gstats = train_generator(g, d, model, x, y, steps=gen["steps"], batch_size=gen["batch-size"],
                                 lr=gen["lr"], ce_weight=gen["ce-weight"], div_weight=gen["div-weight"],
                                 device=device, seed=seed, augment=augment, dp=gdp)
        generator_state = {k: v.detach().cpu() for k, v in g.state_dict().items()}
        metrics.update({"gen-seconds": gstats["seconds"], "gen-fidelity": gstats["fidelity"]})
        if dp is not None:  # kept on the client: with N <= the batch size it is N itself
            log(INFO, "[dp] the discriminator read %.1f real images per step on average (not sent)",
                gstats["dp-real-per-step"])
        if audit_unseen is not None:
            t0 = time.perf_counter()
            rng = torch.Generator().manual_seed(mix_seed(seed, "privacy-samples"))
            audit.update(audit_generator(lambda labels: sample(g, labels, rng=rng), x, y, *audit_unseen,
                                         seed=mix_seed(seed, "privacy-audit")))
            audit_seconds += time.perf_counter() - t0
    if audit_unseen is not None and uploads:
        metrics.update({PREFIX + k: v for k, v in audit.items()})
        metrics[PREFIX + "seconds"] = audit_seconds
    if dp is not None and distill_round:  # everything this client released in the run
        report = dpm.compose(dp, sgd=sgd if generator_state is not None else None, protos=protos is not None)
        metrics.update({f"dp-{k}": float(v) for k, v in report.items() if k != "accountant"})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return MosaicClientResult(state, counts, metrics, protos, generator_state, expert_state)
