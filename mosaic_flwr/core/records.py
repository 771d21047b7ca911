"""torch <-> Flower records, and validation of every payload that arrives.

Besides this module, only the Flower adapters import flwr: the strategies
(``mosaic_flwr.registry``), the in-process grid (``mosaic_flwr.testing.inprocess``) and the
ClientApp / ServerApp; the algorithm (``mosaic_flwr.methods.mosaic``), models, data, config, results
and checkpoint modules do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
CLIENT_SECONDS = "client-seconds"  # a train reply's wall time on the client (benchmarks: client compute)
# ... and its CPU time (the client process's, all threads; CPU devices only): client compute that
# other processes' load on the same cores does not inflate, as it does wall time
CLIENT_CPU_SECONDS = "client-cpu-seconds"
WORK_KEYS = (CLIENT_SECONDS, CLIENT_CPU_SECONDS)  # summed over a round's replies


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (tensors detached and moved to the CPU)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def state_problem(state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be loaded in place of ``template`` (None when it can): same keys,
    shapes and dtypes, finite floating values."""
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing or extra:
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in template.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key}: not a tensor"
        if tuple(value.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key}: non-finite values"
    return None


def number_problem(value, *, integer: bool = False, low: float | None = None) -> str | None:
    """Why ``value`` (a metric a client sent) is not a usable number: not an int or float
    (a bool, a list, a string), not finite, not an integer where one is needed, or below
    ``low``. None when it is fine. Every scalar the server reads goes through this before
    ``int()`` or ``float()`` can raise or turn garbage into a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number ({type(value).__name__})"
    if not np.isfinite(value):
        return f"not finite ({value!r})"
    if integer and float(value) != int(value):
        return f"not an integer ({value!r})"
    if low is not None and value < low:
        return f"{value!r} is below {low:g}"
    return None


NPY_HEADER = 1024  # bytes an Array's serialised data may hold beyond its values (the .npy header)


def more_bytes_than(array, numel: int, itemsize: int = 8) -> bool:
    """Whether an Array's serialised data is larger than ``numel`` values of ``itemsize``
    bytes and a .npy header: read before it is decoded."""
    return len(array.data) > numel * itemsize + NPY_HEADER


def _value_bytes(value) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def reply_bytes(msg: Message) -> int:
    """The size of a reply as it arrived, counted from its records without decoding anything:
    every Array's serialised bytes, 8 per number (each item of a list), the length of every
    string and bytes value and of every key."""
    if msg.has_error():
        return len(msg.error.reason or "")
    content = msg.content
    total = sum(len(name) + sum(len(key) + len(array.data) for key, array in record.items())
                for name, record in content.array_records.items())
    for records in (content.metric_records, content.config_records):
        total += sum(len(name) + sum(len(key) + _value_bytes(value) for key, value in record.items())
                     for name, record in records.items())
    return total


def record_problem(record: ArrayRecord, template: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``record`` cannot hold ``template``'s tensors, read from the Arrays' declared keys,
    shapes, dtypes and byte sizes before anything is decoded (None when it can): a reply
    cannot make the server decode arrays it does not expect, of other shapes, or larger than
    the tensors it stands for."""
    keys = set(record.keys())
    if keys != set(template):
        missing, extra = sorted(set(template) - keys), sorted(keys - set(template))
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in template.items():
        array = record[key]
        if tuple(array.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(array.shape)}, expected {tuple(ref.shape)}"
        if f"torch.{array.dtype}" != str(ref.dtype):
            return f"{key}: dtype torch.{array.dtype}, expected {ref.dtype}"
        if more_bytes_than(array, ref.numel(), ref.element_size()):
            return f"{key}: {len(array.data)} bytes for {ref.numel()} values"
    return None


def decode_reply(msg: Message, template: Mapping[str, torch.Tensor],
                 other_records: Collection[str] = ()) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """Validate and decode a baseline train reply: ``(state, None)`` or ``(None, problem)``.

    The reply must hold one ArrayRecord ``arrays`` matching the template, a MetricRecord
    ``metrics`` with a positive ``num-examples`` and finite values, and no records but
    these (and ``other_records``). The arrays are decoded once, here."""
    if msg.has_error():
        return None, f"error reply: {msg.error.reason}"
    content = msg.content
    unexpected = sorted(set(content.keys()) - {ARRAYS, METRICS, *other_records})
    if unexpected:
        return None, f"unexpected records {unexpected[:3]}"
    if ARRAYS not in content.array_records:
        return None, "no 'arrays' record"
    if METRICS not in content.metric_records:
        return None, "no 'metrics' record"
    n = content.metric_records[METRICS].get(NUM_EXAMPLES)
    if number_problem(n, integer=True, low=1) is not None:
        return None, f"bad {NUM_EXAMPLES}: {n!r}"
    bad = [k for k, v in content.metric_records[METRICS].items()
           if isinstance(v, (int, float)) and not np.isfinite(v)]
    if bad:
        return None, f"metric {bad[0]!r} is not finite"
    loss = content.metric_records[METRICS].get("train-loss", 0.0)
    if (why := number_problem(loss)) is not None:
        return None, f"train-loss: {why}"
    problem = record_problem(content.array_records[ARRAYS], template)
    if problem:
        return None, problem
    try:
        state = record_to_state(content.array_records[ARRAYS])
    except Exception as exc:  # undecodable arrays
        return None, f"arrays do not decode: {exc}"
    problem = state_problem(state, template)
    return (None, problem) if problem else (state, None)


# ----------------------------------------------------------------------------- Mosaic
LABEL_COUNTS = "label-counts"
PROTOTYPES = "prototypes"
GENERATOR = "generator"
EXPERT = "expert-arrays"  # kd.expert-pass: the model the client's class experts are made of


@dataclass
class MosaicReply:
    node_id: int
    state: dict[str, torch.Tensor]
    num_examples: int
    label_counts: torch.Tensor
    metrics: dict[str, float]
    prototypes: tuple[torch.Tensor, torch.Tensor] | None = None
    generator: dict[str, torch.Tensor] | None = None
    declared_counts: torch.Tensor | None = None  # as sent, where ``label_counts`` is bounded (count-clip)
    expert_state: dict[str, torch.Tensor] | None = None  # kd.expert-pass: the expert model, beside ``state``


def decode_evaluate_reply(msg: Message, names: Collection[str]) -> tuple[dict[str, int] | None, str | None]:
    """An ``evaluate`` reply: ``({num-examples: n, name: correct, ...}, None)`` or
    ``(None, problem)``. Every count is an integer in ``[0, n]``, ``n > 0``."""
    if msg.has_error():
        return None, f"client error: {msg.error.reason}"
    if set(msg.content.keys()) != {METRICS} or METRICS not in msg.content.metric_records:
        return None, f"records {sorted(msg.content.keys())[:3]}: expected only a metrics record"
    metrics = msg.content.metric_records[METRICS]
    out: dict[str, int] = {}
    for key in [NUM_EXAMPLES, *(f"correct-{n}" for n in names)]:
        value = metrics.get(key)
        if number_problem(value, integer=True) is not None:
            return None, f"{key}: not an integer ({value!r})"
        out[key] = int(value)
    n = out.pop(NUM_EXAMPLES)
    if n <= 0:
        return None, f"{NUM_EXAMPLES}: {n} is not positive"
    bad = [k for k, v in out.items() if not 0 <= v <= n]
    if bad:
        return None, f"{bad[0]}: {out[bad[0]]} not in [0, {n}]"
    return {NUM_EXAMPLES: n, **{name: out[f"correct-{name}"] for name in names}}, None


META_LOGITS = "meta-logits"


def decode_logits_reply(msg: Message, *, num_models: int, num_classes: int, max_per_class: int,
                        counts: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str | None]:
    """A ``query.logits`` reply (``mosaic.meta-data='clients'``): ``((logits [n, K, C], labels [n]),
    None)`` or ``(None, problem)``. Logits are finite floats from the K models sent; labels
    are classes the client declared, at most ``max_per_class`` and at most its declared
    count of each."""
    if msg.has_error():
        return None, f"client error: {msg.error.reason}"
    if set(msg.content.keys()) != {META_LOGITS} or META_LOGITS not in msg.content.array_records:
        return None, f"records {sorted(msg.content.keys())[:3]}: expected only a {META_LOGITS!r} array record"
    record = msg.content.array_records[META_LOGITS]
    if set(record.keys()) != {"logits", "labels"}:
        return None, f"{META_LOGITS}: keys {sorted(record.keys())[:3]}, expected ['labels', 'logits']"
    # what the arrays declare, before they are decoded: at most the rows asked for, of the
    # expected shapes and dtypes, and no more bytes than those hold
    shape, n = tuple(record["logits"].shape), num_classes * max_per_class
    if len(shape) != 3 or shape[1:] != (num_models, num_classes) or shape[0] > n:
        return None, f"logits: shape {list(shape)}, expected [n <= {n}, {num_models}, {num_classes}]"
    if record["logits"].dtype not in ("float16", "float32", "float64") or record["labels"].dtype != "int64" \
            or tuple(record["labels"].shape) != shape[:1]:
        return None, (f"logits {record['logits'].dtype}, labels {record['labels'].dtype} "
                      f"{list(record['labels'].shape)}: expected float logits and int64 labels [{shape[0]}]")
    if more_bytes_than(record["logits"], math.prod(shape)) or more_bytes_than(record["labels"], shape[0]):
        return None, f"{META_LOGITS}: more bytes than their shapes hold"
    try:
        got = record_to_state(record)
    except Exception as exc:  # a record torch cannot read
        return None, f"{META_LOGITS}: unreadable ({type(exc).__name__})"
    logits, labels = got["logits"], got["labels"]
    if not logits.is_floating_point() or logits.ndim != 3 or tuple(logits.shape[1:]) != (num_models, num_classes):
        return None, f"logits: {logits.dtype} {list(logits.shape)}, expected float [n, {num_models}, {num_classes}]"
    if labels.dtype != torch.int64 or labels.shape != (len(logits),):
        return None, f"labels: {labels.dtype} {list(labels.shape)}, expected int64 [{len(logits)}]"
    logits = logits.float()  # checked after the cast: 1e300 in float64 is inf in float32
    if not torch.isfinite(logits).all():
        return None, "logits: not finite"
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        return None, f"labels: outside [0, {num_classes})"
    per_class = torch.bincount(labels, minlength=num_classes)
    over = torch.nonzero(per_class > torch.minimum(counts.long(), torch.tensor(max_per_class))).flatten()
    if len(over):
        k = int(over[0])
        return None, (f"labels: {int(per_class[k])} of class {k}, more than the client holds ({int(counts[k])}) "
                      f"or the {max_per_class} asked for")
    return (logits.float(), labels), None


def mosaic_payload(result) -> RecordDict:
    """Encode a ``MosaicClientResult`` as the reply's records."""
    content = RecordDict({
        ARRAYS: state_to_record(result.state),
        METRICS: MetricRecord({NUM_EXAMPLES: int(result.label_counts.sum()),
                               **{k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)
                                  for k, v in result.metrics.items()}}),
        LABEL_COUNTS: MetricRecord({"counts": [int(c) for c in result.label_counts.tolist()]}),
    })
    if result.prototypes is not None:
        feats, labels = result.prototypes
        content[PROTOTYPES] = ArrayRecord({"features": feats.float(), "labels": labels.long()})
    if result.generator is not None:
        content[GENERATOR] = state_to_record(result.generator)
    if getattr(result, "expert_state", None) is not None:
        content[EXPERT] = state_to_record(result.expert_state)
    return content


def _state_record(content: RecordDict, name: str, template: Mapping[str, torch.Tensor], what: str
                  ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The state dict in array record ``name``, checked against ``template`` before and after
    decoding: ``(state, None)`` or ``(None, problem)`` (problems start with ``what``)."""
    if name not in content.array_records:
        return None, f"no {name!r} record"
    problem = record_problem(content.array_records[name], template)
    if problem:
        return None, f"{what}: {problem}"
    try:
        state = record_to_state(content.array_records[name])
    except Exception as exc:
        return None, f"{what} does not decode: {exc}"
    problem = state_problem(state, template)
    return (None, f"{what}: {problem}") if problem else (state, None)


def decode_mosaic_reply(msg: Message, template: Mapping[str, torch.Tensor], *, num_classes: int,
                        feature_dim: int, generator_template: Mapping[str, torch.Tensor] | None = None,
                        expect_prototypes: bool = False, max_prototypes: int | None = None,
                        expect_expert: bool = False) -> tuple[MosaicReply | None, str | None]:
    """Validate and decode a Mosaic reply: ``(reply, None)`` or ``(None, problem)``.

    Checks the classifier arrays against the template, the label counts (C non-negative
    integers summing to ``num-examples``), and where expected the prototypes (finite,
    ``[M, feature_dim]`` with labels of classes the client declares) and the generator
    (the declared architecture, finite), and with ``expect_expert`` the expert model
    (``kd.expert-pass``: the classifier's template, like the arrays).
    """
    state, problem = decode_reply(msg, template, other_records=(LABEL_COUNTS, PROTOTYPES, GENERATOR, EXPERT))
    if problem:
        return None, problem
    content = msg.content
    metrics = dict(content.metric_records[METRICS])
    if LABEL_COUNTS not in content.metric_records:
        return None, "no 'label-counts' record"
    counts = content.metric_records[LABEL_COUNTS].get("counts")
    if not isinstance(counts, list) or len(counts) != num_classes:
        return None, f"label counts: expected a list of {num_classes} integers"
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        return None, "label counts: negative or non-integer entries"
    if sum(counts) != int(metrics[NUM_EXAMPLES]):
        return None, f"label counts sum to {sum(counts)}, but num-examples is {metrics[NUM_EXAMPLES]}"
    counts_t = torch.tensor(counts, dtype=torch.long)
    # Numbers, and the privacy audit's per-class lists (``privacy-class-*``; checked, like its
    # other figures, by ``privacy.audit.validate_figures``).
    reply = MosaicReply(msg.metadata.src_node_id, state,
                        int(metrics[NUM_EXAMPLES]), counts_t,
                        {k: float(v) if isinstance(v, (int, float)) else list(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) or (isinstance(v, list) and k.startswith("privacy-class-"))})
    if expect_prototypes:
        if PROTOTYPES not in content.array_records:
            return None, "no 'prototypes' record"
        arrays = content.array_records[PROTOTYPES]
        if set(arrays.keys()) != {"features", "labels"}:
            return None, f"prototypes: records {sorted(arrays.keys())[:3]}, expected features and labels"
        shape = tuple(arrays["features"].shape)
        if len(shape) != 2 or shape[1] != feature_dim:
            return None, f"prototypes: shape {shape}, expected [M, {feature_dim}]"
        if max_prototypes is not None and shape[0] > max_prototypes:
            return None, f"prototypes: {shape[0]} of them, at most {max_prototypes} expected"
        if more_bytes_than(arrays["features"], shape[0] * feature_dim) or more_bytes_than(arrays["labels"], shape[0]):
            return None, "prototypes: more bytes than their shapes hold"
        try:
            rec = record_to_state(arrays)
            feats, labels = rec["features"], rec["labels"]
        except Exception as exc:
            return None, f"prototypes do not decode: {exc}"
        if feats.ndim != 2 or feats.shape[1] != feature_dim or not feats.is_floating_point():
            return None, f"prototypes: shape {tuple(feats.shape)}, expected [M, {feature_dim}]"
        if max_prototypes is not None and feats.shape[0] > max_prototypes:
            return None, f"prototypes: {feats.shape[0]} of them, at most {max_prototypes} expected"
        if labels.shape != (feats.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool \
                or labels.is_complex():
            return None, "prototypes: labels must be M integers"
        feats = feats.float()  # checked after the cast: 1e300 in float64 is inf in float32
        if not torch.isfinite(feats).all():
            return None, "prototypes: non-finite values"
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes
                            or (counts_t[labels] == 0).any()):
            return None, "prototypes: labels of classes the client does not hold"
        reply.prototypes = (feats.float(), labels.long())
    if generator_template is not None:
        reply.generator, problem = _state_record(content, GENERATOR, generator_template, "generator")
        if problem:
            return None, problem
    if expect_expert:
        reply.expert_state, problem = _state_record(content, EXPERT, template, "expert model")
        if problem:
            return None, problem
    elif EXPERT in content.array_records:
        return None, f"an {EXPERT!r} record that was not asked for"
    return reply, None


# ----------------------------------------------------------------------------- discovery
ARCH = "arch"


@dataclass
class ClientInfo:
    """What a client reports before training (``query`` message): no data, only counts."""

    node_id: int
    partition_id: int
    label_counts: torch.Tensor
    model: str
    capacity: float

    @property
    def num_examples(self) -> int:
        return int(self.label_counts.sum())


def decode_client_info(msg: Message, num_classes: int, models: Collection[str]
                       ) -> tuple[ClientInfo | None, str | None]:
    """Validate a ``query`` reply: ``(info, None)`` or ``(None, problem)``."""
    if msg.has_error():
        return None, f"error reply: {msg.error.reason}"
    content = msg.content
    if METRICS not in content.metric_records or ARCH not in content.config_records:
        return None, "no 'metrics' or 'arch' record"
    metrics, arch = content.metric_records[METRICS], content.config_records[ARCH]
    counts = metrics.get("counts")
    if not isinstance(counts, list) or len(counts) != num_classes or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        return None, f"label counts: expected {num_classes} non-negative integers"
    pid = metrics.get("partition-id", -1)
    if (why := number_problem(pid, integer=True, low=-1)) is not None:
        return None, f"partition-id: {why}"
    if sum(counts) != metrics.get(NUM_EXAMPLES) or sum(counts) == 0:
        return None, f"label counts sum to {sum(counts)}, but num-examples is {metrics.get(NUM_EXAMPLES)!r}"
    model, capacity = arch.get("model"), arch.get("capacity")
    if not isinstance(model, str) or model not in models:  # a list would not even hash
        return None, f"unknown architecture {str(model)[:40]!r}; the server knows {sorted(models)}"
    if number_problem(capacity) is not None or not 0 < capacity <= 1:
        return None, f"capacity {str(capacity)[:40]} not in (0, 1]"
    return ClientInfo(msg.metadata.src_node_id, int(metrics.get("partition-id", -1)),
                      torch.tensor(counts, dtype=torch.long), str(model), float(capacity)), None
