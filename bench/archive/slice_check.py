#!/usr/bin/env python3
"""Kept for the record: the one-off diagnostic behind bench/results/slice-check-families.md (run at
commit d6310ad; still runnable, tests/test_bench.py runs it).

How good is each width's slice of a run's global model? A diagnostic for width-scaled
sub-models (HeteroFL / FedRolex, ``client-capacities``).

The server reports a width's accuracy as the *fixed* slice of its family's global model (the
first channels of every layer). Under ``submodel='rolling'`` the narrow clients never train a
fixed slice: they train a window that moves one channel each round. This script scores, on
the run's test set, every width the clients hold as

- the fixed slice, and the rolling windows of the checkpoint's last rounds;
- each with the checkpoint's BatchNorm statistics, and with them re-estimated on the clients'
  training images (the average of batch statistics over every client's data, as HeteroFL's
  "static BN"),

with the share of the most predicted class (1.0: one class for every image).

    .venv/bin/python bench/archive/slice_check.py ~/.cache/mosaic-flwr/bench-runs/headline-cifar10-families-widths/pretrain-a0.1-s42

Writes bench/results/slice-check.md/.json (``--name`` to change).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import header_lines, provenance, write_results  # noqa: E402


def reestimate_bn(model, images, batch_size: int = 100):
    """A copy of ``model`` whose BatchNorm running statistics are the average of the batch
    statistics over ``images`` (a list of tensors, taken together in batches of ``batch_size``;
    train-mode forward passes, no gradient); the weights are unchanged."""
    import torch

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
    model.train()
    x = torch.cat(list(images))
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    return model.eval()


def score(model, x, y) -> dict:
    import torch

    from mosaic_flwr.core.training import logits_metrics, predict_logits

    logits = predict_logits(model, x)
    top = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).max().item() / len(x)
    return {**logits_metrics(logits, y), "top-class-share": top}


def check(run_dir: Path, per_client: int = 500, last_rounds: int = 3) -> dict:
    from mosaic_flwr.core.checkpoint import load_checkpoint
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.submodels import model_plan, slice_state
    from mosaic_flwr.methods.fedbn import bn_keys
    from mosaic_flwr.core.task import Arch, build_arch, client_data, test_data

    state = load_checkpoint(run_dir)
    cfg = build_config(state["config"])
    n = len(state["assignment"])
    held = {Arch(c["model"], float(c["capacity"])) for c in state["assignment"]}  # as the run assigned them
    x, y = test_data(cfg)
    images = [client_data(cfg, pid, n)[0][:per_client] for pid in range(n)]
    rows = []
    for arch in sorted(held, key=lambda a: (a.model, -a.capacity)):
        glob = state["strategy"]["globals"][arch.model]
        full, sub = build_arch(cfg, Arch(arch.model)), build_arch(cfg, arch)
        has_bn = bool(bn_keys(sub))
        slices = [("full width", None)] if arch.capacity == 1.0 else (
            [("fixed slice", ("fixed", 0))]
            + [(f"rolling window of round {r}", ("rolling", r))
               for r in range(state["round"] - last_rounds + 1, state["round"] + 1)])
        for label, how in slices:
            sub.load_state_dict(glob if how is None else slice_state(glob, model_plan(full, sub, mode=how[0], offset=how[1])))
            rows.append({"model": str(arch), "slice": label, "bn": "checkpoint", **score(sub, x, y)})
            if has_bn:
                rows.append({"model": str(arch), "slice": label, "bn": "re-estimated", **score(reestimate_bn(sub, images), x, y)})
    return {"run": str(run_dir), "round": state["round"], "submodel": cfg.submodel,
            "images-per-client": per_client, "rows": rows}


def markdown(data: dict, prov: dict) -> str:
    lines = header_lines("Width slices of a global model (bench/archive/slice_check.py)", prov) + [
        f"Run `{data['run']}` at round {data['round']}, `submodel='{data['submodel']}'`. Test accuracy of each "
        "width the clients hold; `bn re-estimated`: BatchNorm statistics recomputed on "
        f"{data['images-per-client']} training images of every client; `top class`: the share of test images "
        "given the most predicted class.", "",
        "| model | slice | BatchNorm | test accuracy % | top class |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['slice']} | {r['bn']} | {100 * r['accuracy']:.1f} | {r['top-class-share']:.2f} |"
              for r in data["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run directory with a checkpoint.pt")
    ap.add_argument("--images-per-client", type=int, default=500)
    ap.add_argument("--last-rounds", type=int, default=3, help="rolling windows of this many last rounds")
    ap.add_argument("--name", default="slice-check", help="bench/results/<name>.md/.json")
    args = ap.parse_args(argv)
    from mosaic_flwr.core.checkpoint import FILENAME

    if not (args.run_dir / FILENAME).is_file():
        ap.error(f"{args.run_dir}: no {FILENAME} (a run directory written with checkpoint=true)")
    import torch

    torch.set_num_threads(1)
    prov = provenance()
    data = check(args.run_dir, args.images_per_client, args.last_rounds)
    print(write_results(args.name, markdown(data, prov), {"provenance": prov, **data}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
