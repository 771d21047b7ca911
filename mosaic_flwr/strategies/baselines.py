"""FedAvg and FedProx: Flower's own strategies, with every reply validated before aggregation."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx

from ..records import state_to_record
from .bank import BankFedProx, BankStrategy
from .base import ServerContext, filter_replies


class _Validating:
    """Mixin: drop replies with bad payloads (logged) before Flower's aggregation sees them."""

    def __init__(self, *args, sc: ServerContext, **kwargs):
        super().__init__(*args, **kwargs)
        self._sc = sc
        self._template = {k: v.detach().cpu() for k, v in sc.model.state_dict().items()}
        self.rejected = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, rejected = filter_replies(list(replies), self._template)
        self.rejected += rejected
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None:
            self._sc.train_metrics = {k: float(v) for k, v in metrics.items()
                                      if isinstance(v, (int, float))}
        self._sc.train_metrics["clients"] = len(valid)
        self._sc.train_metrics["rejected"] = rejected
        return arrays, metrics


class ValidatingFedAvg(_Validating, FedAvg):
    pass


class ValidatingFedProx(_Validating, FedProx):
    pass


def _run(sc: ServerContext, strategy: FedAvg, train_config) -> None:
    strategy.start(
        grid=sc.grid,
        initial_arrays=state_to_record(sc.model.state_dict()),
        num_rounds=sc.cfg.num_server_rounds,
        train_config=train_config,
        evaluate_fn=sc.evaluate_fn(),
    )
    sc.results.extra["rejected_replies"] = strategy.rejected


def _common(sc: ServerContext) -> dict:
    return {"fraction_train": sc.cfg.fraction_train, "fraction_evaluate": 0.0,
            "min_train_nodes": min(sc.cfg.min_train_clients, sc.num_nodes),
            "min_available_nodes": min(sc.cfg.min_train_clients, sc.num_nodes), "sc": sc}


def run_fedavg(sc: ServerContext) -> None:
    if sc.needs_bank():  # FedAvg within each family, masked for sub-models
        BankStrategy(sc).run()
        return
    _run(sc, ValidatingFedAvg(**_common(sc)), sc.train_config())


def run_fedprox(sc: ServerContext) -> None:
    if sc.needs_bank():
        BankFedProx(sc).run()
        return
    # FedProx puts ``proximal-mu`` into every train config; the client adds the term.
    _run(sc, ValidatingFedProx(proximal_mu=sc.cfg.proximal_mu, **_common(sc)), sc.train_config())
