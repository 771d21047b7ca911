"""FedBN (Li et al., ICLR 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization"): FedAvg in which the BatchNorm layers stay local.

Client side (``restore_local_bn`` / ``keep_local_bn``, the method's ``ClientSide`` hooks that
the ClientApp's ``train`` handler runs; the train config has ``local-bn``): a client keeps its own BatchNorm entries
(weight, bias, running mean and variance, batch count: ``bn_keys``) in its node state
(``context.state``, which Flower keeps per node and run across rounds: in simulation, on a
SuperNode and in ``inprocess.InProcessGrid``) and writes them over the BatchNorm entries of
the model it receives before training. In its first round it has none and trains from the
received ones.

Server side: the bank's aggregation. The non-BatchNorm entries of the global model are
FedAvg's. Since clients send their whole state, the global model's BatchNorm entries become
the (example-weighted) average of the round's clients' local BatchNorm entries; no client
trains from them (each overwrites them with its own), except a client in its first round.

Evaluation (FedBN has no single BatchNorm):
- the headline ``accuracy``: the global model as above (the averaged local BatchNorm) on the
  test set, as every strategy;
- ``acc-personal`` (``fedbn.personal-eval``): each client's own model (its architecture's
  slice of the global model with the BatchNorm entries it last uploaded, which is what it
  trains from next round; the global ones before its first round) on the test set re-weighted
  to the client's label distribution (``sum_c p_k(c) acc_c``); the example-weighted mean over
  the clients. Computed on the server (the uploads hold the clients' BatchNorm already): no
  messages, no client data; one test-set pass per client and round.

Heterogeneity: every family must have BatchNorm (``check``); width sub-models work with
``submodel='fixed'`` (a client's slice, hence its BatchNorm channels, never moves), not with
``'rolling'`` (its kept statistics would belong to other channels after one round).
Resume: a resumed run is a new Flower run, whose node states start empty. The server keeps
every client's last uploaded BatchNorm entries in its checkpoint (``local-bn``), and after a
resume it hands each client its own back (``OWN_RECORD`` in the train message) until that
client's first valid reply, so the clients go on from their own BatchNorm and the resumed run
ends as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from torch import nn

from mosaic_flwr.config import ConfigError, split_list
from mosaic_flwr.data import dataset_info
from mosaic_flwr.models import MODELS, build_model
from mosaic_flwr.core.training import predict_logits
from mosaic_flwr.core.records import record_to_state, state_to_record
from mosaic_flwr.core.task import Arch
from mosaic_flwr.core.fedavg import FedAvgStrategy, StateDict
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.registry import ClientSide, Method

LOCAL_BN = "local-bn"          # the train-config flag the ClientApp reads
STATE_RECORD = "fedbn-bn"      # where a client keeps its BatchNorm entries in context.state
OWN_RECORD = "fedbn-own-bn"    # after a resume: a client's own entries, as it last uploaded them


def bn_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s BatchNorm layers (every ``nn.BatchNorm1d/2d/3d``
    and ``SyncBatchNorm``: parameters and buffers), in state-dict order."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k, _ in module.named_parameters(recurse=False))
            keys.update(prefix + k for k, _ in module.named_buffers(recurse=False))
    return [k for k in model.state_dict() if k in keys]


# ----------------------------------------------------------------------------- client side
def restore_local_bn(model: nn.Module, state: RecordDict) -> bool:
    """Write the client's own BatchNorm entries (kept in ``state`` by ``keep_local_bn``) over
    the received model's; ``False`` when it has none yet (its first round: the received ones
    stay). Raises ``ValueError`` when the kept entries do not fit the model."""
    if STATE_RECORD not in state.array_records:
        return False
    own = record_to_state(state.array_records[STATE_RECORD])
    keys = bn_keys(model)
    if set(own) != set(keys):
        raise ValueError(f"fedbn: the kept BatchNorm entries {sorted(own)[:3]} do not match the model's "
                         f"{keys[:3]}")
    model.load_state_dict(own, strict=False)  # a shape mismatch raises
    return True


def restore_own_bn(model: nn.Module, state: RecordDict, content: RecordDict | None) -> bool:
    """``restore_local_bn``; a client whose node state has none (a resumed run's new Flower
    run) takes the entries the server handed back in the message (``OWN_RECORD``), if any."""
    if restore_local_bn(model, state):
        return True
    if content is None or OWN_RECORD not in content.array_records:
        return False
    state[STATE_RECORD] = content.array_records[OWN_RECORD]
    return restore_local_bn(model, state)


def keep_local_bn(model: nn.Module, state: RecordDict) -> None:
    """Store ``model``'s BatchNorm entries in the client's node ``state`` for its next round."""
    current = model.state_dict()
    state[STATE_RECORD] = state_to_record({k: current[k] for k in bn_keys(model)})


# ----------------------------------------------------------------------------- server side
def class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class accuracy of ``logits`` against ``y`` and the per-class counts of ``y``
    (accuracy 0 where a class is absent)."""
    counts = torch.bincount(y, minlength=num_classes).double()
    correct = torch.bincount(y[logits.argmax(1) == y], minlength=num_classes).double()
    return correct / counts.clamp(min=1), counts


def personal_score(acc: torch.Tensor, test_counts: torch.Tensor, client_counts: torch.Tensor) -> float:
    """The accuracy on a test set re-weighted to a client's label distribution:
    ``sum_c p(c) acc_c`` over the classes the test set has."""
    w = client_counts.double() * (test_counts > 0)
    return float((w * acc).sum() / w.sum()) if w.sum() > 0 else 0.0


class BankFedBN(FedAvgStrategy):
    """FedAvg over the bank with client-local BatchNorm (see the module docstring)."""

    def __init__(self, sc: ServerContext):
        super().__init__(sc)
        # A SuperNode's --node-config may assign a family the config check did not see.
        for arch in self.archs:
            if not self.bn_keys(arch):
                raise ConfigError(no_batchnorm(arch.model, "node-config model"))
        self.local_bn: dict[int, StateDict] = {}   # partition id -> the BN entries it last uploaded
        self.replied: set[int] = set()              # partition ids that replied in this Flower run

    def bn_keys(self, arch: Arch) -> list[str]:
        return bn_keys(self.module(arch))

    def train_config(self) -> ConfigRecord:
        return self.sc.train_config(**{LOCAL_BN: True})

    def messages_for(self, server_round: int, node_ids: list[int], config: ConfigRecord | None = None
                     ) -> list[Message]:
        """The bank's messages; after a resume, a client that has not replied since gets its own
        BatchNorm entries back (its node state did not outlive the old Flower run)."""
        messages = super().messages_for(server_round, node_ids, config)
        if self.sc.resumed_after is not None:
            for msg in messages:
                pid = self.sc.partition_of(msg.metadata.dst_node_id)
                if pid in self.local_bn and pid not in self.replied:
                    msg.content[OWN_RECORD] = state_to_record(self.local_bn[pid])
        return messages

    def decode(self, server_round: int, msg: Message, arch: Arch) -> tuple[object, str | None]:
        """The bank's decoding; a valid reply's BatchNorm entries are also kept (they are the
        client's local ones from now on), for ``acc-personal``."""
        payload, problem = super().decode(server_round, msg, arch)
        if problem is None:
            state = payload[0]
            pid = self.sc.partition_of(msg.metadata.src_node_id)
            self.local_bn[pid] = {k: state[k] for k in self.bn_keys(arch)}
            self.replied.add(pid)
        return payload, problem

    def personal_accuracy(self) -> float | None:
        """``acc-personal`` (see the module docstring); ``None`` without discovery."""
        sc = self.sc
        if not sc.clients or sc.test_y is None:
            return None
        num_classes = self.info.num_classes
        shared: dict[Arch, tuple[torch.Tensor, torch.Tensor]] = {}
        total, examples = 0.0, 0
        for node, info in sorted(sc.clients.items(), key=lambda kv: kv[1].partition_id):
            arch = Arch(info.model, info.capacity)
            own = self.local_bn.get(info.partition_id)
            if own is None and arch in shared:
                acc, counts = shared[arch]
            else:
                state = dict(self.state_for(arch, 0, mode="fixed"))
                state.update(own or {})
                model = self.module(arch)
                model.load_state_dict(state)
                logits = predict_logits(model, sc.test_x, batch_size=self.cfg.eval_batch_size,
                                        device=sc.device)
                acc, counts = class_accuracy(logits, sc.test_y, num_classes)
                if own is None:
                    shared[arch] = (acc, counts)
            total += info.num_examples * personal_score(acc, counts, info.label_counts)
            examples += info.num_examples
        return total / examples if examples else None

    def evaluate_all(self) -> tuple[dict[str, float], dict[str, float]]:
        headline, extra = super().evaluate_all()
        if self.cfg.of("fedbn").personal_eval:
            personal = self.personal_accuracy()
            if personal is not None:
                extra["acc-personal"] = round(personal, 5)
        return headline, extra

    def finish(self) -> None:
        super().finish()
        last = self.sc.results.rounds[-1] if self.sc.results.rounds else {}
        if "acc-personal" in last:
            self.sc.results.extra["final_accuracy_personal"] = last["acc-personal"]
            log(INFO, "[mosaic-flwr] FedBN: final accuracy with each client's own BatchNorm "
                "(test set re-weighted to its labels) %.4f", last["acc-personal"])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "local-bn": self.local_bn}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.local_bn = {int(k): v for k, v in state.get("local-bn", {}).items()}


# ----------------------------------------------------------------------------- config check
def no_batchnorm(model: str, key: str) -> str:
    with_bn = [name for name in MODELS if _has_batchnorm(name, "synthetic")]
    return (f"fedbn: model {model} has no BatchNorm layer; FedBN is FedAvg there ({key}: use one "
            f"with BatchNorm: {', '.join(with_bn)})")


def _has_batchnorm(name: str, dataset: str) -> bool:
    info = dataset_info(dataset)
    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        model = build_model(name, info.in_channels, info.num_classes, info.image_size)
    return bool(bn_keys(model))


def check_fedbn(values: Mapping[str, Any]) -> None:
    """Every model clients train has BatchNorm; width sub-models only with fixed slices."""
    key = "client-models" if split_list(values["client-models"]) else "model"
    for name in dict.fromkeys(split_list(values["client-models"]) or [values["model"]]):
        if not _has_batchnorm(name, values["dataset"]):
            raise ConfigError(no_batchnorm(name, key))
    if values["submodel"] == "rolling" and any(float(c) < 1 for c in split_list(values["client-capacities"])):
        raise ConfigError("fedbn: submodel='rolling' moves a sub-model's channels every round, so the "
                          "BatchNorm entries a client keeps would belong to other channels; use "
                          "submodel='fixed' with client-capacities below 1")


FEDBN = Method(BankFedBN, "FedAvg with client-local BatchNorm layers (Li et al., 2021); headline: the "
                          "averaged local BatchNorm, acc-personal: each client's own",
               settings={"personal-eval": (bool, None)}, check=check_fedbn,
               client=ClientSide(before=lambda step: restore_own_bn(step.model, step.state, step.content),
                                 after=lambda step: keep_local_bn(step.model, step.state)), title="FedBN")
