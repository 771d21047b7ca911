#!/usr/bin/env python3
"""A client that lies about its label counts and poisons its model: does it own Mosaic?

One client (partition 0) declares ``--factor`` times its true label counts at discovery and
in every reply (consistently, so the server's checks pass) and replaces its model by a
poisoned one (``--poison``: ``random`` weights, or its trained model ``negated`` and scaled
by 10). In-process runs (ClientApp + ServerApp, no Ray) on Fashion-MNIST compare:

- ``clean``: no attacker, ``aggregation='mean'``;
- ``attack, mean``: ``aggregation='mean'``, ``max-client-share=1`` (no defence);
- ``attack, <rule>`` / ``attack, cap <s>`` / both: the robust settings.

Reported: final test accuracy and the distillation round's report (accuracy before
distillation, meta teacher, after distillation). The test set is scored for reporting only.

    PYTHONPATH=. .venv/bin/python bench/attack.py [--clients 5] [--alpha 0.1] [--name attack]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header_lines, loadavg, provenance, run_inprocess, write_results  # noqa: E402
from mosaic_flwr.config import load_defaults  # noqa: E402
from mosaic_flwr.testing.inprocess import InProcessGrid  # noqa: E402

POISONS = ("random", "negated")


def poison_state(state: dict[str, torch.Tensor], poison: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The poisoned model: every floating tensor but BatchNorm's running statistics replaced by
    random normal values of the tensor's own standard deviation (``random``: as large as a
    trained model's weights, but meaningless) or by -10 times itself (``negated``)."""
    if poison not in POISONS:
        raise ValueError(f"poison: unknown value {poison!r}; allowed: {list(POISONS)}")
    out = {}
    for key, value in state.items():
        if not value.is_floating_point() or "running_" in key:
            out[key] = value
        elif poison == "random":
            scale = value.std() if value.numel() > 1 else value.abs()
            out[key] = torch.randn(value.shape, generator=gen, dtype=value.dtype) * scale
        else:
            out[key] = -10 * value
    return out


def inflating_attacker(partition: int = 0, factor: int = 1000, poison: str = "random", seed: int = 0):
    """An ``InProcessGrid`` hook: the node of ``partition`` declares ``factor`` x its label
    counts and example count at discovery and in every reply, and sends a poisoned model.
    ``hook.declared`` records the counts it declared, ``hook.sent`` the poisoned states by
    server round."""
    gen = torch.Generator().manual_seed(seed)

    def hook(grid: InProcessGrid, node: int, incoming: Message, reply: Message) -> Message:
        if grid.contexts[node].node_config.get("partition-id") != partition or reply.has_error():
            return reply
        content = reply.content
        metrics = content.metric_records["metrics"]
        metrics["num-examples"] = int(metrics["num-examples"]) * factor
        if incoming.metadata.message_type == "query":
            metrics["counts"] = hook.declared = [int(c) * factor for c in metrics["counts"]]
            return reply
        if "label-counts" in content.metric_records:
            record = content.metric_records["label-counts"]
            record["counts"] = [int(c) * factor for c in record["counts"]]
        state = poison_state(content.array_records["arrays"].to_torch_state_dict(), poison, gen)
        hook.sent[int(incoming.content.config_records["config"]["server-round"])] = state
        content["arrays"] = ArrayRecord(state)
        return reply

    hook.declared, hook.sent = None, {}
    return hook


def run(out: Path, run_config: dict, num_nodes: int, hook=None) -> dict:
    return run_inprocess({**load_defaults(), "output-dir": str(out), "run-name": "run", **run_config}, num_nodes, hook=hook)


REPORT = ("acc-before-distill", "acc-ensemble", "acc-teacher", "acc-after-distill")
TIMES = ("gen-seconds-mean", "meta-seconds", "kd-seconds", "distill-seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--factor", type=int, default=1000)
    ap.add_argument("--poison", default="random", choices=POISONS)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup-rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=30)
    ap.add_argument("--gen-steps", type=int, default=40)
    ap.add_argument("--kd-steps", type=int, default=50)
    ap.add_argument("--name", default="attack")
    args = ap.parse_args()
    prov = provenance()
    base = {"strategy": "mosaic", "dataset": "fmnist", "alpha": args.alpha, "seed": args.seed,
            "num-server-rounds": args.rounds, "warmup-rounds": args.warmup_rounds,
            "local-steps": args.local_steps, "mosaic.gen-steps": args.gen_steps, "kd.steps": args.kd_steps,
            "checkpoint": False, "server-threads": 1}
    cases = [  # (name, attacked, config changes)
        ("clean", False, {}),
        ("attack, mean", True, {}),
        ("attack, median", True, {"aggregation": "median"}),
        ("attack, mean + max-client-share 0.3", True, {"max-client-share": 0.3}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, attacked, changes) in enumerate(cases):
            t0 = time.perf_counter()
            hook = inflating_attacker(0, args.factor, args.poison, args.seed) if attacked else None
            summary = run(Path(tmp) / str(i), {**base, **changes}, args.clients, hook)
            d = summary.get("distillation", {})
            rows.append({"case": name, "attacked": attacked, "config": changes,
                         "final_accuracy": summary["final_accuracy"],
                         **{k: d.get(k) for k in REPORT + TIMES},
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    prov["loadavg_end"] = loadavg()
    title = (f"Attack: one of {args.clients} clients declares {args.factor}x its label counts and sends a "
             f"{args.poison} model (Fashion-MNIST, Dirichlet {args.alpha}, seed {args.seed})")
    lines = header_lines(title, prov)
    lines += [f"Mosaic, cnn_small, {args.rounds} rounds (distillation after round {args.warmup_rounds}), "
              f"local-steps {args.local_steps}, mosaic.gen-steps {args.gen_steps}, kd.steps {args.kd_steps}; "
              "in-process (bench/attack.py); the attacker is partition 0.", "",
              "| case | final accuracy | before distill | expert ensemble | meta teacher | after distill | s |",
              "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    for r in rows:
        lines.append(f"| {r['case']} | {fmt(r['final_accuracy'])} | " + " | ".join(fmt(r[k]) for k in REPORT)
                     + f" | {r['seconds']:.0f} |")
    path = write_results(args.name, "\n".join(lines) + "\n", {"provenance": prov, "args": vars(args), "rows": rows})
    print(path.read_text())


if __name__ == "__main__":
    main()
