"""FedAvg (McMahan et al., 2017): Flower's FedAvg configuration driven by our round loop
(``core/fedavg.py``), so every strategy shares reply validation, fault handling and
checkpoints. With one model at full width the bank is plain FedAvg (example-weighted mean);
under model heterogeneity it is FedAvg within each family, masked over the clients' slices
for width-scaled sub-models."""

from __future__ import annotations

from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.registry import Method

FEDAVG = Method(FedAvgStrategy, "federated averaging (McMahan et al., 2017)")
