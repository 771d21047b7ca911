"""Model heterogeneity: assignment, the bank strategy fed hand-made replies, the output-space
mixture, prototype screening, and mixed federations end to end on real Fashion-MNIST."""

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from client_app.app import app as client_app
from mosaic_flwr.config import ConfigError, build_config, config_heterogeneous
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.distill.experts import ModelMixture, StackedExperts
from mosaic_flwr.methods.mosaic.prototypes import screen_by_prototypes
from mosaic_flwr.models import MODELS
from mosaic_flwr.core.records import decode_client_info, state_to_record
from mosaic_flwr.core.task import Arch, build_arch, client_arch
from tests.support import as_flower_server, hetero_bank, hetero_reply, requires_fmnist, run_inprocess

C = 10


# ----------------------------------------------------------------------------- assignment
def test_assignment_is_round_robin_by_partition_id_and_node_config_overrides():
    cfg = build_config({"client-models": "cnn_small, cnn_wide,resnet8", "client-capacities": "1,0.5"})
    assert config_heterogeneous(cfg.values)
    got = [client_arch(cfg, {"partition-id": i}) for i in range(4)]
    assert got == [Arch("cnn_small", 1.0), Arch("cnn_wide", 0.5), Arch("resnet8", 1.0), Arch("cnn_small", 0.5)]
    assert client_arch(cfg, {"partition-id": 1, "model": "resnet18", "capacity": 0.25}) == Arch("resnet18", 0.25)
    assert str(Arch("cnn_small", 0.25)) == "cnn_small@0.25" and str(Arch("resnet8")) == "resnet8"
    plain = build_config({})
    assert not config_heterogeneous(plain.values) and client_arch(plain, {"partition-id": 3}) == Arch(plain.model)
    with pytest.raises(ValueError, match="capacity"):
        client_arch(cfg, {"partition-id": 0, "capacity": 2.0})


@pytest.mark.parametrize("override,pattern", [
    ({"client-models": "cnn_small,vgg"}, r"^client-models: unknown model 'vgg'"),
    ({"client-capacities": "1,0"}, r"^client-capacities: capacity 0 not in \(0, 1\]"),
    ({"client-capacities": "1,half"}, r"^client-capacities: expected comma-separated numbers"),
    ({"client-capacities": "1,0.5", "mosaic.meta-data": "both"}, r"^mosaic.meta-data: 'both' passes prototypes"),
])
def test_bad_assignments_are_one_line_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(override)


# ----------------------------------------------------------------------------- bank strategy


def test_masked_fedavg_averages_each_entry_over_its_holders(caplog):
    full, half = Arch("cnn_small"), Arch("cnn_small", 0.5)
    bank = hetero_bank({101: full, 102: half, 103: half}, examples={102: 30}, submodel="fixed")
    before = bank.globals["cnn_small"]["conv1.weight"].clone()
    replies = [hetero_reply(bank, 101, full, 1.0, 10), hetero_reply(bank, 102, half, 5.0, 30),
               hetero_reply(bank, 103, full, 7.0, 10)]  # 103 should send the half-width model
    with caplog.at_level(logging.WARNING):
        arrays, _ = bank.aggregate_train(1, replies)
    assert bank.rejected == 1
    assert "node 103 (partition 2) (expected architecture cnn_small@0.5)" in caplog.text and "shape" in caplog.text
    w = arrays.to_torch_state_dict()["conv1.weight"]  # [32, 1, 3, 3]; the half model holds rows 0..15
    assert torch.equal(w[:16], torch.full_like(w[:16], (1 * 10 + 5 * 30) / 40))  # 4.0
    assert torch.equal(w[16:], torch.ones_like(w[16:]))                          # only 101 holds them
    # Only half-width clients: entries no client holds keep the global model's values.
    bank.aggregate_train(2, [hetero_reply(bank, 102, half, 2.0, 30)])
    w2 = bank.globals["cnn_small"]["conv1.weight"]
    assert torch.equal(w2[:16], torch.full_like(w2[:16], 2.0)) and torch.equal(w2[16:], w[16:])
    assert not torch.equal(before, w2)


def test_each_client_receives_its_architecture_and_rolling_slices_move():
    archs = {100: Arch("cnn_small"), 101: Arch("cnn_small", 0.25), 102: Arch("resnet8")}  # InProcessGrid ids
    bank = hetero_bank(archs, submodel="rolling", **{"client-models": "cnn_small,resnet8"})
    assert bank.families == ["cnn_small", "resnet8"] and bank.primary == "cnn_small"
    grid = InProcessGrid(client_app, {}, 3)
    sent = {}
    for rnd in (1, 2):
        for m in bank.configure_train(rnd, ArrayRecord(), ConfigRecord({"lr": 0.1}), grid):
            sent[(rnd, m.metadata.dst_node_id)] = m.content["arrays"].to_torch_state_dict()
    for node, arch in archs.items():
        model = build_arch(bank.cfg, arch)
        model.load_state_dict(sent[(1, node)])  # strict: exactly this client's architecture
    g = bank.globals["cnn_small"]["conv1.bias"]
    assert torch.equal(sent[(1, 101)]["conv1.bias"], g[[(1 + j) % 32 for j in range(8)]])
    assert torch.equal(sent[(2, 101)]["conv1.bias"], g[[(2 + j) % 32 for j in range(8)]])


# ----------------------------------------------------------------------------- pure pieces
class _Scale(nn.Module):
    """A 'classifier' whose logits are ``s * x`` (x: [B, C]) and features are ``x``."""

    def __init__(self, s: float):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def features(self, x):
        return x

    def forward(self, x):
        return self.s * x


def test_model_mixture_combines_groups_with_the_given_weights():
    a = StackedExperts(_Scale(0.0), [{"s": torch.tensor(1.0)}, {"s": torch.tensor(2.0)}])
    b = StackedExperts(_Scale(0.0), [{"s": torch.tensor(10.0)}])
    mix = ModelMixture([(a, torch.tensor([[0.5, 0.0], [0.0, 1.0]])), (b, torch.tensor([[0.5], [0.0]]))])
    x = torch.tensor([[1.0, -1.0]])
    out = mix.logits(x)
    assert len(mix) == 2 and out.shape == (2, 1, 2)
    assert torch.allclose(out[0], 0.5 * 1 * x + 0.5 * 10 * x) and torch.allclose(out[1], 2 * x)
    with pytest.raises(ValueError, match="W_g"):
        ModelMixture([(a, torch.ones(2, 3))])


def test_screening_keeps_samples_whose_nearest_prototype_has_their_label():
    protos = (torch.tensor([[0.0, 0.0], [10.0, 10.0]]), torch.tensor([0, 1]))
    x = torch.tensor([[1.0, 1.0], [9.0, 9.0], [1.0, 0.0], [8.0, 9.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1, 0])
    owners = torch.tensor([0, 0, 0, 0, 1, 2])  # owners 1 and 2 sent no prototypes: nothing vouches for theirs
    x, y = torch.cat([x, torch.tensor([[0.0, 0.0]])]), torch.cat([y, torch.tensor([0])])
    empty = (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    keep = screen_by_prototypes(x, y, owners, [_Scale(1.0)] * 3, [protos, None, empty])
    assert keep.tolist() == [True, False, False, True, False, False]


# ----------------------------------------------------------------------------- end to end
def _rounds(out):
    return json.loads((out / "metrics.json").read_text())


@requires_fmnist
@pytest.mark.slow
def test_width_scaled_fedavg_runs_end_to_end(tmp_path):
    res = run_inprocess(tmp_path, strategy="fedavg", **{"client-capacities": "1,0.5,0.25", "local-steps": 40})
    rounds = _rounds(res["dir"])
    for key in ("acc/cnn_small", "acc/cnn_small@0.5", "acc/cnn_small@0.25", "acc-clients"):
        assert all(key in r for r in rounds), key
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert rounds[-1]["acc/cnn_small@0.25"] > rounds[0]["acc/cnn_small@0.25"] + 0.1
    sent = {m.metadata.dst_node_id: m.content["arrays"].to_torch_state_dict()["conv1.weight"].shape[0]
            for m in res["grid"].sent if m.metadata.message_type == "train"}
    assert sorted(sent.values()) == [8, 16, 32]
    summary = json.loads((res["dir"] / "summary.json").read_text())
    assert summary["headline_model"] == "cnn_small" and len(summary["final_accuracy_by_model"]) == 3
    assert "cnn_small,0.25" in (res["dir"] / "assignment.csv").read_text()


@requires_fmnist
@pytest.mark.slow
def test_mixed_families_run_mosaic_end_to_end(tmp_path):
    # No gate: the clients' gate scores every family's two candidates on all 60,000 training
    # images (2.5 to 3 min of this test on one core); it has its own tests (below, and
    # test_warm_start_gate.py). Here the distilled models are kept and fine-tuned.
    res = run_inprocess(tmp_path, strategy="mosaic", num_nodes=3,
                        **{"client-models": "cnn_small,cnn_wide,resnet8", "warmup-rounds": 1,
                           "num-server-rounds": 3, "test-subset": 2000,
                           "local-steps": 40, "mosaic.gen-steps": 60, "mosaic.meta-epochs": 30, "kd.steps": 20,
                           "kd.gate": "off"})
    out = res["dir"]
    rounds = _rounds(out)
    families = ("cnn_small", "cnn_wide", "resnet8")
    dist = next(r for r in rounds if r.get("phase") == "distill")
    for f in families:
        assert f"acc-after-distill/{f}" in dist and f"acc/{f}" in rounds[-1]
        assert rounds[-1][f"acc/{f}"] > rounds[0][f"acc/{f}"] + 0.1, f
    assert dist["meta-inputs"] > 0 and 0 < dist["meta-screen-kept"] <= 1
    kinds = {m.metadata.dst_node_id: len(m.content["arrays"].to_torch_state_dict())
             for m in res["grid"].sent if m.metadata.message_type.startswith("train")}
    assert len(set(kinds.values())) >= 2  # the ResNet has more tensors than the CNNs
    assert (out / "generator_samples.png").is_file()


def _info_reply(counts, model="cnn_small", capacity=1.0, n=None, pid=0, node=7) -> Message:
    as_flower_server()
    content = RecordDict({
        "metrics": MetricRecord({"partition-id": pid, "num-examples": sum(counts) if n is None else n,
                                 "counts": counts}),
        "arch": ConfigRecord({"model": model, "capacity": capacity})})
    return Message(content, reply_to=Message(RecordDict({}), dst_node_id=node, message_type="query"))


@pytest.mark.parametrize("kwargs,pattern", [
    ({"counts": [1] * C, "model": "alexnet"}, "unknown architecture 'alexnet'"),
    ({"counts": [1] * C, "capacity": 0.0}, "capacity"),
    ({"counts": [1] * (C - 1)}, "label counts"),
    ({"counts": [-1] + [2] * (C - 1)}, "label counts"),
    ({"counts": [1] * C, "n": 99}, "sum to 10"),
    # hostile values that crashed the server before they were checked (issue 38)
    ({"counts": [1] * C, "pid": [1, 2]}, "partition-id: not a number"),
    ({"counts": [1] * C, "pid": float("inf")}, "partition-id: not finite"),
    ({"counts": [1] * C, "pid": float("nan")}, "partition-id: not finite"),
    ({"counts": [1] * C, "pid": 2.5}, "partition-id: not an integer"),
])
def test_discovery_replies_are_validated(kwargs, pattern):
    info, problem = decode_client_info(_info_reply(**kwargs), C, MODELS)
    assert info is None and pattern in problem
    info, problem = decode_client_info(_info_reply([3] * C, capacity=0.5), C, MODELS)
    assert problem is None and info.num_examples == 30 and (info.model, info.capacity) == ("cnn_small", 0.5)


@pytest.mark.slow
def test_the_clients_gate_judges_every_familys_model_on_every_client(tmp_path):
    """Under model heterogeneity the gate scores each family's candidates on all the
    clients' data (a family's own clients hold only some classes): every client receives
    every family's 'before' and 'after' models (its own family at its width, the others at
    full width) and returns counts of correct predictions for each."""
    res = run_inprocess(tmp_path, strategy="mosaic", num_nodes=4, dataset="synthetic", alpha=1.0,
                        **{"client-models": "cnn_small,cnn_wide", "client-capacities": "1,1,0.5,1",
                           "num-server-rounds": 2, "warmup-rounds": 1, "local-steps": 5, "batch-size": 16,
                           "mosaic.gen-steps": 5, "mosaic.gen-batch-size": 8, "mosaic.meta-epochs": 2, "mosaic.meta-samples-per-class": 4,
                           "kd.steps": 4, "kd.batch-size": 16, "kd.gate": "clients", "kd.gate-rounds": 0})
    families = ["cnn_small", "cnn_wide"]
    evaluate = [m for m in res["grid"].sent if m.metadata.message_type == "evaluate"]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == res["grid"].node_ids
    for m in evaluate:
        config = m.content["config"]
        assert list(config["families"]) == families
        assert sorted(config["candidates"]) == sorted(f"{n}.{f}" for n in ("before", "after") for f in families)
        widths = {f: record_width(m.content[f"candidate-before.{f}"]) for f in families}
        assert widths["cnn_wide"] == record_width(state_to_record(build_arch(
            build_config({"dataset": "synthetic"}), Arch("cnn_wide")).state_dict()))  # full width
    # the half-width cnn_small client (partition 2) got its slice of its own family's model
    small = sorted(record_width(m.content["candidate-before.cnn_small"]) for m in evaluate)
    assert small[0] < small[-1]
    report = json.loads((res["dir"] / "summary.json").read_text())["distillation"]
    assert 0 <= report["gate-before"] <= 1 and report["gate-kept"] in (0.0, 1.0)


@pytest.mark.slow  # ~20 s of Mosaic under model families; the quick loop checks the families' settings
def test_model_families_fit_the_meta_model_on_each_familys_prototypes(tmp_path, monkeypatch):
    """Under model families (every client at full width) ``mosaic.meta-data='prototypes'`` keeps
    the meta model on real-derived inputs: each family's prototypes pass through that family's
    class experts' heads (the feature spaces differ: a prototype through another family's
    head would not even fit), and no generator sample is used."""
    calls = []
    head_logits = StackedExperts.head_logits

    def spy(self, features, **kw):
        calls.append((self.weights["head.weight"].shape[-1], features.shape[-1]))
        return head_logits(self, features, **kw)

    monkeypatch.setattr(StackedExperts, "head_logits", spy)
    # alpha 0.1: few classes per client, so classes share experts (cheap teacher passes)
    res = run_inprocess(tmp_path, strategy="mosaic", num_nodes=4, dataset="synthetic", alpha=0.1,
                        **{"client-models": "cnn_small,cnn_wide", "num-server-rounds": 1, "warmup-rounds": 1,
                           "local-steps": 5, "batch-size": 16, "mosaic.gen-steps": 5, "mosaic.gen-batch-size": 8,
                           "mosaic.meta-epochs": 2, "kd.steps": 4, "kd.batch-size": 16, "kd.gate": "off",
                           "mosaic.meta-guard": False, "mosaic.meta-data": "prototypes", "privacy-audit": False,
                           "test-subset": 100, "kd.report-test-subset": 100})
    report = json.loads((res["dir"] / "summary.json").read_text())["distillation"]
    assert report["meta-inputs"] == report["meta-real-inputs"] > 0 and "meta-screen-kept" not in report
    dims = {build_arch(build_config({"dataset": "synthetic"}), Arch(f)).head.in_features
            for f in ("cnn_small", "cnn_wide")}
    assert len(dims) == 2 and {head for head, _ in calls} == dims  # both families' heads were read
    assert all(head == feats for head, feats in calls)  # each on its own family's features


def test_prototypes_need_full_width_and_the_experts_prior_under_families():
    families = {"strategy": "mosaic", "client-models": "cnn_small,resnet8", "mosaic.meta-data": "prototypes"}
    build_config(families)
    with pytest.raises(ConfigError, match=r"^mosaic.meta-data: 'prototypes' passes prototypes .* width-scaled"):
        build_config({**families, "client-capacities": "1,0.5"})
    with pytest.raises(ConfigError, match=r"^mosaic.meta-prior: 'global' makes the primary family's"):
        build_config({**families, "mosaic.meta-prior": "global"})
    with pytest.raises(ConfigError, match=r"^mosaic.meta-data: 'clients' sends the class experts"):
        build_config({**families, "mosaic.meta-data": "clients"})
    build_config({**families, "mosaic.meta-prior": "global", "mosaic.meta-data": "screened"})  # generator samples: any prior


def record_width(record) -> int:
    """The first convolution's output channels of a model sent as a record."""
    return record.to_torch_state_dict()["conv1.weight"].shape[0]


def test_one_node_one_partition_a_second_claim_is_refused(caplog):
    """A node claiming a partition id another node already holds is left out, logged; the
    first claim stands (it cannot replace the first one's uploads)."""
    from mosaic_flwr.core.server import discover_clients

    as_flower_server()  # the discovery builds server messages (alone, no earlier test has set it)

    class Grid:  # every reply ready at once, in this order; nothing left pending after
        pending: dict = {}

        def push_messages(self, messages):
            self.ready = [_info_reply([1] * C, pid=pid, node=node) for node, pid in ((7, 0), (8, 1), (9, 0))]
            return [str(i) for i in range(len(messages))]

        def pull_messages(self, ids):
            ready, self.ready = self.ready, []
            return ready

    with caplog.at_level(logging.WARNING):
        clients = discover_clients(Grid(), [7, 8, 9], C)
    assert sorted(clients) == [7, 8] and clients[7].partition_id == 0
    assert "partition-id 0 is already held by node 7" in caplog.text
