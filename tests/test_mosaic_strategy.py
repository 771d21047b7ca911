"""The Mosaic strategy fed hand-made replies: validation, expert formation, schedule."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import build_config
from mosaic_flwr.data import dataset_info
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.models.generators import build_generator
from mosaic_flwr.methods.mosaic.client import MosaicClientResult
from mosaic_flwr.core.records import decode_mosaic_reply, mosaic_payload
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.methods.feddf import FedDFGenerators
from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy
from mosaic_flwr.core.task import Arch
from tests.support import as_flower_server

C = 10


def _sc(cfg) -> ServerContext:
    """A ServerContext with what the strategy uses before distillation (no grid, no data)."""
    return ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None,
                         test_y=None, results=None, num_nodes=4)


def _template(strategy) -> dict:
    return strategy.template(Arch(strategy.cfg.model))


@pytest.fixture
def strategy():
    as_flower_server()
    cfg = build_config({"strategy": "mosaic", "dataset": "synthetic", "warmup-rounds": 3,
                        "num-server-rounds": 5})
    return MosaicStrategy(_sc(cfg))


def _state(strategy, value: float) -> dict:
    return {k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
            for k, v in _template(strategy).items()}


def _reply(strategy, value: float, counts, node: int, *, protos=None, generator=None, expert: float | None = None,
           **metrics) -> Message:
    counts = torch.tensor(counts)
    result = MosaicClientResult(_state(strategy, value), counts, {"train-loss": 0.1, **metrics},
                                protos, generator, None if expert is None else _state(strategy, expert))
    out = Message(RecordDict({}), dst_node_id=node, message_type="train.mosaic")
    return Message(mosaic_payload(result), reply_to=out)


def test_schedule(strategy):
    assert [strategy.phase(r) for r in range(1, 6)] == ["warmup", "warmup", "distill", "finetune", "finetune"]


def test_experts_are_class_count_weighted_and_bad_replies_dropped(strategy):
    a = [6, 0, 0, 0, 0, 0, 0, 0, 0, 2]    # client A: classes 0 and 9
    b = [2, 4, 0, 0, 0, 0, 0, 0, 0, 6]    # client B: classes 0, 1 and 9
    replies = [_reply(strategy, 1.0, a, 101), _reply(strategy, 5.0, b, 102)]
    # malformed: NaN weights; counts that do not sum to num-examples; wrong number of classes
    bad_nan = _reply(strategy, float("nan"), a, 103)
    bad_counts = _reply(strategy, 2.0, a, 104)
    bad_counts.content["label-counts"] = MetricRecord({"counts": [1] * C})
    bad_len = _reply(strategy, 2.0, a, 105)
    bad_len.content["label-counts"] = MetricRecord({"counts": [8] + [0] * 3})
    arrays, _ = strategy.aggregate_train(1, [replies[0], bad_nan, replies[1], bad_counts, bad_len])
    assert strategy.rejected == 3
    w = next(k for k, v in _template(strategy).items() if v.is_floating_point())
    # global: weighted by num-examples (8 and 12): (8*1 + 12*5) / 20 = 3.4
    assert torch.allclose(arrays.to_torch_state_dict()[w], torch.tensor(3.4))
    experts = strategy.experts["cnn_small"]
    assert len(experts) == C
    assert torch.allclose(experts[0][w], torch.tensor((6 * 1 + 2 * 5) / 8))   # 2.0
    assert torch.allclose(experts[1][w], torch.tensor(5.0))                   # only B holds 1
    assert torch.allclose(experts[9][w], torch.tensor((2 * 1 + 6 * 5) / 8))   # 4.0
    # a class no client holds: no previous expert yet -> the sample-weighted average
    assert torch.allclose(experts[4][w], torch.tensor(3.4))
    # next round: class 1's holder is absent -> class 1 keeps its previous expert
    strategy.aggregate_train(2, [_reply(strategy, 9.0, a, 101)])
    assert torch.allclose(strategy.experts["cnn_small"][1][w], torch.tensor(5.0))
    assert torch.allclose(strategy.experts["cnn_small"][0][w], torch.tensor(9.0))


def test_feddf_gen_warms_up_as_fedavg_and_asks_for_generators_only_at_its_distillation_round():
    as_flower_server()
    cfg = build_config({"strategy": "feddf-gen", "dataset": "synthetic", "warmup-rounds": 3, "num-server-rounds": 5})
    feddf = FedDFGenerators(_sc(cfg))
    assert [feddf.round_config(r, feddf.train_config())[0] for r in (1, 2, 3, 4, 5)] == \
        ["train", "train", "train.mosaic", "train", "train"]
    _, values = feddf.round_config(3, feddf.train_config())
    assert values["distill"] and values["proto-k"] == 0 and values["gen-steps"] == cfg.of('mosaic').gen_steps
    assert "experts" not in feddf.state_dict()  # FedDF's teacher is the client models: no class experts


def test_class_experts_are_kept_through_warm_up_and_dropped_after_the_distillation_round(strategy, monkeypatch):
    ran = []
    monkeypatch.setattr(strategy, "distillation", lambda server_round, clients: ran.append(
        (len(clients), len(strategy.experts["cnn_small"]))))
    a = [6, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    for server_round in (1, 2):
        strategy.aggregate_train(server_round, [_reply(strategy, 1.0, a, 101)])
        assert len(strategy.experts["cnn_small"]) == C  # the next round may need them (absent classes)
    info = dataset_info("synthetic")
    gen = build_generator(info.in_channels, info.image_size, C, info.mean, info.std).state_dict()
    protos = (torch.randn(3, strategy.module(Arch(strategy.cfg.model)).feature_dim), torch.tensor([0, 0, 9]))
    strategy.aggregate_train(3, [_reply(strategy, 1.0, a, 101, protos=protos, generator=gen)])  # distillation
    assert ran == [(1, C)]  # distillation saw the experts ...
    assert strategy.experts == {} and strategy.family_counts == {}  # ... which are gone after it
    assert strategy.state_dict()["experts"] == {}


def test_expert_pass_experts_are_made_of_the_expert_models_and_the_global_model_of_the_trained_ones(monkeypatch):
    """``kd.expert-pass``: at the distillation round each client trains a second model from the
    received one with the ``distill-*`` settings and uploads it beside its trained model; the
    class experts are the count-weighted means of those, the global model the mean of the
    trained ones, and a reply without its expert model is rejected."""
    as_flower_server()
    cfg = build_config({"strategy": "mosaic", "dataset": "synthetic", "warmup-rounds": 3, "num-server-rounds": 5,
                        "local-steps": 7, "kd.expert-pass": True, "kd.local-steps": 2, "kd.local-batch-size": 64,
                        "kd.local-momentum": 0.0, "kd.local-weight-decay": 1e-4})
    strategy = MosaicStrategy(_sc(cfg))
    _, values = strategy.round_config(3, strategy.train_config())
    assert values["local-steps"] == 7 and values["momentum"] == cfg.momentum  # the regular training, unchanged
    assert (values["expert-local-steps"], values["expert-batch-size"], values["expert-momentum"],
            values["expert-weight-decay"]) == (2, 64, 0.0, 1e-4)
    assert "expert-local-steps" not in strategy.round_config(2, strategy.train_config())[1]
    from client_app.app import expert_settings
    assert expert_settings(values) == {"epochs": cfg.local_epochs, "steps": 2, "batch_size": 64, "lr": cfg.lr,
                                       "momentum": 0.0, "weight_decay": 1e-4}
    # kd.local-lr: the expert pass at its own rate, the regular training at the round's
    late = MosaicStrategy(_sc(build_config({**cfg.values, "lr-step-round": 1, "kd.local-lr": 0.05})))
    _, values = late.round_config(3, late.train_config())
    assert values["lr"] == cfg.finetune_lr and expert_settings(values)["lr"] == 0.05
    seen = []
    monkeypatch.setattr(strategy, "distillation", lambda server_round, clients: seen.append(
        [dict(e) for e in strategy.experts["cnn_small"]]))
    info = dataset_info("synthetic")
    gen = build_generator(info.in_channels, info.image_size, C, info.mean, info.std).state_dict()
    d = strategy.module(Arch(cfg.model)).feature_dim
    a = [6, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    b = [2, 4, 0, 0, 0, 0, 0, 0, 0, 6]
    protos = (torch.randn(2, d), torch.tensor([0, 9]))
    replies = [_reply(strategy, 1.0, a, 101, protos=protos, generator=gen, expert=10.0),
               _reply(strategy, 5.0, b, 102, protos=protos, generator=gen, expert=50.0),
               _reply(strategy, 3.0, b, 103, protos=protos, generator=gen)]  # no expert model: rejected
    arrays, _ = strategy.aggregate_train(3, replies)
    assert strategy.rejected == 1
    w = next(k for k, v in _template(strategy).items() if v.is_floating_point())
    assert torch.allclose(arrays.to_torch_state_dict()[w], torch.tensor((8 * 1 + 12 * 5) / 20))
    (experts,) = seen
    assert torch.allclose(experts[0][w], torch.tensor((6 * 10 + 2 * 50) / 8))
    assert torch.allclose(experts[1][w], torch.tensor(50.0))
    assert torch.allclose(experts[9][w], torch.tensor((2 * 10 + 6 * 50) / 8))


def test_an_expert_model_that_was_not_asked_for_or_does_not_fit_is_refused(strategy):
    info = dataset_info("synthetic")
    gen = build_generator(info.in_channels, info.image_size, C, info.mean, info.std).state_dict()
    d = strategy.module(Arch(strategy.cfg.model)).feature_dim
    counts = [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]
    protos = (torch.randn(3, d), torch.tensor([0, 1, 1]))

    def decode(msg, expect_expert):
        return decode_mosaic_reply(msg, _template(strategy), num_classes=C, feature_dim=d,
                                   generator_template=strategy.generator_template(), expect_prototypes=True,
                                   expect_expert=expect_expert)

    ok, problem = decode(_reply(strategy, 1.0, counts, 101, protos=protos, generator=gen, expert=2.0), True)
    assert problem is None and ok.expert_state is not None
    assert decode(_reply(strategy, 1.0, counts, 101, protos=protos, generator=gen, expert=2.0), False)[1] == \
        "an 'expert-arrays' record that was not asked for"
    wrong = _reply(strategy, 1.0, counts, 101, protos=protos, generator=gen, expert=2.0)
    wrong.content["expert-arrays"] = ArrayRecord({k: torch.zeros(2) for k in list(_template(strategy))[:2]})
    reply, problem = decode(wrong, True)
    assert reply is None and problem.startswith("expert model:")
    nan = _reply(strategy, 1.0, counts, 101, protos=protos, generator=gen, expert=float("nan"))
    assert decode(nan, True)[0] is None


def _raw_prototypes(msg: Message, features: torch.Tensor, labels: torch.Tensor) -> Message:
    """A reply whose prototypes record holds exactly these tensors (a hostile client's: the
    ClientApp itself always sends float32 features and int64 labels)."""
    msg.content["prototypes"] = ArrayRecord({"features": features, "labels": labels})
    return msg


def test_distill_round_requires_valid_prototypes_and_generator(strategy):
    info = dataset_info("synthetic")
    gen = build_generator(info.in_channels, info.image_size, C, info.mean, info.std).state_dict()
    d = strategy.module(Arch(strategy.cfg.model)).feature_dim
    counts = [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]
    good = (torch.randn(3, d), torch.tensor([0, 1, 1]))
    cases = {
        "no prototypes": _reply(strategy, 1.0, counts, 101, generator=gen),
        "wrong dimension": _reply(strategy, 1.0, counts, 102, protos=(torch.randn(3, d + 1), good[1]), generator=gen),
        "class not held": _reply(strategy, 1.0, counts, 103, protos=(good[0], torch.tensor([0, 1, 7])), generator=gen),
        "non-finite": _reply(strategy, 1.0, counts, 104, protos=(torch.full((3, d), float("inf")), good[1]), generator=gen),
        "no generator": _reply(strategy, 1.0, counts, 105, protos=good),
        # hostile values that crashed the server before they were checked (issue 38)
        "bool labels": _raw_prototypes(_reply(strategy, 1.0, counts, 108, protos=good, generator=gen),
                                       good[0], torch.tensor([True, False, True])),
        "float64 that overflows float32": _raw_prototypes(_reply(strategy, 1.0, counts, 109, protos=good,
                                                                 generator=gen),
                                                          torch.full((3, d), 1e300, dtype=torch.float64), good[1]),
        "train-loss as a list": _reply(strategy, 1.0, counts, 110, protos=good, generator=gen,
                                       **{"train-loss": [0.1, 0.2]}),
        "generator of another architecture": _reply(
            strategy, 1.0, counts, 106, protos=good,
            generator={k: torch.zeros(2) for k in list(gen)[:3]}),
    }
    for name, msg in cases.items():
        reply, problem = decode_mosaic_reply(msg, _template(strategy), num_classes=C, feature_dim=d,
                                             generator_template=strategy.generator_template(),
                                             expect_prototypes=True)
        assert reply is None and problem, name
    ok, problem = decode_mosaic_reply(_reply(strategy, 1.0, counts, 107, protos=good, generator=gen),
                                      _template(strategy), num_classes=C, feature_dim=d,
                                      generator_template=strategy.generator_template(), expect_prototypes=True)
    assert problem is None and ok.prototypes[0].shape == (3, d) and ok.generator is not None


def test_configure_train_phases(strategy):
    grid = InProcessGrid(client_app, {}, 4)
    cfgrec = strategy.sc.cfg
    base = ConfigRecord({"lr": cfgrec.lr})
    arrays = ArrayRecord(_template(strategy))
    warm = list(strategy.configure_train(1, arrays, base, grid))
    dist = list(strategy.configure_train(3, arrays, base, grid))
    fine = list(strategy.configure_train(4, arrays, base, grid))
    assert {m.metadata.message_type for m in warm} == {"train.mosaic"}
    assert all(m.content["config"]["distill"] is False for m in warm)
    assert all(m.content["config"]["distill"] is True and m.content["config"]["proto-k"] == cfgrec.of("mosaic").proto_k
               for m in dist)
    assert {m.metadata.message_type for m in fine} == {"train"}
    assert all(m.content["config"]["lr"] == cfgrec.finetune_lr for m in fine)


def test_arrays_are_checked_before_anything_is_decoded(strategy):
    """Keys, shapes, dtypes and byte sizes are read from the Arrays' declarations: a reply
    with an unexpected array, or one carrying more bytes than its shape holds, is refused
    without decoding it (issue 38)."""
    from flwr.app import Array

    from mosaic_flwr.core.records import decode_evaluate_reply, record_problem

    template = _template(strategy)
    good = ArrayRecord({k: v.clone() for k, v in template.items()})
    assert record_problem(good, template) is None
    key = next(iter(template))
    ref = template[key]
    bloated = ArrayRecord({k: v.clone() for k, v in template.items()})
    bloated[key] = Array(dtype="float32", shape=tuple(ref.shape), stype="numpy.ndarray", data=b"\0" * 10**7)
    assert "bytes for" in record_problem(bloated, template)
    extra = ArrayRecord({**{k: v.clone() for k, v in template.items()}, "payload": torch.zeros(10**5)})
    assert "unexpected ['payload']" in record_problem(extra, template)
    as_flower_server()
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "correct-a": 3}),
                          "junk": ArrayRecord({"x": torch.zeros(1000)})})
    reply, problem = decode_evaluate_reply(Message(content, dst_node_id=100, message_type="evaluate"), ["a"])
    assert reply is None and "expected only a metrics record" in problem


def test_the_expert_pass_trains_a_copy_of_the_received_model_and_leaves_the_regular_training_as_it_was():
    """``mosaic_client_round(expert_train=...)``: the expert model is the received model trained
    with the expert's settings and its own seed; the trained model is exactly what it is without
    an expert pass (its random numbers are untouched), and the prototypes still come from the
    received model."""
    import copy

    from mosaic_flwr.methods.mosaic.client import mosaic_client_round
    from mosaic_flwr.core.training import train_local
    from mosaic_flwr.core.seeds import mix_seed
    from mosaic_flwr.core.task import initial_model

    cfg = build_config({"strategy": "mosaic", "dataset": "synthetic"})
    info = dataset_info("synthetic")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 28, 28, generator=g), torch.arange(48) % 4
    received = initial_model(cfg)
    train = {"steps": 3, "batch_size": 8, "lr": 0.05, "momentum": 0.9}
    expert_train = {"steps": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.0, "weight_decay": 1e-4}
    common = dict(train=train, seed=5, device=torch.device("cpu"), distill_round=True, proto_k=2)
    plain = mosaic_client_round(copy.deepcopy(received), x, y, info, **common)
    both = mosaic_client_round(copy.deepcopy(received), x, y, info, expert_train=expert_train, **common)
    assert plain.expert_state is None
    assert all(torch.equal(plain.state[k], v) for k, v in both.state.items())
    assert all(torch.equal(a, b) for a, b in zip(plain.prototypes, both.prototypes))
    reference = copy.deepcopy(received)
    train_local(reference, x, y, seed=mix_seed(5, "expert"), **expert_train)
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in both.expert_state.items())
    assert any(not torch.equal(both.state[k], v) for k, v in both.expert_state.items())
    assert both.metrics["expert-seconds"] > 0 and "expert-train-loss" in both.metrics
    # a warm-up round has no expert pass
    warm = mosaic_client_round(copy.deepcopy(received), x, y, info, expert_train=expert_train,
                               **{**common, "distill_round": False})
    assert warm.expert_state is None
