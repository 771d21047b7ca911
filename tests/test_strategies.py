import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from mosaic_flwr.strategies import STRATEGIES, get_strategy
from mosaic_flwr.config import build_config
from mosaic_flwr.strategies.bank import BankFedProx, BankStrategy
from mosaic_flwr.strategies.baselines import run_fedavg, run_fedprox
from mosaic_flwr.strategies.base import ServerContext
from tests.conftest import as_flower_server

TEMPLATE = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def test_selection_by_name():
    assert get_strategy("fedavg") is run_fedavg and get_strategy("fedprox") is run_fedprox
    with pytest.raises(ValueError, match=r"strategy: 'x' is not available; allowed: \["):
        get_strategy("x")
    assert set(STRATEGIES) >= {"fedavg", "fedprox"}


def _reply(w: float, n: int, node: int, *, key="w", shape=(2, 2)) -> Message:
    as_flower_server()
    arrays = {key: torch.full(shape, w), "b": torch.full((2,), w)}
    out = Message(RecordDict({"arrays": ArrayRecord({k: v for k, v in arrays.items()})}),
                  dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=out)


class _Bank:
    """A bank over a two-tensor model: the template is ``TEMPLATE``, the start is zeros."""

    def __init__(self, cls, **cfg):
        sc = ServerContext(cfg=build_config({"dataset": "synthetic", **cfg}), grid=None,
                           device=torch.device("cpu"), test_x=None, test_y=None,
                           results=None, num_nodes=5)
        self.strategy = cls(sc)
        self.strategy._templates = {a: TEMPLATE for a in self.strategy.archs}
        self.strategy.globals = {f: {k: v.clone() for k, v in TEMPLATE.items()} for f in self.strategy.globals}


@pytest.mark.parametrize("cls", [BankStrategy, BankFedProx])
def test_weighted_average_and_garbage_dropped(cls):
    strategy = _Bank(cls).strategy
    good1, good2 = _reply(1.0, 10, 101), _reply(4.0, 30, 102)
    nan = _reply(float("nan"), 10, 103)
    wrong_shape = _reply(9.0, 10, 104, shape=(3, 3))
    wrong_key = _reply(9.0, 10, 105, key="v")
    arrays, metrics = strategy.aggregate_train(1, [good1, nan, good2, wrong_shape, wrong_key])
    state = arrays.to_torch_state_dict()
    # (1*10 + 4*30) / 40 = 3.25, exactly; the three bad replies are left out
    assert torch.allclose(state["w"], torch.full((2, 2), 3.25))
    assert strategy.rejected == 3
    assert strategy.sc.train_metrics["clients"] == 2


@pytest.mark.parametrize("rule, expected", [("median", 2.5), ("trimmed-mean", 2.5)])
def test_robust_aggregation_ignores_an_outlier(rule, expected):
    strategy = _Bank(BankStrategy, aggregation=rule, **{"trim-fraction": 0.25}).strategy
    replies = [_reply(v, n, 101 + i) for i, (v, n) in enumerate([(1.0, 10), (2.0, 10), (3.0, 10), (1e6, 1000)])]
    arrays, _ = strategy.aggregate_train(1, replies)
    # median of (1, 2, 3, 1e6) = (2 + 3) / 2; trimmed mean (drop 1 each end) = (2 + 3) / 2;
    # the weighted mean would be ~970,000
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2, 2), expected))
