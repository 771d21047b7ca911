import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from mosaic_flwr.registry import STRATEGIES, get_strategy
from mosaic_flwr.config import build_config
from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.methods.fedavg import FEDAVG
from mosaic_flwr.methods.fedprox import FEDPROX, FedProxStrategy
from tests.support import as_flower_server, two_tensor_reply, TwoTensorBank


def test_selection_by_name():
    assert get_strategy("fedavg") == FEDAVG.run and get_strategy("fedprox") == FEDPROX.run
    with pytest.raises(ValueError, match=r"strategy: 'x' is not available; allowed: \["):
        get_strategy("x")
    assert set(STRATEGIES) >= {"fedavg", "fedprox"}


@pytest.mark.parametrize("cls", [FedAvgStrategy, FedProxStrategy])
def test_weighted_average_and_garbage_dropped(cls):
    strategy = TwoTensorBank(cls).strategy
    good1, good2 = two_tensor_reply(1.0, 10, 101), two_tensor_reply(4.0, 30, 102)
    nan = two_tensor_reply(float("nan"), 10, 103)
    wrong_shape = two_tensor_reply(9.0, 10, 104, shape=(3, 3))
    wrong_key = two_tensor_reply(9.0, 10, 105, key="v")
    arrays, metrics = strategy.aggregate_train(1, [good1, nan, good2, wrong_shape, wrong_key])
    state = arrays.to_torch_state_dict()
    # (1*10 + 4*30) / 40 = 3.25, exactly; the three bad replies are left out
    assert torch.allclose(state["w"], torch.full((2, 2), 3.25))
    assert strategy.rejected == 3
    assert strategy.sc.train_metrics["clients"] == 2


@pytest.mark.parametrize("rule, expected", [("median", 2.5), ("trimmed-mean", 2.5)])
def test_robust_aggregation_ignores_an_outlier(rule, expected):
    strategy = TwoTensorBank(FedAvgStrategy, aggregation=rule, **{"trim-fraction": 0.25}).strategy
    replies = [two_tensor_reply(v, n, 101 + i) for i, (v, n) in enumerate([(1.0, 10), (2.0, 10), (3.0, 10), (1e6, 1000)])]
    arrays, _ = strategy.aggregate_train(1, replies)
    # median of (1, 2, 3, 1e6) = (2 + 3) / 2; trimmed mean (drop 1 each end) = (2 + 3) / 2;
    # the weighted mean would be ~970,000
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2, 2), expected))


# ----------------------------------------------------------------------------- FedProx
def _update_norm(model: torch.nn.Module, start: dict) -> float:
    return sum((p.detach() - start[k]).pow(2).sum() for k, p in model.named_parameters()).sqrt().item()


def test_proximal_term_pulls_the_local_model_toward_the_received_weights():
    """Same data, seed and steps: the larger FedProx's mu, the shorter the local update."""
    from mosaic_flwr.data import load_dataset
    from mosaic_flwr.core.training import train_local
    from mosaic_flwr.core.task import initial_model

    train, _ = load_dataset("synthetic")
    x, y = train.normalized()[:256], train.y[:256]
    cfg = build_config({"dataset": "synthetic"})
    norms = []
    for mu in (0.0, 1.0, 10.0):
        model = initial_model(cfg)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_local(model, x, y, steps=20, batch_size=32, lr=0.05, momentum=0.9,
                            proximal_mu=mu, seed=3)
        norms.append(_update_norm(model, start))
    assert norms[0] > norms[1] > norms[2] > 0, norms
    assert norms[2] < 0.8 * norms[0], norms


def test_fedprox_mu_reaches_the_clients_and_shortens_their_updates(tmp_path):
    """Through the server and the ClientApp: ``proximal-mu`` is in every train config, and
    the clients' updates (from the same weights, on the same data and seed) are shorter
    with a large mu."""
    from tests.support import run_inprocess

    def updates(name, **overrides):
        seen = {}

        def keep(grid, node, incoming, reply):
            if incoming.metadata.message_type == "train":
                sent = incoming.content["arrays"].to_torch_state_dict()
                got = reply.content["arrays"].to_torch_state_dict()
                seen[node] = sum((got[k] - v).pow(2).sum() for k, v in sent.items()
                                 if v.is_floating_point()).sqrt().item()
            return reply

        out = run_inprocess(tmp_path / name, grid_options={"hook": keep}, dataset="synthetic", alpha=1.0,
                            **{"num-server-rounds": 1, "local-steps": 10, "lr": 0.05, **overrides})
        configs = [m.content["config"] for m in out["grid"].sent if m.metadata.message_type == "train"]
        return seen, configs

    plain, plain_configs = updates("prox0", strategy="fedprox", **{"proximal-mu": 0.0})
    prox, prox_configs = updates("prox10", strategy="fedprox", **{"proximal-mu": 10.0})
    assert len(prox_configs) == 3 and all(c["proximal-mu"] == 10.0 for c in prox_configs)
    assert all(c["proximal-mu"] == 0.0 for c in plain_configs)
    assert set(prox) == set(plain) and len(prox) == 3
    for node in prox:
        assert prox[node] < 0.8 * plain[node], (node, prox[node], plain[node])


def test_the_train_handler_runs_the_hooks_the_method_declares_and_names_no_method(monkeypatch):
    """A method's client side is its ``Method.client`` (``ClientSide``): the ClientApp's
    ``train`` handler runs ``before`` on the received model, passes ``train_options`` to the
    local training and runs ``after`` on the trained model, for whichever method the run
    config names; its source names no method."""
    import dataclasses
    import inspect

    from flwr.app import ConfigRecord

    import client_app.app as client_module
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from mosaic_flwr.registry import ClientSide
    from mosaic_flwr.core.task import initial_model

    seen = []
    side = ClientSide(before=lambda s: seen.append(("before", float(s.model.head.bias.sum()))),
                      train_options=lambda s: {"logit_scale": torch.full((s.num_classes,), 0.5),
                                               "extra_loss": lambda m, xb, yb, logits: seen.append(
                                                   ("extra", "arrays" in s.content)) or logits.sum() * 0},
                      after=lambda s: seen.append(("after", float(s.model.head.bias.sum()))))
    monkeypatch.setitem(STRATEGIES, "fedavg", dataclasses.replace(FEDAVG, client=side))
    real = client_module.train_local
    monkeypatch.setattr(client_module, "train_local", lambda *a, **kw: seen.append(("train", kw["logit_scale"]))
                        or real(*a, **kw))
    as_flower_server()
    run_config = {**load_defaults(), "dataset": "synthetic", "strategy": "fedavg"}
    grid = InProcessGrid(client_module.app, run_config, 1)
    state = initial_model(build_config(run_config)).state_dict()
    config = {"lr": 0.05, "local-epochs": 0, "local-steps": 2, "batch-size": 16, "momentum": 0.9,
              "weight-decay": 0.0, "server-round": 1}
    msg = Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)}),
                  dst_node_id=grid.node_ids[0], message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_content(), reply.error
    assert [k for k, _ in seen] == ["before", "train", "extra", "extra", "after"]  # the regulariser each step
    assert torch.equal(seen[1][1], torch.full((10,), 0.5)) and seen[0][1] != seen[-1][1]  # it trained between
    assert seen[2][1] is True  # the hooks see the received message's records
    source = inspect.getsource(client_module)  # no method's module, nor its train-config keys
    assert not any(name in source for name in ("strategies.fedrs", "strategies.fedbn", "local-bn", "fedrs-alpha"))
