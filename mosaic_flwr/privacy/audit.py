"""What a client's uploads leak: pure functions for the privacy audit (``privacy-audit``).

A Mosaic client uploads, at the distillation round, a class-conditional generator trained on
its private images, per-class prototypes (k-means centres of its features; a class with fewer
than ``k`` samples is uploaded as the mean of its features, one sample: that record's
features exactly) and its exact label counts. The client holds the data, so it audits what it
is about to upload (no server, no other client needed); ``unseen`` data of the same classes is
the data set's test split, read here only.

- **Distance to closest record (DCR)**, per class: for ``n_gen`` generated images, the
  distance to the nearest of ``m`` of the client's training images of that class and to the
  nearest of ``m`` unseen images of that class (the same ``m`` on both sides, so neither
  reference set is favoured by its size). ``ratio`` = median train distance / median unseen
  distance: about 1 when the generator is no closer to its training images than to fresh
  ones, well below 1 when it copies. **Near copies**: the share of generated images closer to
  a training image than the 5th percentile of the training images' own leave-one-out
  nearest-neighbour distances (in their class); ``baseline`` is the same share for unseen real
  images, what a generator that draws fresh samples of the distribution would get. Both in
  the normalised input space (a per-channel affine map of the pixels: "pixel") and in a fixed
  feature space (``feature_net``: a randomly initialised conv net from a fixed seed, the same
  for every client, run and data set of those channels: it depends on no data).
- **Membership inference** (GAN-Leaks' full black-box attack, Chen et al., 2020): the score
  of a query image is minus its distance to the nearest of the ``n_gen`` generated images of
  its class; the ROC AUC at telling the client's training images (members) from unseen images
  of the same classes (non-members, as many per class), with a Hanley-McNeil 95 % interval.
- **Prototypes**: each prototype's distance to the nearest training record of its class, in
  the feature space the prototypes live in, relative to the typical (median) record-to-record
  nearest-neighbour distance; classes uploaded as the mean of fewer than ``k`` records, and
  single-record classes (their prototype *is* a record's features).
- **Label counts**: exact; classes with small counts say "a handful of records of class c".

Every figure is bounded in cost (``n_gen`` generated per class, at most ``m_max`` real ones
per class and side) and returned as plain floats (a MetricRecord's values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

# What the audit flags (see ``flags``): documented in docs/privacy.md.
RATIO_FLAG = 0.8          # median DCR train / unseen below this: the generator sits on its training images
NEAR_COPY_EXCESS = 0.1    # near-copy share above the unseen baseline by more than this
AUC_FLAG = 0.6            # membership AUC at least this, with its interval above 0.5
NEAR_COPY_PERCENTILE = 5  # the near-copy threshold: this percentile of train-to-train NN distances
PROTO_EXACT = 1e-3        # a prototype this close to a record (relative to the typical NN distance) is that record
RARE_COUNT = 5            # label counts in [1, RARE_COUNT]: a handful of records disclosed exactly
FEATURE_SEED = 20240601   # the fixed feature space's seed

N_GEN = 100               # generated images per class
M_MAX = 500               # real images per class and side (training, unseen)


# ----------------------------------------------------------------------------- distances
def nn_distances(queries: Tensor, refs: Tensor, *, chunk: int = 1024, exclude_self: bool = False) -> Tensor:
    """``[Q]`` Euclidean distance of every query row to its nearest reference row (flattened),
    in chunks of ``chunk`` queries. ``exclude_self``: ``queries`` are ``refs`` and each row's
    own entry is left out (leave-one-out; needs at least two rows)."""
    q = queries.reshape(len(queries), -1).float()
    r = refs.reshape(len(refs), -1).float()
    if len(r) == 0 or (exclude_self and len(r) < 2):
        raise ValueError("nn_distances: not enough reference rows")
    out = []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i:i + chunk], r)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + i] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------- ROC AUC
def roc_auc(pos: Tensor, neg: Tensor) -> tuple[float, float, float]:
    """ROC AUC of scores ``pos`` (positives: higher is more positive) against ``neg``, by the
    Mann-Whitney U statistic (ties count one half), and its Hanley-McNeil (1982) 95 % interval,
    clipped to [0, 1]. ``(auc, low, high)``."""
    pos, neg = pos.double().flatten(), neg.double().flatten()
    n1, n0 = len(pos), len(neg)
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_auc: need at least one positive and one negative score")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[:n1].sum().item() - n1 * (n1 + 1) / 2
    auc = u / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    half = 1.96 * math.sqrt(max(var, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


# ----------------------------------------------------------------------------- fixed features
class RandomFeatures(nn.Module):
    """A randomly initialised conv net from a fixed seed: three 3x3 conv layers of stride 2 with
    ReLU (16, 32, 64 channels), then 2x2 average pooling -> 256 features. He-normal weights
    drawn from ``torch.Generator(seed)``, zero biases: the same net for every client and run,
    whatever torch's default initialisation does. Strided and narrow so that it costs about
    0.5 M multiply-adds per 28x28 image (the audit's features must stay cheap on a client)."""

    DIM = 256

    def __init__(self, in_channels: int, seed: int = FEATURE_SEED):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, ch = [], in_channels
        for out in (16, 32, 64):
            conv = nn.Conv2d(ch, out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (ch * 9)))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
            ch = out
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        self.net = nn.Sequential(*layers).eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor, batch: int = 512) -> Tensor:
        if len(x) == 0:
            return torch.zeros(0, self.DIM)
        return torch.cat([self.net(x[i:i + batch].float()) for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------- the generator
def _pick(idx: Tensor, n: int, g: torch.Generator) -> Tensor:
    return idx[torch.randperm(len(idx), generator=g)[:n]] if len(idx) > n else idx


def audit_generator(generate: Callable[[Tensor], Tensor], x_train: Tensor, y_train: Tensor,
                    x_unseen: Tensor, y_unseen: Tensor, *, n_gen: int = N_GEN, m_max: int = M_MAX,
                    seed: int = 0, features: nn.Module | None = None) -> dict[str, float | list[float]]:
    """DCR, near copies and membership inference of a class-conditional generator
    (``generate(labels) -> images``, normalised like ``x_train``) against the client's training
    images and unseen images of the same classes (module docstring). Classes audited: those the
    client holds that the unseen set has too. Returns plain floats (empty when no class can be
    audited)."""
    if n_gen < 1 or m_max < 1:
        raise ValueError("audit_generator: n_gen and m_max must be >= 1")
    features = features if features is not None else RandomFeatures(x_train.shape[1])
    g = torch.Generator().manual_seed(seed)
    spaces = ("pixel", "feature")
    d_train = {s: [] for s in spaces}     # generated -> nearest training image
    d_unseen = {s: [] for s in spaces}    # generated -> nearest unseen image
    near, base = {s: [] for s in spaces}, {s: [] for s in spaces}
    mia_pos = {s: [] for s in spaces}     # -distance of members to the nearest generated image
    mia_neg = {s: [] for s in spaces}
    classes = 0
    num_classes = int(max(y_train.max(), y_unseen.max())) + 1 if len(y_train) and len(y_unseen) else 0
    per_m = [0.0] * num_classes
    per_ratio = {s: [-1.0] * num_classes for s in spaces}
    for c in torch.unique(y_train).tolist():
        tr = torch.nonzero(y_train == c).flatten()
        un = torch.nonzero(y_unseen == c).flatten()
        m = min(len(tr), len(un), m_max)
        if m == 0:
            continue
        classes += 1
        tr, un = _pick(tr, m, g), _pick(un, m, g)
        per_m[c] = float(m)
        gen = generate(torch.full((n_gen,), c, dtype=torch.long)).detach().cpu().float()
        sets = {"pixel": (x_train[tr].float(), x_unseen[un].float(), gen)}
        sets["feature"] = tuple(features(t) for t in sets["pixel"])
        for s, (a, b, gz) in sets.items():
            d_train[s].append(nn_distances(gz, a))
            d_unseen[s].append(nn_distances(gz, b))
            per_ratio[s][c] = d_train[s][-1].median().item() / max(d_unseen[s][-1].median().item(), 1e-12)
            if m >= 2:  # the near-copy threshold of this class: train-to-train NN distances
                thr = torch.quantile(nn_distances(a, a, exclude_self=True), NEAR_COPY_PERCENTILE / 100)
                near[s].append((d_train[s][-1] < thr).float())
                base[s].append((nn_distances(b, a) < thr).float())
            mia_pos[s].append(-nn_distances(a, gz))
            mia_neg[s].append(-nn_distances(b, gz))
    if classes == 0:
        return {}
    out: dict[str, float] = {"classes-audited": float(classes), "gen-samples": float(classes * n_gen),
                             "mia-members": float(sum(len(t) for t in mia_pos["pixel"]))}
    for s in spaces:
        dt, du = torch.cat(d_train[s]), torch.cat(d_unseen[s])
        out[f"dcr-train-{s}"] = dt.median().item()
        out[f"dcr-unseen-{s}"] = du.median().item()
        out[f"dcr-ratio-{s}"] = dt.median().item() / max(du.median().item(), 1e-12)
        if near[s]:
            out[f"near-copy-{s}"] = torch.cat(near[s]).mean().item()
            out[f"near-copy-baseline-{s}"] = torch.cat(base[s]).mean().item()
        auc, low, high = roc_auc(torch.cat(mia_pos[s]), torch.cat(mia_neg[s]))
        out[f"mia-auc-{s}"], out[f"mia-auc-{s}-low"], out[f"mia-auc-{s}-high"] = auc, low, high
    out_lists = {"class-m": per_m, **{f"class-dcr-ratio-{s}": per_ratio[s] for s in spaces}}
    return {**out, **out_lists}


# ----------------------------------------------------------------------------- prototypes
def audit_prototypes(protos: Tensor, proto_labels: Tensor, feats: Tensor, labels: Tensor, k: int
                     ) -> dict[str, float]:
    """How close each uploaded prototype is to one training record (``feats``: the records'
    features in the prototypes' feature space, ``labels`` theirs): its distance to the nearest
    record of its class over the typical record-to-record nearest-neighbour distance (the median
    of the leave-one-out NN distances within classes; the overall median feature norm when no
    class has two records). ``proto-exact``: prototypes within ``PROTO_EXACT`` of that scale of
    a record (a record's features, uploaded); ``proto-few-classes``: classes uploaded with
    fewer than ``k`` records; ``proto-single-record``: classes uploaded with one record."""
    feats, protos = feats.float(), protos.float()
    loo = [nn_distances(feats[labels == c], feats[labels == c], exclude_self=True)
           for c in torch.unique(labels).tolist() if int((labels == c).sum()) >= 2]
    scale = torch.cat(loo).median().item() if loo else feats.norm(dim=1).median().item()
    scale = max(scale, 1e-12)
    rel = []
    for c in torch.unique(proto_labels).tolist():
        members = feats[labels == c]
        if len(members):
            rel.append(nn_distances(protos[proto_labels == c], members) / scale)
    rel_t = torch.cat(rel) if rel else torch.zeros(0)
    counts = torch.bincount(labels.long())
    sent = torch.unique(proto_labels.long())
    held = counts[sent[sent < len(counts)]]  # the records behind each class that was sent
    out = {"proto-count": float(len(protos)), "proto-exact": float((rel_t < PROTO_EXACT).sum()),
           "proto-few-classes": float((held < k).sum()), "proto-single-record": float((held == 1).sum())}
    if len(rel_t):  # (no NaN for "nothing to measure": a reply's metrics must be finite)
        out.update({"proto-nn-ratio-min": rel_t.min().item(), "proto-nn-ratio-median": rel_t.median().item()})
    return out


# ----------------------------------------------------------------------------- label counts
def label_disclosure(counts: Tensor) -> dict[str, float]:
    """What exact label counts say: classes held, classes of a handful of records
    (``1..RARE_COUNT``), the smallest non-zero count."""
    counts = counts.long()
    held = counts[counts > 0]
    return {"label-classes-held": float(len(held)),
            "label-rare-classes": float(((held >= 1) & (held <= RARE_COUNT)).sum()),
            "label-min-count": float(held.min()) if len(held) else 0.0}


# ----------------------------------------------------------------------------- verdicts
def flags(figures: Mapping[str, float]) -> list[str]:
    """Why a client's uploads look like they leak its records (empty: nothing flagged):
    ``copies`` (DCR ratio below ``RATIO_FLAG`` in either space), ``near-copies`` (near-copy
    share above its unseen baseline by more than ``NEAR_COPY_EXCESS``), ``membership`` (AUC
    at least ``AUC_FLAG`` with its interval above 0.5, either space), ``prototype-records``
    (a prototype is a record's features, or a class of one record)."""
    out = []
    get = figures.get
    if any(get(f"dcr-ratio-{s}") is not None and get(f"dcr-ratio-{s}") < RATIO_FLAG for s in ("pixel", "feature")):
        out.append("copies")
    if any(get(f"near-copy-{s}") is not None
           and get(f"near-copy-{s}") - get(f"near-copy-baseline-{s}", 0.0) > NEAR_COPY_EXCESS
           for s in ("pixel", "feature")):
        out.append("near-copies")
    if any(get(f"mia-auc-{s}") is not None and get(f"mia-auc-{s}") >= AUC_FLAG and get(f"mia-auc-{s}-low", 0) > 0.5
           for s in ("pixel", "feature")):
        out.append("membership")
    if get("proto-exact", 0) > 0 or get("proto-single-record", 0) > 0:
        out.append("prototype-records")
    return out


# What a reply's audit figures may be (hostile values are dropped, see ``validate_figures``).
_UNIT = ("near-copy-pixel", "near-copy-feature", "near-copy-baseline-pixel", "near-copy-baseline-feature",
         "mia-auc-pixel", "mia-auc-pixel-low", "mia-auc-pixel-high",
         "mia-auc-feature", "mia-auc-feature-low", "mia-auc-feature-high")
_NON_NEGATIVE = ("dcr-train-pixel", "dcr-unseen-pixel", "dcr-ratio-pixel", "dcr-train-feature",
                 "dcr-unseen-feature", "dcr-ratio-feature", "classes-audited", "gen-samples", "mia-members",
                 "proto-count", "proto-nn-ratio-min", "proto-nn-ratio-median", "proto-exact",
                 "proto-few-classes", "proto-single-record", "proto-withheld-classes", "seconds")
KEYS = _UNIT + _NON_NEGATIVE
LIST_KEYS = ("class-m", "class-dcr-ratio-pixel", "class-dcr-ratio-feature")
PREFIX = "privacy-"


def validate_figures(metrics: Mapping[str, object], num_classes: int) -> tuple[dict[str, float], str | None]:
    """A reply's audit figures (its ``privacy-*`` metrics, the prefix stripped):
    ``(figures, None)``, or ``({}, problem)`` when any is not a finite number in its range
    (shares and AUCs in [0, 1], the rest >= 0, class counts at most ``num_classes``). Unknown
    ``privacy-*`` keys are ignored; a reply without any gives ``({}, None)``."""
    out: dict[str, float] = {}
    for key in KEYS:
        value = metrics.get(PREFIX + key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return {}, f"{PREFIX}{key}: {value!r} is not a finite number"
        value = float(value)
        if value < 0 or (key in _UNIT and value > 1):
            return {}, f"{PREFIX}{key}: {value} out of range"
        if key in ("classes-audited", "proto-few-classes", "proto-single-record") and value > num_classes:
            return {}, f"{PREFIX}{key}: {value} exceeds the {num_classes} classes"
        out[key] = value
    for key in LIST_KEYS:
        value = metrics.get(PREFIX + key)
        if value is None:
            continue
        if (not isinstance(value, list) or len(value) > num_classes
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)):
            return {}, f"{PREFIX}{key}: expected at most {num_classes} finite numbers"
        low = 0.0 if key == "class-m" else -1.0
        if any(v < low or (low < 0 and -1 < v < 0) for v in value):
            return {}, f"{PREFIX}{key}: a value out of range"
        out[key] = [float(v) for v in value]
    return out, None
