"""FedRS (restricted softmax): the pure parts exactly, the train config, and an in-process run
on synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mosaic_flwr.config import build_config
from mosaic_flwr.data import load_dataset
from mosaic_flwr.mosaic.training import restricted_logits, restriction_scale, train_local
from mosaic_flwr.strategies import STRATEGIES
from mosaic_flwr.strategies.base import ServerContext
from mosaic_flwr.strategies.fedrs import BankFedRS
from mosaic_flwr.task import initial_model
from tests.test_e2e_inprocess import run_inprocess

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


def test_fedrs_accepts_model_heterogeneity():
    build_config({**SYNTH, "strategy": "fedrs", "client-models": "cnn_small,resnet8",
                  "client-capacities": "1,0.5"})
    assert "fedrs" in STRATEGIES


def test_fedrs_alpha_goes_into_every_train_config():
    cfg = build_config({**SYNTH, "strategy": "fedrs", "fedrs.alpha": 0.25})
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None, test_y=None,
                       results=None, num_nodes=3)
    assert BankFedRS(sc).train_config()["fedrs-alpha"] == 0.25


# ----------------------------------------------------------------------------- in-process runs
TINY = {**SYNTH, "alpha": 0.3, "num-server-rounds": 2, "local-steps": 4, "batch-size": 16, "lr": 0.05}


def test_fedrs_runs_in_process(tmp_path):
    out = run_inprocess(tmp_path, strategy="fedrs", **{**TINY, "fedrs.alpha": 0.2})
    configs = [m.content["config"] for m in out["grid"].sent if m.metadata.message_type == "train"]
    assert len(configs) == 6 and all(c["fedrs-alpha"] == 0.2 for c in configs)
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["clients"] == 3 for r in rows[1:])
