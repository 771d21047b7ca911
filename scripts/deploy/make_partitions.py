#!/usr/bin/env python3
"""Write one partition file per client, for SuperNodes that hold their own data.

Uses the project's own partitioner with the same run-config keys (``dataset``, ``data-dir``,
``partition``, ``alpha``, ``seed``, ``min-partition-size``, ``partition-cap``,
``shards-per-client``) and defaults (pyproject.toml) as a run, so a file holds
exactly the data that client would train on in simulation. Each ``client-<i>.pt`` holds uint8
images, int64 labels, the data set's name and the partition settings (read it with
``torch.load(path, weights_only=True)``); ``manifest.json`` lists files, sizes, label counts
and SHA-256 sums. Copy ``client-<i>.pt`` to data owner ``i`` only, then start its SuperNode
with ``start_supernode.sh --data-file /path/client-<i>.pt`` (which passes
``--node-config "data-file='/path/client-<i>.pt' partition-id=<i> num-partitions=<n>"``).

    python scripts/deploy/make_partitions.py --out parts --num-partitions 2 \\
        --run-config "alpha=0.1 seed=42"
    python scripts/deploy/make_partitions.py --node-config-of parts/client-0.pt
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from mosaic_flwr.config import Config, ConfigError, build_config, merge_run_config
from mosaic_flwr.data import DatasetNotFoundError, PartitionError, dataset_info
from mosaic_flwr.core.results import atomic_write
from mosaic_flwr.core.task import partition_file, read_partition_file

ERRORS = (ConfigError, DatasetNotFoundError, PartitionError, ValueError, OSError)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def partition_ids(text: str, num_partitions: int) -> list[int]:
    """``--partition-ids`` ("0,2"; empty: all) as a list, each checked."""
    try:
        ids = [int(i) for i in text.split(",") if i.strip()] if text else list(range(num_partitions))
    except ValueError:
        raise ValueError(f"--partition-ids {text!r}: comma-separated integers expected") from None
    bad = [i for i in ids if not 0 <= i < num_partitions]
    if bad:
        raise ValueError(f"--partition-ids: {bad[0]} not in [0, {num_partitions})")
    return ids


def write_partition(cfg: Config, pid: int, num_partitions: int, out: Path) -> dict:
    """Write ``out/client-<pid>.pt`` (atomically, readable by its owner only: it is a client's
    data); return its manifest entry."""
    blob = partition_file(cfg, pid, num_partitions)
    path = out / f"client-{pid}.pt"
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write(path, buf.getvalue(), private=True)
    counts = torch.bincount(blob["y"], minlength=dataset_info(cfg.dataset).num_classes).tolist()
    print(f"[make_partitions] {path}: {len(blob['y'])} examples, label counts {counts}", flush=True)
    return {"file": path.name, "partition-id": pid, "num-examples": len(blob["y"]),
            "label-counts": counts, "bytes": path.stat().st_size, "sha256": sha256(path)}


def write_all(cfg: Config, num_partitions: int, ids: list[int], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"dataset": cfg.dataset, "num-partitions": num_partitions,
                "partition": cfg.partition, "alpha": cfg.alpha, "seed": cfg.seed,
                "min-partition-size": cfg.min_partition_size, "partition-cap": cfg.partition_cap,
                "shards-per-client": cfg.shards_per_client,
                "files": [write_partition(cfg, pid, num_partitions, out) for pid in ids]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[make_partitions] {len(ids)} files and manifest.json in {out.resolve()}")


def node_config_of(path: Path) -> str:
    """The ``--node-config`` of a SuperNode that trains on the partition file ``path``."""
    path = path.expanduser().resolve()
    if "'" in str(path):
        raise ValueError(f"data-file {path}: a path with a single quote is not supported")
    blob = read_partition_file(path)
    return f"data-file='{path}' partition-id={blob['partition-id']} num-partitions={blob['num-partitions']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="directory for client-<i>.pt and manifest.json")
    ap.add_argument("--num-partitions", type=int, help="number of clients")
    ap.add_argument("--run-config", action="append", default=[],
                    help="a run-config TOML file or overrides as for `flwr run` (TOML values): "
                         "\"alpha=0.5 seed=1\"; repeatable, merged in order (later wins)")
    ap.add_argument("--partition-ids", default="", help="comma-separated ids to write (default: all)")
    ap.add_argument("--node-config-of", type=Path, metavar="FILE",
                    help="print the --node-config of a SuperNode holding partition file FILE, and exit")
    args = ap.parse_args(argv)
    try:
        if args.node_config_of:
            print(node_config_of(args.node_config_of))
            return 0
        if args.out is None or args.num_partitions is None:
            ap.error("--out and --num-partitions are required")
        if args.num_partitions < 1:
            ap.error("--num-partitions must be >= 1")
        cfg = build_config(merge_run_config(args.run_config))
        write_all(cfg, args.num_partitions, partition_ids(args.partition_ids, args.num_partitions), args.out)
        return 0
    except ERRORS as exc:
        print(f"[make_partitions] error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
