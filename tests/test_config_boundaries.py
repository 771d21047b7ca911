"""Every numeric key's extreme accepted values run through the code that consumes them, and
their rejected neighbours are one-line ``ConfigError``s naming the key.

One table row per numeric key of ``SPEC``: a key added without a row fails
``test_every_numeric_key_has_a_boundary_row``. Each row gives the accepted boundary values
(the smallest / largest the validator accepts; for an open bound, a value just inside it),
the rejected neighbours, other keys the values need (``with_``), and the consumer: a
function that runs the pure code reading that key on tiny inputs (no Flower runtime).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

from client_app.app import round_seed, sgd_settings
from mosaic_flwr.core.central import federated_sample_passes
from mosaic_flwr.config import SEED_LIMIT, Config, spec, ConfigError, build_config, lr_for_round
from mosaic_flwr.core.schedule import proto_rounds
from mosaic_flwr.data import dataset_info, partition, partition_without, validation_indices
from mosaic_flwr.models.generators import generator_for
from mosaic_flwr.methods.mosaic.client import mosaic_client_round
from mosaic_flwr.distill.kd import distill, distill_many
from mosaic_flwr.distill.teachers import ClientEnsemble, uniform_weights
from mosaic_flwr.methods.mosaic.meta import MetaModel, train_meta
from mosaic_flwr.distill.samplers import GeneratorSampler
from mosaic_flwr.methods.mosaic.prototypes import class_prototypes
from mosaic_flwr.core.robust import robust_average
from mosaic_flwr.core.training import evaluate, restriction_scale, train_local
from mosaic_flwr.core.records import ClientInfo
from mosaic_flwr.registry import STRATEGIES
from mosaic_flwr.core.fedavg import FedAvgStrategy, RoundFailed
from mosaic_flwr.distill.server import ClientModel
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.methods.feddf import RememberingTeacher, TransferSampler, transfer_images
from mosaic_flwr.methods.dense import DenseStrategy
from mosaic_flwr.methods.fedrs import BankFedRS
from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy
from mosaic_flwr.core.task import Arch, initial_model
from tests.support import as_flower_server

INFO = dataset_info("synthetic")
C = INFO.num_classes
JUST_ABOVE_0 = 1e-6        # an open lower bound at 0 (float keys "must be > 0")
JUST_BELOW_1 = 1 - 1e-9    # an open upper bound at 1
NODES = [100, 101, 102]


@pytest.fixture(autouse=True)
def _small_and_restored():
    """Tiny models run fastest on one thread; a consumer may change the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4                       # four classes present, the rest absent
    return torch.randn(n, 1, 28, 28, generator=g), y


# ----------------------------------------------------------------------------- consumers
def data_partition(cfg: Config) -> None:
    labels = np.arange(300) % 3
    for method in ("dirichlet", "shards", "iid"):
        parts = partition(labels, 3, method=method, seed=cfg.seed, alpha=cfg.alpha,
                          min_size=cfg.min_partition_size, cap=cfg.partition_cap,
                          classes_per_client=cfg.shards_per_client)
        assert sorted(np.concatenate(parts).tolist()) == list(range(300))
        assert min(len(p) for p in parts) >= (cfg.min_partition_size if method == "dirichlet" else 1)


def validation(cfg: Config) -> None:
    labels = np.arange(300) % 3
    held = validation_indices(labels, cfg.validation_split, cfg.seed)
    assert len(held) == round(cfg.validation_split * 100) * 3
    parts = partition_without(labels, held, 3, method="dirichlet", seed=cfg.seed, alpha=cfg.alpha,
                              min_size=cfg.min_partition_size)
    assert sorted(np.concatenate([*parts, held]).tolist()) == list(range(300))


def server_test_set(cfg: Config) -> None:
    """``test-subset``: the server's test set (synthetic: 500 images), whole at 0."""
    from mosaic_flwr.core.task import test_data

    _, y = test_data(cfg.replace(dataset="synthetic"))
    assert len(y) == (cfg.test_subset or 500)


def report_test_set(cfg: Config) -> None:
    """``kd.report-test-subset``: the distillation report's test images (class-balanced, fixed),
    the whole server test set at 0 or above its size."""
    from mosaic_flwr.core.task import test_data

    x, y = test_data(cfg.replace(dataset="synthetic"))
    mosaic = _server(cfg, MosaicStrategy)
    mosaic.sc.test_x, mosaic.sc.test_y = x, y
    rx, ry = mosaic.report_test()
    n = cfg.of('kd').report_test_subset
    assert len(ry) == (n if 0 < n < len(y) else len(y)) and len(rx) == len(ry)
    if 0 < n < len(y):
        assert torch.bincount(ry, minlength=C).max() - torch.bincount(ry, minlength=C).min() <= 1 or n < C
        assert mosaic.report_test()[1] is ry  # computed once


def straggler_deadline(cfg: Config) -> None:
    """``straggler-*``: the wait the missing replies of a call get once the quorum is in."""
    from mosaic_flwr.core.server import Straggler, straggler_wait

    rule = Straggler.of(cfg)
    for total in (1, 2, 10, 1000):
        for arrived in range(1, total):
            wait = straggler_wait([0.5] * arrived, total, rule)
            assert wait is None or (math.isfinite(wait) and wait >= cfg.straggler_floor)
        assert straggler_wait([0.5] * total, total, rule) is None


def reply_size_limit(cfg: Config) -> None:
    """``reply-max-mb``: a reply of that size is kept, one of more is dropped as an error reply."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from mosaic_flwr.core.records import reply_bytes
    from mosaic_flwr.core.server import oversized, reply_limit
    from tests.support import as_flower_server

    as_flower_server()
    limit = reply_limit(cfg)
    assert limit > 0
    if limit > 2**26:  # do not build replies of more than 64 MB here
        return
    for size in (0, limit // 2, limit + 1):
        record = ArrayRecord({"x": Array(dtype="uint8", shape=(size,), stype="numpy.ndarray", data=b"\0" * size)})
        reply = Message(RecordDict({"arrays": record}),
                        reply_to=Message(RecordDict({}), dst_node_id=7, message_type="train"))
        dropped = oversized(reply, limit, "test").has_error()
        assert dropped == (reply_bytes(reply) > limit) and (dropped or size <= limit), size


def count_bound(cfg: Config) -> None:
    """``count-clip``: no client is weighted as more than that many median clients."""
    from mosaic_flwr.core.robust import bound_counts
    counts = {i: torch.tensor([10 * (i + 1), i]) for i in range(5)}
    counts[9] = torch.tensor([10**12, 10**12])
    out = bound_counts(counts, cfg.count_clip)
    median = 37.5  # totals 10, 21, 32, 43, 54 and 2e12: the mean of the two middle ones
    for k, c in out.items():
        assert c.dtype == torch.long and (c >= 0).all() and ((c > 0) == (counts[k] > 0)).all()
        if cfg.count_clip:
            assert c.sum() <= max(cfg.count_clip * median, int((counts[k] > 0).sum()))


def seeds(cfg: Config) -> None:
    data_partition(cfg)
    initial_model(cfg)
    torch.Generator().manual_seed(round_seed(cfg, 10**6, 10**4))
    _meta(cfg)
    _mosaic_client(cfg)


def _server(cfg: Config, strategy=FedAvgStrategy, grid=None) -> FedAvgStrategy:
    as_flower_server()
    counts = torch.ones(C, dtype=torch.long) * 4
    clients = {n: ClientInfo(n, i, counts, cfg.model, 1.0) for i, n in enumerate(NODES)}
    sc = ServerContext(cfg=cfg, grid=grid, device=torch.device("cpu"), test_x=None,
                       test_y=None, results=None, num_nodes=len(clients), clients=clients)
    return strategy(sc)


class _SilentGrid:
    """Every node connected; nobody answers (counts the rounds sent)."""

    pending: dict = {}  # like the in-process grid: nothing pushed is left to answer (no wait)

    def __init__(self):
        self.sent = 0

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        self.sent += 1
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return []

    def send_and_receive(self, messages, *, timeout=None):
        assert timeout == pytest.approx(self.timeout)
        self.sent += 1
        return []


def sampling(cfg: Config) -> None:
    grid = _SilentGrid()
    grid.timeout = cfg.round_timeout
    bank = _server(cfg, grid=grid)
    chosen = bank.sample(1, grid=grid)
    assert 1 <= len(chosen) <= len(NODES) and len(chosen) >= min(cfg.min_train_clients, len(NODES))
    assert federated_sample_passes(cfg, [40, 50, 60]) > 0
    with pytest.raises(RoundFailed, match=f"min-replies={cfg.min_replies}"):
        bank.train_round(1)
    assert grid.sent == cfg.round_retries + 1


def connecting(cfg: Config) -> None:
    from server_app.app import wait_for_nodes

    assert wait_for_nodes(_SilentGrid(), len(NODES), cfg.connect_timeout, poll=0.0) == NODES
    with pytest.raises(ConfigError, match="connect-timeout"):   # too few nodes: fails, no hang
        wait_for_nodes(_SilentGrid(), len(NODES) + 1, min(cfg.connect_timeout, 0.05), poll=0.01)


def schedule(cfg: Config) -> None:
    mosaic = _server(cfg, MosaicStrategy)
    phases = [mosaic.phase(r) for r in range(1, cfg.num_server_rounds + 1)]
    assert phases.count("distill") == 1 and set(phases) <= {"warmup", "distill", "finetune"}
    assert federated_sample_passes(cfg, [40]) > 0


def lr_schedule(cfg: Config) -> None:
    """Every round's rate is one of the two rates, and never rises once it has dropped."""
    rates = [lr_for_round(cfg, r) for r in range(1, cfg.num_server_rounds + 1)]
    assert set(rates) <= {cfg.lr, cfg.finetune_lr} and rates[0] == cfg.lr
    assert all(b == cfg.finetune_lr for a, b in zip(rates, rates[1:]) if a == cfg.finetune_lr)


def prototype_bank(cfg: Config) -> None:
    """The rounds whose clients are asked for prototypes: the mosaic.proto-rounds ending at the
    distillation round (none before it with one)."""
    mosaic = _server(cfg, MosaicStrategy)
    n = proto_rounds(cfg.values)
    banked = [r for r in range(1, cfg.num_server_rounds + 1) if mosaic.banking(r)]
    assert banked == (list(range(cfg.warmup_rounds - n + 1, cfg.warmup_rounds + 1)) if n > 1 else [])
    _, values = mosaic.round_config(1, mosaic.train_config())
    assert bool(values.get("prototypes")) == (n == cfg.warmup_rounds > 1)


def local_training(cfg: Config) -> None:
    """What a client does with the round's train config (ServerContext.train_config ->
    the ClientApp's sgd_settings -> train_local), then the server's evaluation."""
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None,
                       test_y=None, results=None, num_nodes=1)
    settings = sgd_settings(sc.train_config())
    x, y = _data()
    model = initial_model(cfg)
    stats = train_local(model, x, y, **settings, proximal_mu=cfg.proximal_mu, seed=1)
    expected = cfg.local_steps or cfg.local_epochs * math.ceil(len(y) / cfg.batch_size)
    assert stats["steps"] == expected and math.isfinite(stats["train-loss"])
    train_local(model, x, y, **{**settings, "lr": cfg.finetune_lr}, seed=2)
    assert 0 <= evaluate(model, x, y, batch_size=cfg.eval_batch_size)["accuracy"] <= 1


def fedrs_training(cfg: Config) -> None:
    """``fedrs.alpha``: the server's train config -> the ClientApp's restriction of the
    classes the client lacks (classes 4.. here) -> train_local."""
    values = _server(cfg, BankFedRS).train_config()
    x, y = _data()
    scale = restriction_scale(torch.bincount(y, minlength=C) > 0, values["fedrs-alpha"])
    assert scale[0] == 1 and scale[-1] == cfg.of("fedrs").alpha
    stats = train_local(initial_model(cfg), x, y, **sgd_settings(values), seed=1, logit_scale=scale)
    assert math.isfinite(stats["train-loss"])


def feddf_transfer(cfg: Config) -> None:
    """``feddf.transfer-size``: FedDF's transfer set (synthetic's validation split of 200
    images here; a larger size takes all of them) and a KD batch drawn from it."""
    x = transfer_images(cfg)
    assert len(x) == min(cfg.of("feddf").transfer_size, 200) and torch.isfinite(x).all()
    teacher = initial_model(cfg).eval()
    sampler = TransferSampler(x, cfg.of('kd').batch_size, cfg.seed, RememberingTeacher(teacher))
    batch, labels = sampler(0)
    assert batch.shape == (cfg.of('kd').batch_size, 1, 28, 28) and labels.shape == (cfg.of('kd').batch_size,)


def distill_round_training(cfg: Config) -> None:
    """The distillation round's train config (``kd.local-steps`` replaces local-steps
    there, 0 keeps them) -> the ClientApp's sgd_settings -> train_local."""
    mosaic = _server(cfg, MosaicStrategy)
    _, values = mosaic.round_config(cfg.warmup_rounds, mosaic.train_config())
    settings = sgd_settings(values)
    assert settings["steps"] == (cfg.of('kd').local_steps or cfg.local_steps)
    assert settings["batch_size"] == (cfg.of('kd').local_batch_size or cfg.batch_size)
    assert settings["momentum"] == (cfg.momentum if cfg.of('kd').local_momentum < 0 else cfg.of('kd').local_momentum)
    assert settings["weight_decay"] == (cfg.weight_decay if cfg.of('kd').local_weight_decay < 0 else cfg.of('kd').local_weight_decay)
    assert settings["lr"] == (lr_for_round(cfg, cfg.warmup_rounds) if cfg.of('kd').local_lr < 0 else cfg.of('kd').local_lr)
    _, plain = mosaic.round_config(1, mosaic.train_config())  # a warm-up round keeps the plain settings
    assert sgd_settings(plain)["momentum"] == cfg.momentum
    x, y = _data()
    stats = train_local(initial_model(cfg), x, y, **settings, seed=1)
    assert stats["steps"] == settings["steps"] and math.isfinite(stats["train-loss"])


def look_ahead(cfg: Config) -> None:
    """``kd.gate-rounds``: the look-ahead gate decides between the distillation round and the
    last round (-1: the last round; 0: at the distillation round itself)."""
    until = _server(cfg, MosaicStrategy).gate_until()
    assert cfg.warmup_rounds <= until <= cfg.num_server_rounds
    assert until == (cfg.num_server_rounds if cfg.of('kd').gate_rounds == -1
                     else min(cfg.num_server_rounds, cfg.warmup_rounds + cfg.of('kd').gate_rounds))


def collection(cfg: Config) -> None:
    """``mosaic.collect-rounds``: the rounds that end at the distillation round, in which sampled
    clients that have not uploaded a generator are asked for one (and only those)."""
    mosaic = _server(cfg, MosaicStrategy)
    rounds = [r for r in range(1, cfg.num_server_rounds + 1) if mosaic.collecting(r)]
    assert len(rounds) == cfg.of('mosaic').collect_rounds and rounds[-1] == cfg.warmup_rounds
    _, values = mosaic.round_config(rounds[0], mosaic.train_config())
    assert values["distill"] and values["gen-steps"] == cfg.of('mosaic').gen_steps
    mosaic.uploaded = {0}   # partition 0 (node 100) uploaded already
    assert not mosaic.values_for(rounds[0], NODES[0], values)["distill"]
    assert mosaic.values_for(rounds[0], NODES[1], values)["distill"]


def generator_bank(cfg: Config) -> None:
    """``mosaic.generator-bank-size``: the server's bank of generators (per class; 0: all) and the
    sampler over what it kept."""
    from mosaic_flwr.core.streaming import GeneratorBank

    mosaic = _server(cfg, MosaicStrategy)
    bank = mosaic.bank
    assert isinstance(bank, GeneratorBank) and bank.size == cfg.of('mosaic').generator_bank_size
    for pid in range(5):
        counts = torch.zeros(C, dtype=torch.long)
        counts[pid % 2] = 10 + pid
        bank.offer(pid, counts, generator_for(INFO).state_dict())
    assert len(bank) == (5 if cfg.of('mosaic').generator_bank_size == 0 else min(5, 2 * cfg.of('mosaic').generator_bank_size))
    rows = bank.rows()
    gens = []
    for _, _, e in rows:
        g = generator_for(INFO)
        g.load_state_dict(e["state"])
        gens.append(g)
    x, y, owners = GeneratorSampler(gens, torch.stack([c for _, c, _ in rows]), batch_size=4, seed=0).draw()
    assert x.shape[0] == 4 and set(y.tolist()) <= {0, 1}


def threads(cfg: Config) -> None:
    torch.set_num_threads(cfg.client_threads)
    if cfg.server_threads:  # 0: torch's default
        torch.set_num_threads(cfg.server_threads)


def share_cap(cfg: Config) -> None:
    from mosaic_flwr.core.robust import cap_shares

    for weights in ([1.0, 1.0, 1.0], [1000.0, 1.0, 0.0, 5.0], [1.0]):
        w = cap_shares(torch.tensor(weights), cfg.max_client_share)
        assert torch.isfinite(w).all() and abs(float(w.sum()) - 1) < 1e-9 and (w >= 0).all()


def robust(cfg: Config) -> None:
    states = [{"w": torch.full((3,), float(i)), "n": torch.tensor(i)} for i in range(5)]
    for n in range(1, 6):
        out = robust_average(states[:n], "trimmed-mean", trim=cfg.trim_fraction)
        assert torch.isfinite(out["w"]).all()


def _mosaic_client(cfg: Config) -> None:
    """A client's distillation round: prototypes and the generator (the ClientApp's gen dict)."""
    x, y = _data()
    gen = {"steps": cfg.of('mosaic').gen_steps if cfg.of('mosaic').gen_steps < 3 else 2, "batch-size": cfg.of('mosaic').gen_batch_size,
           "lr": cfg.of('mosaic').gen_lr, "ce-weight": cfg.of('mosaic').gen_ce_weight, "div-weight": cfg.of('mosaic').gen_div_weight}
    out = mosaic_client_round(initial_model(cfg), x, y, INFO, train={"steps": 1, "batch_size": 8},
                              seed=cfg.seed, device=torch.device("cpu"), distill_round=True,
                              proto_k=cfg.of('mosaic').proto_k, gen=gen)
    assert out.prototypes[0].shape[0] == 4 * cfg.of('mosaic').proto_k and out.generator is not None
    assert math.isfinite(out.metrics["gen-fidelity"])


def dcgan_client(cfg: Config) -> None:
    """``mosaic.dcgan-width``: the client's DCGAN at that width, trained and uploaded, loads into the
    server's template (``mosaic.generator='dcgan'``)."""
    x, y = _data()
    gen = {"steps": 1, "batch-size": cfg.of('mosaic').gen_batch_size, "lr": cfg.of('mosaic').gen_lr, "ce-weight": cfg.of('mosaic').gen_ce_weight,
           "div-weight": cfg.of('mosaic').gen_div_weight, "generator": cfg.of('mosaic').generator, "dcgan-width": cfg.of('mosaic').dcgan_width}
    out = mosaic_client_round(initial_model(cfg), x, y, INFO, train={"steps": 1, "batch_size": 8},
                              seed=cfg.seed, device=torch.device("cpu"), distill_round=True, proto_k=1, gen=gen)
    template = _server(cfg, MosaicStrategy).generator_template()
    assert out.generator.keys() == template.keys()
    assert all(out.generator[k].shape == v.shape for k, v in template.items())
    assert math.isfinite(out.metrics["gen-coverage"])


def mosaic_client(cfg: Config) -> None:
    _mosaic_client(cfg)
    feats, labels = torch.randn(7, 5), torch.tensor([0, 0, 0, 1, 1, 2, 3])
    protos, plabels = class_prototypes(feats, labels, cfg.of('mosaic').proto_k)
    assert set(plabels.tolist()) == {0, 1, 2, 3}


def min_records_client(cfg: Config) -> None:
    """``mosaic.proto-min-records``: every prototype the client sends is the mean of that many records."""
    x, y = _data()
    out = mosaic_client_round(initial_model(cfg), x, y, INFO, train={"steps": 1, "batch_size": 8},
                              seed=cfg.seed, device=torch.device("cpu"), distill_round=True,
                              proto_k=cfg.of('mosaic').proto_k, proto_min_records=cfg.of('mosaic').proto_min_records)
    counts = torch.bincount(y, minlength=C)
    sent = out.prototypes[1]
    assert all(counts[c] >= cfg.of('mosaic').proto_min_records for c in sent.tolist())
    assert len(sent) <= sum(min(cfg.of('mosaic').proto_k, int(n) // cfg.of('mosaic').proto_min_records) for n in counts)


def floored_client(cfg: Config) -> None:
    """``count-floor``: the counts a client declares hold no class below the floor, and it sends
    no prototype of a class it declares absent."""
    x, y = _data()
    out = mosaic_client_round(initial_model(cfg), x, y, INFO, train={"steps": 1, "batch_size": 8},
                              seed=cfg.seed, device=torch.device("cpu"), distill_round=True,
                              proto_k=cfg.of('mosaic').proto_k, count_floor=cfg.count_floor)
    sent = out.label_counts
    assert not ((sent > 0) & (sent < cfg.count_floor)).any()
    assert all(sent[c] > 0 for c in out.prototypes[1].tolist())


def dp_client(cfg: Config) -> None:
    """A client's distillation round under the run's DP settings (the plain one when DP is off)."""
    from mosaic_flwr.privacy import dp as dpm
    settings = dpm.dp_settings(cfg.values)
    x, y = _data()
    gen = {"steps": 2, "batch-size": cfg.of('mosaic').gen_batch_size, "lr": cfg.of('mosaic').gen_lr, "ce-weight": cfg.of('mosaic').gen_ce_weight,
           "div-weight": cfg.of('mosaic').gen_div_weight}
    kw = {}
    if settings is not None:
        rng = torch.Generator().manual_seed(0)
        counts = dpm.noisy_counts(torch.bincount(y, minlength=C), dpm.count_sigma(settings), rng)
        if counts.sum() == 0:
            counts[0] = 1
        kw = {"dp": settings, "dp_counts": counts, "dp_rng": rng}
    out = mosaic_client_round(initial_model(cfg), x, y, INFO, train={"steps": 1, "batch_size": 8},
                              seed=cfg.seed, device=torch.device("cpu"), distill_round=True,
                              proto_k=cfg.of('mosaic').proto_k, gen=gen, **kw)
    assert out.generator is not None and torch.isfinite(out.prototypes[0]).all()
    if settings is not None:
        assert 0 < out.metrics["dp-epsilon"] < math.inf


def _generators(n: int = 2):
    torch.manual_seed(0)
    gens = [generator_for(INFO).eval() for _ in range(n)]
    counts = torch.zeros(n, C)
    counts[0, :3], counts[1, 2:5] = 5, 7
    return gens, counts


def _meta(cfg: Config) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 4
    logits = torch.randn(24, 3, 4, generator=g) + 2 * torch.nn.functional.one_hot(labels, 4)[:, None]
    meta = MetaModel(3, 4, arch=cfg.of('mosaic').meta_arch)
    ema, stats = train_meta(meta, logits, labels, epochs=min(cfg.of('mosaic').meta_epochs, 3), lr=cfg.of('mosaic').meta_lr,
                            ema_decay=cfg.of('mosaic').meta_ema, holdout_frac=cfg.of('mosaic').meta_holdout,
                            patience=cfg.of('mosaic').meta_patience, seed=cfg.seed)
    assert stats["n_train"] >= 4 and math.isfinite(stats["train_loss"])


def meta(cfg: Config) -> None:
    _meta(cfg)
    gens, counts = _generators()
    n_classes = int((counts.sum(0) > 0).sum())
    sampler = GeneratorSampler(gens, counts, seed=cfg.seed + 1,
                               batch_size=cfg.of('mosaic').meta_samples_per_class * n_classes)
    x, y, owners = sampler.draw()
    assert len(y) == cfg.of('mosaic').meta_samples_per_class * n_classes


def distillation(cfg: Config) -> None:
    gens, counts = _generators()
    sampler = GeneratorSampler(gens, counts, batch_size=cfg.of('kd').batch_size, seed=cfg.seed)
    torch.manual_seed(1)
    teacher_model = initial_model(cfg).eval()
    stats = distill(initial_model(cfg), lambda x: teacher_model(x), sampler,
                    steps=min(cfg.of('kd').steps, 3), lr=cfg.of('kd').lr, a=cfg.of('kd').a, b=cfg.of('kd').b,
                    T=cfg.of('kd').temperature, student_bn=cfg.of('kd').student_bn)
    assert math.isfinite(stats["final_loss"])


def server_generator(cfg: Config) -> None:
    """FedFTG's / DFRD's distillation source (their ``fedftg.*`` / ``dfrd.*`` keys): the
    label-aware teacher of three client models, the server generator trained every
    ``gen-interval`` KD steps against a student, the KD batches it gives."""
    strategy = _server(cfg, STRATEGIES[cfg.strategy].strategy)
    counts = torch.zeros(3, C, dtype=torch.long)
    counts[0, :4], counts[1, 3:7], counts[2, 6:] = 5, 3, 4
    clients = [ClientModel(n, Arch(cfg.model), initial_model(cfg.replace(seed=i)).state_dict(), 10.0, 0.0,
                           counts[i]) for i, n in enumerate(NODES)]
    report: dict = {}
    teacher = strategy.teacher_for(1, clients, report)
    student = initial_model(cfg)
    source = strategy.source_for(1, clients, teacher, {cfg.model: student}, report)
    for step in range(min(cfg.of('kd').steps, 3)):
        x, y = source.sample(step)
        assert torch.isfinite(x).all() and len(x) == len(y) and set(y.tolist()) <= set(range(C))
    assert all(math.isfinite(v) for v in report.values()) and "gen-train-fidelity" in report


def dense_source(cfg: Config) -> None:
    """``dense.*``: DENSE's source as the strategy builds it (generator, synthesiser, pool)
    driving the KD loop, against a teacher with and without BatchNorm."""
    from mosaic_flwr.core.task import Arch, build_arch

    dense = _server(cfg, DenseStrategy)
    torch.manual_seed(0)
    teacher = ClientEnsemble([initial_model(cfg), build_arch(cfg, Arch("resnet8", 0.25))], uniform_weights(2, C))
    students = {cfg.model: initial_model(cfg)}
    report: dict = {}
    source = dense.source_for(1, [], teacher, students, report)
    stats = distill_many(students, teacher, source.sample, steps=cfg.of('kd').steps, lr=cfg.of('kd').lr)
    d = cfg.of("dense")
    assert math.isfinite(stats[cfg.model]["final_loss"]) and source.check is None
    assert report["dense-phases"] == math.ceil(cfg.of('kd').steps / d.gen_interval)
    assert report["dense-pool"] == min(report["dense-phases"] * d.gen_batch_size, d.pool_size or 10**9)
    assert all(math.isfinite(v) for v in report.values())


def fedgen_round(cfg: Config) -> None:
    """``fedgen.*``: the server's generator trained on three clients' heads after round 1 (its
    rate decayed per round trained), sent in round 2's messages with the round's client
    weights, and a client's local training with it (``train_local``'s ``extra_loss``)."""
    from mosaic_flwr.core.records import record_to_state
    from mosaic_flwr.methods.fedgen import ALPHA, GEN_RECORD, BankFedGen, regulariser
    from mosaic_flwr.registry import ClientStep

    fedgen = _server(cfg, BankFedGen)
    torch.manual_seed(0)
    fedgen.sc.train_metrics = {}
    fedgen.train_generator_round(1, {n: (torch.randn(C, fedgen.feature_dim), torch.zeros(C)) for n in NODES})
    assert all(math.isfinite(v) for v in fedgen.sc.train_metrics.values())
    msg = fedgen.messages_for(2, NODES)[0]
    values, s = msg.content["config"], cfg.of("fedgen")
    assert GEN_RECORD in msg.content.array_records and values[ALPHA] == (max(1e-4, s.alpha * s.decay) if s.alpha else 0)
    x, y = _data()
    model = initial_model(cfg)
    model.load_state_dict(record_to_state(msg.content["arrays"]))
    options = regulariser(ClientStep(model, x, y, C, values, None, msg.content))
    stats = train_local(model, x, y, **sgd_settings(values), seed=1, **options)
    assert stats["steps"] == 2 and math.isfinite(stats["train-loss"])


# ----------------------------------------------------------------------------- the table
@dataclass
class Row:
    accepted: list[Any]
    rejected: list[Any]
    consume: Callable[[Config], None]
    with_: dict[str, Any] = field(default_factory=dict)


MOSAIC = {"strategy": "mosaic"}
DP_MOSAIC = MOSAIC  # with the clients' gate: its scores are part of the DP plan
DENSE = {"strategy": "dense", "kd.steps": 3, "kd.batch-size": 4, "dense.gen-steps": 1, "dense.gen-interval": 2,
         "dense.gen-batch-size": 4, "dense.gen-width": 2, "dense.noise-dim": 4}
ROWS: dict[str, Row] = {
    "alpha": Row([JUST_ABOVE_0, 1e6], [0.0, -1.0], data_partition),
    "min-partition-size": Row([1, 100], [0, -1], data_partition),
    "shards-per-client": Row([1, 3], [0], data_partition),   # 3: every class of the tiny data
    "test-subset": Row([0, 1, 500], [-1], server_test_set),
    "kd.report-test-subset": Row([0, 1, 500, 10**6], [-1], report_test_set),
    "validation-split": Row([0.0, 0.5], [-0.1, 0.5 + 1e-9], validation),
    "seed": Row([0, SEED_LIMIT - 1], [-1, SEED_LIMIT], seeds),
    "num-server-rounds": Row([1], [0], schedule, {**MOSAIC, "warmup-rounds": 1}),
    "warmup-rounds": Row([1, 8], [0, 9], schedule, {**MOSAIC, "num-server-rounds": 8}),
    "fraction-train": Row([JUST_ABOVE_0, 1.0], [0.0, 1.0 + 1e-9], sampling),
    "min-train-clients": Row([1, 10**6], [0], sampling),
    "min-replies": Row([1], [0], sampling),
    "connect-timeout": Row([JUST_ABOVE_0, 1e9], [0.0, -1.0], connecting),
    "round-timeout": Row([JUST_ABOVE_0], [0.0, -1.0], sampling),
    "straggler-quorum": Row([JUST_ABOVE_0, 1.0], [0.0, 1.1], straggler_deadline),
    "straggler-factor": Row([JUST_ABOVE_0, 1e6], [0.0, float("inf")], straggler_deadline),
    "straggler-floor": Row([0.0, 1e9], [-1.0, float("inf")], straggler_deadline),
    "count-clip": Row([0.0, 1.0, 1e6], [0.5, -1.0, float("inf")], count_bound),
    "reply-max-mb": Row([2**-20, 1.0, 1e6], [0.0, -1.0, float("inf")], reply_size_limit),
    "round-retries": Row([0, 2], [-1], sampling),
    "local-epochs": Row([1, 3], [-1, 0], local_training, {"local-steps": 0}),   # 0: no work at all
    "local-steps": Row([1, 5], [-1, 0], local_training, {"local-epochs": 0}),
    "batch-size": Row([1, 10**6], [0], local_training),
    "lr": Row([JUST_ABOVE_0], [0.0], local_training),
    "momentum": Row([0.0, 1.0], [-0.1, 1.1], local_training),
    "weight-decay": Row([0.0], [-0.1], local_training),
    "proximal-mu": Row([0.0, 1.0], [-0.1], local_training),
    "finetune-lr": Row([JUST_ABOVE_0], [0.0], local_training),
    "lr-step-round": Row([-1, 1, 10**6], [-2, 0], lr_schedule, MOSAIC),
    "fedrs.alpha": Row([0.0, 1.0], [-0.1, 1.0 + 1e-9], fedrs_training, {"strategy": "fedrs"}),
    "feddf.transfer-size": Row([1, 10**9], [0, -1], feddf_transfer,
                               {"strategy": "feddf", "feddf.transfer-set": "holdout", "validation-split": 0.1}),
    "dense.gen-steps": Row([1, 3], [0], dense_source, DENSE),
    "dense.gen-interval": Row([1, 10**6], [0], dense_source, DENSE),
    "dense.gen-batch-size": Row([1, 5], [0], dense_source, DENSE),
    "dense.gen-lr": Row([JUST_ABOVE_0, 10.0], [0.0], dense_source, DENSE),
    "dense.gen-width": Row([1, 8], [0], dense_source, DENSE),
    "dense.noise-dim": Row([1, 64], [0], dense_source, DENSE),
    "dense.bn-weight": Row([0.0, 1e6], [-0.1], dense_source, DENSE),
    "dense.oh-weight": Row([0.0, 1e6], [-0.1], dense_source, DENSE),
    "dense.adv-weight": Row([0.0, 1e6], [-0.1], dense_source, DENSE),
    "dense.pool-size": Row([0, 1, 10**6], [-1], dense_source, DENSE),
    "kd.local-steps": Row([0, 7], [-1], distill_round_training, {**MOSAIC, "local-steps": 3}),
    "kd.local-batch-size": Row([0, 1, 10**6], [-1], distill_round_training, {**MOSAIC, "local-steps": 3}),
    "kd.local-momentum": Row([-1.0, 0.0, 1.0], [-0.5, 1.1, -2.0], distill_round_training, {**MOSAIC, "local-steps": 3}),
    "kd.local-weight-decay": Row([-1.0, 0.0, 1e-4], [-0.5, float("inf")], distill_round_training,
                                {**MOSAIC, "local-steps": 3}),
    "kd.local-lr": Row([-1.0, JUST_ABOVE_0, 1.0], [0.0, -0.5, -2.0], distill_round_training, {**MOSAIC, "local-steps": 3}),
    "mosaic.collect-rounds": Row([1, 8], [0, 9], collection, {**MOSAIC, "num-server-rounds": 8, "warmup-rounds": 8}),
    "mosaic.proto-rounds": Row([-1, 1, 8], [0, -2, 9], prototype_bank, {**MOSAIC, "num-server-rounds": 8, "warmup-rounds": 8}),
    "mosaic.generator-bank-size": Row([0, 1, 10**6], [-1], generator_bank, MOSAIC),
    "kd.gate-rounds": Row([-1, 0, 10**6], [-2], look_ahead, MOSAIC),
    "eval-batch-size": Row([1], [0], local_training),
    "client-threads": Row([1], [0], threads),
    "server-threads": Row([0, 1], [-1], threads),
    "max-client-share": Row([JUST_ABOVE_0, 1.0], [0.0, 1.0 + 1e-9], share_cap),
    "trim-fraction": Row([0.0, 0.5 - 1e-9], [-0.1, 0.5], robust),
    "mosaic.proto-k": Row([1, 10], [0], mosaic_client),            # 10 > a class's samples: the mean
    "mosaic.proto-min-records": Row([1, 2, 10**6], [0, -1], min_records_client),
    "count-floor": Row([0, 1, 10**6], [-1], floored_client),
    "mosaic.gen-steps": Row([1], [0], mosaic_client),
    "mosaic.gen-batch-size": Row([2, 3], [1, 0], mosaic_client),
    "mosaic.gen-lr": Row([JUST_ABOVE_0], [0.0], mosaic_client),
    "mosaic.gen-ce-weight": Row([0.0], [-0.1], mosaic_client),
    "mosaic.gen-div-weight": Row([0.0], [-0.1], mosaic_client),
    "mosaic.dcgan-width": Row([1, 8], [0, -1], dcgan_client, {**MOSAIC, "mosaic.generator": "dcgan"}),
    "mosaic.meta-samples-per-class": Row([1], [0], meta),
    "mosaic.meta-epochs": Row([1], [0], meta),
    "mosaic.meta-lr": Row([JUST_ABOVE_0], [0.0], meta),
    "mosaic.meta-patience": Row([1], [0], meta),
    "mosaic.meta-holdout": Row([0.0, JUST_BELOW_1], [-0.1, 1.0], meta),
    "mosaic.meta-ema": Row([0.0, JUST_BELOW_1], [-0.1, 1.0], meta),
    "kd.steps": Row([1], [0, -1], distillation),
    "kd.batch-size": Row([1], [0], distillation),
    "kd.lr": Row([JUST_ABOVE_0], [0.0], distillation),
    "kd.a": Row([0.0, 1.0], [-0.1, 1.1], distillation),
    "kd.b": Row([0.0], [-0.1], distillation),
    "kd.temperature": Row([JUST_ABOVE_0], [0.0], distillation),
    # differential privacy: 0 is "off"; the smallest epsilon at the smallest delta (non-finite
    # floats are refused for every key)
    # dp.epsilon is a client's total: the counts', prototypes' and gate scores' own epsilons
    # (at least 0.1 each) must leave the generator some of it (0.1 cannot)
    "dp.epsilon": Row([0.0, 0.5, 1e6], [-0.1, 0.1 - 1e-9, 0.1, math.inf], dp_client,
                      {**DP_MOSAIC, "dp.count-epsilon": 0.1, "dp.proto-epsilon": 0.1, "dp.gate-epsilon": 0.1}),
    "dp.delta": Row([1e-10, 0.1 - 1e-9], [1e-10 * (1 - 1e-9), 0.1], dp_client, {**DP_MOSAIC, "dp.epsilon": 4.0}),
    "dp.max-grad-norm": Row([JUST_ABOVE_0, 1e6], [0.0, math.inf], dp_client, {**DP_MOSAIC, "dp.epsilon": 4.0}),
    "dp.noise-multiplier": Row([0.0, JUST_ABOVE_0, 1e3], [-0.1, math.inf], dp_client, DP_MOSAIC),
    "dp.proto-epsilon": Row([0.1, 1e3], [0.1 - 1e-9, math.inf], dp_client,
                            {**DP_MOSAIC, "dp.epsilon": 1e4, "dp.delta": 1e-10}),
    "dp.proto-clip": Row([JUST_ABOVE_0, 1e6], [0.0, math.inf], dp_client, {**DP_MOSAIC, "dp.epsilon": 4.0}),
    "dp.count-epsilon": Row([0.1, 1e3], [0.1 - 1e-9, math.inf], dp_client,
                            {**DP_MOSAIC, "dp.epsilon": 1e4, "dp.delta": 1e-10}),
    "dp.gate-epsilon": Row([0.1, 1e3], [0.1 - 1e-9, math.inf], dp_client,
                           {**DP_MOSAIC, "dp.epsilon": 1e4, "dp.delta": 1e-10}),
}
# Small KD batches: the generator trains on them.
FEDFTG = {"strategy": "fedftg", "kd.batch-size": 4, "kd.steps": 3, "mosaic.meta-samples-per-class": 1}
DFRD = {**FEDFTG, "strategy": "dfrd"}
ROWS.update({
    "fedftg.gen-steps": Row([1, 3], [0], server_generator, FEDFTG),
    "fedftg.gen-interval": Row([1, 10**6], [0], server_generator, FEDFTG),
    "fedftg.gen-lr": Row([JUST_ABOVE_0], [0.0], server_generator, FEDFTG),
    "fedftg.hard-weight": Row([0.0], [-0.1], server_generator, FEDFTG),
    "fedftg.div-weight": Row([0.0], [-0.1], server_generator, FEDFTG),
    "dfrd.gen-steps": Row([1, 3], [0], server_generator, DFRD),
    "dfrd.gen-interval": Row([1, 10**6], [0], server_generator, DFRD),
    "dfrd.gen-lr": Row([JUST_ABOVE_0], [0.0], server_generator, DFRD),
    "dfrd.tran-weight": Row([0.0], [-0.1], server_generator, DFRD),
    "dfrd.div-weight": Row([0.0], [-0.1], server_generator, DFRD),
    "dfrd.ema-decay": Row([0.0, JUST_BELOW_1], [-0.1, 1.0], server_generator, DFRD),
})
FEDGEN = {"strategy": "fedgen", "fedgen.gen-steps": 2, "fedgen.gen-batch-size": 4, "fedgen.hidden-dim": 8,
          "fedgen.noise-dim": 4}
ROWS.update({
    "fedgen.alpha": Row([0.0, 1e6], [-0.1], fedgen_round, FEDGEN),
    "fedgen.beta": Row([0.0, 1e6], [-0.1], fedgen_round, FEDGEN),
    "fedgen.decay": Row([JUST_ABOVE_0, 1.0], [0.0, 1.0 + 1e-9], fedgen_round, FEDGEN),
    "fedgen.gen-steps": Row([1, 3], [0], fedgen_round, FEDGEN),
    "fedgen.gen-batch-size": Row([2, 5], [1, 0], fedgen_round, FEDGEN),
    "fedgen.gen-lr": Row([JUST_ABOVE_0, 10.0], [0.0], fedgen_round, FEDGEN),
    "fedgen.gen-weight-decay": Row([0.0, 1e6], [-0.1], fedgen_round, FEDGEN),
    "fedgen.div-weight": Row([0.0, 1e6], [-0.1], fedgen_round, FEDGEN),
    "fedgen.noise-dim": Row([1, 64], [0], fedgen_round, FEDGEN),
    "fedgen.hidden-dim": Row([1, 64], [0], fedgen_round, FEDGEN),
})
BASE = {"dataset": "synthetic", "partition": "iid", "local-steps": 2}


def test_every_numeric_key_has_a_boundary_row():
    numeric = {k for k, (typ, _) in spec().items() if typ in (int, float)}
    assert not numeric - set(ROWS), f"add a row to ROWS for {sorted(numeric - set(ROWS))}"
    assert not set(ROWS) - numeric


ACCEPTED = [(k, v) for k, row in ROWS.items() for v in row.accepted]
REJECTED = [(k, v) for k, row in ROWS.items() for v in row.rejected]


@pytest.mark.parametrize("key,value", ACCEPTED, ids=[f"{k}={v}" for k, v in ACCEPTED])
def test_accepted_boundary_value_runs(key, value):
    row = ROWS[key]
    cfg = build_config({**BASE, **row.with_, key: value})
    assert getattr(cfg, key.replace("-", "_")) == value
    row.consume(cfg)


@pytest.mark.parametrize("key,value", REJECTED, ids=[f"{k}={v}" for k, v in REJECTED])
def test_rejected_neighbour_names_the_key(key, value):
    # the key names the error: "key: ..." or, for a pair, "local-epochs/local-steps: ..."
    with pytest.raises(ConfigError, match=rf"^([\w-]+/)?{re.escape(key)}(/[\w-]+)?: ") as info:
        build_config({**BASE, **ROWS[key].with_, key: value})
    assert "\n" not in str(info.value)


def test_kd_steps_zero_points_to_fedavg():
    with pytest.raises(ConfigError, match=r"^kd.steps: must be >= 1, got 0 .*strategy='fedavg'"):
        build_config({"kd.steps": 0})


@pytest.mark.parametrize("key,value", [("mosaic.meta-holdout", 1.0), ("mosaic.meta-ema", 1.0), ("mosaic.gen-batch-size", 1),
                                       ("kd.steps", 0), ("seed", -1)])
def test_values_accepted_before_crashed_their_consumer(key, value):
    """Why the ranges moved: each of these passed validation before, then crashed."""
    cfg = build_config(BASE)
    forced = Config({**cfg.values, key: value})      # bypassing the validator
    consumer = ROWS[key].consume
    with pytest.raises((ValueError, RuntimeError)):
        consumer(forced)
