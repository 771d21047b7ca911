"""FedFTG and DFRD (a conditional generator the server trains against the clients' models): the
shared pieces exactly (label draws, EMA update, transferability term), each method's teacher,
labels and generator state through its strategy, and in-process runs on synthetic data (one
under model heterogeneity; DFRD's crash in the middle and resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.config import ConfigError, build_config
from mosaic_flwr.data import dataset_info, load_dataset
from mosaic_flwr.distill.generators import (BlockSampler, boundary_mask, diversity_loss, ema_update,
                                                 fidelity_loss, generate, generator_steps, module_state,
                                                 new_generator, proportional_labels, sampled_labels,
                                                 transferability_loss)
from mosaic_flwr.core.training import train_local
from mosaic_flwr.core.records import ClientInfo
from mosaic_flwr.registry import STRATEGIES
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.methods.dfrd import DFRDStrategy
from mosaic_flwr.distill.server import ClientModel
from mosaic_flwr.methods.fedftg import FedFTGStrategy
from mosaic_flwr.core.task import Arch, initial_model
from tests.support import as_flower_server, equal_states, metric_rows, run_inprocess

INFO = dataset_info("synthetic")
C = INFO.num_classes
SYNTH = {"dataset": "synthetic"}
NODES = [100, 101, 102]
# Class totals 4, 2, 2, 2 (sum 10): 30 labels drawn in proportion are exactly 12, 6, 6, 6.
COUNTS = torch.zeros(3, C, dtype=torch.long)
COUNTS[0, 0], COUNTS[0, 1] = 3, 2
COUNTS[1, 0], COUNTS[1, 2], COUNTS[1, 3] = 1, 2, 2


def _strategy(cls, **overrides):
    as_flower_server()
    name = {FedFTGStrategy: "fedftg", DFRDStrategy: "dfrd"}[cls]
    cfg = build_config({**SYNTH, "strategy": name, "kd.batch-size": 8, "kd.steps": 4,
                        "mosaic.meta-samples-per-class": 2, **overrides})
    clients = {n: ClientInfo(n, i, COUNTS[i], cfg.model, 1.0) for i, n in enumerate(NODES)}
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None, test_y=None,
                       results=None, num_nodes=len(NODES), clients=clients)
    return cls(sc)


def _clients(strategy, counts=COUNTS) -> list[ClientModel]:
    """The round's client models: differently initialised, each with its label counts."""
    cfg = strategy.cfg
    return [ClientModel(n, Arch(cfg.model), initial_model(cfg.replace(seed=i)).state_dict(), 10.0, 0.0, counts[i])
            for i, n in enumerate(NODES[:len(counts)])]


def _source(strategy, server_round: int, clients, students=None):
    report: dict = {}
    teacher = strategy.teacher_for(server_round, clients, report)
    students = students or {strategy.cfg.model: initial_model(strategy.cfg)}
    return strategy.source_for(server_round, clients, teacher, students, report), report


# ----------------------------------------------------------------------------- labels
def test_proportional_labels_are_the_class_proportions_exactly_in_random_order():
    rng = torch.Generator().manual_seed(0)
    y = proportional_labels(torch.tensor([3, 0, 1, 0, 6]), 20, rng)
    assert torch.bincount(y, minlength=5).tolist() == [6, 0, 2, 0, 12]
    # Thirds: the rounding remainder goes to a class that has examples, never to the empty last one.
    assert torch.bincount(proportional_labels(torch.tensor([1, 1, 1, 0]), 10, rng), minlength=4).tolist() == [3, 3, 4, 0]
    a, b = (proportional_labels(torch.tensor([5, 5]), 50, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, a.sort().values)   # shuffled, by the seed alone
    with pytest.raises(ValueError, match="positive total"):
        proportional_labels(torch.zeros(3), 5, rng)


def test_sampled_labels_follow_the_proportions_and_never_draw_an_empty_class():
    y = sampled_labels(torch.tensor([1, 0, 3]), 4000, torch.Generator().manual_seed(0))
    counts = torch.bincount(y, minlength=3)
    assert counts[1] == 0 and abs(counts[2].item() / 4000 - 0.75) < 0.03


def test_block_sampler_renews_its_batch_every_interval_steps():
    made = []
    sampler = BlockSampler(3, lambda block: made.append(block) or (torch.full((2,), float(block)), torch.zeros(2)))
    batches = [sampler(step) for step in range(7)]
    assert made == [0, 1, 2] and batches[0] is batches[2] and batches[3] is not batches[2]
    assert [b[0][0].item() for b in batches] == [0, 0, 0, 1, 1, 1, 2]


def test_diversity_loss_is_smaller_for_outputs_that_spread_with_their_noise():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    spread, collapsed = torch.cat([z, z], 1), torch.zeros(16, 16)
    for metric in ("l1", "l2"):
        assert diversity_loss(z, spread, metric) < diversity_loss(z, collapsed, metric) == 1.0
    x = torch.randn(40, 1, 28, 28, requires_grad=True)
    diversity_loss(torch.randn(40, 8), x, "l2").backward()   # > 25 rows: cdist's matrix path
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- FedFTG
def test_fedftg_teacher_weights_each_class_by_the_clients_share_of_it():
    strategy = _strategy(FedFTGStrategy)
    counts = torch.zeros(2, C, dtype=torch.long)
    counts[0, 0], counts[0, 2] = 10, 4            # class 0: client 0 only; class 2: 40 / 60
    counts[1, 1], counts[1, 2] = 10, 6            # class 1: client 1 only; classes 3..9: nobody (1/2 each)
    clients = _clients(strategy, counts)
    teacher = strategy.teacher_for(1, clients, {})
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = teacher(x)
        za, zb = (strategy.client_module(c.arch, c.state)(x) for c in clients)
    assert torch.equal(t[:, 0], za[:, 0]) and torch.equal(t[:, 1], zb[:, 1])
    assert torch.allclose(t[:, 2], 0.4 * za[:, 2] + 0.6 * zb[:, 2], atol=1e-6)
    assert torch.allclose(t[:, 3:], 0.5 * (za[:, 3:] + zb[:, 3:]), atol=1e-6)
    plain = 0.5 * (za + zb)                        # what a plain average would give
    assert not torch.allclose(t[:, :3], plain[:, :3], atol=1e-3)


@pytest.mark.parametrize("cls", [FedFTGStrategy, DFRDStrategy])
def test_the_teacher_weights_a_generated_samples_whole_output_by_its_requested_class(cls):
    """The authors' form (``teacher-weighting='sample'``, the default): sample ``b`` asked for
    class ``y_b`` is ``sum_i share_i(y_b) * z_i[b]``; on real images (no requested class) and
    with ``'class'`` the class-by-class form; the KD loop and the generator loss ask with labels."""
    name = {FedFTGStrategy: "fedftg", DFRDStrategy: "dfrd"}[cls]
    counts = torch.zeros(2, C, dtype=torch.long)
    counts[0, 0], counts[0, 2] = 10, 4
    counts[1, 1], counts[1, 2] = 10, 6
    strategy = _strategy(cls)
    clients = _clients(strategy, counts)
    teacher = strategy.teacher_for(1, clients, {})
    assert teacher.conditional
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 5])
    with torch.no_grad():
        t = teacher(x, y)
        za, zb = (strategy.client_module(c.arch, c.state)(x) for c in clients)
        column = teacher(x)
    assert torch.equal(t[0], za[0]) and torch.equal(t[1], zb[1])           # the holder's whole vector
    assert torch.allclose(t[2], 0.4 * za[2] + 0.6 * zb[2], atol=1e-6)
    assert torch.allclose(t[3], 0.5 * (za[3] + zb[3]), atol=1e-6)           # nobody holds class 5
    assert torch.allclose(t[torch.arange(4), y], column[torch.arange(4), y], atol=1e-6)   # same asked logit
    assert not torch.allclose(t, column, atol=1e-3)
    with pytest.raises(ValueError, match="requested labels"):
        teacher(x, y[:2])
    xg = x.clone().requires_grad_(True)
    teacher(xg, y).sum().backward()                                         # a generator trains through it
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # The KD loop gives the conditional teacher the requested labels.
    from mosaic_flwr.distill.kd import distill_many
    seen = []

    def spy(xb, yb=None):
        seen.append(yb)
        return teacher(xb, yb)
    spy.conditional = True
    distill_many({"s": initial_model(strategy.cfg)}, spy, lambda step: (x, y), steps=2, lr=1e-3, a=0.8, b=1.0,
                 T=1.0, student_bn="eval", device="cpu")
    assert len(seen) == 2 and all(torch.equal(s, y) for s in seen)
    # 'class': the class-by-class form even with labels.
    plain = _strategy(cls, **{f"{name}.teacher-weighting": "class"}).teacher_for(1, clients, {})
    assert not plain.conditional
    with torch.no_grad():
        assert torch.allclose(plain(x, y), column, atol=1e-6)
    with pytest.raises(ConfigError, match="teacher-weighting"):
        build_config({**SYNTH, "strategy": name, f"{name}.teacher-weighting": "samples"})


def test_fedftg_draws_the_rounds_labels_in_proportion_and_keeps_its_generator():
    strategy = _strategy(FedFTGStrategy, **{"kd.steps": 6, "kd.batch-size": 10, "fedftg.gen-interval": 2,
                                            "fedftg.gen-steps": 2})
    clients = _clients(strategy)
    source, report = _source(strategy, 1, clients)
    initial = module_state(strategy.generator)
    batches = [source.sample(step) for step in range(6)]
    assert batches[0] is batches[1] and batches[1] is not batches[2]   # a new batch every 2 KD steps
    labels = torch.cat([y for _, y in batches[::2]])
    assert torch.bincount(labels, minlength=C).tolist() == [12, 6, 6, 6] + [0] * (C - 4)
    assert {"gen-train-fidelity", "gen-train-hardness", "gen-train-diversity"} <= set(report)
    assert report["gen-train-hardness"] <= 0                            # minus a distance
    trained = module_state(strategy.generator)
    assert not equal_states(trained, initial)
    # The next round trains the same generator on; the checkpoint holds it.
    generator = strategy.generator
    _source(strategy, 2, clients)
    assert strategy.generator is generator and equal_states(module_state(generator), trained)
    fresh = _strategy(FedFTGStrategy)
    fresh.load_state_dict(strategy.state_dict())
    assert equal_states(module_state(fresh.generator), trained)


def test_fedftg_generator_trains_against_every_familys_student():
    strategy = _strategy(FedFTGStrategy)
    students = {"cnn_small": initial_model(strategy.cfg),
                "cnn_wide": initial_model(strategy.cfg.replace(model="cnn_wide"))}
    for s in students.values():
        s.train()
    source, report = _source(strategy, 1, _clients(strategy), students)
    x, y = source.sample(0)
    assert x.shape == (8, 1, 28, 28) and torch.isfinite(x).all()
    assert all(s.training and all(p.requires_grad for p in s.parameters()) for s in students.values())
    assert all(p.grad is None for s in students.values() for p in s.parameters())   # held still


# ----------------------------------------------------------------------------- DFRD
def test_ema_update_is_decay_times_old_plus_one_minus_decay_times_new_exactly():
    g, ema = new_generator(INFO, 1), new_generator(INFO, 2)
    g(torch.randn(4, g.nz), torch.arange(4))      # BatchNorm statistics and batch counter move
    old, new = module_state(ema), module_state(g)
    ema_update(ema, g, 0.75)
    for k, v in ema.state_dict().items():
        expected = 0.75 * old[k] + (1 - 0.75) * new[k] if v.is_floating_point() else new[k]
        assert torch.equal(v, expected), k
    assert not torch.equal(ema.state_dict()["fc.weight"], new["fc.weight"])
    ema_update(ema, g, 0.0)
    assert equal_states(module_state(ema), new)


def test_dfrd_ema_generator_follows_its_generator_and_persists_across_rounds():
    decay = 0.8
    strategy = _strategy(DFRDStrategy, **{"dfrd.ema-decay": decay, "dfrd.gen-interval": 2, "dfrd.gen-steps": 2})
    clients = _clients(strategy)
    source, report = _source(strategy, 1, clients)
    assert equal_states(module_state(strategy.ema), module_state(strategy.generator))   # starts as a copy
    for block in range(2):
        before = module_state(strategy.ema)
        x, y = source.sample(2 * block)
        new = module_state(strategy.generator)
        for k, v in strategy.ema.state_dict().items():
            expected = decay * before[k] + (1 - decay) * new[k] if v.is_floating_point() else new[k]
            assert torch.equal(v, expected), (block, k)
        assert x.shape[0] == y.shape[0] == 2 * 8        # the generator's samples and the EMA copy's
    assert {"gen-train-fidelity", "gen-train-transfer", "gen-train-diversity", "gen-train-boundary"} <= set(report)
    assert report["gen-train-transfer"] <= 0 and 0 <= report["gen-train-boundary"] <= 1
    ema, gen = module_state(strategy.ema), module_state(strategy.generator)
    assert not equal_states(ema, gen)
    # Through the checkpoint: both generators exactly.
    fresh = _strategy(DFRDStrategy, **{"dfrd.ema-decay": decay})
    fresh.load_state_dict(strategy.state_dict())
    assert equal_states(module_state(fresh.generator), gen) and equal_states(module_state(fresh.ema), ema)
    # The next round goes on from both (the EMA copy is not reset to the generator).
    source2, _ = _source(fresh, 2, clients)
    assert equal_states(module_state(fresh.ema), ema) and equal_states(module_state(fresh.generator), gen)
    source2.sample(0)
    assert not equal_states(module_state(fresh.ema), ema)


def test_transferability_is_minus_the_kl_on_boundary_samples_only():
    t = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0]])
    s = torch.tensor([[0, 3.0, 0], [0, 3.0, 0], [3.0, 0, 0]])
    y = torch.tensor([0, 1, 1])   # 0: teacher right, student wrong; 1: both right; 2: teacher wrong
    assert boundary_mask(t, s, y).tolist() == [True, False, False]
    kl0 = F.kl_div(F.log_softmax(s[0], 0), F.log_softmax(t[0], 0), reduction="sum", log_target=True)
    assert transferability_loss(t, s, y).item() == pytest.approx(-kl0.item() / 3, rel=1e-6)
    assert transferability_loss(t, t, y).item() == 0.0   # no boundary sample: no term


def test_training_on_transferability_raises_teacher_student_disagreement():
    """A teacher that knows every class, a student that knows classes 0-4: the generator
    trained with DFRD's transferability term beside fidelity ends with samples on which the
    student disagrees with the teacher more than with fidelity alone (and than untrained)."""
    cfg = build_config(SYNTH)
    train, _ = load_dataset("synthetic")
    x, y = train.normalized(), train.y
    teacher = initial_model(cfg)
    train_local(teacher, x, y, steps=40, batch_size=32, lr=0.05, momentum=0.9, seed=1)
    student = initial_model(cfg.replace(seed=3))
    train_local(student, x[y < 5], y[y < 5], steps=10, batch_size=32, lr=0.05, momentum=0.9, seed=2)
    for m in (teacher, student):
        m.eval().requires_grad_(False)

    def disagreement(weight: float, steps: int = 20) -> float:
        g = new_generator(INFO, 0)
        optimizer = torch.optim.Adam(g.parameters(), lr=0.01, betas=(0.5, 0.999))
        rng = torch.Generator().manual_seed(0)
        for _ in range(steps):
            yy, z = torch.randint(C, (32,), generator=rng), torch.randn(32, g.nz, generator=rng)

            def loss(xx):
                t = teacher(xx)
                return fidelity_loss(t, yy) + weight * transferability_loss(t, student(xx), yy), {}

            generator_steps(g, optimizer, z, yy, 1, loss, [student])
        rng = torch.Generator().manual_seed(99)                      # held-out noise
        yy, z = torch.randint(C, (256,), generator=rng), torch.randn(256, g.nz, generator=rng)
        with torch.no_grad():
            xx = generate(g, z, yy)
            log_t, log_s = F.log_softmax(teacher(xx), 1), F.log_softmax(student(xx), 1)
            return (log_t.exp() * (log_t - log_s)).sum(1).mean().item()

    untrained, fidelity, transfer = disagreement(0.0, steps=0), disagreement(0.0), disagreement(2.0)
    assert transfer > fidelity * 1.04 and transfer > untrained


# ----------------------------------------------------------------------------- config
def test_both_methods_are_registered_with_the_distillation_schedule_after_every_round():
    for name, cls in (("fedftg", FedFTGStrategy), ("dfrd", DFRDStrategy)):
        method = STRATEGIES[name]
        assert method.strategy is cls and method.distils and cls.every_round
        cfg = build_config({"strategy": name, "warmup-rounds": 2, "num-server-rounds": 4})
        strategy = _strategy(cls, **{"warmup-rounds": 2, "num-server-rounds": 4})
        assert [strategy.phase(r) for r in range(1, 5)] == ["warmup", "distill", "distill", "distill"]
        assert cfg.of(name).gen_steps >= 1
    with pytest.raises(ConfigError, match=r"^dfrd\.ema-decay: must be in \[0, 1\), got 1\.0$"):
        build_config({"strategy": "dfrd", "dfrd.ema-decay": 1.0})


# ----------------------------------------------------------------------------- in-process runs
TINY = {**SYNTH, "alpha": 0.5, "num-server-rounds": 3, "warmup-rounds": 2, "local-steps": 10, "batch-size": 16,
        "lr": 0.05, "kd.steps": 6, "kd.batch-size": 16, "kd.lr": 1e-3, "mosaic.meta-samples-per-class": 4,
        "fedftg.gen-interval": 2, "dfrd.gen-interval": 2, "kd.gate": "off"}


@pytest.mark.parametrize("strategy, gate", [("fedftg", "clients"), ("dfrd", "off")])
def test_runs_in_process_distilling_after_every_round_from_warmup(tmp_path, strategy, gate):
    out = run_inprocess(tmp_path, strategy=strategy, **{**TINY, "kd.gate": gate})
    rows = metric_rows(out["dir"])
    assert [r.get("phase") for r in rows] == [None, "warmup", "distill", "distill"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    for r in rows[2:]:
        assert {"acc-teacher", "acc-teacher-asked", "gen-student", "gen-teacher", "gen-after-distill",
                "gen-train-fidelity", "gate-kept", "kd-final-loss"} <= set(r)
    types = {m.metadata.message_type for m in out["grid"].sent}
    assert types == {"query", "train"} | ({"evaluate"} if gate == "clients" else set())   # clients: FedAvg's work
    summary = json.loads((out["dir"] / "summary.json").read_text())
    assert summary["distillation"]["distill-rounds"] == 2
    state = load_checkpoint(out["dir"])["strategy"]
    keys = ["fedftg-generator"] if strategy == "fedftg" else ["dfrd-generator", "dfrd-ema"]
    for key in keys:
        assert set(state[key]) == set(new_generator(INFO, 0).state_dict())


@pytest.mark.slow  # ~20 s; the quick loop runs DFRD on one family (above)
def test_dfrd_under_model_heterogeneity_distils_every_family(tmp_path):
    hetero = {"client-models": "cnn_small,cnn_wide", "client-capacities": "1,0.5", "submodel": "fixed"}
    out = run_inprocess(tmp_path, strategy="dfrd", **{**TINY, **hetero})
    rows = metric_rows(out["dir"])
    for r in rows[2:]:
        for family in ("cnn_small", "cnn_wide"):
            assert 0 <= r[f"acc-before-distill/{family}"] <= 1 and 0 <= r[f"acc-after-distill/{family}"] <= 1
        assert r["gate-kept"] == 1.0
    assert "acc/cnn_wide@0.5" in rows[-1]
    state = load_checkpoint(out["dir"])["strategy"]
    assert set(state["globals"]) == {"cnn_small", "cnn_wide"}

