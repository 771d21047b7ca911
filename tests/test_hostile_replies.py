"""Hostile replies, generated (issue 38): every field of every reply type the server reads
(discovery ``query``, baseline ``train``, ``train.mosaic``, the gate's ``evaluate``, the meta
model's ``query.logits``) replaced, removed or added with values a client could put on the
wire (wrong types, NaN/inf/huge numbers, bools, lists, arrays of other dtypes, shapes and
byte sizes, undecodable bytes, error replies, extra records).

Property: the server's decoder never raises, and what it accepts is well formed. Then a real
in-process Mosaic run whose one client answers every message with such a reply completes and
resumes exactly. Hypothesis runs derandomised (the same examples on every machine), without an
example database (nothing written beside the repository)."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaic_flwr.data import dataset_info
from mosaic_flwr.models import MODELS, build_model
from mosaic_flwr.models.generators import generator_for
from mosaic_flwr.methods.mosaic.client import MosaicClientResult
from mosaic_flwr.core.records import (ARCH, META_LOGITS, decode_client_info, decode_evaluate_reply,
                                 decode_logits_reply, decode_mosaic_reply, decode_reply, mosaic_payload,
                                 reply_bytes, state_problem, state_to_record)
from mosaic_flwr.core.server import oversized
from tests.support import (as_flower_server, assert_same_run, Crash, crash_then_resume, metric_rows, round_of, run_inprocess,
                           TINY_MOSAIC)

C = 10
EXAMPLES = 400  # per reply type
PROFILE = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------- honest replies
INFO = dataset_info("synthetic")
MODEL = build_model("cnn_small", INFO.in_channels, C, INFO.image_size, width=0.25)
TEMPLATE = {k: v.detach().clone() for k, v in MODEL.state_dict().items()}
GENERATOR = {k: v.detach().clone() for k, v in generator_for(INFO).state_dict().items()}
COUNTS = [30, 0, 5, 0, 0, 10, 0, 0, 0, 5]
N = sum(COUNTS)


def _reply(content: RecordDict, message_type: str, node: int = 7) -> Message:
    as_flower_server()
    return Message(content, reply_to=Message(RecordDict({}), dst_node_id=node, message_type=message_type))


def honest(kind: str) -> RecordDict:
    """What an honest client sends for each reply type."""
    if kind == "query":
        return RecordDict({"metrics": MetricRecord({"partition-id": 3, "num-examples": N, "counts": COUNTS}),
                           ARCH: ConfigRecord({"model": "cnn_small", "capacity": 0.25})})
    if kind == "train":
        return RecordDict({"arrays": state_to_record(TEMPLATE),
                           "metrics": MetricRecord({"num-examples": N, "train-loss": 0.5, "client-seconds": 1.5})})
    if kind == "train.mosaic":
        feats = torch.randn(4, MODEL.feature_dim)
        return mosaic_payload(MosaicClientResult(
            TEMPLATE, torch.tensor(COUNTS), {"train-loss": 0.4, "client-seconds": 2.0},
            (feats, torch.tensor([0, 0, 2, 5])), GENERATOR, expert_state=TEMPLATE))  # kd.expert-pass: all of it
    if kind == "evaluate":
        return RecordDict({"metrics": MetricRecord({"num-examples": N, "correct-before": 20, "correct-after": 31})})
    if kind == "query.logits":
        return RecordDict({META_LOGITS: state_to_record({"logits": torch.randn(6, 2, C),
                                                         "labels": torch.tensor([0, 0, 2, 5, 5, 9])})})
    raise ValueError(kind)


def decode(kind: str, msg: Message):
    """The server's decoder for ``kind``: (value, problem), exactly one of them None."""
    if kind == "query":
        return decode_client_info(msg, C, MODELS)
    if kind == "train":
        return decode_reply(msg, TEMPLATE)
    if kind == "train.mosaic":
        return decode_mosaic_reply(msg, TEMPLATE, num_classes=C, feature_dim=MODEL.feature_dim,
                                   generator_template=GENERATOR, expect_prototypes=True, max_prototypes=3 * C,
                                   expect_expert=True)
    if kind == "evaluate":
        return decode_evaluate_reply(msg, ["before", "after"])
    if kind == "query.logits":
        return decode_logits_reply(msg, num_models=2, num_classes=C, max_per_class=4, counts=torch.tensor(COUNTS))
    raise ValueError(kind)


KINDS = ("query", "train", "train.mosaic", "evaluate", "query.logits")
for _kind in KINDS:  # the honest replies pass (else the properties below prove nothing)
    assert decode(_kind, _reply(honest(_kind), _kind))[1] is None, _kind

# ----------------------------------------------------------------------------- hostile values
# Drawn from a ``random.Random``: Hypothesis hands one to the property tests (``st.randoms``,
# reproducible under ``derandomize``), and the run below seeds its own per round and message.
# Only what Flower's records can carry (the wire has no other values): int64 or float numbers,
# lists of one of them, in metric records; those, bools, strings and bytes in config records.
SPECIAL_INTS = [0, -1, 1, 2, 2**62, -2**63, 2**63 - 1]
SPECIAL_FLOATS = [1e300, -1e300, 1e-300, 3.5e38, float("nan"), float("inf"), float("-inf"), 0.5, -0.0, 2.0]
DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "object", "<U3", "x"]


def an_int(rng: random.Random) -> int:
    return rng.choice([rng.choice(SPECIAL_INTS), rng.randint(-2**63, 2**63 - 1), rng.randint(-5, 200)])


def a_float(rng: random.Random) -> float:
    return rng.choice([rng.choice(SPECIAL_FLOATS), rng.uniform(-1e6, 1e6), float(rng.randint(-5, 200))])


def metric_value(rng: random.Random):
    how = rng.randrange(6)
    if how == 0:
        return [rng.randint(-3, 50) for _ in range(C)]  # counts-like
    if how == 1:
        return [an_int(rng) for _ in range(rng.randrange(12))]
    if how == 2:
        return [a_float(rng) for _ in range(rng.randrange(1, 12))]
    return an_int(rng) if how < 4 else a_float(rng)


def config_value(rng: random.Random):
    return rng.choice([an_int(rng), a_float(rng), rng.random() < 0.5, "cnn_small", "resnet8", "alexnet", "",
                       "x" * rng.randrange(50), rng.randbytes(rng.randrange(20)), ["a", "b"], [1.5, 2.0]])


def hostile_array(rng: random.Random, like: Array | None = None) -> Array:
    """An Array a client could send: declared dtype/shape/bytes of any kind (the bytes may not
    decode, or disagree with the declaration), real values of another dtype or shape, or the
    expected shape full of NaN, inf or 1e300."""
    how = rng.choice(["raw", "values", "poison"] if like is not None else ["raw", "values"])
    if how == "raw":
        shape = tuple(rng.randint(-2, 12) for _ in range(rng.randrange(4)))
        return Array(dtype=rng.choice(DTYPES), shape=shape, stype="numpy.ndarray",
                     data=rng.randbytes(rng.randrange(256)))
    if how == "values":
        shape = tuple(rng.randrange(6) for _ in range(rng.randrange(4)))
        dtype = rng.choice(["float32", "float64", "int64", "bool", "float16"])
        return Array(np.full(shape, rng.choice([0, 1, np.nan, np.inf, 1e300]) if dtype[0] == "f" else 1, dtype=dtype))
    poison = rng.choice([np.nan, np.inf, -np.inf, 1e300, 3.5e38])
    shape = tuple(min(max(0, d), 4096) for d in like.shape)  # ``like`` may be a hostile array already
    return Array(np.full(shape, poison, dtype=rng.choice(["float32", "float64"])))


def mutate(rng: random.Random, content: RecordDict) -> RecordDict:
    """``content`` with 1-3 hostile edits: a record or a field removed, replaced or added."""
    for _ in range(rng.randint(1, 3)):
        names = sorted(content.keys())
        action = rng.choice(["field", "field", "field", "drop-field", "drop-record", "add-record"])
        if action == "add-record" or not names:
            name = rng.choice([*names, "extra", "metrics", "arrays", "prototypes", "generator", "expert-arrays"])
            key = rng.choice(["x", "counts", "num-examples", "features", "labels"])
            content[name] = rng.choice([lambda: MetricRecord({key: 1}), lambda: ConfigRecord({key: "x"}),
                                        lambda: ArrayRecord({key: hostile_array(rng)})])()
            continue
        name = rng.choice(names)
        if action == "drop-record":
            del content[name]
            continue
        record = content[name]
        keys = sorted(record.keys())
        if action == "drop-field" and keys:
            del record[rng.choice(keys)]
            continue
        key = rng.choice([*keys, "extra"])
        if isinstance(record, ArrayRecord):
            record[key] = hostile_array(rng, record[key] if key in record else None)
        elif isinstance(record, MetricRecord):
            record[key] = metric_value(rng)
        else:
            record[key] = config_value(rng)
    return content


def hostile_reply(rng: random.Random, kind: str) -> Message:
    if rng.randrange(20) == 0:  # a client that reports an error
        as_flower_server()
        request = Message(RecordDict({}), dst_node_id=7, message_type=kind)
        return Message(Error(code=rng.randint(-5, 5), reason="x" * rng.randrange(30)), reply_to=request)
    return _reply(mutate(rng, honest(kind)), kind)


def _well_formed(kind: str, value) -> None:
    """What the server accepted is what it may use."""
    if kind == "query":
        assert value.label_counts.min() >= 0 and value.num_examples > 0 and 0 < value.capacity <= 1
    elif kind == "train":
        assert state_problem(value, TEMPLATE) is None
    elif kind == "train.mosaic":
        assert state_problem(value.state, TEMPLATE) is None and state_problem(value.generator, GENERATOR) is None
        assert state_problem(value.expert_state, TEMPLATE) is None
        assert value.label_counts.min() >= 0 and int(value.label_counts.sum()) == value.num_examples
        feats, labels = value.prototypes
        assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
        assert (value.label_counts[labels] > 0).all()
        assert all(np.isfinite(v) for v in value.metrics.values() if isinstance(v, float))
    elif kind == "evaluate":
        n = value["num-examples"]
        assert n > 0 and all(0 <= value[k] <= n for k in ("before", "after"))
    else:
        logits, labels = value
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert (labels >= 0).all() and (labels < C).all()


SEEN: Counter = Counter()  # hostile replies generated and decoded, per type


@pytest.mark.parametrize("kind", KINDS)
def test_no_hostile_reply_crashes_a_decoder_and_what_passes_is_well_formed(kind):
    @PROFILE
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        msg = hostile_reply(rng, kind)
        value, problem = decode(kind, msg)  # never raises
        assert (value is None) != (problem is None)
        assert problem is None or (isinstance(problem, str) and problem)
        if value is not None:
            _well_formed(kind, value)
        size = reply_bytes(msg)  # the size limit reads every reply too, and drops what is over it
        assert oversized(msg, size, kind) is msg
        if size > 1 and not msg.has_error():
            assert oversized(msg, size - 1, kind).has_error()
        SEEN[kind] += 1

    check()
    assert SEEN[kind] >= EXAMPLES
    print(f"[hostile] {kind}: {SEEN[kind]} generated replies decoded without an exception")


# ----------------------------------------------------------------------------- a run that meets them
HOSTILE_NODE = 102  # the third of the in-process grid's nodes (100, 101, 102)


def hostile_client(crash_in: int | None = None):
    """A grid hook: node HOSTILE_NODE joins honestly (discovery), then answers every message
    (training, the gate's evaluation) with a hostile version of its honest reply, the same one
    for the same round and message type in every run; with ``crash_in`` the server dies in
    that round. Counts the hostile replies in ``hook.sent``."""

    def hook(grid, node, incoming, reply):
        server_round = round_of(incoming)
        if crash_in is not None and server_round == crash_in:
            raise Crash
        if node != HOSTILE_NODE or incoming.metadata.message_type == "query":
            return reply
        rng = random.Random(f"{server_round}-{incoming.metadata.message_type}")
        hook.sent += 1
        return Message(mutate(rng, reply.content), reply_to=incoming)

    hook.sent = 0
    return hook


@pytest.mark.slow
def test_a_mosaic_run_with_a_hostile_client_completes_and_resumes_exactly(tmp_path):
    hook = hostile_client()
    full = run_inprocess(tmp_path / "a", grid_options={"hook": hook}, **TINY_MOSAIC)["dir"]
    rows = metric_rows(full)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and hook.sent >= 4
    assert all(r["accuracy"] == r["accuracy"] for r in rows)  # finite
    summary = json.loads((full / "summary.json").read_text())
    print(f"[hostile] a 3-round Mosaic run met {hook.sent} hostile replies; "
          f"{summary.get('rejected_replies', 0)} rejected in rounds, the rest refused at discovery or by the gate")
    # the same run, the server killed in the distillation round and resumed: the same numbers
    # (the same node ids: the hostile client is a node)
    resumed = crash_then_resume(tmp_path / "b", [2], hook=hostile_client(), first_node_id=None, **TINY_MOSAIC)
    assert_same_run(full, resumed, resumed_after=1)
