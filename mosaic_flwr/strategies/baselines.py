"""FedAvg and FedProx: Flower's FedAvg configuration driven by our round loop (``bank.py``),
so every strategy shares reply validation, fault handling and checkpoints. With one model at
full width the bank is plain FedAvg (example-weighted mean); under model heterogeneity it is
FedAvg within each family, masked over the clients' slices for width-scaled sub-models.
FedProx's ``proximal-mu`` goes into every train config; the client adds the term."""

from __future__ import annotations

from .bank import BankFedProx, BankStrategy
from .method import Method

FEDAVG = Method(BankStrategy, "federated averaging (McMahan et al., 2017)")
FEDPROX = Method(BankFedProx, "FedAvg with a proximal term in the clients' loss (Li et al., 2020; proximal-mu)")
