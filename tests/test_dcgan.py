"""``mosaic.generator='dcgan'``: the authors' unconditional DCGAN (models), its client-side training,
the server's sampler over such generators, the client round, and the configurations refused
with it. The run end to end is in ``test_e2e_quick.py``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mosaic_flwr.config import ConfigError, build_config
from mosaic_flwr.data import dataset_info
from mosaic_flwr.models.generators import (DCGANDiscriminator, DCGANGenerator, discriminator_for, generator_for,
                                           is_unconditional, normalised_range, sample, sample_unconditional)
from mosaic_flwr.methods.mosaic.client import mosaic_client_round
from mosaic_flwr.methods.mosaic.dcgan import class_coverage, train_dcgan
from mosaic_flwr.distill.samplers import UnconditionalSampler
from mosaic_flwr.core.task import initial_model

INFO = dataset_info("synthetic")  # 28x28x1, 10 classes


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int = 32, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % classes


class Constant(nn.Module):
    """A classifier that always predicts ``k`` (and has a weight, to check it is not trained)."""

    def __init__(self, k: int, num_classes: int = 10):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_classes))
        self.k = k

    def forward(self, x):
        out = x.flatten(1)[:, :1] * 0 + self.w
        return out + 10 * nn.functional.one_hot(torch.tensor(self.k), len(self.w)).float()


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("channels,size,mean,std", [(1, 28, (0.1307,), (0.3081,)),
                                                    (3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))])
def test_shapes_and_output_range(channels, size, mean, std):
    torch.manual_seed(0)
    g, d = DCGANGenerator(channels, size, mean, std, width=8), DCGANDiscriminator(channels, size, width=8)
    x = g(3 * torch.randn(6, g.nz))  # large noise: the tanh saturates somewhere
    assert x.shape == (6, channels, size, size) and g.nz == 100
    low, high = normalised_range(mean, std)
    assert (x >= low.view(1, -1, 1, 1) - 1e-5).all() and (x <= high.view(1, -1, 1, 1) + 1e-5).all()
    scores = d(x)
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    assert not any(k in ("mean", "std") for k in g.state_dict())  # fixed by the data set, not uploaded
    assert is_unconditional(g) and not is_unconditional(generator_for(INFO))


def test_the_authors_sizes_at_32x32x3():
    """Width 64 at CIFAR's shape is their ``utils/dcgan_model.py`` parameter for parameter."""
    g, d = DCGANGenerator(3, 32, (0.5,) * 3, (0.5,) * 3), DCGANDiscriminator(3, 32)
    assert sum(p.numel() for p in g.parameters()) == 3_573_824
    assert sum(p.numel() for p in d.parameters()) == 2_759_424


def test_dcgan_init_and_refusals():
    torch.manual_seed(0)
    g = DCGANGenerator(1, 28, (0.5,), (0.5,), width=16)
    conv = g.net[0].weight
    assert abs(conv.std().item() - 0.02) < 0.002 and abs(g.net[1].weight.mean().item() - 1) < 0.01
    with pytest.raises(ValueError, match="image size"):
        DCGANGenerator(1, 30, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="width"):
        DCGANDiscriminator(1, 28, width=0)
    with pytest.raises(ValueError, match="unknown kind"):
        generator_for(INFO, "gan")
    with pytest.raises(ValueError, match="unconditional"):
        sample(g, torch.tensor([0, 1]), seed=0)


def test_generator_for_builds_what_the_server_loads():
    g, d = generator_for(INFO, "dcgan", 4), discriminator_for(INFO, "dcgan", 4)
    assert isinstance(g, DCGANGenerator) and g.width == 4 and isinstance(d, DCGANDiscriminator)
    h = generator_for(INFO, "dcgan", 4)
    h.load_state_dict(g.state_dict())  # the same keys and shapes
    assert torch.equal(sample_unconditional(g, 5, seed=3), sample_unconditional(h, 5, seed=3))


def test_sample_unconditional_is_seeded_batched_and_restores_the_mode():
    g = generator_for(INFO, "dcgan", 4).train()
    a = sample_unconditional(g, 7, seed=1)
    assert a.shape == (7, 1, 28, 28) and g.training
    assert torch.allclose(sample_unconditional(g, 7, rng=torch.Generator().manual_seed(1), batch_size=3), a,
                          atol=1e-6)
    assert not torch.equal(sample_unconditional(g, 7, seed=2), a)
    assert sample_unconditional(g, 0, seed=0).shape == (0, 1, 28, 28)


# ----------------------------------------------------------------------------- training
def test_training_moves_g_and_d_lowers_d_loss_and_leaves_the_classifier_alone():
    torch.manual_seed(0)
    x, y = _data()
    g, d = generator_for(INFO, "dcgan", 4), discriminator_for(INFO, "dcgan", 4)
    clf = initial_model(build_config({"dataset": "synthetic"})).train()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    g0 = [p.detach().clone() for p in g.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    stats = train_dcgan(g, d, clf, x, y, steps=20, batch_size=8, seed=0)
    # the guide: same weights and buffers, mode and flags restored
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    assert clf.training and all(p.requires_grad for p in clf.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    # D starts at BCE(0.5) on both halves, 2 log 2; it learns to tell the batches apart
    assert stats["d_loss"] < 2 * math.log(2)
    assert all(math.isfinite(stats[k]) for k in ("g_loss", "adv", "div"))
    assert -math.log(10) - 1e-3 <= stats["div"] <= 0  # sum w log w over 10 classes
    assert stats["classes"] == [0, 1, 2, 3] and 0 <= stats["coverage"] <= 1


def test_training_is_reproducible_and_zero_steps_only_evaluates():
    x, y = _data()
    clf = initial_model(build_config({"dataset": "synthetic"}))
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        g, d = generator_for(INFO, "dcgan", 4), discriminator_for(INFO, "dcgan", 4)
        train_dcgan(g, d, clf, x, y, steps=3, batch_size=4, seed=5)
        states.append(g.state_dict())
    assert all(torch.equal(states[0][k], v) for k, v in states[1].items())
    stats = train_dcgan(g, d, clf, x, y, steps=0, batch_size=4)
    assert math.isnan(stats["d_loss"]) and stats["steps"] == 0
    with pytest.raises(ValueError, match="batch_size"):
        train_dcgan(g, d, clf, x, y, steps=1, batch_size=1)


def test_class_coverage():
    g = generator_for(INFO, "dcgan", 4)
    assert class_coverage(g, Constant(3), [3, 5], n=16) == {"coverage": 0.5, "held-share": 1.0}
    assert class_coverage(g, Constant(7), [3, 5], n=16) == {"coverage": 0.0, "held-share": 0.0}


# ----------------------------------------------------------------------------- server side
def test_unconditional_sampler_draws_the_same_number_from_each_and_labels_by_the_teacher():
    gens = [generator_for(INFO, "dcgan", 4) for _ in range(3)]
    seen = []

    def label(x):
        seen.append(x)
        return torch.arange(len(x)) % 10

    s = UnconditionalSampler(gens, 2, seed=4, label=label)
    x, y, owners = s.draw()
    assert x.shape == (6, 1, 28, 28) and s.batch_size == 6
    assert owners.tolist() == [0, 0, 1, 1, 2, 2] and y.tolist() == [0, 1, 2, 3, 4, 5] and seen[-1] is x
    again = UnconditionalSampler(gens, 2, seed=4, label=label)(0)[0]
    assert torch.equal(again, x) and not torch.equal(s(1)[0], x)
    assert all(not g.training for g in gens)
    with pytest.raises(ValueError):
        UnconditionalSampler(gens, 0, label=label)


# ----------------------------------------------------------------------------- the client round
def test_client_round_trains_and_uploads_the_dcgan():
    cfg = build_config({"dataset": "synthetic"})
    x, y = _data(40)
    gen = {"steps": 2, "batch-size": 4, "lr": 5e-4, "ce-weight": 1.0, "div-weight": 0.3,
           "generator": "dcgan", "dcgan-width": 4}
    unseen = _data(40, classes=10, seed=1)
    out = mosaic_client_round(initial_model(cfg), x, y, INFO, train={"steps": 1, "batch_size": 8}, seed=0,
                              device=torch.device("cpu"), distill_round=True, proto_k=2, gen=gen,
                              audit_unseen=unseen)
    template = generator_for(INFO, "dcgan", 4).state_dict()
    assert out.generator.keys() == template.keys()
    assert all(out.generator[k].shape == v.shape for k, v in template.items())
    assert 0 <= out.metrics["gen-coverage"] <= 1 and out.metrics["gen-seconds"] > 0
    assert "gen-fidelity" not in out.metrics
    # the audit: prototypes audited, the (unconditional) generator skipped
    assert "privacy-proto-count" in out.metrics
    assert not any(k.startswith("privacy-dcr") or k.startswith("privacy-mia") for k in out.metrics)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("extra", [{"mosaic.meta-data": "generated"}, {"mosaic.meta-data": "both"}, {"mosaic.meta-data": "screened"},
                                   {"client-capacities": "1.0,0.5"}])  # 'auto' is 'screened' there
def test_dcgan_with_a_meta_model_on_generator_samples_is_refused(extra):
    with pytest.raises(ConfigError, match=r"^mosaic.generator: 'dcgan' is unconditional") as info:
        build_config({"strategy": "mosaic", "mosaic.generator": "dcgan", **extra})
    assert "\n" not in str(info.value)
    build_config({"strategy": "mosaic", "mosaic.generator": "dcgan", "mosaic.meta": False, **extra})  # no meta model
    build_config({"strategy": "mosaic", **extra})  # the conditional generator


def test_dcgan_accepted_settings_and_dp_refused():
    assert build_config({}).of('mosaic').generator == "conditional" and build_config({}).of('mosaic').dcgan_width == 64
    for extra in ({}, {"mosaic.meta-data": "clients"}, {"strategy": "feddf-gen"}):
        assert build_config({"mosaic.generator": "dcgan", **extra}).of('mosaic').generator == "dcgan"
    with pytest.raises(ConfigError, match=r"^mosaic.generator: 'dcgan' cannot train under DP"):
        build_config({"strategy": "mosaic", "mosaic.generator": "dcgan", "dp.epsilon": 8.0})
    with pytest.raises(ConfigError, match=r"^mosaic.generator: unknown value"):
        build_config({"mosaic.generator": "unconditional"})
