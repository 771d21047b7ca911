"""FedAvg and FedProx: Flower's FedAvg configuration driven by our round loop (``bank.py``),
so every strategy shares reply validation, fault handling and checkpoints. With one model at
full width the bank is plain FedAvg (example-weighted mean); under model heterogeneity it is
FedAvg within each family, masked over the clients' slices for width-scaled sub-models."""

from __future__ import annotations

from .bank import BankFedProx, BankStrategy
from .base import ServerContext
from .method import Method


def run_fedavg(sc: ServerContext) -> None:
    BankStrategy(sc).run()


def run_fedprox(sc: ServerContext) -> None:
    # ``proximal-mu`` goes into every train config; the client adds the term.
    BankFedProx(sc).run()


FEDAVG = Method(run_fedavg, "federated averaging (McMahan et al., 2017)")
FEDPROX = Method(run_fedprox, "FedAvg with a proximal term in the clients' loss (Li et al., 2020; proximal-mu)")
