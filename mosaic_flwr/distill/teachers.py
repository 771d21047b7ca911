"""Teachers built from the clients' models, shared by the server-side distillation methods.

``ClientEnsemble`` combines the logits of N client models (each in its own architecture)
class by class: ``t[:, c] = sum_i W[i, c] * z_i[:, c]`` with every column of ``W`` summing
to 1. ``uniform_weights`` is FedDF's and DENSE's average; ``label_weights`` is the
label-aware ensemble of FedFTG and DFRD (client i's weight for class c is its share of the
examples of class c, so a client never votes on a class it has not seen, unless nobody
has). Unlike ``StackedExperts`` it is an ``nn.Module`` whose forward is differentiable in
its input (the models' weights are frozen): a server-side generator trains through it.

With ``per_sample=True`` (FedFTG's and DFRD's authors) a generated sample asked for class
``y`` takes every client's whole logit vector weighted by that client's share of class
``y``: ``t[b] = sum_i W[i, y_b] * z_i[b]`` (the two forms agree on the requested class's
logit). Such a teacher is *conditional* (``conditional = True``): it is called as
``teacher(x, y)`` wherever the requested labels are known (``call_teacher``); on real
images, which have no requested class, it falls back to the class-by-class form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mosaic_flwr.distill.experts import StackedExperts


def uniform_weights(num_clients: int, num_classes: int) -> Tensor:
    """``[N, C]`` all ``1/N``: the plain average of the clients' logits."""
    if num_clients < 1:
        raise ValueError("uniform_weights: no client")
    return torch.full((num_clients, num_classes), 1.0 / num_clients)


def label_weights(label_counts: Tensor) -> Tensor:
    """``[N, C]``: client i's share of class c's examples, ``n_ic / sum_j n_jc`` (uniform
    for a class nobody holds)."""
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if counts.dim() != 2 or len(counts) == 0:
        raise ValueError("label_weights: expected [N, C] label counts")
    totals = counts.sum(0, keepdim=True)
    share = torch.where(totals > 0, counts / totals.clamp_min(1), 1.0 / len(counts))
    return share.float()


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter's gradient off (gradients still flow to
    its input)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ClientEnsemble(nn.Module):
    """``forward(x) = sum_i W[i] * model_i(x)`` class by class, or with ``per_sample`` and the
    requested labels ``forward(x, y) = sum_i W[i, y] * model_i(x)`` sample by sample (see the
    module docstring).

    ``models`` are frozen (eval mode, no weight gradients); ``forward`` is differentiable in
    ``x``; ``all_logits(x)`` gives every model's logits ``[N, B, C]``."""

    def __init__(self, models: Sequence[nn.Module], weights: Tensor, *, per_sample: bool = False):
        super().__init__()
        if len(models) == 0:
            raise ValueError("ClientEnsemble: no model")
        if weights.shape[0] != len(models):
            raise ValueError(f"ClientEnsemble: {len(models)} models but {weights.shape[0]} weight rows")
        self.members = nn.ModuleList([frozen(m) for m in models])
        self.register_buffer("weights", weights.float())
        self.conditional = bool(per_sample)

    def train(self, mode: bool = True) -> "ClientEnsemble":  # the members stay in eval mode
        super().train(mode)
        for m in self.members:
            m.eval()
        return self

    def all_logits(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if self.conditional and y is not None:
            if len(y) != len(x):
                raise ValueError(f"ClientEnsemble: {len(x)} inputs but {len(y)} requested labels")
            w = self.weights[:, y.to(self.weights.device)]  # [N, B]: each client's share of the asked class
            return (self.all_logits(x) * w.unsqueeze(-1)).sum(0)
        return (self.all_logits(x) * self.weights.unsqueeze(1)).sum(0)


def call_teacher(teacher, x: Tensor, y: Tensor | None = None) -> Tensor:
    """``teacher(x)``, or ``teacher(x, y)`` for a conditional teacher (one whose output
    depends on the class each input was generated for) when the labels ``y`` are known."""
    if y is not None and getattr(teacher, "conditional", False):
        return teacher(x, y)
    return teacher(x)


class ConcatExperts:
    """Several expert stacks as one: ``logits(x)`` is ``[sum E_i, B, C]``, in order, and
    ``head_logits(features)`` ``[M, sum E_i, C]``. ``mosaic.meta-prior='global'`` appends the
    aggregated global model (a one-model ``StackedExperts``) to the class experts, so the
    meta model sees the student's opinion as one more token and starts from it."""

    def __init__(self, parts):
        if not parts:
            raise ValueError("ConcatExperts: no parts")
        self.parts = list(parts)
        self.device = self.parts[0].device

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return torch.cat([p.logits(x).to(self.device) for p in self.parts])

    @torch.no_grad()
    def head_logits(self, features: Tensor) -> Tensor:
        return torch.cat([p.head_logits(features).to(self.device) for p in self.parts], dim=1)


class HeadExperts:
    """The class experts' linear heads on ONE backbone's features (``mosaic.meta-experts='heads'``):
    ``logits(x)`` is ``[E, B, C]``, each expert's head applied to ``backbone.features(x)``.

    Prototypes are penultimate features of the model the distillation round's clients
    received, so the meta model learns from the experts' heads on that model's features. Run
    as the teacher on an image, the full experts (each its own backbone) give other inputs: the
    further the experts drifted from that model in their last local training, the less the meta
    model's training inputs describe them (measured in ``bench/results/mosaic-paper.md``). With
    this object as the experts (``backbone``: the received model), the teacher meets exactly the
    kind of inputs the meta model learned on: the received model's features of the image, read
    by each expert's head. The default where one architecture learns from one round's
    prototypes (``config.meta_experts_for``)."""

    def __init__(self, experts: StackedExperts, backbone: nn.Module):
        self.experts, self.backbone = experts, backbone.eval()
        self.device = experts.device

    def __len__(self) -> int:
        return len(self.experts)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.experts.head_logits(self.backbone.features(x.to(self.device))).permute(1, 0, 2)

    @torch.no_grad()
    def head_logits(self, features: Tensor) -> Tensor:
        return self.experts.head_logits(features)


@torch.no_grad()
def expert_logits(experts: StackedExperts, x: Tensor, *, batch_size: int = 256) -> Tensor:
    """Every expert's logits on a large tensor, batched: ``[E, N, C]`` on the CPU."""
    return torch.cat([experts.logits(x[i:i + batch_size].to(experts.device)).cpu()
                      for i in range(0, len(x), batch_size)], dim=1)


def ensemble_teacher(experts: StackedExperts) -> Callable[[Tensor], Tensor]:
    """The plain mixture: the mean of the experts' logits (the scale the meta model starts
    from, so that "with" and "without the meta model" distil at the same temperature)."""
    return lambda x: experts.logits(x).mean(0)


def meta_teacher(experts: StackedExperts, meta: nn.Module) -> Callable[[Tensor], Tensor]:
    """Mosaic's teacher: the (EMA) meta model fusing the experts' logits."""
    meta.eval()

    @torch.no_grad()
    def teach(x: Tensor) -> Tensor:
        z = experts.logits(x).permute(1, 0, 2)  # [B, E, C]
        return meta(z.to(next(meta.parameters()).device))

    return teach


@torch.no_grad()
def teacher_logits(teacher: Callable[[Tensor], Tensor], x: Tensor, *, labels: Tensor | None = None,
                   batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """A teacher's logits on a (test) tensor, batched, on the CPU; ``labels``: the classes
    the inputs were generated for, given to a conditional teacher (``call_teacher``)."""
    return torch.cat([call_teacher(teacher, x[i:i + batch_size].to(device),
                                   None if labels is None else labels[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])
