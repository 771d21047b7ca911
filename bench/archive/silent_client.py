"""A round with one silent client, in a real deployment (issue 38, item 4).

On this machine: a SuperLink behind its proxy, three SuperNodes, a 3-round FedAvg run on the
synthetic data set. When round 2 starts, the ClientApp process that SuperNode 2 starts for it
is slowed down (``--how throttle``, the default: moved into a cgroup of 1 % of one CPU, so it
is alive, keeps its heartbeats and answers about a hundred times later, a straggler) or frozen
(``--how freeze``: SIGSTOP; Flower 1.42's task heartbeat then notices the dead ClientApp by
itself). The SuperNode itself stays alive. The round's wall time is read from the run's
metrics.json, for the old behaviour (``straggler-quorum=1``: every reply is waited for until
``round-timeout``) and the default rule (once half the replies are in, the rest get 3 x the
median reply time, at least ``straggler-floor``).

    .venv/bin/python bench/archive/silent_client.py [--how throttle|freeze] [--round-timeout 180] [--floor 60]

Writes bench/results/silent-client-<how>.{md,json}; throttling needs root (cgroup v1 cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "scripts" / "deploy"), str(ROOT / "scripts"), str(ROOT)]

import flwr_deploy  # noqa: E402
from bench.common import header_lines, provenance, write_results  # noqa: E402
from flwr_sim import BIN, flower_env, free_port, stop_group  # noqa: E402

DEPLOY = ROOT / "scripts" / "deploy"
DATA = "dataset='synthetic' alpha=1.0"
RUN = f"{DATA} strategy='fedavg' num-server-rounds=3 local-steps=10"
NODES = 3


def sh(cmd: list, env: dict) -> None:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd}: {proc.stdout}{proc.stderr}")


def clientapps_of(home: Path) -> list[int]:
    """PIDs of the ClientApp processes a SuperNode with FLWR_HOME ``home`` has started."""
    marker = f"FLWR_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flwr-clientapp" in cmd and marker in env:
            pids.append(int(entry.name))
    return pids


CGROUP = Path("/sys/fs/cgroup/cpu/mosaic-silent-client")


def slow_down(pid: int, how: str) -> None:
    if how == "freeze":
        os.kill(pid, signal.SIGSTOP)
        return
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpu.cfs_period_us").write_text("100000")
    (CGROUP / "cpu.cfs_quota_us").write_text("1000")  # 1 % of one CPU
    (CGROUP / "cgroup.procs").write_text(str(pid))


def one_run(root: Path, name: str, extra: str, env: dict, round_timeout: float, how: str) -> dict:
    """Deploy, run, slow node 2's ClientApp of round 2 down; the rounds' wall times."""
    procs: dict[str, subprocess.Popen] = {}
    logs = root / name
    logs.mkdir()

    def start(tag: str, cmd: list) -> None:
        procs[tag] = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, start_new_session=True,
                                      stdout=open(logs / f"{tag}.log", "w"), stderr=subprocess.STDOUT)

    port = free_port()
    address = f"127.0.0.1:{port}"
    start("superlink", ["bash", DEPLOY / "start_superlink.sh", "--certs", root / "certs", "--port", port,
                        "--internal-port", free_port(), "--home", logs / "home-superlink"])
    frozen: list[int] = []
    try:
        ca = root / "certs" / "ca.crt"
        flwr_deploy.wait_superlink(address, ca, timeout=90, proc=procs["superlink"])
        control = flwr_deploy.write_connection(logs / "home-cli", address, ca,
                                               operator=(root / "certs" / "operator.crt", root / "certs" / "operator.key"))
        flwr_deploy.register(control, [root / "keys" / f"client-{i}.pub" for i in range(NODES)])
        for i in range(NODES):
            start(f"client-{i}", ["bash", DEPLOY / "start_supernode.sh", "--superlink", address, "--root-cert", ca,
                                  "--key", root / "keys" / f"client-{i}", "--data-file", root / "parts" / f"client-{i}.pt",
                                  "--port", free_port(), "--home", logs / f"home-client-{i}"])
        flwr_deploy.wait_online(control, NODES, timeout=120)
        out = logs / "results"
        config = f"{RUN} round-timeout={round_timeout} output-dir='{out}' run-name='run' {extra}"
        start("submit", [BIN / "python", DEPLOY / "flwr_deploy.py", "submit", "--superlink", address,
                         "--root-cert", ca, "--operator-cert", root / "certs" / "operator.crt",
                         "--operator-key", root / "certs" / "operator.key", "--home", logs / "home-submit",
                         "--run-config", config, "--timeout", 3 * round_timeout + 600])
        # the victim's ClientApp processes, one per message: discovery, round 1, then round 2's
        victim, seen = (logs / "home-client-2").resolve(), []
        deadline = time.monotonic() + 600
        while not frozen and time.monotonic() < deadline and procs["submit"].poll() is None:
            for pid in clientapps_of(victim):
                if pid not in seen:
                    seen.append(pid)
                    if len(seen) == 3:
                        slow_down(pid, how)
                        frozen.append(pid)
            time.sleep(0.05)
        t_frozen = time.monotonic()
        code = procs["submit"].wait(timeout=3 * round_timeout + 900)
        rows = json.loads((out / "run" / "metrics.json").read_text())
        log = (logs / "submit.log").read_text(errors="replace")
        cut = re.search(r"\[progress\] round 2: .*the rest get [^\n]*", log)
        return {"variant": name, "extra": extra, "how": how, "exit": code, "slowed-clientapps": len(frozen),
                "clientapps-seen": len(seen),
                "round-seconds": {r["round"]: r.get("seconds") for r in rows if r["round"] > 0},
                "round-2-clients": next((r.get("clients") for r in rows if r["round"] == 2), None),
                "after-freeze-s": round(time.monotonic() - t_frozen, 1),
                "straggler-line": cut.group(0) if cut else None}
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for tag in reversed(list(procs)):
            stop_group(procs[tag], grace=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--how", choices=("throttle", "freeze"), default="throttle")
    ap.add_argument("--round-timeout", type=float, default=180.0)
    ap.add_argument("--floor", type=float, default=60.0, help="straggler-floor of the default rule")
    args = ap.parse_args()
    prov = provenance()
    with tempfile.TemporaryDirectory(prefix="silent-client-") as tmp:
        root = Path(tmp)
        env = flower_env(root / "home-default")
        sh(["bash", DEPLOY / "make_certs.sh", root / "certs", "127.0.0.1"], {**env, "CERT_KEY_BITS": "2048"})
        sh(["bash", DEPLOY / "make_node_keys.sh", root / "keys", *(f"client-{i}" for i in range(NODES))], env)
        sh([BIN / "python", DEPLOY / "make_partitions.py", "--out", root / "parts", "--num-partitions", NODES,
            "--run-config", DATA], env)
        try:
            runs = [one_run(root, "before", "straggler-quorum=1.0", env, args.round_timeout, args.how),
                    one_run(root, "after", f"straggler-floor={args.floor}", env, args.round_timeout, args.how)]
        finally:
            if CGROUP.exists():
                for pid in (CGROUP / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(1)
                CGROUP.rmdir()
    lines = header_lines("A round with one silent client, deployed (bench/archive/silent_client.py)", prov)
    lines += ["", f"3 SuperNodes on 127.0.0.1 behind the proxy, FedAvg on the synthetic data, 3 rounds, "
              f"round-timeout={args.round_timeout:g} s. In round 2 SuperNode 2's ClientApp process is "
              + ("slowed to 1 % of a CPU (cgroup): alive, heartbeating, about 100 x slower"
                 if args.how == "throttle" else "frozen (SIGSTOP)") + "; its SuperNode stays online.", "",
              "| behaviour | setting | round 1 (s) | round 2, one client silent (s) | round 3 (s) | clients in round 2 | run exit |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["round-seconds"]
        lines.append(f"| {r['variant']} | `{r['extra']}` | {s.get(1, '-')} | {s.get(2, '-')} | {s.get(3, '-')} "
                     f"| {r['round-2-clients']} | {r['exit']} |")
    lines += ["", "The default rule's log line: " + (f"`{runs[1]['straggler-line']}`" if runs[1]["straggler-line"] else "-"),
              "", f"Before this rule a silent client held every round for `round-timeout`, 3,600 s by default; "
              f"here {args.round_timeout:g} s to keep the measurement short.", ""]
    path = write_results(f"silent-client-{args.how}", "\n".join(lines), {"provenance": prov, "runs": runs,
                                                             "round-timeout": args.round_timeout})
    print("\n".join(lines))
    print(f"[silent_client] written: {path}")


if __name__ == "__main__":
    main()
