"""The privacy audit's results: one entry per client, the run's summary, the plot (no flwr).

The clients measure (``audit.py``, in their distillation round); the server collects their
figures (validated: ``audit.validate_figures``), adds what the exact label counts disclose,
and writes ``privacy.json``, ``privacy.png``, a log line and ``summary.json``'s ``privacy``.
"""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mosaic_flwr.core.results import atomic_write  # noqa: E402
from mosaic_flwr.privacy import audit  # noqa: E402

THRESHOLDS = {"dcr-ratio-below": audit.RATIO_FLAG, "near-copy-excess-above": audit.NEAR_COPY_EXCESS,
              "mia-auc-at-least": audit.AUC_FLAG, "near-copy-percentile": audit.NEAR_COPY_PERCENTILE,
              "proto-exact-below": audit.PROTO_EXACT, "rare-count-at-most": audit.RARE_COUNT,
              "generated-per-class": audit.N_GEN, "real-per-class-max": audit.M_MAX,
              "feature-space": f"RandomFeatures (3 random strided conv layers, 256 features, seed {audit.FEATURE_SEED})"}


def client_entry(partition_id: int, counts: torch.Tensor, figures: dict[str, float],
                 client_seconds: float | None = None, problem: str | None = None) -> dict[str, Any]:
    """One client's row: its audit figures, what its label counts disclose, its flags."""
    entry: dict[str, Any] = {"partition-id": int(partition_id), "label-counts": [int(c) for c in counts.tolist()],
                             **label_disclosure_rounded(counts),
                             **{k: [round(x, 5) for x in v] if isinstance(v, list) else round(v, 5)
                                for k, v in figures.items()}}
    if problem:
        entry["audit-rejected"] = problem
    if client_seconds is not None and "seconds" in figures and client_seconds > figures["seconds"]:
        entry["seconds-fraction"] = round(figures["seconds"] / (client_seconds - figures["seconds"]), 5)
    entry["flags"] = audit.flags(figures) if figures else []
    return entry


def label_disclosure_rounded(counts: torch.Tensor) -> dict[str, float]:
    return {k: round(v, 5) for k, v in audit.label_disclosure(counts).items()}


def _values(entries: Sequence[dict], key: str) -> list[float]:
    return [e[key] for e in entries if isinstance(e.get(key), (int, float))]


def sign_test(k: int, n: int) -> float:
    """One-sided sign test: the chance of ``k`` or more of ``n`` ratios below 1 when each is
    below 1 with probability one half (a generator no closer to its records than to unseen ones)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def summarise(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run's figures over the audited clients: medians and extremes of the DCR ratios and
    membership AUCs, the largest near-copy excess, prototype and label-count disclosure, the
    audit's seconds and its cost relative to the clients' round, and who was flagged."""
    audited = [e for e in entries if "dcr-ratio-pixel" in e or "proto-count" in e]
    out: dict[str, Any] = {"clients": len(entries), "clients-audited": len(audited),
                           "flagged": {str(e["partition-id"]): e["flags"] for e in entries if e["flags"]}}
    for key in ("dcr-ratio-pixel", "dcr-ratio-feature", "mia-auc-pixel", "mia-auc-feature", "proto-nn-ratio-min"):
        vals = _values(audited, key)
        if vals:
            out[f"{key}-median"] = round(statistics.median(vals), 5)
            out[f"{key}-min"] = round(min(vals), 5)
            out[f"{key}-max"] = round(max(vals), 5)
    for s in ("pixel", "feature"):
        excess = [e[f"near-copy-{s}"] - e.get(f"near-copy-baseline-{s}", 0.0) for e in audited if f"near-copy-{s}" in e]
        if excess:
            out[f"near-copy-excess-{s}-max"] = round(max(excess), 5)
        sig = [e for e in audited if e.get(f"mia-auc-{s}-low", 0) > 0.5]
        out[f"mia-significant-{s}"] = len(sig)
    for s in ("pixel", "feature"):  # per class: classes of a handful of records vs the others
        small, large = [], []
        for e in audited:
            for m, r in zip(e.get("class-m", []), e.get(f"class-dcr-ratio-{s}", [])):
                if m >= 1 and r >= 0:
                    (small if m <= audit.RARE_COUNT else large).append(r)
        for name, vals in (("small", small), ("large", large)):
            if vals:
                below = sum(v < 1 for v in vals)
                out[f"class-dcr-ratio-{s}-{name}-median"] = round(statistics.median(vals), 5)
                out[f"class-dcr-ratio-{s}-{name}-classes"] = len(vals)
                out[f"class-dcr-ratio-{s}-{name}-below-1"] = below
                out[f"class-dcr-ratio-{s}-{name}-sign-p"] = round(sign_test(below, len(vals)), 6)
    for key in ("proto-exact", "proto-few-classes", "proto-single-record", "proto-withheld-classes",
                "label-rare-classes"):
        vals = _values(entries, key)
        if vals:
            out[f"{key}-total"] = int(sum(vals))
    secs = _values(audited, "seconds")
    if secs:
        out["seconds-mean"] = round(sum(secs) / len(secs), 3)
    frac = _values(audited, "seconds-fraction")
    if frac:
        out["seconds-fraction-mean"] = round(sum(frac) / len(frac), 4)
    rejected = [e["partition-id"] for e in entries if "audit-rejected" in e]
    if rejected:
        out["rejected"] = rejected
    return out


def summary_line(round_: int, s: dict[str, Any]) -> str:
    def fmt(key: str) -> str:
        return f"{s[key + '-median']:.2f} (min {s[key + '-min']:.2f})" if key + "-median" in s else "-"

    def auc(key: str) -> str:
        return f"{s[key + '-median']:.3f} (max {s[key + '-max']:.3f})" if key + "-median" in s else "-"
    flagged = ", ".join(f"{p}: {'+'.join(f)}" for p, f in s["flagged"].items()) or "none"
    return (f"round {round_}, {s['clients-audited']} of {s['clients']} clients audited: DCR train/unseen "
            f"pixel {fmt('dcr-ratio-pixel')}, feature {fmt('dcr-ratio-feature')}; near-copy excess max "
            f"{s.get('near-copy-excess-pixel-max', float('nan')):.3f}; membership AUC {auc('mia-auc-pixel')}, "
            f"significant at {s.get('mia-significant-pixel', 0)}; prototypes that are records "
            f"{s.get('proto-exact-total', 0)}, single-record classes {s.get('proto-single-record-total', 0)}, "
            f"classes withheld (too few records) {s.get('proto-withheld-classes-total', 0)}, "
            f"rare label counts {s.get('label-rare-classes-total', 0)}; audit {s.get('seconds-mean', 0):.1f} s/client "
            f"({100 * s.get('seconds-fraction-mean', 0):.1f} % of its round); flagged: {flagged}")


def plot_privacy(entries: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Per client: DCR ratios (pixel, feature; 1 = no copying, the flag line) and the
    membership AUC with its 95 % interval (0.5 = chance)."""
    pids = [e["partition-id"] for e in entries]
    xs = list(range(len(entries)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for off, s in ((-0.2, "pixel"), (0.2, "feature")):
        a1.bar([x + off for x in xs], [e.get(f"dcr-ratio-{s}", 0.0) for e in entries], width=0.4, label=s)
        auc = [e.get(f"mia-auc-{s}", float("nan")) for e in entries]
        lo = [a - e.get(f"mia-auc-{s}-low", a) for a, e in zip(auc, entries)]
        hi = [e.get(f"mia-auc-{s}-high", a) - a for a, e in zip(auc, entries)]
        a2.errorbar([x + off for x in xs], auc, yerr=[lo, hi], fmt="o", ms=4, capsize=3, label=s)
    a1.axhline(1.0, color="grey", lw=1)
    a1.axhline(audit.RATIO_FLAG, color="red", ls="--", lw=1, label=f"flag < {audit.RATIO_FLAG}")
    a1.set_ylabel("DCR train / unseen (median)")
    a2.axhline(0.5, color="grey", lw=1)
    a2.axhline(audit.AUC_FLAG, color="red", ls="--", lw=1, label=f"flag >= {audit.AUC_FLAG}")
    a2.set_ylabel("membership inference AUC (95 % CI)")
    for ax in (a1, a2):
        ax.set_xticks(xs, [str(p) for p in pids])
        ax.set_xlabel("client (partition id)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
    fig.suptitle(title or "privacy audit of the uploads", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
