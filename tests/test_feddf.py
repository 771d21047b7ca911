"""FedDF as published (``strategy='feddf'``): the transfer set (loading, shape checks, missing
files), the mechanism (the averaged model moves to the client ensemble on the unlabelled
transfer set; no transfer label is read) and in-process runs on the synthetic data set,
with one architecture and with two.

MNIST (the transfer set of some tests) comes from the machine's copy, as in
``test_data_cifar_mnist.py``: where it is missing these tests FAIL, none is skipped."""

from __future__ import annotations

import json
import shlex
import types

import pytest
import torch

import mosaic_flwr.distill.server as core_module
import mosaic_flwr.methods.feddf as feddf_module
from client_app.app import app as client_app
from mosaic_flwr.config import PROJECT_ROOT, ConfigError, build_config, load_defaults, merge_run_config
from mosaic_flwr.data import ImageData, dataset_info, load_dataset, normalize
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.core.training import train_local
from mosaic_flwr.core.records import record_to_state
from mosaic_flwr.registry import STRATEGIES
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.distill.server import ClientModel
from mosaic_flwr.methods.feddf import FedDF, transfer_images
from mosaic_flwr.core.task import Arch, build_arch, initial_model, validation_data
from tests.support import mnist_dir, run_inprocess

SYNTH = {"strategy": "feddf", "dataset": "synthetic", "feddf.transfer-set": "holdout", "validation-split": 0.1}


@pytest.fixture(autouse=True)
def _fresh_transfer_cache():
    feddf_module._transfer_cached.cache_clear()
    yield
    feddf_module._transfer_cached.cache_clear()


def _pixels(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Normalised images back to uint8, with ``dataset``'s mean and std."""
    info = dataset_info(dataset)
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def _rows(images: torch.Tensor) -> set[bytes]:
    """Each image's bytes (to compare sets of images exactly)."""
    return {r.tobytes() for r in images.reshape(len(images), -1).numpy()}


# ----------------------------------------------------------------------------- the transfer set
def test_mnist_transfer_set_is_in_the_fmnist_federations_input_space():
    cfg = build_config({"strategy": "feddf", "dataset": "fmnist", "data-dir": str(mnist_dir()),
                        "feddf.transfer-size": 300})
    assert feddf_module.transfer_set_name("fmnist", cfg.of("feddf").transfer_set) == "mnist"   # auto
    x = transfer_images(cfg)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32
    # every image is an MNIST training image, normalised with Fashion-MNIST's mean and std
    mnist, _ = load_dataset("mnist", str(mnist_dir()))
    pixels = _pixels(x, "fmnist")
    assert torch.allclose(normalize(pixels, dataset_info("fmnist")), x, atol=1e-5)
    assert _rows(pixels) <= _rows(mnist.x) and len(_rows(pixels)) == 300
    # the same draw for the same seed, another for another seed
    feddf_module._transfer_cached.cache_clear()
    assert torch.equal(transfer_images(cfg.replace(lr=0.5)), x)
    assert not torch.equal(transfer_images(cfg.replace(seed=7)), x)


def test_holdout_is_the_validation_splits_images_and_the_size_is_capped_by_the_set():
    cfg = build_config({**SYNTH, "feddf.transfer-size": 10**6})
    val_x, _ = validation_data(cfg)
    x = transfer_images(cfg)
    assert len(val_x) == 200 and x.shape == val_x.shape                 # the whole split, no more
    assert _rows(_pixels(x, "synthetic")) == _rows(_pixels(val_x, "synthetic"))
    small = transfer_images(cfg.replace(**{"feddf.transfer-size": 50}))
    assert len(small) == 50 and _rows(_pixels(small, "synthetic")) <= _rows(_pixels(val_x, "synthetic"))


@pytest.mark.parametrize("run_config,pattern", [
    ({"dataset": "fmnist", "feddf.transfer-set": "cifar100"},
     r"^feddf\.transfer-set: 'cifar100' images are 32x32x3 but the federation's \(fmnist\) are 28x28x1; .*mnist"),
    ({"dataset": "cifar10", "feddf.transfer-set": "mnist"},
     r"^feddf\.transfer-set: 'mnist' images are 28x28x1 but the federation's \(cifar10\) are 32x32x3; .*cifar100"),
    ({"dataset": "mnist", "feddf.transfer-set": "mnist"}, r"^feddf\.transfer-set: 'mnist' is the federation's own"),
    ({"dataset": "synthetic"}, r"^feddf\.transfer-set: 'holdout' \(auto for synthetic\) .*validation-split is 0"),
    ({"feddf.transfer-set": "stl10"}, r"^feddf\.transfer-set: unknown value 'stl10'"),
    ({"feddf.transfer-size": 0}, r"^feddf\.transfer-size: must be > 0"),
])
def test_a_transfer_set_that_does_not_fit_is_one_config_error(run_config, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        build_config({"strategy": "feddf", **run_config})
    assert "\n" not in str(info.value)


def _failing_setup(tmp_path, **overrides) -> tuple[str, InProcessGrid]:
    """The ServerApp's main on an in-process grid, expected to fail in its setup."""
    from flwr.app import Context, RecordDict

    from server_app.app import main as server_main

    run_config = {**load_defaults(), "output-dir": str(tmp_path), "run-name": "run", **overrides}
    grid = InProcessGrid(client_app, run_config, 2)
    with pytest.raises(RuntimeError, match="^configuration error: ") as info:
        server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    return str(info.value), grid


def test_a_missing_transfer_set_fails_in_setup_naming_where_it_looked_and_the_setup_command(tmp_path):
    message, grid = _failing_setup(tmp_path, **{"strategy": "feddf", "dataset": "synthetic",
                                                "feddf.transfer-set": "mnist", "data-dir": str(tmp_path / "empty")})
    assert "feddf.transfer-set: 'mnist'" in message and str(tmp_path / "empty" / "mnist") in message
    assert "scripts/setup.sh --data mnist" in message
    assert grid.sent == []                                   # no client was even asked
    message, grid = _failing_setup(tmp_path, **{"strategy": "feddf", "dataset": "fmnist",
                                                "feddf.transfer-set": "cifar100"})
    assert "32x32x3" in message and "28x28x1" in message and grid.sent == []


def test_cifar10_takes_cifar100_as_published_and_says_how_to_get_it_or_fall_back(tmp_path):
    cfg = build_config({"strategy": "feddf", "dataset": "cifar10", "data-dir": str(tmp_path)})
    with pytest.raises(feddf_module.DatasetNotFoundError) as info:
        transfer_images(cfg)
    message = str(info.value)
    assert message.startswith("feddf.transfer-set: 'cifar100'") and str(tmp_path) in message
    assert "scripts/setup.sh --data cifar100" in message and "feddf.transfer-set='holdout'" in message
    build_config({"strategy": "feddf", "dataset": "cifar10", "feddf.transfer-set": "holdout",
                  "validation-split": 0.1})                  # the documented offline fallback


def test_schedule_every_round_as_published_or_once():
    def phases(**kw):
        cfg = build_config({**SYNTH, "num-server-rounds": 4, "warmup-rounds": 2, **kw})
        sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None, test_y=None,
                           results=None, num_nodes=3)
        return [FedDF(sc).phase(r) for r in range(1, 5)]

    assert phases() == ["warmup", "distill", "distill", "distill"]
    assert phases(**{"feddf.every-round": False}) == ["warmup", "distill", "finetune", "finetune"]
    assert phases(**{"warmup-rounds": 1}) == ["distill"] * 4


def test_the_published_preset_distils_every_round_with_the_papers_kd():
    merged = merge_run_config(["conf/fmnist-dir0.1.toml", "conf/feddf-published.toml"], cwd=PROJECT_ROOT)
    cfg = build_config({**load_defaults(), **merged})
    assert (cfg.strategy, cfg.warmup_rounds, cfg.lr_schedule, cfg.of('kd').gate) == ("feddf", 1, "constant", "off")
    assert (cfg.of('kd').a, cfg.of('kd').b, cfg.of('kd').temperature, cfg.of('kd').lr) == (1.0, 0.0, 1.0, 1e-3)
    assert cfg.of("feddf").every_round and STRATEGIES["feddf"].prepare is not None


# ----------------------------------------------------------------------------- the mechanism
def _clients(cfg) -> list[ClientModel]:
    """Three models, each trained on a few classes of the synthetic data: their ensemble is
    far from their average."""
    train, _ = load_dataset("synthetic")
    x, y = train.normalized(), train.y
    out = []
    for i, classes in enumerate([(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]):
        model = initial_model(cfg)
        keep = torch.isin(y, torch.tensor(classes))
        train_local(model, x[keep], y[keep], steps=20, batch_size=32, lr=0.05, seed=i)
        out.append(ClientModel(100 + i, Arch(cfg.model), {k: v.detach().clone() for k, v in model.state_dict().items()},
                               float(keep.sum()), 0.0, None))
    return out


def _feddf(cfg, clients) -> FedDF:
    _, test = load_dataset("synthetic")
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=test.normalized(), test_y=test.y,
                       results=None, num_nodes=len(clients))
    strategy = FedDF(sc)
    total = sum(c.weight for c in clients)
    strategy.globals[cfg.model] = {k: sum(c.state[k].float() * (c.weight / total) for c in clients).to(v.dtype)
                                   for k, v in clients[0].state.items()}   # the round's average
    return strategy


def _mnist_cfg(**kw):
    return build_config({"strategy": "feddf", "dataset": "synthetic", "feddf.transfer-set": "mnist",
                         "data-dir": str(mnist_dir()), "feddf.transfer-size": 256, "kd.steps": 20,
                         "kd.batch-size": 32, "kd.lr": 1e-3, "kd.a": 1.0, "kd.b": 0.0, "kd.gate": "off", **kw})


@pytest.fixture(scope="module")
def mechanism():
    """A FedDF distillation on MNIST images of a synthetic federation, and what it used."""
    feddf_module._transfer_cached.cache_clear()
    cfg = _mnist_cfg()
    clients = _clients(cfg)
    strategy = _feddf(cfg, clients)
    before = strategy.globals[cfg.model]
    seen = {}
    real = core_module.distill_many

    def spy(students, teacher, sample, **kw):
        seen["teacher"], seen["batches"] = teacher, []
        stats = real(students, teacher, lambda step: seen["batches"].append(sample(step)) or seen["batches"][-1], **kw)
        return stats

    core_module.distill_many = spy
    try:
        strategy.run_distillation(1, clients)
    finally:
        core_module.distill_many = real
    return {"cfg": cfg, "clients": clients, "strategy": strategy, "before": before,
            "after": strategy.globals[cfg.model], **seen}


def _model(cfg, state):
    model = initial_model(cfg)
    model.load_state_dict(state)
    return model.eval()


def test_the_teacher_is_the_mean_of_the_client_models_logits(mechanism):
    cfg, x = mechanism["cfg"], mechanism["strategy"].transfer[:64]
    with torch.no_grad():
        expected = torch.stack([_model(cfg, c.state)(x) for c in mechanism["clients"]]).mean(0)
        assert torch.allclose(mechanism["teacher"](x), expected, atol=1e-5)


def test_kd_batches_are_transfer_images_in_shuffled_passes(mechanism):
    cfg, transfer = mechanism["cfg"], mechanism["strategy"].transfer
    xs = torch.cat([b[0] for b in mechanism["batches"]])
    assert len(mechanism["batches"]) == cfg.of('kd').steps and all(len(b[0]) == cfg.of('kd').batch_size for b in mechanism["batches"])
    # 20 batches of 32 = 2.5 passes over the 256 images: the first 256 are each image once
    assert _rows(xs[:256]) == _rows(transfer) and len(_rows(transfer)) == 256
    ys = torch.cat([b[1] for b in mechanism["batches"]])      # the teacher's labels (no labels asked)
    with torch.no_grad():
        assert torch.equal(ys, mechanism["teacher"].teacher(xs).argmax(1))
    assert mechanism["strategy"].distill_report["kd-teacher-label-agreement"] == 1.0


def test_the_averaged_model_moves_to_the_ensemble_on_the_transfer_set(mechanism):
    cfg, transfer = mechanism["cfg"], mechanism["strategy"].transfer
    with torch.no_grad():
        teacher = mechanism["teacher"].teacher(transfer).argmax(1)
        agree = [(_model(cfg, mechanism[k])(transfer).argmax(1) == teacher).float().mean().item()
                 for k in ("before", "after")]
    # the average of three specialised models disagrees with their ensemble; after KD it follows it
    assert agree[0] < 0.5 and agree[1] > 0.8, agree
    report = mechanism["strategy"].distill_report
    assert report["transfer-images"] == 256 and report["distill-rounds"] == 1 and report["gate-kept"] == 1.0


def test_no_label_of_the_transfer_set_is_read(mechanism, monkeypatch):
    """The same distillation with the transfer set's labels gone (any read raises) and with
    garbage labels: the same distilled model, bit for bit."""
    real_load = feddf_module.load_dataset

    def without_labels(name, *args, **kw):
        train, test = real_load(name, *args, **kw)
        if name != "mnist":
            return train, test
        return types.SimpleNamespace(x=train.x, info=train.info), None

    def garbage_labels(name, *args, **kw):
        train, test = real_load(name, *args, **kw)
        if name != "mnist":
            return train, test
        return ImageData(train.x, torch.randint(0, 1000, train.y.shape), train.info), test

    cfg = mechanism["cfg"]
    for fake in (without_labels, garbage_labels):
        feddf_module._transfer_cached.cache_clear()
        monkeypatch.setattr(feddf_module, "load_dataset", fake)
        strategy = _feddf(cfg, mechanism["clients"])
        assert all(torch.equal(strategy.globals[cfg.model][k], v) for k, v in mechanism["before"].items())
        strategy.run_distillation(1, mechanism["clients"])
        after = strategy.globals[cfg.model]
        assert all(torch.equal(after[k], v) for k, v in mechanism["after"].items()), fake.__name__


# ----------------------------------------------------------------------------- in-process runs
TINY = {"alpha": 1.0, "num-server-rounds": 3, "warmup-rounds": 1, "local-steps": 10, "batch-size": 16,
        "lr": 0.05, "kd.steps": 6, "kd.batch-size": 16, "kd.lr": 1e-3, "kd.gate": "off",
        "feddf.transfer-size": 100}


def _run(tmp_path, monkeypatch, **overrides):
    """An in-process FedDF run; the KD loop's teacher, students and batches are recorded."""
    kd, replies = [], {}
    real = core_module.distill_many

    def spy(students, teacher, sample, **kw):
        seen = {"teacher": teacher, "batches": [],
                "before": {f: {k: v.clone() for k, v in s.state_dict().items()} for f, s in students.items()}}
        stats = real(students, teacher, lambda step: seen["batches"].append(sample(step)) or seen["batches"][-1], **kw)
        seen["after"] = {f: {k: v.clone() for k, v in s.state_dict().items()} for f, s in students.items()}
        kd.append(seen)
        return stats

    def hook(grid, node, incoming, reply):
        configs = incoming.content.config_records
        if "config" in configs and "arrays" in reply.content.array_records:
            replies.setdefault(int(configs["config"]["server-round"]), {})[node] = record_to_state(reply.content["arrays"])
        return reply

    monkeypatch.setattr(core_module, "distill_many", spy)
    out = run_inprocess(tmp_path, num_nodes=3, grid_options={"hook": hook}, **{**SYNTH, **TINY, **overrides})
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    return out, rows, kd, replies


def _ensemble(cfg, archs: dict, states: dict, x) -> torch.Tensor:
    with torch.no_grad():
        logits = []
        for node, state in sorted(states.items()):
            model = build_arch(cfg, archs[node])
            model.load_state_dict(state)
            logits.append(model.eval()(x))
        return torch.stack(logits).mean(0)


def test_feddf_runs_in_process_distilling_after_every_round(tmp_path, monkeypatch):
    out, rows, kd, replies = _run(tmp_path, monkeypatch)
    cfg = build_config({**SYNTH, **TINY, "output-dir": str(tmp_path)})
    grid = out["grid"]
    # plain FedAvg messages (no generators, no label counts), three clients a round
    assert {m.metadata.message_type for m in grid.sent[3:]} == {"train"} and len(grid.sent) == 3 + 9
    assert [r.get("phase") for r in rows] == [None, "distill", "distill", "distill"]
    assert len(kd) == 3 and all(r["clients"] == 3 and r["transfer-images"] == 100 for r in rows[1:])
    summary = json.loads((out["dir"] / "summary.json").read_text())
    assert summary["strategy"] == "feddf" and summary["distillation"]["distill-rounds"] == 3
    val_x, _ = validation_data(cfg)
    val_rows = _rows(val_x)
    archs = {n: Arch(cfg.model) for n in grid.node_ids}
    for r, seen in zip((1, 2, 3), kd):
        # the student enters KD as the round's average; the teacher is the mean of the logits
        states = replies[r]
        assert set(states) == set(grid.node_ids)
        x = torch.cat([b[0] for b in seen["batches"]])
        assert _rows(x) <= val_rows                                       # holdout images only
        assert torch.allclose(seen["teacher"](x[:32]), _ensemble(cfg, archs, states, x[:32]), atol=1e-5)
        assert any(not torch.equal(seen["before"][cfg.model][k], v) for k, v in seen["after"][cfg.model].items()
                   if v.is_floating_point())
        # the distilled model is the global model the next round sends
        if r < 3:
            sent = [m for m in grid.sent[3:] if m.content["config"]["server-round"] == r + 1]
            got = record_to_state(sent[0].content["arrays"])
            assert all(torch.equal(got[k], v) for k, v in seen["after"][cfg.model].items())
    assert rows[-1]["accuracy"] == pytest.approx(rows[-1]["acc-after-distill"], abs=1e-4)


@pytest.mark.slow  # ~20 s; the quick loop runs FedDF on one family (test_feddf_runs_in_process_distilling_after_every_round)
def test_feddf_distils_every_family_under_model_heterogeneity_on_mnist_images(tmp_path, monkeypatch):
    overrides = {"client-models": "cnn_small,cnn_wide", "num-server-rounds": 2, "feddf.transfer-set": "mnist",
                 "data-dir": str(mnist_dir())}
    out, rows, kd, replies = _run(tmp_path, monkeypatch, **overrides)
    cfg = build_config({**SYNTH, **TINY, **overrides})
    grid = out["grid"]
    rows_csv = (out["dir"] / "assignment.csv").read_text().strip().splitlines()[1:]
    archs = {int(line.split(",")[0]): Arch(line.split(",")[2]) for line in rows_csv}
    assert set(archs) == set(grid.node_ids)
    assert sorted(a.model for a in archs.values()) == ["cnn_small", "cnn_small", "cnn_wide"]
    mnist, _ = load_dataset("mnist", str(mnist_dir()))
    for r, seen in zip((1, 2), kd):
        assert set(seen["before"]) == {"cnn_small", "cnn_wide"}          # every family is a student
        for f in ("cnn_small", "cnn_wide"):
            assert any(not torch.equal(seen["before"][f][k], v) for k, v in seen["after"][f].items()
                       if v.is_floating_point()), f
            assert f"acc-after-distill/{f}" in rows[r]
        x = torch.cat([b[0] for b in seen["batches"]])
        assert _rows(_pixels(x, "synthetic")) <= _rows(mnist.x)          # MNIST images, synthetic's space
        # one teacher: the mean of the logits of the three client models, each its own architecture
        assert torch.allclose(seen["teacher"](x[:32]), _ensemble(cfg, archs, replies[r], x[:32]), atol=1e-5)


def test_the_readmes_feddf_commands_are_valid_configurations():
    readme = (PROJECT_ROOT / "docs" / "methods.md").read_text()
    start = readme.index("\n## FedDF\n")
    section = readme[start:readme.index("\n## ", start + 1)]  # up to the next section
    commands = [line for line in section.splitlines() if line.startswith("bash scripts/run.sh")]
    assert len(commands) == 3
    for line in commands:
        args = shlex.split(line.split("#")[0])[2:]
        values = merge_run_config([a for a in args if a != "--run-config"], cwd=PROJECT_ROOT)
        cfg = build_config({**load_defaults(), **values})
        assert cfg.strategy == "feddf", line
