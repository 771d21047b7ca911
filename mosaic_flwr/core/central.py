"""The centralised-training reference (the upper bound of the accuracy benchmark).

The same model, trained by the same SGD (``core.training.train_local``) on the union of the
clients' training data, for as many sample passes as the clients make in a federated run
of the same config, evaluated on the test set. No Flower here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from mosaic_flwr.config import Config
from mosaic_flwr.data.augment import augmenter
from mosaic_flwr.core.training import evaluate, train_local
from mosaic_flwr.core.seeds import mix_seed
from mosaic_flwr.core.task import clients_per_round, data_for, initial_model, partitions_for, test_data


def samples_in_steps(n: int, batch_size: int, steps: int) -> int:
    """Samples ``steps`` batches of ``core.training.batches`` pass through SGD on a client
    with ``n`` samples: each epoch is ``ceil(n / batch_size)`` batches, its last one short."""
    per_epoch = math.ceil(n / batch_size)
    return (steps // per_epoch) * n + (steps % per_epoch) * batch_size


def federated_sample_passes(cfg: Config, sizes: Sequence[int]) -> float:
    """Training samples the clients pass through SGD in a run of ``cfg`` (clients of
    ``sizes`` samples): every round, each sampled client does ``local-steps`` batches (or
    ``local-epochs`` passes over its data when ``local-steps`` is 0). With ``fraction-train``
    < 1 the clients of a round are a random sample; the expectation is returned."""
    n = len(sizes)
    if n == 0:
        raise ValueError("federated_sample_passes: no clients")
    per_round = clients_per_round(cfg, n)
    if cfg.local_steps > 0:
        per_client = [samples_in_steps(s, cfg.batch_size, cfg.local_steps) for s in sizes]
    else:
        per_client = [cfg.local_epochs * s for s in sizes]
    return cfg.num_server_rounds * per_round / n * sum(per_client)


def train_central(cfg: Config, num_clients: int, *, device: torch.device | str = "cpu"
                  ) -> dict:
    """Train ``cfg.model`` from the run's initial weights on the union of the ``num_clients``
    partitions for the federated run's number of sample passes, at the clients' batch size,
    ``lr``, momentum, weight decay and augmentation, in ``num-server-rounds`` equal chunks (each with a
    fresh optimiser, as a client's round has), evaluating on the test set after each.

    Returns ``final_accuracy``, ``best_accuracy``, ``best_round``, ``rounds`` (per chunk:
    round, accuracy, loss, train-loss), ``steps``, ``sample_passes``, ``train_samples``,
    ``seconds``.
    """
    parts = partitions_for(cfg, num_clients)
    train, _ = data_for(cfg)
    union = np.sort(np.concatenate(parts))
    data = train.subset(union)
    x, y = data.normalized(), data.y
    test_x, test_y = test_data(cfg)
    passes = federated_sample_passes(cfg, [len(p) for p in parts])
    steps = max(1, round(passes / cfg.batch_size))
    rounds = cfg.num_server_rounds
    chunks = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    model = initial_model(cfg).to(device)
    t0, history = time.perf_counter(), []
    for r, chunk in enumerate(chunks, start=1):
        if chunk == 0:
            continue
        stats = train_local(model, x, y, steps=chunk, batch_size=cfg.batch_size, lr=cfg.lr,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                            seed=mix_seed(cfg.seed, "central", r), device=device,
                            augment=augmenter(cfg.augment, data.info))
        metrics = evaluate(model, test_x, test_y, batch_size=cfg.eval_batch_size, device=device)
        history.append({"round": r, **metrics, "train-loss": stats["train-loss"]})
    best = max(history, key=lambda h: h["accuracy"])
    return {"final_accuracy": history[-1]["accuracy"], "best_accuracy": best["accuracy"],
            "best_round": best["round"], "rounds": history, "steps": steps,
            "sample_passes": passes, "train_samples": len(y),
            "seconds": time.perf_counter() - t0}

