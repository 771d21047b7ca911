"""Robust aggregation beyond the global model: the share cap, robust class experts and the
robust masked rule for width-scaled sub-models (exact values on hand-made tensors)."""

import json

import pytest
import torch

from mosaic_flwr.models.classifiers import build_model
from mosaic_flwr.distill.experts import build_class_experts, robust_class_average, weighted_average_states
from mosaic_flwr.core.robust import cap_shares, robust_average
from mosaic_flwr.core.submodels import model_plan, robust_masked_average, submodel_plan
from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.core.task import Arch
from tests.support import hetero_bank, hetero_reply, TwoTensorBank, two_tensor_reply

D = torch.float64


# ----------------------------------------------------------------------------- cap_shares
@pytest.mark.parametrize("weights, share, expected", [
    ([6, 1, 1], 0.5, [0.5, 0.25, 0.25]),               # 0.75 capped, 0.25 excess split 1:1
    ([4, 2, 1, 1], 0.375, [0.375, 0.3125, 0.15625, 0.15625]),
    ([1, 2, 4, 1], 0.375, [0.15625, 0.3125, 0.375, 0.15625]),  # order does not matter
    ([6, 5, 1, 0], 0.375, [0.375, 0.375, 0.25, 0.0]),  # redistribution pushes #2 over: both capped
    ([3, 1, 0], 0.5, [0.5, 0.5, 0.0]),                 # two holders, bound 1/2: equal shares
    ([5, 1, 0], 0.25, [0.5, 0.5, 0.0]),                # infeasible (2 * 0.25 < 1): equal shares
    ([1, 3], 1.0, [0.25, 0.75]),                       # no bound: the normalised weights
    ([1, 1, 2], 0.5, [0.25, 0.25, 0.5]),               # already within the bound: unchanged
])
def test_cap_shares_exact(weights, share, expected):
    assert torch.equal(cap_shares(weights, share), torch.tensor(expected, dtype=D))


def test_cap_shares_properties_on_random_weights():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 12, (1,), generator=gen))
        w = torch.rand(n, generator=gen, dtype=D) ** 4 * torch.randint(0, 2, (n,), generator=gen)
        w[0] += 1e3  # one dominant client
        share = float(torch.rand(1, generator=gen)) * 0.9 + 0.1
        out = cap_shares(w, share)
        p = w / w.sum()
        m = int((w > 0).sum())
        assert torch.isclose(out.sum(), torch.tensor(1.0, dtype=D))
        assert torch.equal(out > 0, w > 0)
        if m * share > 1:
            assert out.max() <= share + 1e-12
            free = (out < share - 1e-12) & (w > 0)  # uncapped holders keep their proportions, scaled up
            ratio = out[free] / p[free]
            assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and (ratio >= 1 - 1e-12).all()
        else:
            assert torch.allclose(out[w > 0], torch.full((m,), 1 / m, dtype=D))


def test_bound_counts_weights_a_client_as_at_most_factor_median_clients():
    from mosaic_flwr.core.robust import bound_counts
    counts = {1: torch.tensor([50, 50, 0]), 2: torch.tensor([0, 100, 0]), 3: torch.tensor([30, 0, 90]),
              4: torch.tensor([9000, 1, 999])}  # totals 100, 100, 120, 10000: median 110
    out = bound_counts(counts, 4.0)
    assert all(out[k] is counts[k] for k in (1, 2, 3))  # at most 4 x 110: unchanged
    assert out[4].tolist() == [396, 1, 43] and out[4].sum() <= 440  # 9000 x 0.044 = 396; a held class keeps 1
    assert bound_counts(counts, 0.0) == counts
    with pytest.raises(ValueError, match="count-clip"):
        bound_counts(counts, 0.5)


@pytest.mark.parametrize("weights, share, match", [
    ([1, -1], 0.5, "weights"), ([0, 0], 0.5, "weights"), ([1, float("nan")], 0.5, "weights"),
    ([1, 1], 0.0, "max-client-share"), ([1, 1], 1.5, "max-client-share"),
])
def test_cap_shares_rejects_bad_input(weights, share, match):
    with pytest.raises(ValueError, match=match):
        cap_shares(weights, share)


# ----------------------------------------------------------------------------- class experts
def _s(w: float, n: int = 0) -> dict:
    return {"w": torch.tensor([w, -w]), "n": torch.tensor(n)}


# 4 clients, 3 classes; client 3 is the liar (huge counts, poisoned model 1000)
LIAR_COUNTS = torch.tensor([[10, 5, 0], [20, 0, 0], [30, 5, 0], [10**6, 10**6, 0]])
LIAR_STATES = [_s(1.0, 1), _s(2.0, 2), _s(3.0, 3), _s(1000.0, 9)]


def test_mean_experts_are_owned_by_a_client_with_inflated_counts():
    experts = build_class_experts(LIAR_STATES, LIAR_COUNTS)
    assert experts[0]["w"][0] > 999 and experts[1]["w"][0] > 999


def test_robust_experts_take_the_median_or_trimmed_mean_of_the_class_holders_unweighted():
    experts = build_class_experts(LIAR_STATES, LIAR_COUNTS, average=robust_class_average("median"))
    assert torch.equal(experts[0]["w"], torch.tensor([2.5, -2.5]))   # median(1, 2, 3, 1000)
    assert torch.equal(experts[1]["w"], torch.tensor([3.0, -3.0]))   # median(1, 3, 1000): holders of 1
    assert experts[0]["n"].item() == 9                               # integer entries: the maximum
    assert torch.equal(experts[2]["w"], torch.tensor([2.5, -2.5]))   # nobody holds 2: all clients
    experts = build_class_experts(LIAR_STATES, LIAR_COUNTS,
                                  average=robust_class_average("trimmed-mean", trim=0.25))
    assert torch.equal(experts[0]["w"], torch.tensor([2.5, -2.5]))   # drop 1 and 1000
    assert torch.equal(experts[1]["w"], torch.tensor([(1 + 3 + 1000) / 3, -(1 + 3 + 1000) / 3]))  # 3 holders: trim 0


def test_max_share_caps_each_client_in_each_expert():
    experts = build_class_experts(LIAR_STATES, LIAR_COUNTS, max_share=0.4)
    # class 0: the liar capped at 0.4; 0.6 shared 1:2:3 by the others -> 0.1, 0.2, 0.3
    torch.testing.assert_close(experts[0]["w"][0], torch.tensor(0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.4 * 1000))
    # class 1: three holders, bound 0.4 -> liar 0.4; 0.6 shared 5:5 -> 0.3, 0.3
    torch.testing.assert_close(experts[1]["w"][0], torch.tensor(0.3 * 1 + 0.3 * 3 + 0.4 * 1000))


def test_max_share_one_is_bit_identical_to_no_bound():
    """The defaults (mean, max-client-share 1) compute exactly what they did before: expert k
    is ``weighted_average_states`` with class k's count column as weights."""
    torch.manual_seed(0)
    states = [build_model("cnn_small", 1, 10, 28).state_dict() for _ in range(3)]
    counts = torch.tensor([[5, 0, 7, 1], [1, 9, 0, 0], [3, 3, 3, 0]])
    a, b = build_class_experts(states, counts), build_class_experts(states, counts, max_share=1.0)
    for k, (x, y) in enumerate(zip(a, b)):
        before = weighted_average_states(states, counts[:, k].double() / counts[:, k].sum())
        assert all(torch.equal(x[key], y[key]) and torch.equal(x[key], before[key]) for key in x)


def test_fedavg_defaults_are_the_weighted_average_rounded_once():
    """The default aggregate (streamed, float64 running sums) is the examples-weighted mean
    computed in float64 and rounded once to float32: within a float32 unit of the plain
    float32 weighted average, and exactly the float64 one cast."""
    strategy = TwoTensorBank(FedAvgStrategy).strategy
    assert strategy.cfg.aggregation == "mean" and strategy.cfg.max_client_share == 1.0
    values = [(0.1, 7), (0.7, 3), (1.3, 11)]
    arrays, _ = strategy.aggregate_train(1, [two_tensor_reply(v, n, 101 + i) for i, (v, n) in enumerate(values)])
    states = [{"w": torch.full((2, 2), v), "b": torch.full((2,), v)} for v, _ in values]
    plain = weighted_average_states(states, [n for _, n in values])
    exact = {k: (sum(n * s[k].double() for s, (_, n) in zip(states, values)) / sum(n for _, n in values)).float()
             for k in plain}
    state = arrays.to_torch_state_dict()
    assert all(torch.equal(state[k], exact[k]) for k in exact)
    assert all(torch.allclose(state[k], plain[k], rtol=0, atol=float(torch.finfo(torch.float32).eps) * 2) for k in plain)


# ----------------------------------------------------------------------------- masked robust rule
GLOBAL = {"w": (4, 2), "n": ()}
HALF = {"w": (2, 2), "n": ()}


def _filled(shapes, value, n=0):
    return {k: torch.tensor(n) if not s else torch.full(s, value) for k, s in shapes.items()}


def test_robust_masked_average_exact():
    base = {"w": torch.full((4, 2), -1.0), "n": torch.tensor(0)}
    fixed = submodel_plan(GLOBAL, HALF, mode="fixed")                # rows 0, 1
    rolled = submodel_plan(GLOBAL, HALF, mode="rolling", offset=1)   # rows 1, 2
    states = [_filled(HALF, 1.0, 4), _filled(HALF, 2.0, 1), _filled(HALF, 30.0, 2), _filled(GLOBAL, 4.0, 3)]
    plans = [fixed, fixed, rolled, None]
    out = robust_masked_average(base, states, plans, "median")
    # row 0: held by 1, 2, 4 -> 2; row 1: held by all -> median(1, 2, 30, 4) = 3;
    # row 2: held by 30 and 4 -> 17; row 3: only the full model -> 4
    assert torch.equal(out["w"], torch.tensor([[2.0] * 2, [3.0] * 2, [17.0] * 2, [4.0] * 2]))
    assert out["n"].item() == 4
    out = robust_masked_average(base, states, plans, "trimmed-mean", trim=0.25)
    # 3 holders: floor(0.75) = 0 trimmed -> mean; 4 holders: 1 trimmed each end -> (2 + 4) / 2
    assert torch.equal(out["w"], torch.tensor([[7 / 3] * 2, [3.0] * 2, [17.0] * 2, [4.0] * 2]))
    # weight 0: the full-width client holds nothing; row 3 keeps base's value
    out = robust_masked_average(base, states, plans, "median", weights=[1, 1, 1, 0])
    assert torch.equal(out["w"], torch.tensor([[1.5] * 2, [2.0] * 2, [30.0] * 2, [-1.0] * 2]))
    assert out["n"].item() == 4


def test_robust_masked_average_with_full_plans_equals_robust_average():
    torch.manual_seed(0)
    states = [build_model("resnet8", 1, 10, 28).state_dict() for _ in range(5)]
    for i, state in enumerate(states):
        state["stages.0.0.bn1.num_batches_tracked"].fill_(3 * i + 1)
    full_plan = model_plan(build_model("resnet8", 1, 10, 28), build_model("resnet8", 1, 10, 28))
    base = build_model("resnet8", 1, 10, 28).state_dict()
    for rule in ("median", "trimmed-mean"):
        expected = robust_average(states, rule, trim=0.2)
        for plans in ([None] * 5, [full_plan] * 5):
            out = robust_masked_average(base, states, plans, rule, trim=0.2)
            assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_robust_masked_average_errors():
    base = {"w": torch.zeros(4, 2), "n": torch.tensor(0)}
    with pytest.raises(ValueError, match="no states"):
        robust_masked_average(base, [], [], "median")
    with pytest.raises(ValueError, match="shape"):
        robust_masked_average(base, [_filled(GLOBAL, 1.0)], [submodel_plan(GLOBAL, HALF)], "median")
    with pytest.raises(ValueError, match="aggregation: unknown rule"):
        robust_masked_average(base, [_filled(GLOBAL, 1.0)], [None], "krum")


# ----------------------------------------------------------------------------- strategies
def test_fedavg_with_max_client_share_caps_the_weight_of_inflated_example_counts():
    strategy = TwoTensorBank(FedAvgStrategy, **{"max-client-share": 0.4}).strategy
    replies = [two_tensor_reply(v, n, 101 + i) for i, (v, n) in enumerate([(1.0, 10), (2.0, 10), (3.0, 10), (11.0, 10**6)])]
    arrays, _ = strategy.aggregate_train(1, replies)
    # the liar: 0.4; the others share 0.6 equally: 0.2 * (1 + 2 + 3) + 0.4 * 11 = 5.6
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((2, 2), 5.6))


def test_robust_rule_now_covers_width_scaled_sub_models():
    full, half = Arch("cnn_small"), Arch("cnn_small", 0.5)
    bank = hetero_bank({101: full, 102: half, 103: half, 104: full}, submodel="fixed", aggregation="median")
    replies = [hetero_reply(bank, 101, full, 1.0, 10), hetero_reply(bank, 102, half, 2.0, 10),
               hetero_reply(bank, 103, half, 500.0, 10), hetero_reply(bank, 104, full, 4.0, 10)]
    arrays, _ = bank.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["conv1.weight"]  # [32, 1, 3, 3]; half models hold rows 0..15
    assert torch.equal(w[:16], torch.full_like(w[:16], 3.0))    # median(1, 2, 500, 4)
    assert torch.equal(w[16:], torch.full_like(w[16:], 2.5))    # median(1, 4)


# ----------------------------------------------------------------------------- in-process attack
def _relative_distance(a: dict, b: dict) -> float:
    keys = [k for k in b if b[k].is_floating_point() and "running_" not in k]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    return float(diff / torch.cat([b[k].flatten() for k in keys]).norm())


@pytest.mark.parametrize("aggregation,count_clip", [("mean", 0.0), ("mean", 4.0), ("median", 4.0)])
def test_a_client_with_inflated_counts_owns_the_mean_experts_unless_bounded(tmp_path, monkeypatch,
                                                                             aggregation, count_clip):
    """Partition 0 declares 1000x its counts at discovery and in its replies (consistently:
    the checks pass) and sends random weights. Without a bound (``count-clip=0``) the mean
    gives it every class expert of the classes it holds, the teacher and the global model.
    With the default ``count-clip=4`` it is weighted as 4 median clients: in no class expert
    that another client also holds does it reach 99 %. With the median it owns none.
    (On this tiny schedule the distilled model itself is at chance even in a clean run: its
    generators train for 20 steps; the teacher scores 1.0 clean.)"""
    from mosaic_flwr.testing.faults import inflating_attacker
    from mosaic_flwr.core.checkpoint import load_checkpoint
    from tests.support import run_inprocess
    from tests.support import TINY_MOSAIC, metric_rows

    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy

    seen = {}  # the experts and counts the distillation round starts from (dropped after it)
    real = MosaicStrategy.distillation

    def distillation(strategy, *args, **kwargs):
        seen.update(experts=dict(strategy.experts), counts=dict(strategy.family_counts))
        return real(strategy, *args, **kwargs)

    monkeypatch.setattr(MosaicStrategy, "distillation", distillation)
    hook = inflating_attacker(partition=0, factor=1000, poison="random")
    # The teacher is the plain expert ensemble (no meta model): what the experts are worth.
    out = run_inprocess(tmp_path, num_nodes=4, grid_options={"hook": hook}, aggregation=aggregation,
                        **{**TINY_MOSAIC, "num-server-rounds": 2, "mosaic.gen-steps": 5, "kd.steps": 2,
                           "mosaic.meta": False, "count-clip": count_clip})["dir"]
    state = load_checkpoint(out)
    assert state["round"] == 2 and all(r.get("rejected", 0) == 0 for r in metric_rows(out))  # the lie passed
    summary = json.loads((out / "summary.json").read_text())
    declared = torch.tensor(hook.declared, dtype=torch.float64)
    if count_clip:  # weighted as count_clip x the median declared total, logged in summary.json
        totals = sorted(float(a["num-examples"]) for a in summary["assignment"])
        median = (totals[1] + totals[2]) / 2
        weighted = summary["count-clipped"]["0"]["weighted-as"]
        assert summary["count-clipped"]["0"]["declared"] == int(declared.sum())
        assert count_clip * median - 10 <= weighted <= count_clip * median
        declared = torch.where(declared > 0, torch.floor(declared * (count_clip * median / declared.sum())).clamp_min(1), 0)
    share = declared / seen["counts"]["cnn_small"].double()  # its weight in expert k
    held, owned = torch.nonzero(declared > 0).flatten().tolist(), torch.nonzero(share > 0.99).flatten().tolist()
    experts = seen["experts"]["cnn_small"]
    distance = {k: _relative_distance(experts[k], hook.sent[2]) for k in held}
    report = summary["distillation"]
    if count_clip == 0:
        assert len(owned) >= len(held) / 2  # 1000 x (a class's count) outweighs the other clients' counts
        assert max(distance[k] for k in owned) < 0.05   # those experts are the liar's model
        assert report["acc-teacher"] < 0.2 and report["acc-before-distill"] < 0.2
    elif aggregation == "mean":
        shared = [k for k in held if seen["counts"]["cnn_small"][k] > declared[k]]  # another client holds k
        assert shared and all(share[k] < 0.99 for k in shared), share
    else:
        assert min(distance.values()) > 0.5            # no expert is the liar's model
        assert report["acc-teacher"] > 0.6 and report["acc-before-distill"] > 0.6


def test_mosaic_robust_experts_of_width_scaled_sub_models_are_masked_medians_of_the_holders():
    from tests.support import as_flower_server
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.records import ClientInfo
    from mosaic_flwr.core.server import ServerContext
    from mosaic_flwr.distill.server import ClientModel
    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy

    as_flower_server()
    cfg = build_config({"strategy": "mosaic", "dataset": "synthetic", "aggregation": "median",
                        "submodel": "fixed"})
    full, half = Arch("cnn_small"), Arch("cnn_small", 0.5)
    both, first = [5, 5] + [0] * 8, [10] + [0] * 9
    setup = {101: (full, both, 1.0), 102: (half, both, 2.0), 103: (half, [10**6] + [0] * 9, 500.0),
             104: (full, first, 4.0)}
    clients = {n: ClientInfo(n, i, torch.tensor(c), a.model, a.capacity) for i, (n, (a, c, _)) in enumerate(setup.items())}
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None, test_y=None,
                       results=None, num_nodes=4, clients=clients)
    strategy = MosaicStrategy(sc)
    items = []
    for n, (arch, counts, value) in setup.items():
        state = {k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
                 for k, v in strategy.template(arch).items()}
        items.append(ClientModel(n, arch, state, float(sum(counts)), 0.0, torch.tensor(counts)))
    strategy.update_experts(1, "cnn_small", items)
    experts = strategy.experts["cnn_small"]
    w0, w1 = experts[0]["conv1.weight"], experts[1]["conv1.weight"]  # half models hold rows 0..15
    assert torch.equal(w0[:16], torch.full_like(w0[:16], 3.0))   # class 0: median(1, 2, 500, 4)
    assert torch.equal(w0[16:], torch.full_like(w0[16:], 2.5))   # median(1, 4): the full models
    assert torch.equal(w1[:16], torch.full_like(w1[:16], 1.5))   # class 1: holders 101, 102
    assert torch.equal(w1[16:], torch.full_like(w1[16:], 1.0))   # only 101 holds these rows
    assert experts[2] is experts[3]                              # nobody holds 2..9: one shared expert


@pytest.mark.slow
def test_the_median_gate_gives_a_client_that_forges_its_scores_one_vote(tmp_path):
    """``bench/archive/liar_client.py`` (partition 0: 1000x counts, random weights, and gate scores that
    say the distilled model is right everywhere and the old one nowhere) among 5 clients. The
    pooled gate reads the forged 100 % with the liar's (count-clip bounded) weight; the median
    of the clients' own accuracies hears it as one client of five."""
    from flwr.app import Context, RecordDict

    from bench.archive.liar_client import app as liar_app
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from server_app.app import main as server_main
    from tests.support import QUICK_MOSAIC as TINY

    after = {}
    for statistic in ("pooled", "median"):
        rc = {**load_defaults(), **TINY, "strategy": "mosaic", "kd.gate": "clients", "kd.gate-rounds": 0,
              "kd.gate-statistic": statistic, "output-dir": str(tmp_path / statistic), "run-name": "r"}
        server_main(InProcessGrid(liar_app, rc, 5),
                    Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc))
        report = json.loads((tmp_path / statistic / "r" / "summary.json").read_text())["distillation"]
        after[statistic] = report["gate-after"]
    # the liar's forged 1.0 pulls the pooled score up by at least a third of its bounded share
    assert after["pooled"] > after["median"] + 0.2, after


def test_the_attackers_lie_covers_every_reply_kind_and_replies_without_a_model():
    """``mosaic_flwr.testing.faults.inflate_reply``: discovery (counts and example count x factor, no
    model), a training round (counts, label-counts record, poisoned model returned), the
    gate's evaluation reply (example count and correct predictions x factor: the same accuracy,
    factor x the weight; no model, no KeyError) and the meta model's logits (nothing to lie
    about: unchanged)."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from mosaic_flwr.testing.faults import inflate_reply

    gen = torch.Generator().manual_seed(0)
    query = RecordDict({"metrics": MetricRecord({"partition-id": 0, "num-examples": 6, "counts": [1, 0, 5]})})
    assert inflate_reply(query, "query", 10, "random", gen) is None
    assert query.metric_records["metrics"]["counts"] == [10, 0, 50]
    assert query.metric_records["metrics"]["num-examples"] == 60

    model = {"w": torch.ones(3, 2), "bn.running_mean": torch.zeros(2)}
    train = RecordDict({"arrays": ArrayRecord(model), "metrics": MetricRecord({"num-examples": 6, "train-loss": 0.5}),
                        "label-counts": MetricRecord({"counts": [1, 0, 5]})})
    sent = inflate_reply(train, "train.mosaic", 10, "negated", gen)
    assert torch.equal(sent["w"], -10 * torch.ones(3, 2)) and torch.equal(sent["bn.running_mean"], torch.zeros(2))
    assert torch.equal(train.array_records["arrays"].to_torch_state_dict()["w"], sent["w"])
    assert train.metric_records["label-counts"]["counts"] == [10, 0, 50]
    assert train.metric_records["metrics"]["num-examples"] == 60
    assert train.metric_records["metrics"]["train-loss"] == 0.5

    evaluate = RecordDict({"metrics": MetricRecord({"num-examples": 6, "correct-before": 3, "correct-after": 5})})
    assert inflate_reply(evaluate, "evaluate", 10, "random", gen) is None
    assert dict(evaluate.metric_records["metrics"]) == {"num-examples": 60, "correct-before": 30, "correct-after": 50}
    assert list(evaluate.keys()) == ["metrics"]  # still what decode_evaluate_reply accepts

    logits = RecordDict({"meta-logits": ArrayRecord({"logits": torch.zeros(2, 1, 3), "labels": torch.zeros(2)})})
    assert inflate_reply(logits, "query.logits", 10, "random", gen) is None
    assert torch.equal(logits.array_records["meta-logits"].to_torch_state_dict()["logits"], torch.zeros(2, 1, 3))
