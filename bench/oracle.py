"""The converged protocol's diagnostic of round 1 (``bench/run.py``'s ``forked`` with ``oracle``):
how high a teacher built from round 1's class experts could score with real labelled images,
written per (alpha, seed) and round-1 setting to ``oracle-*.json`` and tabulated by
``bench.protocol_report.oracle_tables``."""

from __future__ import annotations


def oracle_teacher(strategy, items: list, seed: int) -> dict:
    """How far better meta-model data could lift the teacher at most: the class experts of
    round 1 and a meta model trained on REAL labelled images (half of the validation split,
    which no deployed server has), all scored on the other half. If even this teacher is
    not clearly above the student, the experts themselves limit Mosaic's teacher, not the
    generator samples or prototypes the meta model learns from. Diagnostic only."""
    import copy
    from collections import defaultdict

    import torch

    from mosaic_flwr.methods.mosaic.meta import MetaModel, train_meta
    from mosaic_flwr.distill.teachers import ConcatExperts, expert_logits
    from mosaic_flwr.core.task import Arch

    cfg, sc = strategy.cfg, strategy.sc
    decoded = defaultdict(list)
    for arch, reply in copy.deepcopy(items):
        decoded[arch.model].append(reply)  # a ClientModel
    received = copy.deepcopy(strategy.globals[strategy.primary])  # the model round 1's clients started from
    for family, group in decoded.items():
        strategy.update_experts(1, family, group)
    strategy.aggregate_states(1, {f: [(c.arch, c.state, c.weight) for c in g] for f, g in decoded.items()})
    experts, student = strategy.expert_mixture(), strategy.frozen(strategy.primary)
    x, y = sc.val_x, sc.val_y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    fit, score = perm[: len(y) // 2], perm[len(y) // 2:]
    z = expert_logits(ConcatExperts([experts, student]), x)  # [E + 1, N, C]: the student last

    def acc(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == y[score]).float().mean())

    out = {"student": acc(z[-1, score]), "ensemble": acc(z[:-1, score].mean(0)),
           # each image scored by the expert of its own (true) class: the experts' best case
           "own-class-expert": float((z[y[score], score].argmax(1) == y[score]).float().mean())
           if len(z) - 1 == int(y.max()) + 1 else None, "fit": len(fit), "scored": len(score)}
    def fit_meta(inputs: torch.Tensor, prior: str = "mean") -> MetaModel:
        meta = MetaModel(len(inputs), int(z.shape[2]), arch=cfg.of('mosaic').meta_arch, prior=prior)
        return train_meta(meta, inputs[:, fit].permute(1, 0, 2), y[fit], epochs=cfg.of('mosaic').meta_epochs, lr=cfg.of('mosaic').meta_lr,
                          ema_decay=cfg.of('mosaic').meta_ema, holdout_frac=cfg.of('mosaic').meta_holdout, patience=cfg.of('mosaic').meta_patience,
                          seed=cfg.seed)[0]

    for prior, inputs in (("experts", z[:-1]), ("global", z)):
        meta = fit_meta(inputs, "mean" if prior == "experts" else "last")
        with torch.no_grad():
            out[f"oracle-meta-{prior}"] = acc(meta(inputs[:, score].permute(1, 0, 2)))
    # What the meta model learns from against what it meets: a prototype is scored by each
    # expert's head on the features of the model the client RECEIVED (it computes its
    # prototypes before training), while the teacher runs each FULL expert on an image. On the
    # same real images: how often the two agree (argmax, per expert), the mean of the heads'
    # logits, and a meta model fitted on the heads' logits of real images (the best
    # prototypes could give it) but scored on the full experts. The same on the round's
    # AGGREGATED model's features (keys ``-aggregated``; ``mosaic.meta-experts='heads'`` runs the
    # teacher on those), which the rows before 2026-12-07 reported without the suffix.
    if hasattr(experts, "head_logits"):
        for suffix, backbone in (("", received), ("-aggregated", strategy.globals[strategy.primary])):
            model = copy.deepcopy(strategy.module(Arch(strategy.primary)))
            model.load_state_dict(backbone)
            model.eval()
            with torch.no_grad():
                feats = torch.cat([model.features(x[i:i + 512]) for i in range(0, len(x), 512)])
                heads = experts.head_logits(feats).permute(1, 0, 2).cpu()  # [E, N, C]
            full = z[:-1]
            out[f"head-vs-full-agreement{suffix}"] = float((heads.argmax(2) == full.argmax(2)).float().mean())
            out[f"head-mean{suffix}"] = acc(heads[:, score].mean(0))
            meta = fit_meta(heads)
            with torch.no_grad():
                out[f"oracle-meta-heads-on-heads{suffix}"] = acc(meta(heads[:, score].permute(1, 0, 2)))
                out[f"oracle-meta-heads-on-full{suffix}"] = acc(meta(full[:, score].permute(1, 0, 2)))
        out["backbones"] = "received (no suffix) and aggregated"
    return out
