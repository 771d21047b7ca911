#!/usr/bin/env python3
"""Kept for the record: the one-off measurement behind bench/results/throughput-cifar10.md (run at
commit 56c374d; still runnable).

Images per second of each classifier on one data set's input shape, training (SGD steps
with momentum, the clients' loop: forward, backward, step) and inference (eval mode, no
grad), at 1 and 2 threads, on this machine's CPU (and CUDA when present).

    .venv/bin/python bench/archive/throughput.py                       # cifar10, every model
    .venv/bin/python bench/archive/throughput.py --dataset fmnist --models cnn_small resnet8

Writes bench/results/throughput-<dataset>.md/.json with the commit, machine and load average
(other processes on the machine lower the figures: the load is in the table's header).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import header_lines, loadavg, provenance, write_results  # noqa: E402


def measure(model_name: str, dataset: str, device: str, threads: int, *, train_batch: int = 32,
            infer_batch: int = 256, seconds: float = 4.0) -> dict:
    """Steady-state rate: a warm-up step, then as many steps as fit in
    ``seconds`` (at least 3), images divided by wall time."""
    import torch
    import torch.nn.functional as F

    from mosaic_flwr.data import dataset_info
    from mosaic_flwr.models import build_model

    torch.set_num_threads(threads)
    info = dataset_info(dataset)
    torch.manual_seed(0)
    model = build_model(model_name, info.in_channels, info.num_classes, info.image_size).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    shape = (info.in_channels, info.image_size, info.image_size)
    xb, yb = torch.randn(train_batch, *shape, device=device), torch.randint(0, info.num_classes, (train_batch,), device=device)
    xi = torch.randn(infer_batch, *shape, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train_step():
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.no_grad():
            model(xi)

    out = {"model": model_name, "params": params, "threads": threads, "device": device}
    for name, step, batch, mode in (("train", train_step, train_batch, model.train),
                                    ("infer", infer_step, infer_batch, model.eval)):
        mode()
        step()
        sync()
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            step()
            n += 1
        sync()
        out[f"{name}_images_per_s"] = round(n * batch / (time.perf_counter() - t0), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--models", nargs="+", default=["cnn_small", "cnn_wide", "resnet8", "resnet18"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args(argv)
    prov = provenance("bench/archive/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for model in args.models:
            for threads in (args.threads if device == "cpu" else [1]):
                r = measure(model, args.dataset, device, threads, seconds=args.seconds)
                print(f"[throughput] {model} {device} threads={threads}: train {r['train_images_per_s']:.0f} img/s, "
                      f"inference {r['infer_images_per_s']:.0f} img/s", flush=True)
                rows.append(r)
    prov["loadavg_end"] = loadavg()
    lines = header_lines(f"Classifier throughput on {args.dataset} inputs", prov) + [
        "Training: SGD steps of batch 32 (forward, backward, momentum step), the clients' loop. Inference: eval "
        "mode, batch 256. Images per second, steady state over about "
        f"{args.seconds:g} s each, synthetic inputs of the data set's shape.", "",
        "| model | parameters | device | threads | train img/s | inference img/s | 50 local steps (s) |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['device']} | {r['threads']} | "
                     f"{r['train_images_per_s']:.0f} | {r['infer_images_per_s']:.0f} | "
                     f"{50 * 32 / r['train_images_per_s']:.1f} |")
    path = write_results(f"throughput-{args.dataset}", "\n".join(lines) + "\n", {"provenance": prov, "rows": rows})
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
