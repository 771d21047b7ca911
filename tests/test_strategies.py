import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from mosaic_flwr.strategies import STRATEGIES, get_strategy
from mosaic_flwr.strategies.baselines import ValidatingFedAvg, ValidatingFedProx, run_fedavg, run_fedprox

TEMPLATE = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def test_selection_by_name():
    assert get_strategy("fedavg") is run_fedavg and get_strategy("fedprox") is run_fedprox
    with pytest.raises(ValueError, match=r"strategy: 'x' is not available; allowed: \["):
        get_strategy("x")
    assert set(STRATEGIES) >= {"fedavg", "fedprox"}


def _reply(w: float, n: int, node: int, *, key="w", shape=(2, 2)) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 0, 1  # "server" side
    arrays = {key: torch.full(shape, w), "b": torch.full((2,), w)}
    out = Message(RecordDict({"arrays": ArrayRecord({k: v for k, v in arrays.items()})}),
                  dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=out)


class _SC:
    def __init__(self):
        self.model = torch.nn.Module()
        self.model.register_buffer("w", torch.zeros(2, 2))
        self.model.register_buffer("b", torch.zeros(2))
        self.train_metrics = {}


@pytest.mark.parametrize("cls", [ValidatingFedAvg, ValidatingFedProx])
def test_weighted_average_and_garbage_dropped(cls):
    strategy = cls(sc=_SC())
    good1, good2 = _reply(1.0, 10, 101), _reply(4.0, 30, 102)
    nan = _reply(float("nan"), 10, 103)
    wrong_shape = _reply(9.0, 10, 104, shape=(3, 3))
    wrong_key = _reply(9.0, 10, 105, key="v")
    arrays, metrics = strategy.aggregate_train(1, [good1, nan, good2, wrong_shape, wrong_key])
    state = arrays.to_torch_state_dict()
    # (1*10 + 4*30) / 40 = 3.25, exactly; the three bad replies are left out
    assert torch.allclose(state["w"], torch.full((2, 2), 3.25))
    assert strategy.rejected == 3
    assert strategy._sc.train_metrics["clients"] == 2
