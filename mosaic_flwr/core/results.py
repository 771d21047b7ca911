"""Run results: config.json, metrics.json/.csv, summary.json and plots, written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)
PRIVATE_MODE = 0o600              # files that hold client-derived data: the owner only


def atomic_write(path: Path, data: str | bytes, durable: bool = False, private: bool = False) -> None:
    """Write a file so that readers see the old or the new content, never a torn one
    (``durable``: also flushed to the disk before it replaces the old one).

    The file gets the mode ``open()`` would give it under the process's umask, or, with
    ``private``, 0600 (readable and writable by its owner only) whatever the umask and
    whatever the mode of a file it replaces: it is a new file, created 0600, renamed over
    the old one, so it is never readable by others, not even while it is being written."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, PRIVATE_MODE if private else _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def check_writable(directory: Path) -> None:
    """Create ``directory`` and prove it is writable; raise ``ValueError`` naming it if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"output-dir: cannot write to {directory}: {exc.strerror or exc}") from None


class Scalars:
    """Per-round scalars as TensorBoard event files in ``directory``, written as each round
    ends, when TensorBoard is installed (the ``tensorboard`` extra); otherwise nothing.
    ``purge_step``: earlier event files' scalars from that round on are hidden (a resumed run
    writes them again)."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the extra is not installed
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


class RunResults:
    """Collects per-round metrics and writes the results contract into ``out_dir`` (and, with
    TensorBoard installed, ``out_dir/tensorboard``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]):
        self.out_dir = Path(out_dir)
        check_writable(self.out_dir)
        self.rounds: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._scalars: Scalars | None = None
        write_json(self.out_dir / "config.json", config)

    @property
    def tensorboard_dir(self) -> Path:
        return self.out_dir / "tensorboard"

    def scalars(self, purge_step: int | None = None) -> Scalars:
        if self._scalars is None or purge_step is not None:
            if self._scalars is not None:
                self._scalars.close()
            self._scalars = Scalars(self.tensorboard_dir, purge_step)
        return self._scalars

    def restore(self, rounds: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Continue from a checkpoint's metrics (rewrites metrics.json/.csv, and the scalars,
        to match it)."""
        self.rounds, self.extra = list(rounds), dict(extra)
        write_json(self.out_dir / "metrics.json", self.rounds)
        atomic_write(self.out_dir / "metrics.csv", rows_to_csv(self.rounds))
        scalars = self.scalars(purge_step=0)
        for row in self.rounds:
            scalars.add(row)

    def log_round(self, row: dict[str, Any]) -> None:
        """Record one round (keys at least round, accuracy, loss, seconds) and rewrite files."""
        self.rounds.append(row)
        write_json(self.out_dir / "metrics.json", self.rounds)
        atomic_write(self.out_dir / "metrics.csv", rows_to_csv(self.rounds))
        self.scalars().add(row)

    def finish(self, summary: dict[str, Any], title: str = "") -> dict[str, Any]:
        scored = [r for r in self.rounds if r.get("accuracy") is not None]
        summary = {
            "final_accuracy": scored[-1]["accuracy"] if scored else None,
            "best_accuracy": max((r["accuracy"] for r in scored), default=None),
            "best_round": max(scored, key=lambda r: r["accuracy"])["round"] if scored else None,
            "rounds": len([r for r in self.rounds if r["round"] > 0]),
            **({"final_val_accuracy": scored[-1]["val-accuracy"]}
               if scored and "val-accuracy" in scored[-1] else {}),
            **self.extra,
            **summary,
        }
        write_json(self.out_dir / "summary.json", summary)
        plot_accuracy(self.rounds, self.out_dir / "accuracy.png", title=title)
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None
        return summary


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    return buf.getvalue()


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    pts = [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3)
    for r in rows:  # phase changes (e.g. Mosaic's distillation) as vertical markers
        if r.get("phase") == "distill":
            ax.axvline(r["round"], color="grey", ls="--", lw=1)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def save_partition(out_dir: Path, table: np.ndarray, class_names: Sequence[str] = (), title: str = "") -> None:
    """The partition's label-count table as CSV and as a heatmap PNG."""
    num_clients, num_classes = table.shape
    names = list(class_names) if len(class_names) == num_classes else [str(c) for c in range(num_classes)]
    header = ["client"] + names + ["total"]
    lines = [",".join(header)]
    lines += [",".join(map(str, [i, *row.tolist(), int(row.sum())])) for i, row in enumerate(table)]
    atomic_write(out_dir / "partition.csv", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * num_classes, 1.0 + 0.4 * num_clients), dpi=110)
    im = ax.imshow(table, cmap="viridis", aspect="auto")
    if num_clients * num_classes <= 400:
        for i in range(num_clients):
            for j in range(num_classes):
                v = int(table[i, j])
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if v < table.max() / 2 else "black")
    ax.set_xticks(range(num_classes), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(num_clients), [str(i) for i in range(num_clients)], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("client (partition id)")
    ax.set_title(title or "label counts per client", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(out_dir / "partition.png", buf.getvalue())


def save_generator_grid(path: Path, generators, label_counts, info, *, per_class: int = 10,
                        seed: int = 0) -> None:
    """A PNG grid of generator samples in pixel space: one row per class, pooled over the
    generators that hold that class (chosen by label count; empty rows: no client holds it);
    for unconditional generators (``mosaic.generator='dcgan'``) one row per generator (at most 20)."""
    import torch

    from mosaic_flwr.models.generators import is_unconditional, sample, sample_unconditional

    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    rng = torch.Generator().manual_seed(seed)
    c, s = info.in_channels, info.image_size
    unconditional = bool(generators) and is_unconditional(generators[0])
    n_rows = len(generators) if unconditional else info.num_classes
    canvas = np.ones((n_rows * (s + 2), per_class * (s + 2), c), dtype=np.float32)
    mean = np.asarray(info.mean, dtype=np.float32).reshape(1, 1, -1)
    std = np.asarray(info.std, dtype=np.float32).reshape(1, 1, -1)
    for k in range(n_rows):
        if unconditional:
            imgs = sample_unconditional(generators[k], per_class, rng=rng).cpu().numpy()
        elif counts[:, k].sum() <= 0:
            continue
        else:
            owners = torch.multinomial(counts[:, k] / counts[:, k].sum(), per_class, replacement=True,
                                       generator=rng)
            imgs = [sample(generators[owner], torch.tensor([k]), rng=rng)[0].cpu().numpy()
                    for owner in owners.tolist()]
        for j, img in enumerate(imgs):
            img = np.clip(img.transpose(1, 2, 0) * std + mean, 0, 1)
            canvas[k * (s + 2):k * (s + 2) + s, j * (s + 2):j * (s + 2) + s] = img
    rows = min(n_rows, 20)
    fig, ax = plt.subplots(figsize=(per_class * 0.5 + 1.5, rows * 0.5 + 0.6), dpi=110)
    shown = canvas[: rows * (s + 2)]
    ax.imshow(shown[..., 0] if c == 1 else shown, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    if unconditional:
        names = [f"G{i}" for i in range(n_rows)]
    else:
        names = list(info.class_names) if info.class_names else [str(k) for k in range(info.num_classes)]
    ax.set_yticks([k * (s + 2) + s / 2 for k in range(rows)], names[:rows], fontsize=6)
    ax.set_xticks([])
    ax.set_title("generator samples (row = " + ("generator, in bank order)" if unconditional
                                                 else "requested class)"), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
