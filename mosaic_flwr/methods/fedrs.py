"""FedRS (Li & Zhan, KDD 2021, "FedRS: Federated Learning with Restricted Softmax for Label
Distribution Non-IID Data"): FedAvg whose clients restrict the softmax of their local
training. The logits of the classes a client holds no example of are multiplied by
``fedrs.alpha`` in [0, 1] before the cross-entropy (1: FedAvg), so a client does not push
the missing classes' weights around; evaluation is unrestricted.

The client's label set is its whole data (every class with a count > 0), as in the paper.
The Mosaic authors' code takes the classes visible in each batch and anneals alpha from 0.1
by 0.01 a step up to 0.8 (``/work/shared/MOSAIC_REFERENCE.md``, "FedRS and FedBN baselines
are non-standard"); we follow the paper, with a constant alpha.

Server side: the bank's FedAvg (every family, every width: the restriction acts on the
logits, which every model has), with ``fedrs-alpha`` in every train config. Client side
(``ClientSide.train_options``, run by the ClientApp's ``train`` handler): it becomes per-class
factors of the logits (``training.restriction_scale``).
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from mosaic_flwr.config import _closed_unit
from mosaic_flwr.core.training import label_counts, restriction_scale
from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.registry import ClientSide, ClientStep, Method

ALPHA_KEY = "fedrs-alpha"  # the train-config key the ClientApp reads


class BankFedRS(FedAvgStrategy):
    """FedAvg over the bank; clients scale the missing classes' logits by ``fedrs.alpha``."""

    def train_config(self) -> ConfigRecord:
        return self.sc.train_config(**{ALPHA_KEY: self.cfg.of("fedrs").alpha})


def restricted_softmax(step: ClientStep) -> dict:
    """The client's local training scales the logits of the classes it holds no example of by
    the round's ``fedrs-alpha``."""
    held = label_counts(step.y, step.num_classes) > 0
    return {"logit_scale": restriction_scale(held, float(step.config[ALPHA_KEY]))}


FEDRS = Method(BankFedRS, "FedAvg whose clients scale the logits of classes they lack by alpha "
                          "(restricted softmax; Li & Zhan, 2021; fedrs.alpha)",
               settings={"alpha": (float, _closed_unit)}, client=ClientSide(train_options=restricted_softmax),
               title="FedRS")
