#!/usr/bin/env python3
"""Run this Flower app in simulation against a SuperLink this script owns.

``flwr run .`` alone returns at once, its ``--stream`` exits 0 even when the run failed, and
the auto-started local SuperLink outlives it. This wrapper starts a private SuperLink on a
free loopback port (runtime dependency installation off, Flower state under the project),
submits the run with ``--stream`` so progress is shown live, checks the run's final status,
and always stops the SuperLink (and with it Ray) before it exits: 0 when the run completed,
1 when it failed, 2 when it could not start.

    python scripts/flwr_sim.py --num-supernodes 10 --run-config "strategy='fedprox' alpha=0.1"
    python scripts/flwr_sim.py --run-config conf/fmnist-families.toml --run-config "alpha=1.0"

``--run-config`` is repeatable; each is a run-config TOML file or ``key=value`` string, merged
in order (a later value wins, even one equal to the default) and handed to ``flwr run`` as one
file (``flwr run`` itself accepts a file only alone).

``--ray-address HOST:PORT`` runs the ClientApps on an existing Ray cluster (``ray start --head``
on one machine, ``ray start --address HOST:PORT`` on the others): one ClientApp actor per
``--cpus-per-client`` CPUs of each node. (Without it, Ray starts a private instance, unless
``ray start`` ran on this machine with the default temp dir: ``ray.init()`` then joins that
cluster through /tmp/ray/ray_current_cluster.) Flower 1.42 has no
federation option for it (the simulation's Ray ``init-args`` are num-cpus, num-gpus,
logging-level and log-to-driver only), but it calls ``ray.init()`` without an address, which
then connects to ``RAY_ADDRESS``: the SuperLink is started with ``RAY_ADDRESS`` set, and the
simulation process it launches inherits it. The cluster keeps running afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from mosaic_flwr.config import ConfigError, build_config, merge_run_config, write_run_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy on port {port} after {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group (SuperLink, ServerApp, Ray), then SIGKILL what remains."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_status(env: dict, connection: str, run_id: int | None, flwr: list[str] | None = None) -> str:
    """The final status of the run (e.g. ``finished:completed``), via ``flwr list`` (``flwr``:
    the command that is the CLI, default this venv's ``flwr``)."""
    out = subprocess.run([*(flwr or [str(BIN / "flwr")]), "list", connection, "--format", "json"]
                         + (["--run-id", str(run_id)] if run_id else []),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"
    if not runs:
        return "unknown (no run listed)"
    run = max(runs, key=lambda r: int(r.get("run-id", 0)))
    return str(run.get("status", "unknown"))


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment for Flower commands: ``FLWR_HOME=home``, telemetry and the
    update check off, unbuffered output, this venv's binaries first on PATH (plus ``extra``)."""
    return dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
                FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-supernodes", type=int, default=10)
    ap.add_argument("--cpus-per-client", type=int, default=1,
                    help="Ray CPUs per ClientApp (1 on 2 cores: two clients train at once)")
    ap.add_argument("--gpus-per-client", type=float, default=0.0)
    ap.add_argument("--run-config", action="append", default=[],
                    help="a run-config TOML file (conf/*.toml) or overrides with TOML values, "
                         "\"strategy='fedprox' alpha=0.1\"; repeatable, merged in order (later wins)")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the run is stopped")
    ap.add_argument("--ray-address", metavar="HOST:PORT",
                    help="run on this existing Ray cluster (the head's GCS address from `ray start --head`)")
    ap.add_argument("--keep-home", action="store_true", help="keep the run's FLWR_HOME (logs) after exit")
    args = ap.parse_args(argv)
    try:  # the merged run config, validated as the ServerApp will, before anything starts
        run_config = merge_run_config(args.run_config)
        build_config(run_config)
    except ConfigError as exc:
        print(f"[flwr_sim] error: {exc}", file=sys.stderr, flush=True)
        return 2

    ray_env: dict[str, str] = {}
    if args.ray_address is not None:
        if not re.fullmatch(r"[^:/\s]+:\d{1,5}", args.ray_address):
            print(f"[flwr_sim] error: --ray-address {args.ray_address!r}: expected HOST:PORT, the "
                  "address `ray start --head` printed", file=sys.stderr, flush=True)
            return 2
        ray_env["RAY_ADDRESS"] = args.ray_address

    port = free_port()
    home = ROOT / ".flwr" / f"sim-{port}"
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(home, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # only --ray-address names a cluster
    env.update(ray_env)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n'
        f'[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    federation = (f"num-supernodes={args.num_supernodes} "
                  f"client-resources-num-cpus={args.cpus_per_client}")
    if args.gpus_per_client:
        federation += f" client-resources-num-gpus={args.gpus_per_client}"

    log_path = home / "superlink.log"
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    code = 2
    try:
        wait_healthy(port, superlink)
        print(f"[flwr_sim] SuperLink pid {superlink.pid} on 127.0.0.1:{port}; "
              f"{args.num_supernodes} simulated clients"
              + (f" on the Ray cluster at {args.ray_address}" if ray_env else ""), flush=True)
        cmd = [str(BIN / "flwr"), "run", ".", "sim", "--stream", "--federation-config", federation]
        if run_config:
            print(f"[flwr_sim] run config: {' '.join(f'{k}={v!r}' for k, v in run_config.items())}",
                  flush=True)
            cmd += ["--run-config", str(write_run_config(run_config, home / "run-config.toml"))]
        run_id = None
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) as flwr_run:
            deadline = time.monotonic() + args.timeout
            for line in flwr_run.stdout:
                sys.stdout.write(line)
                if run_id is None and "run" in line.lower():
                    digits = [w for w in line.replace(".", " ").split() if w.isdigit() and len(w) > 5]
                    if "Successfully started run" in line and digits:
                        run_id = int(digits[0])
                if time.monotonic() > deadline:
                    print(f"[flwr_sim] timeout after {args.timeout:.0f} s; stopping", flush=True)
                    flwr_run.kill()
                    break
            flwr_run.wait()
        status = run_status(env, "sim", run_id)
        code = 0 if status == "finished:completed" else 1
        print(f"[flwr_sim] run {run_id or '?'} status: {status}", flush=True)
        if code:
            print(f"[flwr_sim] run failed; SuperLink log: {log_path}", flush=True)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"[flwr_sim] error: {exc} (SuperLink log: {log_path})", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        stop_group(superlink)
        if code == 0 and not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
