"""A real `flwr run` (SuperLink + simulation engine + Ray), through the project's launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_fmnist

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
    proc = launch(tmp_path, "alpha=-1.0")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "configuration error: alpha: must be > 0" in proc.stdout
