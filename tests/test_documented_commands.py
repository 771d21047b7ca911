"""The README's commands work as written: the resume recipe (run from the README itself),
plain ``flwr run .``'s defaults (data from the user data directory, results under the home
directory), and ``scripts/setup_data.sh`` from a path with spaces and quotes."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mosaic_flwr.data.datasets as ds
from mosaic_flwr.checkpoint import load_checkpoint
from mosaic_flwr.config import build_config
from mosaic_flwr.data import load_dataset
from server_app.app import run_dir
from tests.test_e2e_inprocess import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fmnist(folder: Path, seed: int, n_train: int = 300, n_test: int = 60, test_seed: int | None = None) -> Path:
    """Four small Fashion-MNIST-shaped IDX files (random images, balanced labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, test_rng = np.random.default_rng(seed), np.random.default_rng(seed if test_seed is None else test_seed)
    arrays = (rng.integers(0, 256, (n_train, 28, 28)), rng.permutation(np.arange(n_train) % 10),
              test_rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10)
    for stem, array in zip(STEMS, arrays):
        write_idx(folder / f"{stem}.gz", array)
    return folder


# ----------------------------------------------------------------------------- plain `flwr run .`
def test_empty_data_dir_reads_the_user_data_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "DEBIAN_FMNIST_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(ds.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ds.user_data_dir() == tmp_path / "cache" / "mosaic-flwr" / "data"
    monkeypatch.setenv(ds.DATA_ENV, str(tmp_path / "my data"))
    assert ds.user_data_dir() == tmp_path / "my data"
    assert ds.fmnist_location() is None
    fake_fmnist(tmp_path / "my data" / "fashion-mnist", seed=0)
    train, test = load_dataset("fmnist")          # data-dir empty, as with plain `flwr run .`
    assert (len(train), len(test)) == (300, 60)
    assert ds.fmnist_location() == tmp_path / "my data" / "fashion-mnist"


def test_default_output_dir_is_under_home_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_dir(build_config({"run-name": "x"}))
    assert out == Path.home() / "mosaic-flwr-outputs" / "x"


# ----------------------------------------------------------------------------- resume: data-dir
def test_resume_accepts_another_data_dir_holding_the_same_data_and_refuses_other_data(tmp_path):
    base = {"strategy": "fedavg", "partition": "iid", "local-steps": 2, "min-partition-size": 1}
    first, copy = tmp_path / "first", tmp_path / "copy of it"
    fake_fmnist(first / "fashion-mnist", seed=1)
    shutil.copytree(first, copy)
    out = run_inprocess(tmp_path / "out", **base, **{"data-dir": str(first), "num-server-rounds": 1})["dir"]
    assert len(load_checkpoint(out)["extra"]["test_set_sha256"]) == 16
    # the same files elsewhere: accepted (and the run extended by one round)
    run_inprocess(tmp_path / "out", **base, **{"data-dir": str(copy), "resume": str(out), "num-server-rounds": 2})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1 and summary["rounds"] == 2

    other = fake_fmnist(tmp_path / "other" / "fashion-mnist", seed=2)
    with pytest.raises(RuntimeError, match=r"resume: the fmnist test set read now \(data-dir=.*other'\) is not "
                                           r"the checkpoint's \(sha256 [0-9a-f]{16}\.\.\., saved [0-9a-f]{16}"
                                           r"\.\.\.\): a resumed run must read the same data"):
        run_inprocess(tmp_path / "out", **base, **{"data-dir": str(other.parent), "resume": str(out),
                                                   "num-server-rounds": 3})
    relabelled = fake_fmnist(tmp_path / "relabelled" / "fashion-mnist", seed=3, test_seed=1)  # same test set
    with pytest.raises(RuntimeError, match=r"resume: the clients' label counts differ from the checkpoint's"):
        run_inprocess(tmp_path / "out", **base, **{"data-dir": str(relabelled.parent), "resume": str(out),
                                                   "num-server-rounds": 3})


# ----------------------------------------------------------------------------- scripts/setup_data.sh
def test_setup_data_works_from_a_path_with_spaces_and_quotes(tmp_path):
    project = tmp_path / "it's a \"project\" dir"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_data.sh", project / "scripts")
    data = tmp_path / "data 'here' \"too\""
    fake_fmnist(data / "fashion-mnist", seed=0)
    env = {**os.environ, "MOSAIC_VENV": sys.prefix, ds.DATA_ENV: str(data), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(project / "scripts" / "setup_data.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == f"[setup] Fashion-MNIST: {data / 'fashion-mnist'}\n"


# ----------------------------------------------------------------------------- the README's resume recipe
def readme_resume_recipe() -> tuple[str, str]:
    """The README's resume command and the run directory it names (``outputs/<name>``)."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"```bash\n(\.venv/bin/python scripts/flwr_sim\.py [^\n]*resume='(outputs/[^']+)'[^\n]*)\n```",
                       text)
    assert len(found) == 1, "README: expected one resume recipe (.venv/bin/python scripts/flwr_sim.py ... resume=...)"
    return found[0]


def test_run_sh_passes_only_what_the_resume_recipe_assumes():
    """The recipe resumes a run of scripts/run.sh: results under <project>/outputs, no data-dir."""
    text = (ROOT / "scripts" / "run.sh").read_text()
    assert "OUT=\"'$ROOT/outputs'\"" in text and '--run-config "output-dir=$OUT" "$@"' in text
    assert "data-dir" not in text and '--num-supernodes "${NUM_SUPERNODES:-10}"' in text
    command, _ = readme_resume_recipe()
    assert "--num-supernodes" not in command  # flwr_sim.py's default, 10, like run.sh's


@pytest.mark.slow
def test_the_readme_resume_recipe_continues_a_run_of_run_sh():
    """A short run started as scripts/run.sh starts it, then the README's resume line verbatim
    (its example directory replaced by this run's) plus the run's own settings."""
    command, example = readme_resume_recipe()
    name = f"test-readme-resume-{os.getpid()}-{int(time.time())}"
    settings = "strategy='fedavg' dataset='synthetic' alpha=1.0 local-steps=5"
    out = ROOT / "outputs" / name
    python = shlex.quote(sys.executable)
    try:
        # what scripts/run.sh runs (after its setup): 10 clients, results in <project>/outputs
        first = subprocess.run([sys.executable, "scripts/flwr_sim.py", "--num-supernodes", "10", "--run-config",
                                f"output-dir='{ROOT}/outputs'", "--run-config",
                                f"{settings} num-server-rounds=2 run-name='{name}'"],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
        assert load_checkpoint(out)["round"] == 2
        line = command.replace(example, f"outputs/{name}")
        line = python + line[len(".venv/bin/python"):] if not (ROOT / ".venv").exists() else line
        resumed = subprocess.run(["bash", "-c", f"{line} --run-config \"{settings} num-server-rounds=3\""],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["resumed_after_round"] == 2 and summary["rounds"] == 3
        assert [r["round"] for r in json.loads((out / "metrics.json").read_text())] == [0, 1, 2, 3]
    finally:
        shutil.rmtree(out, ignore_errors=True)
