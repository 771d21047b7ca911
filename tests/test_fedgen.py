"""FedGen: the feature generator, the server's training of it on the clients' heads, the
clients' regulariser (through the real ClientApp), a whole in-process run with its checkpoint
and an exact resume, and the configurations it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

import client_app.app as client_module
from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.config import ConfigError, build_config, load_defaults
from mosaic_flwr.data import load_dataset
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.core.training import train_local
from mosaic_flwr.core.records import state_to_record
from mosaic_flwr.registry import STRATEGIES
from mosaic_flwr.methods.fedgen import (ALPHA, BETA, GEN_BATCH, GEN_RECORD, HIDDEN_DIM, LABELS, NOISE_DIM, SEED,
                                           FeatureGenerator, diversity_loss, label_shares, regulariser,
                                           round_weight, teacher_loss, train_generator)
from mosaic_flwr.registry import ClientStep
from mosaic_flwr.core.task import initial_model
from tests.support import as_flower_server, metric_rows, run_inprocess

C, D = 10, 16
SYNTH = {"dataset": "synthetic"}
TINY = {**SYNTH, "strategy": "fedgen", "alpha": 0.3, "num-server-rounds": 3, "local-steps": 4, "batch-size": 16,
        "lr": 0.05, "fedgen.gen-steps": 5, "fedgen.gen-batch-size": 8, "fedgen.hidden-dim": 32,
        "fedgen.noise-dim": 8}


# ----------------------------------------------------------------------------- the generator
def test_the_generator_maps_noise_and_labels_to_features_deterministically():
    torch.manual_seed(0)
    g = FeatureGenerator(C, D, noise_dim=8, hidden_dim=32).eval()
    y, noise = g.draw(torch.tensor([2, 5, 7]), 6, torch.Generator().manual_seed(1))
    assert noise.shape == (6, 8) and set(y.tolist()) <= {2, 5, 7} and 0 <= noise.min() and noise.max() < 1
    out = g(y, noise)
    assert out.shape == (6, D) and torch.isfinite(out).all()
    again = g.draw(torch.tensor([2, 5, 7]), 6, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], y) and torch.equal(again[1], noise) and torch.equal(g(*again), out)
    other = y.clone()
    other[0] = (y[0] + 1) % C
    assert not torch.equal(g(other, noise)[0], out[0])  # the label conditions the output


def test_label_shares_and_the_weighted_teacher_loss():
    counts = torch.tensor([[3, 0, 1], [1, 0, 3]])
    shares = label_shares(counts)
    assert torch.allclose(shares, torch.tensor([[0.75, 0.0, 0.25], [0.25, 0.0, 0.75]]))
    feats, y = torch.randn(5, 4), torch.tensor([0, 2, 2, 0, 2])
    w, b = torch.randn(2, 3, 4), torch.randn(2, 3)
    loss = teacher_loss(feats, y, w, b, shares)
    by_hand = sum((torch.nn.functional.cross_entropy(feats @ w[k].T + b[k], y, reduction="none") * shares[k, y]).mean()
                  for k in range(2))
    assert torch.allclose(loss, by_hand)
    assert diversity_loss(torch.rand(6, 3), torch.randn(6, 4)) <= 1.0


def test_the_servers_generator_training_lowers_the_heads_weighted_cross_entropy():
    """Two clients' heads that each know half the classes: after training, the heads
    (weighted per label by the clients' shares) classify the generated features as asked."""
    torch.manual_seed(0)
    weights, biases = torch.randn(2, C, D), torch.zeros(2, C)
    counts = torch.zeros(2, C, dtype=torch.long)
    counts[0, :6], counts[1, 4:] = 50, 50   # class 4, 5 shared; nobody lacks a class
    counts[1, 9] = 0                        # ... but class 9: nobody holds it, never drawn
    g = FeatureGenerator(C, D, noise_dim=8, hidden_dim=64)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)

    def measured() -> float:
        g.eval()
        y, noise = g.draw(torch.arange(9), 256, torch.Generator().manual_seed(5))
        with torch.no_grad():
            return float(teacher_loss(g(y, noise), y, weights, biases, label_shares(counts)))

    before = measured()
    stats = train_generator(g, opt, weights, biases, counts, steps=40, batch_size=32, div_weight=1.0, seed=3)
    after = measured()
    assert after < 0.5 * before and stats["fedgen-teacher-last"] < stats["fedgen-teacher-first"]
    # deterministic: the same start and seed give the same generator
    twins = []
    for _ in range(2):
        torch.manual_seed(1)
        twin = FeatureGenerator(C, D, noise_dim=8, hidden_dim=64)
        train_generator(twin, torch.optim.Adam(twin.parameters(), lr=1e-2), weights, biases, counts, steps=3,
                        batch_size=8, div_weight=1.0, seed=4)
        twins.append(twin.state_dict())
    assert all(torch.equal(twins[0][k], twins[1][k]) for k in twins[0])


def test_round_weights_decay_and_zero_stays_zero():
    assert round_weight(10.0, 0.98, 1) == 10.0
    assert round_weight(10.0, 0.98, 3) == pytest.approx(10.0 * 0.98**2)
    assert round_weight(10.0, 0.5, 100) == 1e-4 and round_weight(0.0, 0.98, 2) == 0.0


# ----------------------------------------------------------------------------- client side
def _client(n: int = 64, classes: int = 4):
    train, _ = load_dataset("synthetic")
    keep = torch.nonzero(train.y < classes).flatten()[:n]
    return train.normalized()[keep], train.y[keep]


def _config(alpha=10.0, beta=10.0, server_round=2, **extra) -> dict:
    return {"lr": 0.05, "local-epochs": 0, "local-steps": 4, "batch-size": 16, "momentum": 0.9,
            "weight-decay": 0.0, "server-round": server_round, ALPHA: alpha, BETA: beta, LABELS: list(range(C)),
            NOISE_DIM: 8, HIDDEN_DIM: 32, GEN_BATCH: 8, SEED: 7, **extra}


def _generator(seed: int, feature_dim: int) -> FeatureGenerator:
    torch.manual_seed(seed)
    g = FeatureGenerator(C, feature_dim, noise_dim=8, hidden_dim=32)
    g.train()(torch.randint(C, (16,)), torch.rand(16, 8))  # running statistics move off their start
    return g


def _trained(model, x, y, config, content) -> torch.nn.Module:
    model = copy.deepcopy(model)
    step = ClientStep(model, x, y, C, config, None, content)
    train_local(model, x, y, steps=4, batch_size=16, lr=0.05, seed=1, **regulariser(step))
    return model


def test_the_client_regulariser_uses_the_received_generator_and_is_off_without_one():
    cfg = build_config({**load_defaults(), **SYNTH})
    torch.manual_seed(0)
    model, (x, y) = initial_model(cfg), _client()
    plain = _trained(model, x, y, _config(), RecordDict({}))         # no generator: plain training
    reference = copy.deepcopy(model)
    train_local(reference, x, y, steps=4, batch_size=16, lr=0.05, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), reference.state_dict().values()))
    with_g = {s: RecordDict({GEN_RECORD: state_to_record(_generator(s, model.feature_dim).state_dict())})
              for s in (1, 2)}
    a, again, b = (_trained(model, x, y, _config(), with_g[s]) for s in (1, 1, 2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(a.head.weight, plain.head.weight)          # the regulariser acted
    assert not torch.equal(a.head.weight, b.head.weight)              # ... with the generator it received
    # both weights at 0: exactly plain training
    off = _trained(model, x, y, _config(alpha=0.0, beta=0.0), with_g[1])
    assert all(torch.equal(p, q) for p, q in zip(off.state_dict().values(), plain.state_dict().values()))


def test_the_regulariser_gives_finite_gradients_to_the_model_only():
    cfg = build_config({**load_defaults(), **SYNTH})
    torch.manual_seed(0)
    model, (x, y) = initial_model(cfg), _client(16)
    g = _generator(3, model.feature_dim)
    content = RecordDict({GEN_RECORD: state_to_record(g.state_dict())})
    for alpha, beta in ((10.0, 0.0), (0.0, 10.0), (10.0, 10.0)):
        extra = regulariser(ClientStep(model, x, y, C, _config(alpha, beta), None, content))["extra_loss"]
        for degenerate in (True, False):
            torch.manual_seed(4)
            with torch.no_grad():   # a zero head: uniform predictions and targets, a zero KL term
                model.head.weight.copy_(torch.zeros_like(model.head.weight) if degenerate
                                        else torch.randn_like(model.head.weight))
                model.head.bias.zero_()
            model.zero_grad()
            loss = extra(model, x, y, model(x))
            loss.backward()
            assert torch.isfinite(loss) and loss >= 0
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
            if not degenerate:
                assert loss > 0 and model.head.weight.grad.abs().sum() > 0
            assert all(p.grad is None for p in extra.generator.parameters())   # the generator is frozen
            assert not extra.generator.training                                 # its BatchNorm: running statistics


def test_the_train_handler_applies_the_regulariser_only_for_fedgen_with_the_generator_it_received():
    """Through the real ClientApp: under strategy fedgen a message with a generator trains a
    different model than one without (which is plain FedAvg training); under fedavg the same
    message's generator is ignored."""
    as_flower_server()
    replies = {}
    for strategy in ("fedgen", "fedavg"):
        run_config = {**load_defaults(), **SYNTH, "strategy": strategy}
        grid = InProcessGrid(client_module.app, run_config, 1)
        model = initial_model(build_config(run_config))
        state = model.state_dict()
        for name, extra in (("plain", {}), ("g1", {GEN_RECORD: state_to_record(_generator(1, model.feature_dim).state_dict())}),
                            ("g2", {GEN_RECORD: state_to_record(_generator(2, model.feature_dim).state_dict())})):
            msg = Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(_config()), **extra}),
                          dst_node_id=grid.node_ids[0], message_type="train")
            (reply,) = grid.send_and_receive([msg])
            assert reply.has_content(), reply.error
            replies[strategy, name] = reply.content["arrays"].to_torch_state_dict()["head.weight"]
    assert not torch.equal(replies["fedgen", "g1"], replies["fedgen", "plain"])
    assert not torch.equal(replies["fedgen", "g1"], replies["fedgen", "g2"])
    assert torch.equal(replies["fedgen", "plain"], replies["fedavg", "plain"])
    assert torch.equal(replies["fedavg", "g1"], replies["fedavg", "plain"])


# ----------------------------------------------------------------------------- whole runs
def test_fedgen_runs_in_process_and_checkpoints_its_generator(tmp_path):
    out = run_inprocess(tmp_path, **TINY)
    grid, run_dir = out["grid"], out["dir"]
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    rounds = [int(m.content["config"]["server-round"]) for m in sent]
    assert rounds == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    has_generator = [GEN_RECORD in m.content.array_records for m in sent]
    assert has_generator == [r > 1 for r in rounds]            # from the round after its first training
    configs = [m.content["config"] for m in sent]
    assert configs[0][ALPHA] == 10.0 and configs[-1][ALPHA] == pytest.approx(10.0 * 0.98**2)
    assert len({c[SEED] for c in configs}) == 9                # one seed per client and round
    rows = metric_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["clients"] == 3 and r["fedgen-teacher-last"] >= 0 for r in rows[1:])
    state = load_checkpoint(run_dir)   # weights_only: the generator and its optimiser as plain tensors
    assert state["round"] == 3 and state["strategy"]["fedgen"]["rounds"] == 3
    assert set(state["strategy"]["fedgen"]["generator"]) >= {"fc.weight", "bn.running_mean", "out.weight"}
    last = sent[-1].content.array_records[GEN_RECORD].to_torch_state_dict()
    assert not torch.equal(last["out.weight"], state["strategy"]["fedgen"]["generator"]["out.weight"])  # trained after




# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("values, message", [
    ({"client-models": "cnn_small,cnn_wide"}, "client-models: fedgen trains one generator for one feature space"),
    ({"client-capacities": "1,0.5"}, "client-capacities: fedgen needs every client's features at full width"),
    ({"fedgen.gen-batch-size": 1}, "fedgen.gen-batch-size: must be >= 2"),
    ({"fedgen.decay": 0.0}, "fedgen.decay: must be in (0, 1]"),
])
def test_fedgen_refuses_what_it_cannot_run(values, message):
    with pytest.raises(ConfigError) as info:
        build_config({**SYNTH, "strategy": "fedgen", **values})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert "fedgen" in STRATEGIES
