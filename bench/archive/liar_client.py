"""A lying ClientApp for ``bench/archive/liar.py`` (issue 39; bench/results/liar.md, run at commit
bcb052d; tests/test_robust.py runs it): every honest handler of
``client_app.app``, except that the node of partition 0 lies in everything it sends.

- discovery and every reply: its label counts and example count times ``FACTOR`` (consistently,
  so every check that counts can get without the data passes);
- ``train`` / ``train.mosaic``: random weights of its model's own scale instead of its model
  (``mosaic_flwr.testing.faults.poison_state``), a generator of random weights, prototypes of noise;
- ``evaluate`` (the clients' gate): forged scores, every candidate the server distilled right
  on all its examples and the model before distillation wrong on all of them.

It is copied into the app bundle by ``bench/archive/liar.py`` (``client_app/liar.py``) and named as the
app's ``clientapp``; it is never part of the project's own app.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client_app import app as honest
from mosaic_flwr.testing.faults import poison_state

LIAR, FACTOR = 0, 1000
app = ClientApp()
_gen = torch.Generator().manual_seed(12345)


def _is_liar(context: Context) -> bool:
    return int(context.node_config.get("partition-id", -1)) == LIAR


def _inflate(metrics: MetricRecord) -> None:
    if "num-examples" in metrics:
        metrics["num-examples"] = int(metrics["num-examples"]) * FACTOR
    if "counts" in metrics:
        metrics["counts"] = [int(c) * FACTOR for c in metrics["counts"]]


def _lie(reply: Message) -> Message:
    content = reply.content
    for name in ("metrics", "label-counts"):
        if name in content.metric_records:
            _inflate(content.metric_records[name])
    for name in ("arrays", "generator"):
        if name in content.array_records:
            state = content.array_records[name].to_torch_state_dict()
            content[name] = ArrayRecord(poison_state(state, "random", _gen))
    if "prototypes" in content.array_records:
        protos = content.array_records["prototypes"].to_torch_state_dict()
        protos["features"] = torch.randn(protos["features"].shape, generator=_gen) * 10
        content["prototypes"] = ArrayRecord(protos)
    return reply


def _lying(handler):
    """``handler``, whose reply the liar's node falsifies (``_lie``)."""
    def lying(msg: Message, context: Context) -> Message:
        reply = handler(msg, context)
        return _lie(reply) if _is_liar(context) else reply
    return lying


for register, handler in ((app.query(), honest.query), (app.train(), honest.train),
                          (app.train("mosaic"), honest.train_mosaic)):
    register(_lying(handler))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = honest.evaluate_candidates(msg, context)
    if _is_liar(context):
        metrics = reply.content.metric_records["metrics"]
        n = int(metrics["num-examples"]) * FACTOR
        metrics["num-examples"] = n
        for key in list(metrics.keys()):
            if key.startswith("correct-"):  # the distilled candidate right everywhere, the old one nowhere
                metrics[key] = n if key.split("-", 1)[1].startswith("after") else 0
    return reply


@app.query("logits")
def meta_logits(msg: Message, context: Context) -> Message:
    return honest.meta_logits(msg, context)
