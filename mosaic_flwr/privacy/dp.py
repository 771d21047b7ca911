"""Differential privacy for what a Mosaic client uploads beyond FedAvg's weights.

A Mosaic client uploads, besides the classifier weights every FedAvg client sends, four
things computed from its private data: its **label counts** (discovery and every warm-up
round; their sum is the example count every reply declares), its **prototypes** and its
**generator** (once, at the distillation round), and its **gate scores** (the clients' gate:
how many examples each candidate model classifies right). With DP on (``dp.epsilon`` > 0,
or ``dp.noise-multiplier`` > 0; both 0, the default: off), each is released through a
Gaussian mechanism, and one accountant composes them. ``dp.epsilon`` is each client's
**total**: the counts, prototypes and gate scores have their own epsilons
(``dp.count-epsilon``, ``dp.proto-epsilon``, ``dp.gate-epsilon``), and the generator's
noise is calibrated so that everything the client releases in the run composes to
``dp.epsilon`` (``plan``, ``generator_sigma``). Each client writes every release in its
privacy ledger (``mosaic_flwr.privacy.ledger``, on disk) before sending it, and refuses one
that would take its total past ``dp.epsilon``.

* **Label counts**: ``counts + N(0, s_c^2)`` per class (add/remove-one L2 sensitivity 1),
  rounded and clipped at 0, drawn **once** per client and run and reused by every message
  (a repeated release of the same noisy vector costs nothing more). ``s_c`` is calibrated
  to ``dp.count-epsilon`` at ``dp.delta``.
* **Prototypes**: k-means centres have no bounded sensitivity (one point can move a centre
  arbitrarily far through the assignment), so under DP a client releases **one noisy mean
  per class** (``mosaic.proto-k`` is ignored): every feature vector is clipped to L2 norm
  ``dp.proto-clip`` = C, the per-class sums get ``N(0, (s_p C)^2)`` per coordinate (one
  sample changes one class's sum by at most C: sensitivity C), and each noisy sum is
  divided by the class's *noisy* count (already released: post-processing), then projected
  back on the ball of radius C (a true mean lies in it). Classes whose noisy count is 0
  get no prototype. All the client's samples are used (the non-private cap of 1000 random
  samples per class would make the sensitivity 2C). Noisy Lloyd iterations would pay one
  such release per iteration and per centre for classes that often hold tens of samples
  here (Dirichlet 0.1), so one mean per class is the better use of the budget.
* **Generator**: only the discriminator D reads private images. D trains under DP-SGD:
  real batches are **Poisson-sampled** (each image independently with rate
  ``q = mosaic.gen-batch-size / N``, as the accountant assumes; the non-private class-balanced
  sampler is not used), each real image's gradient of D's hinge loss is computed alone
  (``torch.func``), clipped to L2 norm ``dp.max-grad-norm``, summed, and
  ``N(0, (sigma C)^2)`` added, divided by the expected batch size. The fake half of D's
  loss reads no private data (G's samples are a function of earlier, already private, D
  states and of the classifier), so its gradient is added unclipped: the update's
  sensitivity is that of the real half alone (the standard Opacus DCGAN recipe clips and
  noises the fake half too, spending noise on data that need none). G is trained against
  D and the client's classifier: post-processing of D and of the classifier, whose weights
  the client uploads anyway. Label mixes come from the noisy counts (fake labels in
  proportion to them, as the real labels under Poisson sampling), never from the true ones.
  ``sigma`` is calibrated for the planned ``mosaic.gen-steps`` and ``q`` with Opacus's accountant so
  that the run's releases compose to ``dp.epsilon``, or given as ``dp.noise-multiplier``.
* **Gate scores**: each client scores the candidate models (before and after distillation)
  once at the distillation round and once more when the look-ahead ends (``gate_releases``).
  Each score is a vector of K counts of correct predictions; adding or removing one example
  changes each by at most 1, so its L2 sensitivity is sqrt(K): ``N(0, (s_g sqrt(K))^2)`` is
  added to each, the result rounded and kept in [0, the noisy example count]
  (``noisy_scores``), with ``s_g`` such that the planned scores compose to ``dp.gate-epsilon``.
  The example count the reply declares is the noisy counts' sum. Pooled over clients the
  noise is small against thousands of examples.

The guarantee: add/remove-one-example (ε, δ)-DP of the Mosaic uploads, *given* the
classifier weights, which are uploaded in FedAvg anyway and are not private (neither is
FedAvg's training loss). The privacy audit (``privacy-audit``) is off under DP unless
``dp.audit`` asks for it, and then its figures stay in the client's log. ``compose``
composes the mechanisms in one RDP (or PRV) accountant (Opacus's): the total is below the
sum of their epsilons. With ``dp.noise-multiplier`` instead of ``dp.epsilon`` the run has no
total: the ledger records and composes, and refuses nothing.

The DP noise and Poisson sampling draw from a secret generator (``secret_generator``: OS
entropy), never from the run seed, which the server knows and could use to subtract the
noise.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mosaic_flwr.core.schedule import gate_until, proto_rounds

__all__ = [
    "ACCOUNTANTS", "DPSettings", "DiscriminatorDP", "check_delta", "clip_rows", "compose", "count_sigma",
    "dp_class_means", "dp_settings", "enabled", "epsilon_of", "gaussian_sigma", "noisy_counts",
    "per_sample_grads", "private_grad_sum", "secret_generator", "sgd_sigma", "NO_DP",
]

ACCOUNTANTS = ("rdp", "prv")
NO_DP = "no differential privacy: label counts, prototypes and generator are uploaded exactly"
# Opacus's default orders plus larger ones: a single full-batch Gaussian release at small
# epsilon has its best order above Opacus's largest (63).
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 513, 8))


@dataclass(frozen=True)
class DPSettings:
    """The run's DP keys (``dp.*``), resolved; see the module docstring."""

    epsilon: float            # the client's total budget (0: sigma given as noise_multiplier, no budget)
    delta: float
    max_grad_norm: float
    noise_multiplier: float   # 0: calibrated from epsilon
    proto_epsilon: float
    proto_clip: float
    count_epsilon: float
    accountant: str
    gate_epsilon: float = 0.0  # every gate score of the run together
    gate_releases: int = 0     # gate scores a client sends in the run (0: no clients' gate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def enabled(values: Mapping[str, Any]) -> bool:
    """DP is on when ``dp.epsilon`` > 0 or ``dp.noise-multiplier`` > 0 (both 0, the default: off;
    an infinite epsilon, "no privacy", is also off)."""
    eps = float(values["dp.epsilon"])
    return (0 < eps < math.inf) or float(values["dp.noise-multiplier"]) > 0


def audits(values: Mapping[str, Any]) -> bool:
    """Whether clients audit their uploads (``privacy-audit``): under DP only with ``dp.audit``,
    and then the figures stay in the client's log (they are not covered by ``dp.epsilon``)."""
    return bool(values["privacy-audit"]) and (not enabled(values) or bool(values["dp.audit"]))


def dp_settings(values: Mapping[str, Any]) -> DPSettings | None:
    """The run's ``DPSettings`` from config values (keys as in the run config), or None when off."""
    if not enabled(values):
        return None
    eps = float(values["dp.epsilon"])
    return DPSettings(epsilon=eps if math.isfinite(eps) else 0.0, delta=float(values["dp.delta"]),
                      max_grad_norm=float(values["dp.max-grad-norm"]),
                      noise_multiplier=float(values["dp.noise-multiplier"]),
                      proto_epsilon=float(values["dp.proto-epsilon"]), proto_clip=float(values["dp.proto-clip"]),
                      count_epsilon=float(values["dp.count-epsilon"]), accountant=str(values["dp.accountant"]),
                      gate_epsilon=float(values["dp.gate-epsilon"]), gate_releases=gate_releases(values))


def gate_releases(values: Mapping[str, Any]) -> int:
    """How many times a client scores candidate models for the clients' gate in a run: at the
    distillation round, and again when the look-ahead (``kd.gate-rounds``) ends after it (0
    without the clients' gate)."""
    if values["kd.gate"] != "clients" or values["strategy"] != "mosaic":
        return 0
    return 1 + (gate_until(values) > int(values["warmup-rounds"]))


def check_config(values: Mapping[str, Any]) -> str | None:
    """Cross-key problems of the DP keys (one line naming the key), or None."""
    eps, nm = float(values["dp.epsilon"]), float(values["dp.noise-multiplier"])
    if 0 < eps < math.inf and nm > 0:
        return (f"dp.epsilon/dp.noise-multiplier: both set (dp.epsilon={eps:g}, dp.noise-multiplier={nm:g}); "
                "give the generator's target epsilon or its noise multiplier, not both")
    if not enabled(values):
        return None
    if values["strategy"] != "mosaic":
        return (f"dp.epsilon/dp.noise-multiplier: differential privacy covers Mosaic's client uploads; "
                f"strategy is {values['strategy']!r} (use strategy='mosaic' or turn DP off)")
    if values["mosaic.generator"] == "dcgan":
        return ("mosaic.generator: 'dcgan' cannot train under DP: its discriminator has BatchNorm, so the per-sample "
                "gradients DP-SGD clips are not defined; use mosaic.generator='conditional' or turn DP off")
    if values["kd.expert-pass"]:
        return ("kd.expert-pass: the expert model is a second set of classifier weights trained on the client's "
                "data, which DP does not cover (as the FedAvg weights); set kd.expert-pass=false with DP")
    if proto_rounds(values) > 1:
        return (f"mosaic.proto-rounds: {values['mosaic.proto-rounds']} releases prototypes in {proto_rounds(values)} rounds, and "
                "the privacy plan covers one release (dp.proto-epsilon); set mosaic.proto-rounds=1 with DP")
    if values["mosaic.meta-data"] == "clients":
        return ("mosaic.meta-data: 'clients' sends logits of the clients' real images, which DP does not cover; "
                "use 'auto', 'prototypes', 'generated', 'both' or 'screened' with DP")
    if values["resume"]:
        return ("resume: with DP the clients' noisy label counts live in their node state for one Flower "
                "run; a resumed run would draw and upload fresh ones (more privacy spent); start a new run")
    settings = dp_settings(values)
    if settings.epsilon > 0:
        fixed = plan(settings, protos=int(values["mosaic.proto-k"]) > 0)
        spent = epsilon_of(list(fixed.values()), settings.delta, settings.accountant)
        if spent >= 0.9 * settings.epsilon:
            return (f"dp.epsilon: {settings.epsilon:g} is the client's total, and the label counts "
                    f"(dp.count-epsilon={settings.count_epsilon:g}), prototypes (dp.proto-epsilon="
                    f"{settings.proto_epsilon:g}) and gate scores (dp.gate-epsilon={settings.gate_epsilon:g}) "
                    f"already compose to {spent:.3f}, leaving the generator nothing; lower those or raise dp.epsilon")
    return None


def check_delta(delta: float, sizes: Sequence[int]) -> str | None:
    """A delta that is not below 1/N for every client (N its number of examples) admits a
    mechanism that publishes one example outright: refused."""
    if not sizes:
        return None
    n = min(int(s) for s in sizes)
    if delta >= 1.0 / max(n, 1):
        return (f"dp.delta: {delta:g} is not below 1/N = {1.0 / max(n, 1):.3g} for the smallest client "
                f"(N = {n}); use a delta well below 1/N (e.g. 1e-5)")
    return None


# ----------------------------------------------------------------------------- randomness
def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from OS entropy (``secrets``): DP noise the server cannot
    reproduce from the run seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


# ----------------------------------------------------------------------------- accounting
def _accountant(name: str):
    from opacus.accountants import create_accountant
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant: unknown {name!r}; allowed: {list(ACCOUNTANTS)}")
    return create_accountant(mechanism=name)


def _kwargs(name: str) -> dict:
    return {"alphas": ALPHAS} if name == "rdp" else {}


def epsilon_of(mechanisms: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of subsampled Gaussian mechanisms
    ``(noise multiplier, sample rate, steps)`` (sample rate 1: a full-batch release), as
    Opacus's accountant computes it. (With very large noise the best RDP order is the largest
    one tried: the epsilon is then a valid, loose, upper bound; Opacus's warning is muted.)"""
    history = tuple((float(s), float(q), int(t)) for s, q, t in mechanisms if t > 0)
    return _epsilon_of(history, float(delta), accountant) if history else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon_of(history: tuple, delta: float, accountant: str) -> float:
    import warnings
    acc = _accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(acc.get_epsilon(delta=delta, **_kwargs(accountant)))


@functools.lru_cache(maxsize=256)
def sgd_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """DP-SGD's noise multiplier for ``steps`` steps at ``sample_rate`` to spend ``epsilon``."""
    import warnings
    from opacus.accountants.utils import get_noise_multiplier
    with warnings.catch_warnings():  # the search tries large sigmas whose best order is the largest
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, **_kwargs(accountant)))


def gaussian_sigma(epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """Noise multiplier (noise std / L2 sensitivity) of one full-batch Gaussian release at
    (``epsilon``, ``delta``), by the same accountant (sample rate 1, one step)."""
    return sgd_sigma(epsilon, delta, 1.0, 1, accountant)


def count_sigma(settings: DPSettings) -> float:
    return gaussian_sigma(settings.count_epsilon, settings.delta, settings.accountant)


def gate_sigma(settings: DPSettings) -> float:
    """The noise multiplier of one gate score (a vector of counts of correct predictions, L2
    sensitivity the square root of its length) such that the run's ``gate_releases`` of them
    compose to ``gate_epsilon``."""
    return sgd_sigma(settings.gate_epsilon, settings.delta, 1.0, settings.gate_releases, settings.accountant)


def plan(settings: DPSettings, *, protos: bool) -> dict[str, tuple[float, float, int]]:
    """A run's releases other than the generator, as ``what -> (sigma, sample rate, steps)``:
    the counts (once), the prototypes (once, when sent) and the gate scores (``gate_releases``)."""
    acc, delta = settings.accountant, settings.delta
    out = {"counts": (count_sigma(settings), 1.0, 1)}
    if protos:
        out["prototypes"] = (gaussian_sigma(settings.proto_epsilon, delta, acc), 1.0, 1)
    if settings.gate_releases:
        out["gate"] = (gate_sigma(settings), 1.0, settings.gate_releases)
    return out


def generator_sigma(settings: DPSettings, fixed: Sequence[tuple[float, float, int]], sample_rate: float,
                    steps: int) -> float:
    """DP-SGD's noise multiplier for the generator's discriminator: ``noise_multiplier`` when
    given; otherwise the smallest (to 0.1 %) at which the run's other releases ``fixed`` and
    ``steps`` steps at ``sample_rate`` compose to at most ``epsilon``, the client's total."""
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    return _calibrated(tuple(fixed), settings.epsilon, settings.delta, float(sample_rate), int(steps),
                       settings.accountant)


@functools.lru_cache(maxsize=256)
def _calibrated(fixed: tuple, target: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    def eps(sigma: float) -> float:
        return epsilon_of(list(fixed) + [(sigma, rate, steps)], delta, accountant)

    if epsilon_of(list(fixed), delta, accountant) >= target:
        raise ValueError(f"dp.epsilon: the counts, prototypes and gate scores already spend the total "
                         f"{target:g}; nothing is left for the generator")
    lo, hi = 0.1, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"dp.epsilon: no noise multiplier up to 1e5 leaves the generator within {target:g}")
    if eps(lo) <= target:
        return lo
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


def generator_mechanism(settings: DPSettings, n: int, batch_size: int, steps: int, *, protos: bool
                        ) -> tuple[float, float, int]:
    """The generator's DP-SGD as the accountant sees it, ``(sigma, sample rate, steps)``, for a
    client of ``n`` examples (Poisson rate ``batch_size / n``), calibrated against the run's
    other releases (``plan``)."""
    rate = min(1.0, batch_size / max(int(n), 1))
    return generator_sigma(settings, list(plan(settings, protos=protos).values()), rate, steps), rate, int(steps)


def noisy_scores(correct: Mapping[str, int], total: int, sigma: float, rng: torch.Generator) -> dict[str, int]:
    """One gate release: each count of correct predictions plus ``N(0, (sigma sqrt(K))^2)`` (K
    counts, each changed by at most one by adding or removing one example), rounded and kept
    within ``[0, total]`` (``total``: the client's released noisy example count)."""
    names = list(correct)
    true = torch.tensor([float(correct[n]) for n in names], dtype=torch.float64)
    noise = torch.randn(true.shape, generator=rng, dtype=torch.float64) * (sigma * math.sqrt(len(names)))
    noisy = (true + noise).round().clamp(0, max(int(total), 0)).long().tolist()
    return dict(zip(names, map(int, noisy)))


def compose(settings: DPSettings, *, sgd: tuple[float, float, int] | None, protos: bool) -> dict[str, Any]:
    """The client's privacy report for a run: each mechanism's epsilon alone and the total of
    what it releases (counts always; prototypes, the gate scores, and the generator's
    DP-SGD where given), at delta. The gate scores come after the distillation round; they are
    counted here as planned (the ledger refuses any beyond the total)."""
    acc, delta = settings.accountant, settings.delta
    mech = plan(settings, protos=protos)
    if sgd is not None:
        mech["generator"] = sgd
    out: dict[str, Any] = {"delta": delta, "accountant": acc}
    for name, m in mech.items():
        out[f"epsilon-{name}"] = epsilon_of([m], delta, acc)
        out[f"sigma-{name}"] = m[0]
    if sgd is not None:
        out["sample-rate"], out["steps"] = sgd[1], sgd[2]
    out["epsilon"] = epsilon_of(list(mech.values()), delta, acc)
    return out


# ----------------------------------------------------------------------------- counts, prototypes
def noisy_counts(counts: Tensor, sigma: float, rng: torch.Generator) -> Tensor:
    """``round(counts + N(0, sigma^2))`` clipped at 0 (L2 sensitivity 1 under add/remove-one)."""
    noise = torch.randn(counts.shape, generator=rng, dtype=torch.float64) * sigma
    return (counts.double().cpu() + noise).round().clamp_min(0).long()


def clip_rows(x: Tensor, clip: float) -> Tensor:
    """Each row scaled down to L2 norm at most ``clip``."""
    norms = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (clip / norms).clamp(max=1.0)
    return x * factor.view(-1, *([1] * (x.dim() - 1)))


@torch.no_grad()
def dp_class_means(features: Tensor, labels: Tensor, counts: Tensor, *, clip: float, sigma: float,
                   rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """One noisy mean feature per class whose (noisy, already released) count is >= 1.

    Rows clipped to norm ``clip``; the ``[C, d]`` per-class sums get ``N(0, (sigma clip)^2)``
    per entry; each is divided by ``counts`` and projected on the ball of radius ``clip``.
    Returns ``(prototypes [M, d], labels [M])`` in increasing label order."""
    num_classes = counts.numel()
    f = clip_rows(features.detach().float().cpu(), clip)
    sums = torch.zeros(num_classes, f.shape[1]).index_add_(0, labels.long().cpu(), f)
    sums = sums + torch.randn(sums.shape, generator=rng) * (sigma * clip)
    keep = torch.nonzero(counts.cpu() >= 1).squeeze(1)
    means = sums[keep] / counts.cpu()[keep].unsqueeze(1).float()
    return clip_rows(means, clip), keep.long()


# ----------------------------------------------------------------------------- DP-SGD for D
def per_sample_grads(module: nn.Module, loss: Callable[[Tensor], Tensor], x: Tensor, y: Tensor
                     ) -> dict[str, Tensor]:
    """``{name: [B, *shape]}``: the gradient of ``loss(module(x_i, y_i))`` for each sample
    alone (``torch.func``), for the module's trainable parameters. The module runs in eval
    mode (spectral norm then reads its stored power-iteration vectors instead of updating
    them in place); its mode is restored."""
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    buffers = dict(module.named_buffers())

    def one(p, xi, yi):
        return loss(functional_call(module, (p, buffers), (xi.unsqueeze(0), yi.unsqueeze(0)))).sum()

    was_training = module.training
    module.eval()
    try:
        return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    finally:
        module.train(was_training)


def private_grad_sum(grads: Mapping[str, Tensor], clip: float, sigma: float, rng: torch.Generator
                     ) -> tuple[dict[str, Tensor], Tensor]:
    """The Gaussian mechanism of DP-SGD: each sample's gradient (over all parameters together)
    clipped to L2 norm ``clip``, summed, plus ``N(0, (sigma clip)^2)`` per entry (noise drawn
    on the CPU from ``rng``). Returns the noisy sums and the per-sample norms before clipping."""
    names = list(grads)
    first = grads[names[0]]
    n = first.shape[0]
    if n:
        norms = torch.stack([grads[k].reshape(n, -1).norm(dim=1) for k in names], 1).norm(dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0) if math.isfinite(clip) else torch.ones_like(norms)
    else:
        norms = first.new_zeros(0)
    out = {}
    for k in names:
        g = grads[k]
        total = torch.einsum("b,b...->...", factor, g) if n else g.new_zeros(g.shape[1:])
        if sigma > 0:
            total = total + (torch.randn(total.shape, generator=rng) * (sigma * clip)).to(total.device)
        out[k] = total
    return out, norms


@dataclass
class DiscriminatorDP:
    """What ``train_generator`` needs to train D under DP-SGD (see the module docstring)."""

    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    label_weights: Tensor         # [num_classes] the noisy counts: fake labels in proportion
    rng: torch.Generator          # secret: Poisson sampling and noise

    def __post_init__(self):
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"DiscriminatorDP: sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.max_grad_norm <= 0 or self.noise_multiplier < 0:
            raise ValueError("DiscriminatorDP: max_grad_norm must be > 0 and noise_multiplier >= 0")
        if float(self.label_weights.sum()) <= 0:
            raise ValueError("DiscriminatorDP: the noisy counts are all 0 (no class to generate)")


# ----------------------------------------------------------------------------- the run's report
def run_entry(values: Mapping[str, Any]) -> dict[str, Any]:
    """``summary.json``'s ``dp`` entry at the start of a run: the settings, or, without DP,
    an explicit statement that none is given."""
    settings = dp_settings(values)
    if settings is None:
        return {"enabled": False, "guarantee": NO_DP}
    counts_only = epsilon_of([(count_sigma(settings), 1.0, 1)], settings.delta, settings.accountant)
    return {"enabled": True, "settings": settings.to_dict(),
            "guarantee": ("(epsilon, delta)-DP per client (add/remove one example) of the label counts "
                          "(and the example counts, their sum), prototypes, generator and the clients' "
                          "gate scores, given the classifier weights; FedAvg's weights and training loss "
                          "are not covered (nor the privacy audit's figures, which under DP stay on "
                          "the client)"),
            "epsilon-counts-only": counts_only, "clients": {}}


def record_clients(entry: dict[str, Any], per_client: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """Adds each client's spent privacy (its ``dp-*`` reply metrics, by partition id) to the
    run's ``dp`` entry; ``epsilon`` is the largest total over all clients (a client that only
    sent counts spent ``epsilon-counts-only``)."""
    for pid, metrics in per_client.items():
        entry["clients"][str(pid)] = {k[3:]: float(v) for k, v in metrics.items() if k.startswith("dp-")}
    totals = [c["epsilon"] for c in entry["clients"].values() if "epsilon" in c]
    entry["epsilon"] = max(totals + [entry["epsilon-counts-only"]])
    entry["delta"] = entry["settings"]["delta"]
    return entry


def describe(entry: Mapping[str, Any]) -> str:
    """One log line for the run's ``dp`` entry."""
    if not entry["enabled"]:
        return NO_DP
    s = entry["settings"]
    gen = (f"generator DP-SGD noise multiplier {s['noise_multiplier']:g} (no total budget)" if s["noise_multiplier"]
           else f"total epsilon {s['epsilon']:g} per client (the generator gets what the rest leaves)")
    gate = (f"; gate scores epsilon {s['gate_epsilon']:g} ({s['gate_releases']} per client)"
            if s.get("gate_releases") else "")
    line = (f"differential privacy on: {gen}, clip {s['max_grad_norm']:g}; prototypes epsilon "
            f"{s['proto_epsilon']:g} (one noisy mean per class, clip {s['proto_clip']:g}); label counts epsilon "
            f"{s['count_epsilon']:g}{gate}; delta {s['delta']:g}; accountant {s['accountant']}; "
            "every release is written in the client's privacy ledger")
    if "epsilon" in entry:
        line += f"; spent: at most epsilon {entry['epsilon']:.3f} per client (total, composed)"
    return line
