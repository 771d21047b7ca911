"""A real `flwr run` (SuperLink + simulation engine + Ray), through the project's launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import requires_fmnist

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path, run_config: str, nodes: int = 3, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "flwr_sim.py"), "--num-supernodes", str(nodes),
           "--run-config", f"output-dir='{tmp_path}' run-name='real' {run_config}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@requires_fmnist
def test_real_flwr_run_writes_results(tmp_path):
    proc = launch(tmp_path, "strategy='fedavg' num-server-rounds=2 local-steps=20")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[progress] round 2/2" in proc.stdout
    assert "results written to" in proc.stdout
    out = tmp_path / "real"
    rounds = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert (out / "summary.json").is_file() and (out / "partition.png").stat().st_size > 1000
    assert (out / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_real_flwr_run_failure_exits_nonzero(tmp_path):
    """A run that starts and fails on the server (its data set is not there) exits 1."""
    proc = launch(tmp_path, f"dataset='mnist' download=false data-dir='{tmp_path / 'no-data'}'")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "mnist" in proc.stdout and "not found" in proc.stdout.lower(), proc.stdout[-3000:]


def test_a_bad_run_config_is_one_line_before_anything_starts(tmp_path):
    """The merged run config is validated as the ServerApp would, before a SuperLink or Ray
    starts: one line naming the key and the allowed values, exit 2."""
    for config, line in (("strategy='fedavgg'", "[flwr_sim] error: strategy: unknown value 'fedavgg'; allowed: "),
                         ("alpha=-1.0", "[flwr_sim] error: alpha: must be > 0")):
        proc = launch(tmp_path, config, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
        assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr
        # (stdout empty: no "[flwr_sim] SuperLink pid ..." line, nothing was started)


@pytest.mark.slow
def test_real_flwr_run_settings_file_then_explicit_values_win(tmp_path):
    """``--run-config FILE --run-config "..."`` through the launcher and a real ``flwr run``:
    the later values win over the file's, also ones equal to their defaults
    (``client-models=''``, ``alpha=0.1``)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "flwr_sim.py"), "--num-supernodes", "2",
           "--run-config", "conf/fmnist-families.toml",
           "--run-config", f"output-dir='{tmp_path}' run-name='real' dataset='synthetic' partition='iid'",
           "--run-config", "strategy='fedavg' num-server-rounds=1 local-steps=3 client-models='' alpha=0.1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    config = json.loads((tmp_path / "real" / "config.json").read_text())
    assert config["client-models"] == "" and config["alpha"] == 0.1      # the file said otherwise
    assert config["dataset"] == "synthetic" and config["local-steps"] == 3
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["local_work"] == "3 local SGD steps of batch 32"
    assert {row["model"] for row in summary["assignment"]} == {"cnn_small"}


def test_launcher_refuses_an_unreadable_settings_file_before_starting(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import flwr_sim
    assert flwr_sim.main(["--run-config", str(tmp_path / "missing.toml")]) == 2
    assert "[flwr_sim] error: --run-config: cannot read" in capsys.readouterr().err
