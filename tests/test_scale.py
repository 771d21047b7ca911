"""Many clients: streaming aggregation (running float64 sums, replies pulled one at a time),
the bounded generator bank, and Mosaic's collection rounds under partial participation."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.config import ConfigError, build_config
from mosaic_flwr.distill.experts import build_class_experts, weighted_average_states
from mosaic_flwr.distill.samplers import GeneratorSampler
from mosaic_flwr.core.streaming import ClassSums, GeneratorBank, RunningSum
from mosaic_flwr.core.submodels import masked_average, submodel_plan
from tests.support import assert_same_run, crash_then_resume, metric_rows, run_inprocess, untimed_scores

C = 10


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(7, 5, generator=g) * 10 ** torch.randint(-6, 2, (7, 5), generator=g),
             "b": torch.randn(5, generator=g),
             "n": torch.randint(0, 1000, (), generator=g)} for _ in range(n)]


def _sum(states, weights, order, plans=None, base=None) -> dict:
    s = RunningSum()
    for i in order:
        s.add(states[i], weights[i], None if plans is None else plans[i], base)
    return s.result(base or states[0])


# ----------------------------------------------------------------------------- running sums
def test_running_sum_is_the_weighted_mean_and_independent_of_arrival_order():
    states = _states(40)
    weights = [random.Random(i).randint(1, 6000) for i in range(40)]
    reference = _sum(states, weights, range(40))
    for seed in range(5):
        order = list(range(40))
        random.Random(seed).shuffle(order)
        other = _sum(states, weights, order)
        for key in reference:
            assert torch.equal(reference[key], other[key]), key   # bit for bit
    expected = weighted_average_states(states, weights)
    torch.testing.assert_close(reference["w"], expected["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reference["b"], expected["b"], rtol=1e-6, atol=1e-7)
    assert reference["n"].dtype == torch.int64 and abs(int(reference["n"]) - int(expected["n"])) <= 1
    one = _sum(states, [0] * 39 + [7], range(40))  # a single non-zero weight: that state, exactly
    assert all(torch.equal(one[k], states[39][k]) for k in one)


def test_running_sum_of_sub_models_matches_the_masked_average_in_any_order():
    base = {"w": torch.randn(6, 4), "b": torch.randn(6)}
    plan = submodel_plan({k: v.shape for k, v in base.items()}, {"w": (3, 2), "b": (3,)}, mode="rolling", offset=2)
    g = torch.Generator().manual_seed(1)
    states, plans, weights = [], [], []
    for i in range(12):
        full = i % 3 == 0
        states.append({"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)} if full
                      else {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)})
        plans.append(None if full else plan)
        weights.append(i + 1)
    a = _sum(states, weights, range(12), plans, base)
    b = _sum(states, weights, reversed(range(12)), plans, base)
    assert all(torch.equal(a[k], b[k]) for k in a)
    expected = masked_average(base, states, plans, weights)
    for k in a:
        torch.testing.assert_close(a[k], expected[k], rtol=1e-6, atol=1e-7)
    only_sub = _sum(states[1:3], weights[1:3], range(2), plans[1:3], base)   # entries nobody held keep base
    held = torch.zeros(6, dtype=torch.bool)
    held[plan["b"][0]] = True
    assert torch.equal(only_sub["b"][~held], base["b"][~held])


def test_class_sums_give_the_class_experts_and_keep_unheld_classes():
    states = _states(8, seed=3)
    states = [{k: v for k, v in s.items() if k != "n"} for s in states]
    counts = torch.zeros(8, C, dtype=torch.long)
    for i in range(8):
        counts[i, i % 4] = 10 + i
        counts[i, (i + 1) % 4] = 3
    previous = [{"w": torch.full((7, 5), float(k)), "b": torch.zeros(5)} for k in range(C)]
    sums = ClassSums(C)
    for i in reversed(range(8)):
        sums.add(states[i], counts[i])
    experts = sums.experts(previous, fallback=states[0], base=states[0])
    expected = build_class_experts(states, counts, previous=previous)
    for k in range(C):
        for key in ("w", "b"):
            torch.testing.assert_close(experts[k][key], expected[k][key], rtol=1e-6, atol=1e-7)
    assert experts[7] is previous[7] and torch.equal(sums.counts, counts.sum(0))
    restored = ClassSums.from_state(sums.state_dict())
    assert all(torch.equal(restored.experts(previous, states[0], states[0])[k]["w"], experts[k]["w"])
               for k in range(C))


def test_class_experts_that_come_out_equal_are_one_shared_state():
    """A class with a single holder is exactly that client's model: the classes a client holds
    alone share one state dict (and the fallback, when equal), which StackedExperts runs once."""
    a, b, c = _states(3, seed=4)
    counts = torch.zeros(3, C, dtype=torch.long)
    counts[0, [0, 1, 2]] = torch.tensor([5, 700, 13])   # classes 0-2: client a alone
    counts[1, [3, 4]] = torch.tensor([9, 4])            # classes 3, 4: b and c, weights 9:2 and 4:1
    counts[2, [3, 4, 5]] = torch.tensor([2, 1, 30])     # class 5: c alone; 6-9: nobody
    sums = ClassSums(C)
    for state, n in zip((a, b, c), counts):
        sums.add(state, n)
    experts = sums.experts(None, fallback=dict(a), base=a)
    assert all(experts[k] is experts[0] for k in (1, 2, 6, 7, 8, 9))  # a's model, and the fallback equal to it
    assert all(torch.equal(experts[0][key], a[key]) for key in a)
    assert torch.equal(experts[5]["w"], c["w"]) and experts[5] is not experts[0]
    assert experts[3] is not experts[4] and not torch.equal(experts[3]["w"], experts[4]["w"])
    assert len({id(e) for e in experts}) == 4
    # a fallback that differs stays its own state, shared by the classes nobody holds
    other = sums.experts(None, fallback=b, base=a)
    assert all(other[k] is b for k in (6, 7, 8, 9)) and other[0] is not b


# ----------------------------------------------------------------------------- generator bank
def _offers(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for pid in range(n):
        counts = torch.zeros(C, dtype=torch.long)
        held = torch.randperm(C, generator=g)[:2]
        counts[held] = torch.randint(1, 50, (2,), generator=g)
        out.append((pid, counts, {"weight": torch.full((3,), float(pid))}))
    return out


@pytest.mark.parametrize("size", [1, 3])
def test_generator_bank_keeps_the_largest_holders_of_each_class_whatever_the_order(size):
    offers = _offers(60)
    banks = []
    for seed in range(3):
        order = list(offers)
        random.Random(seed).shuffle(order)
        bank = GeneratorBank(C, size)
        for pid, counts, state in order:
            bank.offer(pid, counts, state)
            assert len(bank) <= C * size          # never above the bound, at any time
        banks.append(bank)
    rows = banks[0].rows()
    assert [r[0] for r in rows] == [r[0] for r in banks[1].rows()] == [r[0] for r in banks[2].rows()]
    masked = torch.stack([c for _, c, _ in rows])
    assert ((masked > 0).sum(0) <= size).all()
    for k in range(C):
        holders = sorted(((-int(c[k]), pid) for pid, c, _ in offers if c[k] > 0))[:size]
        assert sorted(pid for pid, c, _ in rows if c[k] > 0) == sorted(pid for _, pid in holders)
    # The sampler only draws from the kept generators, each only for the classes it is kept for.
    gens = [torch.nn.Identity() for _ in rows]
    sampler = GeneratorSampler(gens, masked, batch_size=256, seed=0)
    owners = torch.multinomial(sampler.owner_probs[sampler.classes.repeat(20)], 1).flatten()
    assert (masked[owners, sampler.classes.repeat(20)] > 0).all()
    assert GeneratorBank.from_state(banks[0].state_dict()).rows()[0][0] == rows[0][0]


def test_unbounded_bank_keeps_every_generator():
    bank = GeneratorBank(C, 0)
    for pid, counts, state in _offers(30):
        bank.offer(pid, counts, state)
    assert len(bank) == 30 and all(torch.equal(c, bank.entries[p]["counts"]) for p, c, _ in bank.rows())


# ----------------------------------------------------------------------------- config
def test_collect_rounds_and_bank_size_are_checked_before_training():
    base = {"strategy": "mosaic", "num-server-rounds": 6, "warmup-rounds": 4}
    assert build_config({**base, "mosaic.collect-rounds": 4, "mosaic.generator-bank-size": 2}).of('mosaic').collect_rounds == 4
    with pytest.raises(ConfigError, match="mosaic.collect-rounds: 5 exceeds warmup-rounds 4"):
        build_config({**base, "mosaic.collect-rounds": 5})
    with pytest.raises(ConfigError, match="mosaic.collect-rounds: 2 accumulates .* aggregation='mean'"):
        build_config({**base, "mosaic.collect-rounds": 2, "aggregation": "median"})
    with pytest.raises(ConfigError, match="mosaic.meta-data='screened'"):
        build_config({**base, "mosaic.collect-rounds": 2, "client-capacities": "1,0.5"})
    with pytest.raises(ConfigError, match="mosaic.generator-bank-size"):
        build_config({**base, "mosaic.generator-bank-size": -1})
    assert build_config({**base, "mosaic.proto-rounds": 4}).of('mosaic').proto_rounds == 4
    with pytest.raises(ConfigError, match=r"^mosaic.proto-rounds: 5 exceeds warmup-rounds 4"):
        build_config({**base, "mosaic.proto-rounds": 5})
    with pytest.raises(ConfigError, match=r"^mosaic.proto-rounds: 2 keeps prototypes for the meta model, .*'generated'"):
        build_config({**base, "mosaic.proto-rounds": 2, "mosaic.meta-data": "generated"})
    with pytest.raises(ConfigError, match=r"^mosaic.proto-rounds: 2 .* mosaic.meta=False"):
        build_config({**base, "mosaic.proto-rounds": 2, "mosaic.meta": False})


# ----------------------------------------------------------------------------- in-process runs
SCALE = {"dataset": "synthetic", "alpha": 0.5, "strategy": "mosaic", "num-server-rounds": 4, "warmup-rounds": 3,
         "local-steps": 4, "batch-size": 16, "mosaic.gen-steps": 4, "mosaic.gen-batch-size": 8, "mosaic.proto-k": 2,
         "mosaic.meta-epochs": 3, "mosaic.meta-samples-per-class": 4, "kd.steps": 4, "kd.batch-size": 16,
         "kd.gate": "off", "fraction-train": 0.34, "min-train-clients": 1,
         "mosaic.collect-rounds": 3, "mosaic.generator-bank-size": 1}


def _final_state(run_dir):
    return load_checkpoint(run_dir)["strategy"]["globals"]


def _uploads(grid) -> dict[int, list[int]]:
    """round -> the nodes asked for a generator."""
    out: dict[int, list[int]] = {}
    for m in grid.sent:
        cfg = m.content.config_records.get("config")
        if cfg is not None and m.metadata.message_type == "train.mosaic" and cfg.get("distill"):
            out.setdefault(int(cfg["server-round"]), []).append(m.metadata.dst_node_id)
    return out


@pytest.mark.slow
def test_partial_participation_collects_each_client_once_and_arrival_order_does_not_matter(tmp_path):
    a = run_inprocess(tmp_path / "a", num_nodes=6, **SCALE)
    b = run_inprocess(tmp_path / "b", num_nodes=6, grid_options={"pull_order": lambda msgs: list(reversed(msgs))},
                      **SCALE)
    c = run_inprocess(tmp_path / "c", num_nodes=6, grid_options={"pull_batch": 100}, **SCALE)  # all at once
    asked = _uploads(a["grid"])
    assert sorted(asked) == [1, 2, 3]                   # collection rounds 1..3 (mosaic.collect-rounds=3)
    everyone = [n for nodes in asked.values() for n in nodes]
    assert len(everyone) == len(set(everyone))          # each client uploads once
    summary = json.loads((a["dir"] / "summary.json").read_text())
    dist = summary["distillation"]
    assert dist["generators-uploaded"] == len(set(everyone)) >= 3
    assert dist["generators-kept"] <= C * 1
    # Every uploader's privacy audit is in privacy.json, whichever collection round it uploaded in.
    audited = json.loads((a["dir"] / "privacy.json").read_text())["clients"]
    assert len(audited) == len(set(everyone))
    assert {e["round"] for e in audited} == {1, 2, 3}
    for other in (b, c):
        sa, so = _final_state(a["dir"]), _final_state(other["dir"])
        assert all(torch.equal(sa[f][k], so[f][k]) for f in sa for k in sa[f])
        assert untimed_scores(metric_rows(a["dir"])) == untimed_scores(metric_rows(other["dir"]))


@pytest.mark.slow
def test_collection_rounds_resume_exactly(tmp_path):
    full = run_inprocess(tmp_path / "a", num_nodes=6, **SCALE)["dir"]

    def in_the_checkpoint(server_round, run_dir):
        state = load_checkpoint(run_dir)
        assert state["round"] == 2 and state["strategy"]["uploaded"] and state["strategy"]["collected"]
    run_dir = crash_then_resume(tmp_path / "b", [3], on_crash=in_the_checkpoint, num_nodes=6, **SCALE)
    assert_same_run(full, run_dir, resumed_after=2)

    def audited(d):
        return sorted((e["round"], e["partition-id"]) for e in json.loads((d / "privacy.json").read_text())["clients"])
    assert audited(run_dir) == audited(full) and {r for r, _ in audited(full)} == {1, 2, 3}  # kept in the checkpoint


BANK = {"dataset": "synthetic", "alpha": 0.5, "strategy": "mosaic", "num-server-rounds": 3, "warmup-rounds": 3,
        "local-steps": 3, "batch-size": 16, "mosaic.gen-steps": 3, "mosaic.gen-batch-size": 8, "mosaic.proto-k": 2, "mosaic.meta-epochs": 2,
        "kd.steps": 3, "kd.batch-size": 16, "kd.gate": "off", "mosaic.meta-guard": False}


def _asked_prototypes(grid) -> dict[int, int]:
    """round -> how many train.mosaic messages asked for prototypes (the bank or an upload)."""
    out: dict[int, int] = {}
    for m in grid.sent:
        cfg = m.content.config_records.get("config")
        if cfg is not None and m.metadata.message_type == "train.mosaic" and (cfg.get("prototypes") or cfg.get("distill")):
            out[int(cfg["server-round"])] = out.get(int(cfg["server-round"]), 0) + 1
    return out


@pytest.mark.slow
def test_the_prototype_bank_keeps_every_bank_rounds_prototypes_audits_them_and_resumes(tmp_path):
    """``mosaic.proto-rounds=3``: every sampled client sends prototypes in rounds 1..3 (round 3 with
    its generator); the meta model learns from every one of them, each upload is audited in
    its round, and a run resumed inside the bank ends exactly as the uninterrupted one."""
    sent: dict[str, list[int]] = {"one": [], "bank": []}

    def counting(name):
        def hook(grid, node, incoming, reply):
            if "prototypes" in reply.content.array_records:
                sent[name].append(len(reply.content.array_records["prototypes"]["labels"].numpy()))
            return reply
        return hook
    one = run_inprocess(tmp_path / "one", num_nodes=4, grid_options={"hook": counting("one")}, **BANK)
    bank = run_inprocess(tmp_path / "bank", num_nodes=4, grid_options={"hook": counting("bank")},
                         **{**BANK, "mosaic.proto-rounds": 3})
    assert _asked_prototypes(one["grid"]) == {3: 4} and _asked_prototypes(bank["grid"]) == {1: 4, 2: 4, 3: 4}
    assert len(sent["one"]) == 4 and len(sent["bank"]) == 12

    def report(d):
        return json.loads((d / "summary.json").read_text())["distillation"]
    assert report(one["dir"])["meta-real-inputs"] == sum(sent["one"]) > 0
    assert report(bank["dir"])["meta-real-inputs"] == sum(sent["bank"]) > 2 * sum(sent["one"])

    def audited(d):
        return sorted((e["round"], e["partition-id"]) for e in json.loads((d / "privacy.json").read_text())["clients"])
    assert audited(bank["dir"]) == [(r, p) for r in (1, 2, 3) for p in range(4)]
    def kept(server_round, run_dir):
        assert sorted(p["round"] for p in load_checkpoint(run_dir)["strategy"]["protos"]) == [1] * 4 + [2] * 4
    run_dir = crash_then_resume(tmp_path / "b", [3], on_crash=kept, num_nodes=4, **{**BANK, "mosaic.proto-rounds": 3})
    assert_same_run(bank["dir"], run_dir, resumed_after=2)
    assert audited(run_dir) == audited(bank["dir"])


def test_fedavg_streams_replies_one_at_a_time(tmp_path, monkeypatch):
    import mosaic_flwr.core.fedavg as bank_module

    held = []
    real = bank_module.FedAvgStrategy.absorb

    def absorb(self, server_round, arch, payload):
        out = real(self, server_round, arch, payload)
        held.append(out[0])          # the state is dropped once summed
        return out
    monkeypatch.setattr(bank_module.FedAvgStrategy, "absorb", absorb)
    out = run_inprocess(tmp_path, num_nodes=4, dataset="synthetic", strategy="fedavg", **{"local-steps": 3})
    assert held and all(s is None for s in held)
    assert len(out["grid"].sent) >= 2 * 4


def test_robust_aggregation_keeps_the_round_buffered(tmp_path, monkeypatch):
    import mosaic_flwr.core.fedavg as bank_module

    held = []
    real = bank_module.FedAvgStrategy.absorb
    monkeypatch.setattr(bank_module.FedAvgStrategy, "absorb",
                        lambda self, r, a, p: held.append(real(self, r, a, p)[0]) or real(self, r, a, p))
    run_inprocess(tmp_path, num_nodes=3, dataset="synthetic", strategy="fedavg", aggregation="median",
                  **{"local-steps": 3})
    assert held and all(isinstance(s, dict) and s for s in held)


# ----------------------------------------------------------------------------- pulling, partition
def test_replies_are_pulled_one_at_a_time_with_progress_lines(monkeypatch):
    import mosaic_flwr.core.server as base_module
    from flwr.app import ConfigRecord, Message, RecordDict

    from client_app.app import app as client_app
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid

    handled = []
    grid = InProcessGrid(client_app, {**load_defaults(), "dataset": "synthetic"}, 4,
                         hook=lambda g, node, incoming, reply: handled.append(node) or reply)
    lines = []
    monkeypatch.setattr(base_module, "log", lambda level, fmt, *a: lines.append(fmt % a))
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                        message_type="query") for n in grid.get_node_ids()]
    stream = base_module.stream_replies(grid, messages, timeout=60, label="round 1", progress_every=0)
    first = next(stream)
    assert len(handled) == 1 and first.metadata.src_node_id == handled[0]   # nothing pulled ahead
    rest = list(stream)
    assert len(rest) == 3 and len(handled) == 4
    assert any("round 1: 1 of 4 replies" in l for l in lines) and "round 1: 4 of 4 replies" in lines[-1]


def test_dirichlet_client_partition_gives_every_client_the_same_size_and_skewed_labels():
    import numpy as np

    from mosaic_flwr.data import partition

    labels = np.repeat(np.arange(C), 600)
    parts = partition(labels, 100, method="dirichlet-client", seed=3, alpha=0.1)
    assert [len(p) for p in parts] == [60] * 100
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == len(labels)        # disjoint, everything used
    top_share = np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])
    assert top_share > 0.5                                              # label skew at alpha 0.1
    again = partition(labels, 100, method="dirichlet-client", seed=3, alpha=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    iid_like = partition(labels, 100, method="dirichlet-client", seed=3, alpha=1000.0)
    assert np.mean([np.bincount(labels[p]).max() / len(p) for p in iid_like]) < 0.3


def test_a_pull_asks_for_at_most_chunk_replies_when_all_are_ready():
    """Flower's pull returns every ready reply it is asked for: the stream asks for at most
    ``chunk`` ids at a time, so the replies held at once stay bounded however many arrived."""
    from types import SimpleNamespace

    import mosaic_flwr.core.server as base_module

    class AllReady:  # every reply is ready at once, as after a long aggregation step
        def __init__(self):
            self.asked: list[int] = []

        def push_messages(self, messages):
            self.ids = [f"m{i:02d}" for i in range(len(messages))]
            return list(self.ids)

        def pull_messages(self, ids):
            ids = list(ids)
            self.asked.append(len(ids))
            ready = [i for i in ids if i in self.ids]
            for i in ready:
                self.ids.remove(i)
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    grid = AllReady()
    got = list(base_module.stream_replies(grid, [object()] * 20, timeout=5, label="r", chunk=8))
    assert sorted(m.metadata.reply_to_message_id for m in got) == [f"m{i:02d}" for i in range(20)]
    assert max(grid.asked) == 8 and sum(grid.asked) == 20
