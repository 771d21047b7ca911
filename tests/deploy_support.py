"""Shared by the deployment tests (tests/test_deploy.py on 127.0.0.1, tests/test_deploy_netns.py
across two network namespaces): processes with their logs, stopped by PID; the certificates,
node keys and partition files; the small Mosaic run and the checks of its results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import started_under

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "deploy"
for _path in (str(DEPLOY), str(ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import flwr_deploy  # noqa: E402
from flwr_sim import BIN, flower_env, free_port, stop_group  # noqa: E402

# The synthetic data set keeps the server's evaluations short on 2 CPU cores; the deployment
# path is the same for any data set (MOSAIC_DEPLOY_TEST_DATASET=fmnist runs it on Fashion-MNIST).
RUN_DATA = f"dataset='{os.environ.get('MOSAIC_DEPLOY_TEST_DATASET', 'synthetic')}'"
SMALL = ("num-server-rounds=2 warmup-rounds=1 local-steps=10 mosaic.gen-steps=20 mosaic.meta-epochs=5 "
         "mosaic.meta-samples-per-class=8 mosaic.proto-k=2 kd.steps=5 kd.batch-size=32")
IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"
NO_NGINX = (None if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else
            "nginx is not installed: the SuperLink's operator-only proxy needs it "
            "(apt-get install nginx; scripts/setup.sh --deploy does it where apt is usable)")


def run(cmd, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout, **kw)


def in_netns(netns: str | None, cmd: list) -> list:
    """``cmd`` run inside the network namespace ``netns`` (``ip netns exec``, which execs the
    command: its PID is the command's), or as it is when ``netns`` is None."""
    return [IP, "netns", "exec", netns, *cmd] if netns else list(cmd)


class Deployment:
    """Processes, each in its own session with its own log, and each with its FLWR_HOME under
    ``root``; all stopped by PID in :meth:`stop_all`. ``address`` is the SuperLink's HOST:PORT."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.env = flower_env(root / "home-default")
        self.address = ""

    def start(self, name: str, cmd: list, netns: str | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "w") as f:
            proc = subprocess.Popen([str(c) for c in in_netns(netns, cmd)], cwd=ROOT, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def superlink(self, host: str = "127.0.0.1", netns: str | None = None) -> subprocess.Popen:
        """Start the SuperLink behind its operator-only proxy on ``host`` (a free port; the
        SuperLink itself on another free port of 127.0.0.1) with this deployment's certificates."""
        port, self.internal_port = free_port(), free_port()
        self.address = f"{host}:{port}"
        return self.start("superlink", ["bash", DEPLOY / "start_superlink.sh", "--certs", self.certs,
                                        "--host", host, "--port", port, "--internal-port", self.internal_port,
                                        "--home", self.root / "home-superlink"], netns)

    def supernode(self, name: str, key: Path, data_file: Path, root_cert: Path,
                  netns: str | None = None) -> subprocess.Popen:
        return self.start(name, ["bash", DEPLOY / "start_supernode.sh", "--superlink", self.address,
                                 "--root-cert", root_cert, "--key", key, "--data-file", data_file,
                                 "--port", free_port(), "--home", self.root / f"home-{name}"], netns)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def proxy_log(self, last: str = "", timeout: float = 10.0) -> list[str]:
        """The lines of the SuperLink proxy's access log (one per request), once one of them
        holds ``last`` (nginx writes a request's line after it has answered the request)."""
        log = self.root / "home-superlink" / "proxy" / "access.log"
        deadline = time.monotonic() + timeout
        while True:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            if any(last in line for line in lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def tails(self, lines: int = 40) -> str:
        return "\n".join(f"----- {name} (last {lines} lines) -----\n"
                         + "\n".join(self.log(name).splitlines()[-lines:]) for name in self.logs)

    def wait_exit(self, name: str, timeout: float) -> int | None:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_all(self) -> None:
        """SuperNodes first, the SuperLink last, each by its PID (SIGTERM to its process group,
        then SIGKILL); then, by PID, anything they started that outlived them. Raises if any
        process of this deployment survives."""
        for name in reversed(list(self.procs)):
            stop_group(self.procs[name], grace=10)
        deadline = time.monotonic() + 10
        while started_under(self.root) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in started_under(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        survivors = started_under(self.root)
        assert not survivors, f"processes of the deployment test still running: {survivors}"


def make_material(d: Deployment, names: list[str], *hosts: str, loopback: bool = True,
                  other_ca: bool = False) -> None:
    """Certificates for the SuperLink at ``hosts`` (``make_certs.sh``: also for localhost and
    127.0.0.1 unless not ``loopback``; with ``other_ca`` a second CA under ``root/other-ca``),
    node keys for ``names`` and one partition file per ``client-*`` name."""
    d.certs, d.keys, d.parts = d.root / "certs", d.root / "keys", d.root / "parts"
    d.operator = (d.certs / "operator.crt", d.certs / "operator.key")
    clients = sum(n.startswith("client-") for n in names)
    cmds = [["bash", DEPLOY / "make_certs.sh", *([] if loopback else ["--no-loopback"]), d.certs, *hosts]]
    if other_ca:
        cmds.append(["bash", DEPLOY / "make_certs.sh", d.root / "other-ca", "127.0.0.1"])
    cmds += [["bash", DEPLOY / "make_node_keys.sh", d.keys, *names],
             [BIN / "python", DEPLOY / "make_partitions.py", "--out", d.parts,
              "--num-partitions", clients, "--run-config", RUN_DATA]]
    for cmd in cmds:
        proc = run(cmd, env={**d.env, "CERT_KEY_BITS": "2048"})
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"


def submit_config(out: Path, run_name: str = "deploy") -> str:
    """The small Mosaic run's config, writing its results to ``out/run_name``."""
    return f"{RUN_DATA} {SMALL} output-dir='{out}' run-name='{run_name}'"


def check_mosaic_results(run_dir: Path, node_ids: list[str], parts: Path) -> None:
    """The small run wrote 2 rounds of Mosaic (warm-up, then distillation) from exactly the
    SuperNodes ``node_ids``, each trained on its own partition file under ``parts``."""
    rounds = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2], rounds
    assert rounds[1].get("phase") == "distill" and "acc-after-distill" in rounds[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == "mosaic" and summary["num_clients"] == len(node_ids)  # only the authorised
    assert sorted(str(r["node-id"]) for r in summary["assignment"]) == sorted(node_ids)
    # each SuperNode trained on its own partition file, which the server never read
    manifest = json.loads((parts / "manifest.json").read_text())
    sizes = {f["partition-id"]: f["num-examples"] for f in manifest["files"]}
    assert {r["partition-id"]: r["num-examples"] for r in summary["assignment"]} == sizes
