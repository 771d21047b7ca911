"""The in-process grid passes every message through Flower's wire format, as a SuperLink and
SuperNode do, so the quick loop exercises Flower's serialisation of every record we send."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from mosaic_flwr.testing.inprocess import over_the_wire
from tests.support import SYNTH, run_inprocess


def test_records_cross_the_wire_equal_and_unshared():
    arrays = {"w": torch.randn(3, 4), "n": torch.arange(5, dtype=torch.int64), "h": torch.ones(2, dtype=torch.float16)}
    sent = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": 3, "lr": 0.05, "mode": "x",
                                                                                "flags": [True, False]}),
                       "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.25})})
    got = over_the_wire(sent)
    assert got is not sent and got["arrays"] is not sent["arrays"]
    back = got["arrays"].to_torch_state_dict()
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    assert dict(got["config"]) == dict(sent["config"]) and dict(got["metrics"]) == dict(sent["metrics"])
    back["w"].add_(1)  # the receiver's tensors are its own
    assert not torch.equal(sent["arrays"].to_torch_state_dict()["w"], back["w"])


def test_a_run_in_process_sends_serialised_copies(tmp_path):
    seen = []

    def hook(grid, node, incoming, reply):
        sent = next(m for m in grid.sent if m.metadata.message_id == incoming.metadata.message_id)
        seen.append((sent.content is incoming.content, incoming.content.array_records.keys() ==
                     sent.content.array_records.keys()))
        return reply
    run_inprocess(tmp_path, grid_options={"hook": hook}, **{**SYNTH, "strategy": "fedavg", "num-server-rounds": 1,
                                                            "local-steps": 1})
    assert seen and all(not same and keys for same, keys in seen)
