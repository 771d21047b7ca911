"""A stronger attacker than the client's audit: the server holds the uploaded generator and can
draw as many samples as it likes. Re-runs the audit's generator part on a finished run's
generators (``distillation.pt``) with ``--n-gen`` samples per class (the audit draws 100),
against the same clients' training data and the test split. Writes ``bench/results/<name>.json``.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/archive/privacy_strong.py \
        /tmp/privacy-runs/privacy-a0.1 --n-gen 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mosaic_flwr.config import build_config  # noqa: E402
from mosaic_flwr.data import dataset_info  # noqa: E402
from mosaic_flwr.models.generators import generator_for, sample  # noqa: E402
from mosaic_flwr.privacy.audit import audit_generator  # noqa: E402
from mosaic_flwr.core.seeds import mix_seed  # noqa: E402
from mosaic_flwr.core.task import client_data, unseen_data  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--n-gen", type=int, default=1000)
    ap.add_argument("--name", default="privacy-audit-strong")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for d in args.run_dirs:
        cfg = build_config(json.loads((d / "config.json").read_text()))
        info = dataset_info(cfg.dataset)
        art = torch.load(d / "distillation.pt", map_location="cpu", weights_only=False)
        n = len(art["generators"])
        rows = []
        for entry in art["generators"]:
            pid = int(entry["partition-id"])
            g = generator_for(info)
            g.load_state_dict(entry["state"])
            x, y = client_data(cfg, pid, n)
            rng = torch.Generator().manual_seed(mix_seed(cfg.seed, "strong", pid))
            t0 = time.perf_counter()
            fig = audit_generator(lambda labels: sample(g, labels, rng=rng), x, y, *unseen_data(cfg),
                                  n_gen=args.n_gen, seed=mix_seed(cfg.seed, "strong-audit", pid))
            fig = {k: v for k, v in fig.items() if not isinstance(v, list)}
            rows.append({"partition-id": pid, "examples": len(y), "seconds": round(time.perf_counter() - t0, 2),
                         **{k: round(v, 5) for k, v in fig.items()}})
            print(d.name, pid, len(y), {k: rows[-1][k] for k in ("dcr-ratio-pixel", "mia-auc-pixel", "mia-auc-pixel-low",
                                                                  "mia-auc-pixel-high", "mia-auc-feature")}, flush=True)
        out[d.name] = {"n-gen": args.n_gen, "clients": rows}
    (ROOT / "bench" / "results" / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
