"""FedProx (Li et al., 2020): FedAvg whose clients add ``mu/2 ||w - w_received||^2`` to their
loss; ``proximal-mu`` goes into every train config and the client adds the term."""

from __future__ import annotations

from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.registry import Method


class FedProxStrategy(FedAvgStrategy):
    """FedProx over the bank: clients add ``mu/2 ||w - w_received||^2`` to their loss."""

    def train_config(self):
        return self.sc.train_config(**{"proximal-mu": self.cfg.proximal_mu})


FEDPROX = Method(FedProxStrategy, "FedAvg with a proximal term in the clients' loss (Li et al., 2020; proximal-mu)")
