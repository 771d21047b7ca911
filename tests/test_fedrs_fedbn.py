"""FedRS (restricted softmax) and FedBN (client-local BatchNorm): the pure parts exactly, the
client's kept BatchNorm through the real ClientApp, the server's aggregate from hand-built
replies, the config checks, and one in-process run of each on synthetic data."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import client_app.app as client_module
from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.config import ConfigError, build_config, load_defaults
from mosaic_flwr.data import load_dataset
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.core.training import restricted_logits, restriction_scale, train_local
from mosaic_flwr.core.records import record_to_state
from mosaic_flwr.registry import STRATEGIES
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.methods.fedbn import (STATE_RECORD, BankFedBN, bn_keys, class_accuracy,
                                          personal_score)
from mosaic_flwr.methods.fedrs import BankFedRS
from mosaic_flwr.core.task import initial_model
from tests.support import as_flower_server, run_inprocess

SYNTH = {"dataset": "synthetic"}


def _client_data(n: int = 256, classes: int = 4):
    """Synthetic images of the first ``classes`` classes only (a client missing the rest)."""
    train, _ = load_dataset("synthetic")
    x, y = train.normalized(), train.y
    keep = torch.nonzero(y < classes).flatten()[:n]
    return x[keep], y[keep]


# ----------------------------------------------------------------------------- FedRS
def test_restricted_logits_scale_only_the_missing_classes():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    present = torch.tensor([True, False, True, False, False])
    out = restricted_logits(logits, present, 0.3)
    assert torch.equal(out[:, present], logits[:, present])
    assert torch.equal(out[:, ~present], 0.3 * logits[:, ~present])
    assert torch.equal(restriction_scale(present, 0.3), torch.tensor([1.0, 0.3, 1.0, 0.3, 0.3]))
    y = torch.tensor([0, 2, 0, 2, 2, 0])
    assert torch.equal(F.cross_entropy(restricted_logits(logits, present, 1.0), y), F.cross_entropy(logits, y))


def test_fedrs_training_differs_and_alpha_one_is_plain_training():
    x, y = _client_data()
    cfg = build_config(SYNTH)
    present = torch.bincount(y, minlength=10) > 0
    assert present.sum() == 4

    def trained(scale):
        model = initial_model(cfg)
        train_local(model, x, y, steps=8, batch_size=32, lr=0.05, momentum=0.0, seed=1, logit_scale=scale)
        return model.state_dict()

    plain, one = trained(None), trained(restriction_scale(present, 1.0))
    restricted, zero = trained(restriction_scale(present, 0.5)), trained(restriction_scale(present, 0.0))
    start = initial_model(cfg).state_dict()
    assert all(torch.equal(plain[k], one[k]) for k in plain)
    assert any(not torch.equal(plain[k], restricted[k]) for k in plain)
    # alpha = 0: the missing classes' logits are 0 whatever their weights: their head rows get
    # no gradient (no momentum, no weight decay), so they stay as received
    assert torch.equal(zero["head.weight"][~present], start["head.weight"][~present])
    assert torch.equal(zero["head.bias"][~present], start["head.bias"][~present])
    assert not torch.equal(plain["head.weight"][~present], start["head.weight"][~present])


def test_fedrs_alpha_goes_into_every_train_config():
    cfg = build_config({**SYNTH, "strategy": "fedrs", "fedrs.alpha": 0.25})
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None, test_y=None,
                       results=None, num_nodes=3)
    assert BankFedRS(sc).train_config()["fedrs-alpha"] == 0.25


# ----------------------------------------------------------------------------- FedBN: pure parts
def test_bn_keys_are_the_batchnorm_layers_entries():
    model = initial_model(build_config({**SYNTH, "model": "resnet8"}))
    keys = bn_keys(model)
    bn_modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn_modules) == 9    # stem, 2 per block x 3 blocks, 2 shortcuts
    entries = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(keys) == {f"{n}.{e}" for n in bn_modules for e in entries}
    assert {"bn1.weight", "stages.1.0.shortcut.1.running_var"} <= set(keys)
    assert not {"conv1.weight", "stages.1.0.shortcut.0.weight", "head.weight"} & set(keys)
    assert keys == [k for k in model.state_dict() if k in set(keys)]     # state-dict order
    assert bn_keys(initial_model(build_config(SYNTH))) == []             # cnn_small has none


def test_personal_score_reweights_the_test_set_to_the_clients_labels():
    logits = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    y = torch.tensor([0, 0, 1, 1])
    acc, counts = class_accuracy(logits, y, 3)
    assert torch.equal(acc, torch.tensor([1.0, 0.5, 0.0], dtype=torch.double))
    assert torch.equal(counts, torch.tensor([2.0, 2.0, 0.0], dtype=torch.double))
    assert personal_score(acc, counts, torch.tensor([3, 1, 0])) == pytest.approx(0.875)
    # a class the test set lacks does not count (here: the client's class 2)
    assert personal_score(acc, counts, torch.tensor([1, 1, 8])) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- FedBN: config
@pytest.mark.parametrize("values, message", [
    ({"model": "cnn_small"}, "fedbn: model cnn_small has no BatchNorm layer; FedBN is FedAvg there (model: "),
    ({"model": "resnet8", "client-models": "resnet8,cnn_wide"},
     "fedbn: model cnn_wide has no BatchNorm layer; FedBN is FedAvg there (client-models: "),
    ({"model": "resnet8", "client-capacities": "1,0.5", "submodel": "rolling"}, "fedbn: submodel='rolling' "),
])
def test_fedbn_refuses_what_it_cannot_run(values, message):
    with pytest.raises(ConfigError) as info:
        build_config({**SYNTH, "strategy": "fedbn", **values})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_fedbn_and_fedrs_accept_heterogeneity_they_handle():
    build_config({**SYNTH, "strategy": "fedbn", "client-models": "resnet8,resnet18"})
    build_config({**SYNTH, "strategy": "fedbn", "model": "resnet8", "client-capacities": "1,0.5",
                  "submodel": "fixed"})
    build_config({**SYNTH, "strategy": "fedrs", "client-models": "cnn_small,resnet8",
                  "client-capacities": "1,0.5"})
    assert {"fedrs", "fedbn"} <= set(STRATEGIES)


# ----------------------------------------------------------------------------- FedBN: client
def _train_message(state: dict, node: int, server_round: int) -> Message:
    config = {"lr": 0.05, "local-epochs": 0, "local-steps": 3, "batch-size": 16, "momentum": 0.9,
              "weight-decay": 0.0, "server-round": server_round, "local-bn": True}
    return Message(RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
                               "config": ConfigRecord(config)}), dst_node_id=node, message_type="train")


def test_a_client_keeps_its_batchnorm_across_rounds(monkeypatch):
    """Round 1 trains from the received BatchNorm; round 2 from the client's own round-1
    BatchNorm (not the server's), with the server's other entries."""
    as_flower_server()
    run_config = {**load_defaults(), **SYNTH, "strategy": "fedbn", "model": "resnet8"}
    grid = InProcessGrid(client_module.app, run_config, 2)
    entered = []
    real = client_module.train_local

    def spy(model, *args, **kwargs):
        entered.append(copy.deepcopy(model.state_dict()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(client_module, "train_local", spy)
    cfg = build_config(run_config)
    model = initial_model(cfg)
    keys = bn_keys(model)
    sent1 = model.state_dict()
    node = grid.node_ids[0]
    (reply1,) = grid.send_and_receive([_train_message(sent1, node, 1)])
    assert reply1.has_content(), reply1.error
    own = record_to_state(reply1.content["arrays"])
    # the server's round-2 model: different everywhere, BatchNorm included
    sent2 = {k: (v + 0.5 if v.is_floating_point() else v + 100) for k, v in sent1.items()}
    (reply2,) = grid.send_and_receive([_train_message(sent2, node, 2)])
    assert reply2.has_content(), reply2.error
    first, second = entered
    assert all(torch.equal(first[k], sent1[k]) for k in sent1)
    assert all(torch.equal(second[k], own[k]) for k in keys)                  # its own BatchNorm
    assert all(torch.equal(second[k], sent2[k]) for k in sent2 if k not in keys)
    assert not torch.equal(own["bn1.running_mean"], sent2["bn1.running_mean"])
    kept = record_to_state(grid.contexts[node].state.array_records[STATE_RECORD])
    after = record_to_state(reply2.content["arrays"])
    assert set(kept) == set(keys) and all(torch.equal(kept[k], after[k]) for k in keys)
    assert STATE_RECORD not in grid.contexts[grid.node_ids[1]].state.array_records   # per node


# ----------------------------------------------------------------------------- FedBN: server
def _reply(state: dict, n: int, node: int) -> Message:
    out = Message(RecordDict({}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=out)


def test_the_server_averages_the_model_and_keeps_each_clients_batchnorm():
    as_flower_server()
    cfg = build_config({**SYNTH, "strategy": "fedbn", "model": "resnet8"})
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None, test_y=None,
                       results=None, num_nodes=2)
    strategy = BankFedBN(sc)
    template = strategy.globals["resnet8"]
    assert strategy.train_config()["local-bn"] is True
    a = {k: torch.full_like(v, 1 if v.is_floating_point() else 2) for k, v in template.items()}
    b = {k: torch.full_like(v, 4 if v.is_floating_point() else 6) for k, v in template.items()}
    arrays, _ = strategy.aggregate_train(1, [_reply(a, 10, 101), _reply(b, 30, 102)])
    state = arrays.to_torch_state_dict()
    keys = set(bn_keys(strategy.module(strategy.archs[0])))
    # non-BN: FedAvg; BN: the example-weighted mean of the clients' local BN (headline model);
    # the integer batch counts get the rounded mean
    for k, v in state.items():
        expected = 3.25 if v.is_floating_point() else 5
        assert torch.equal(v, torch.full_like(v, expected)), k
    assert set(strategy.local_bn) == {101, 102}
    assert set(strategy.local_bn[101]) == keys
    assert all(torch.equal(strategy.local_bn[102][k], b[k]) for k in keys)
    saved = strategy.state_dict()
    fresh = BankFedBN(sc)
    fresh.load_state_dict(saved)
    assert set(fresh.local_bn) == {101, 102}


# ----------------------------------------------------------------------------- in-process runs
TINY = {**SYNTH, "alpha": 0.3, "num-server-rounds": 2, "local-steps": 4, "batch-size": 16, "lr": 0.05}


def test_fedrs_runs_in_process(tmp_path):
    out = run_inprocess(tmp_path, strategy="fedrs", **{**TINY, "fedrs.alpha": 0.2})
    configs = [m.content["config"] for m in out["grid"].sent if m.metadata.message_type == "train"]
    assert len(configs) == 6 and all(c["fedrs-alpha"] == 0.2 for c in configs)
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["clients"] == 3 for r in rows[1:])


@pytest.mark.parametrize("hetero", [{}, {"client-capacities": "1,0.5", "submodel": "fixed"}],
                         ids=["resnet8", "widths-fixed"])
def test_fedbn_runs_in_process(tmp_path, hetero):
    out = run_inprocess(tmp_path, strategy="fedbn", model="resnet8", **{**TINY, **hetero})
    grid = out["grid"]
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0 <= r["acc-personal"] <= 1 for r in rows) and all(r["clients"] == 3 for r in rows[1:])
    assert all(m.content["config"]["local-bn"] for m in grid.sent if m.metadata.message_type == "train")
    assert all(STATE_RECORD in grid.contexts[n].state.array_records for n in grid.node_ids)
    summary = json.loads((out["dir"] / "summary.json").read_text())
    assert summary["final_accuracy_personal"] == rows[-1]["acc-personal"]
    # the checkpoint (read with weights_only=True) holds each client's last BatchNorm, by partition id
    assert sorted(load_checkpoint(out["dir"])["strategy"]["local-bn"]) == [0, 1, 2]
