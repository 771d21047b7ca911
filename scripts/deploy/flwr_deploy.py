#!/usr/bin/env python3
"""Talk to a deployed SuperLink over TLS as its operator: allow SuperNode keys, submit, list
and stop runs, list nodes.

Every command writes a connection (address + the CA certificate that signed the SuperLink's
certificate) into an ``FLWR_HOME/config.toml`` (a temporary one unless ``--home`` is given)
and calls the ``flwr`` CLI with it, through ``flwr_operator.py``, which presents the
operator's client certificate (``--operator-cert``/``--operator-key``, ``operator.crt``/``.key``
from ``make_certs.sh``): the proxy of ``start_superlink.sh`` passes the Control API to nothing
else.

    OP="--superlink 127.0.0.1:9093 --root-cert certs/ca.crt --operator-cert certs/operator.crt --operator-key certs/operator.key"
    # allow SuperNodes' public keys (the SuperLink must run with --enable-supernode-auth)
    flwr_deploy.py register $OP keys/client-0.pub keys/client-1.pub
    # submit this app (`flwr run . deploy --stream`), block until the run ends:
    # exit 0 completed, 1 failed or stopped, 2 not started (bad address/certificate, refused, ...)
    flwr_deploy.py submit $OP --run-config "num-server-rounds=3"
    # the SuperNodes the SuperLink knows and their status (registered/online/offline);
    # --online N first waits (up to --wait seconds) until N of them are online
    flwr_deploy.py nodes $OP
    # the runs and their status; stop one
    flwr_deploy.py runs $OP
    flwr_deploy.py stop $OP RUN_ID

``flwr run --stream`` exits 0 even when the run failed, so ``submit`` checks the run's final
status with ``flwr list`` (the helper in ``scripts/flwr_sim.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from flwr_sim import BIN, flower_env, run_status  # BIN: the directory of the python running this script
from mosaic_flwr.config import ConfigError, build_config, merge_run_config, write_run_config

CONNECTION = "deploy"
OPERATOR_CLI = Path(__file__).resolve().with_name("flwr_operator.py")
RUN_ID = re.compile(r"Successfully started run (\d+)")


class DeployError(RuntimeError):
    """Something needed is missing or the SuperLink said no; the message says what."""


def check_address(address: str) -> str:
    if not re.fullmatch(r"(\[[0-9A-Fa-f:]+\]|[^:/\s\[\]]+):\d{1,5}", address):
        raise DeployError(f"--superlink {address!r}: expected HOST:PORT (e.g. 127.0.0.1:9093)")
    return address


def write_connection(home: Path, address: str, root_cert: Path, name: str = CONNECTION,
                     operator: tuple[Path, Path] | None = None) -> dict[str, str]:
    """Write ``home/config.toml`` with connection ``name``; return the environment for ``flwr``
    (with ``operator``, the operator's certificate and key, presented by :func:`flwr_cli`)."""
    root_cert = Path(root_cert).expanduser().resolve()
    if not root_cert.is_file():
        raise DeployError(f"--root-cert {root_cert}: file not found (the SuperLink's ca.crt, "
                          "from scripts/deploy/make_certs.sh)")
    check_address(address)
    extra = {}
    if operator is not None:
        cert, key = (Path(f).expanduser().resolve() for f in operator)
        for path, option in ((cert, "--operator-cert"), (key, "--operator-key")):
            if not path.is_file():
                raise DeployError(f"{option} {path}: file not found (operator.crt/.key, from "
                                  "scripts/deploy/make_certs.sh)")
        extra = {"MOSAIC_OPERATOR_CERT": str(cert), "MOSAIC_OPERATOR_KEY": str(key)}
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = {json.dumps(str(root_cert))}\n')
    return flower_env(home, **extra)


def flwr_cli() -> list[str]:
    """The ``flwr`` CLI, presenting the operator's certificate where the environment names one."""
    return [str(BIN / "python"), str(OPERATOR_CLI)]


def probe_superlink(address: str, root_cert: Path) -> None:
    """One HTTPS request to ``https://address/health``, verified against ``root_cert``.

    Raises :class:`DeployError` saying what is wrong when the certificate does not verify
    (another CA, or HOST not among the certificate's names), and ``OSError`` when nothing
    answers (yet)."""
    context = ssl.create_default_context(cafile=str(root_cert))
    try:
        with urllib.request.urlopen(f"https://{address}/health", timeout=5, context=context) as r:
            if r.status != 200:
                raise OSError(f"/health answered {r.status}")
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise DeployError(
                f"TLS: the SuperLink at {address} did not present a certificate that {root_cert} "
                f"verifies for {address.rsplit(':', 1)[0]} ({exc.reason.verify_message}; "
                f"CERTIFICATE_VERIFY_FAILED): use the ca.crt that signed its certificate and one of "
                "the names it was made for (make_certs.sh)") from None
        raise OSError(str(exc.reason)) from None


def wait_superlink(address: str, root_cert: Path, timeout: float = 60.0,
                   proc: subprocess.Popen | None = None) -> None:
    """Block until the SuperLink at ``address`` answers over verified TLS; a certificate
    that does not verify fails at once, a SuperLink that does not answer after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the SuperLink process exited with code {proc.returncode}")
        try:
            return probe_superlink(address, root_cert)
        except OSError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise DeployError(f"no SuperLink answers at https://{address} ({last}); is it running, "
                              "and is the address right?")
        time.sleep(0.3)


def _flwr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*flwr_cli(), *args], cwd=ROOT, env=env, capture_output=True, check=False,
                          text=True, timeout=timeout)


REFUSED = ("{}: the SuperLink's proxy passes the Control API only to the operator's client "
           "certificate, signed by the deployment's CA (--operator-cert operator.crt --operator-key "
           "operator.key, from make_certs.sh)")


def _json(out: subprocess.CompletedProcess) -> dict:
    try:
        reply = json.loads(out.stdout)
    except json.JSONDecodeError:
        text = (out.stdout + out.stderr).strip()
        reply = {"success": False, "error-message": text or f"exit code {out.returncode}"}
    status = re.search(r"'(403 Forbidden|400 Bad Request)'", str(reply.get("error-message", "")))
    if not reply.get("success") and status:  # no certificate (403), or one the proxy rejects (400)
        reply["error-message"] = REFUSED.format(status.group(1))
    return reply


def register(env: dict[str, str], public_keys: list[Path], connection: str = CONNECTION) -> dict[str, str]:
    """Allow each public key on the SuperLink (``flwr supernode register``); a key that is
    already registered is fine. Returns {key file: node id or 'already registered'}."""
    done: dict[str, str] = {}
    for key in public_keys:
        key = Path(key).expanduser().resolve()
        if not key.is_file():
            raise DeployError(f"public key {key}: file not found (NAME.pub from scripts/deploy/make_node_keys.sh)")
        if "PRIVATE KEY" in key.read_text(errors="replace"):
            raise DeployError(f"{key} is a private key: register the public one (NAME.pub), and "
                              "keep the private key on its SuperNode")
        reply = _json(_flwr(env, "supernode", "register", str(key), connection, "--format", "json"))
        if reply.get("success"):
            done[str(key)] = str(reply.get("node-id"))
        elif "already in use" in str(reply.get("error-message", "")):
            done[str(key)] = "already registered"
        else:
            raise DeployError(f"registering {key} failed: {reply.get('error-message', reply)}")
        print(f"[flwr_deploy] {key.name}: {'node ' if done[str(key)][0].isdigit() else ''}"
              f"{done[str(key)]}", flush=True)
    return done


def nodes(env: dict[str, str], connection: str = CONNECTION) -> list[dict]:
    """The SuperNodes the SuperLink knows (``flwr supernode list``)."""
    reply = _json(_flwr(env, "supernode", "list", connection, "--format", "json"))
    if not reply.get("success"):
        raise DeployError(f"listing SuperNodes failed: {reply.get('error-message', reply)}")
    return list(reply.get("nodes", []))


def wait_online(env: dict[str, str], count: int, timeout: float = 60.0,
                connection: str = CONNECTION) -> list[dict]:
    """Block until at least ``count`` SuperNodes are online; return the SuperLink's nodes."""
    deadline = time.monotonic() + timeout
    while True:
        known = nodes(env, connection)
        online = sum(n.get("status") == "online" for n in known)
        if online >= count:
            return known
        if time.monotonic() >= deadline:
            raise DeployError(f"{online} of {count} SuperNodes online after {timeout:.0f} s: "
                              + ", ".join(f"{n.get('node-id')} {n.get('status')}" for n in known))
        time.sleep(1)


def runs(env: dict[str, str], connection: str = CONNECTION) -> list[dict]:
    """The runs the SuperLink knows (``flwr list``)."""
    reply = _json(_flwr(env, "list", connection, "--format", "json"))
    if not reply.get("success"):
        raise DeployError(f"listing runs failed: {reply.get('error-message', reply)}")
    return list(reply.get("runs", []))


def stop(env: dict[str, str], run_id: int, connection: str = CONNECTION) -> None:
    """Stop run ``run_id`` (``flwr stop``)."""
    reply = _json(_flwr(env, "stop", str(run_id), connection, "--format", "json"))
    if not reply.get("success"):
        raise DeployError(f"stopping run {run_id} failed: {reply.get('error-message', reply)}")
    print(f"[flwr_deploy] run {run_id}: stopped", flush=True)


def submit(env: dict[str, str], run_config: list[str], app: Path = ROOT, timeout: float = 6 * 3600,
           connection: str = CONNECTION, log=sys.stdout) -> tuple[int, int | None, str]:
    """``flwr run APP CONNECTION --stream``; block until the run ends.

    Returns (exit code: 0 completed, 1 failed, 2 not started; run id; final status).
    """
    cmd = [*flwr_cli(), "run", str(app), connection, "--stream"]
    if run_config:  # files and key=value strings merged in order; `flwr run` takes one file
        values = merge_run_config(run_config)
        build_config(values)  # a bad key or value: one line before the SuperLink hears of it
        cmd += ["--run-config", str(write_run_config(values, Path(env["FLWR_HOME"]) / "run-config.toml"))]
    found: list[int] = []
    timed_out = False

    def pump(stream) -> None:  # copy the log stream through, catching the run id
        for line in stream:
            log.write(line)
            log.flush()
            if not found and (m := RUN_ID.search(line)):
                found.append(int(m.group(1)))

    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, start_new_session=True) as proc:
        reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log.write(f"[flwr_deploy] timeout after {timeout:.0f} s; stopping the run\n")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:  # Ctrl-C: leave neither `flwr run` nor the run behind
            os.killpg(proc.pid, signal.SIGKILL)
            if found:
                _flwr(env, "stop", str(found[0]), connection, timeout=30)
            raise
        reader.join(timeout=10)
    run_id = found[0] if found else None
    if run_id is None:
        log.write("[flwr_deploy] the run was not started (see the output above)\n")
        return 2, None, "not started"
    if timed_out:
        _flwr(env, "stop", str(run_id), connection, timeout=30)
    status = run_status(env, connection, run_id, flwr=flwr_cli())
    log.write(f"[flwr_deploy] run {run_id} status: {status}\n")
    log.flush()
    return (0 if status == "finished:completed" else 1), run_id, status


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    parsers = {
        "register": sub.add_parser("register", help="allow SuperNode public keys"),
        "submit": sub.add_parser("submit", help="submit a run and wait for its end"),
        "nodes": sub.add_parser("nodes", help="list the SuperLink's SuperNodes"),
        "runs": sub.add_parser("runs", help="list the SuperLink's runs"),
        "stop": sub.add_parser("stop", help="stop a run"),
    }
    for p in parsers.values():
        p.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT (a name/IP in its certificate)")
        p.add_argument("--root-cert", required=True, type=Path, help="the CA certificate (ca.crt)")
        p.add_argument("--operator-cert", type=Path, help="the operator's client certificate "
                       "(operator.crt): the SuperLink's proxy passes the Control API to it only")
        p.add_argument("--operator-key", type=Path, help="its private key (operator.key)")
        p.add_argument("--home", type=Path, help="FLWR_HOME to write the connection into (default: a temporary one)")
        p.add_argument("--wait", type=float, default=10.0,
                       help="seconds to wait for the SuperLink to answer (default 10), and with "
                            "nodes --online, for the SuperNodes")
    parsers["stop"].add_argument("run_id", type=int, metavar="RUN_ID")
    parsers["register"].add_argument("public_keys", nargs="+", type=Path, metavar="NAME.pub")
    parsers["nodes"].add_argument("--online", type=int, default=0, metavar="N",
                                  help="first wait until N SuperNodes are online (see --wait)")
    s = parsers["submit"]
    s.add_argument("--app", type=Path, default=ROOT, help="the Flower app directory (default: this repository)")
    s.add_argument("--run-config", action="append", default=[],
                   help="a run-config TOML file or overrides, TOML values: \"strategy='fedprox' "
                        "num-server-rounds=3\"; repeatable, merged in order (later wins); "
                        "output-dir is a path on the SuperLink's machine")
    s.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the run is stopped")
    return ap


def command(args: argparse.Namespace, env: dict[str, str]) -> int:
    """Run one sub-command against a SuperLink that answers; its exit code."""
    if args.command == "register":
        register(env, args.public_keys)
        return 0
    if args.command == "nodes":
        for node in wait_online(env, args.online, timeout=args.wait):
            print(f"{node.get('node-id')}\t{node.get('status')}\t{node.get('online-at')}")
        return 0
    if args.command == "runs":
        for r in runs(env):
            print(f"{r.get('run-id')}\t{r.get('status')}\t{r.get('fab-id', '')}")
        return 0
    if args.command == "stop":
        stop(env, args.run_id)
        return 0
    return submit(env, args.run_config, app=args.app, timeout=args.timeout)[0]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flwr-deploy-") as tmp:
        try:
            if not (BIN / "flwr").is_file():
                raise DeployError(f"{BIN / 'flwr'} not found: run this script with the project's "
                                  "python (.venv/bin/python scripts/deploy/flwr_deploy.py ...)")
            if (args.operator_cert is None) != (args.operator_key is None):
                raise DeployError("give --operator-cert and --operator-key together")
            operator = (args.operator_cert, args.operator_key) if args.operator_cert else None
            env = write_connection(args.home or Path(tmp), args.superlink, args.root_cert, operator=operator)
            wait_superlink(args.superlink, args.root_cert, timeout=args.wait)
            return command(args, env)
        except (DeployError, ConfigError, OSError, subprocess.SubprocessError) as exc:
            print(f"[flwr_deploy] error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
