"""Results files: written atomically, readable like any other new file; private files 0600."""

import os

import pytest

from mosaic_flwr.core.results import atomic_write
from tests.support import scalars_of


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write(path, "old")
    atomic_write(path, b"new", durable=True)
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_private_files_are_owner_only_also_when_they_replace_a_readable_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    path.chmod(0o644)
    old = os.umask(0)  # the most permissive umask: private files must not depend on it
    try:
        atomic_write(path, b"new", durable=True, private=True)
        atomic_write(tmp_path / "fresh.pt", b"x", private=True)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "fresh.pt").stat().st_mode & 0o777 == 0o600


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write(path, "complete")
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # not str or bytes: fails while writing
    assert path.read_text() == "complete" and len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------- TensorBoard


def test_each_round_is_in_tensorboard_as_it_ends_and_a_resume_rewrites_it(tmp_path):
    from mosaic_flwr.core.results import RunResults
    results = RunResults(tmp_path, {})
    results.log_round({"round": 0, "accuracy": 0.1, "loss": 2.3, "phase": "init"})
    results.log_round({"round": 1, "accuracy": 0.5, "loss": float("nan"), "kd-loss": 0.7})
    live = scalars_of(results.tensorboard_dir)  # before finish: flushed each round
    assert live["accuracy"] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.5))]
    assert live["loss"] == [(0, pytest.approx(2.3))] and live["kd-loss"] == [(1, pytest.approx(0.7))]
    assert "phase" not in live
    results.finish({})
    # a resumed run restores round 0 only (its checkpoint) and goes on: round 1 is the new one
    resumed = RunResults(tmp_path, {})
    resumed.restore([{"round": 0, "accuracy": 0.1, "loss": 2.3}], {})
    resumed.log_round({"round": 1, "accuracy": 0.6, "loss": 1.0})
    resumed.finish({})
    assert scalars_of(resumed.tensorboard_dir)["accuracy"] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.6))]
