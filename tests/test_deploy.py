"""Deployment: a SuperNode's own data (unit), the deploy scripts, and a real TLS + SuperNode
authentication deployment on 127.0.0.1 (slow): two authorised SuperNodes run Mosaic to the
end; an unregistered key, a missing key, another CA and plain HTTP are refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mosaic_flwr.config import build_config
from mosaic_flwr.data import DatasetNotFoundError
from mosaic_flwr.core.task import client_data, node_data, node_partition, partition_file
from tests.deploy_support import (BIN, DEPLOY, NO_NGINX, Deployment, check_mosaic_results, free_port, make_material,
                                  run, submit_config)

import flwr_deploy  # noqa: E402  (scripts/deploy is on sys.path through tests.deploy_support)
import make_partitions  # noqa: E402

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


# ----------------------------------------------------------------------------- node_data
@pytest.fixture(scope="module")
def synth():
    return build_config({"dataset": "synthetic", "partition": "iid"})


def save_part(path: Path, cfg, pid: int, num: int) -> Path:
    torch.save(partition_file(cfg, pid, num), path)
    return path


def file_config(path: Path, pid: int, num: int) -> dict:
    return {"data-file": str(path), "partition-id": pid, "num-partitions": num}


def test_node_data_in_simulation_is_client_data(synth):
    x, y = node_data(synth, {"partition-id": 1, "num-partitions": 3})
    cx, cy = client_data(synth, 1, 3)
    assert x is cx and y is cy  # the same cached tensors: simulation is unchanged


def test_partition_file_round_trip(tmp_path, synth):
    path = save_part(tmp_path / "client-1.pt", synth, 1, 3)
    blob = torch.load(path, weights_only=True)
    assert blob["dataset"] == "synthetic" and blob["x"].dtype == torch.uint8
    assert (blob["partition-id"], blob["num-partitions"]) == (1, 3)
    cx, cy = client_data(synth, 1, 3)
    x, y = node_data(synth, file_config(path, 1, 3))
    assert torch.equal(y, cy) and torch.allclose(x, cx)


def test_partition_file_replaced_is_read_again(tmp_path, synth):
    path = tmp_path / "client.pt"
    save_part(path, synth, 1, 2)
    y0 = node_data(synth, file_config(path, 1, 2))[1]
    torch.save({**partition_file(synth, 1, 2), "y": torch.flip(y0, [0])}, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    y1 = node_data(synth, file_config(path, 1, 2))[1]
    assert torch.equal(y1, torch.flip(y0, [0])) and not torch.equal(y0, y1)


def test_node_data_missing_file(tmp_path, synth):
    with pytest.raises(DatasetNotFoundError, match=r"node-config data-file: .*nope\.pt not found"):
        node_data(synth, file_config(tmp_path / "nope.pt", 0, 2))


def test_node_data_wrong_dataset(tmp_path, synth):
    path = save_part(tmp_path / "c.pt", synth, 0, 2)
    fmnist = build_config({"dataset": "fmnist"})
    with pytest.raises(ValueError, match="holds 'synthetic' data but the run's dataset is 'fmnist'"):
        node_data(fmnist, file_config(path, 0, 2))


def test_node_data_corrupt_files(tmp_path, synth):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    good = save_part(tmp_path / "good.pt", synth, 0, 2)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match="is not a readable partition file"):
            node_data(synth, file_config(path, 0, 2))
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="is not a mosaic-flwr partition file"):
        node_data(synth, file_config(other, 0, 2))
    blob = partition_file(synth, 0, 2)
    for key, bad, msg in (("x", blob["x"].float(), "'x' must be a non-empty uint8 tensor"),
                          ("x", blob["x"][:, :, :14], "'x' must be"),
                          ("y", blob["y"][:-1], "'y' must be an int64 tensor"),
                          ("y", blob["y"] + 10, "labels outside"),
                          ("partition-id", "zero", "no valid 'partition-id'"),
                          ("partition-id", 5, r"partition-id 5 not in \[0, 2\)")):
        path = tmp_path / f"bad-{key}.pt"
        torch.save({**blob, key: bad}, path)
        with pytest.raises(ValueError, match=msg):
            node_data(synth, file_config(path, 0, 2))


def test_node_data_partition_id_must_match_file(tmp_path, synth):
    path = save_part(tmp_path / "c.pt", synth, 0, 2)
    with pytest.raises(ValueError, match="partition-id=1 num-partitions=2 but data-file .* holds partition 0 of 2"):
        node_data(synth, file_config(path, 1, 2))


def test_node_partition_is_required(synth):
    for node_config in ({}, {"data-file": "/x.pt"}, {"partition-id": 0}):
        with pytest.raises(ValueError, match="node-config (partition-id|num-partitions): missing"):
            node_partition(node_config)
    with pytest.raises(ValueError, match="integers expected"):
        node_partition({"partition-id": "a", "num-partitions": 2})
    assert node_partition({"partition-id": 1, "num-partitions": 4}) == (1, 4)
    with pytest.raises(ValueError, match="partition-id: 2 not in"):
        node_data(synth, {"partition-id": 2, "num-partitions": 2})


def test_node_data_dir_overrides_run_config(tmp_path):
    cfg = build_config({"dataset": "mnist", "data-dir": str(tmp_path / "server-side")})
    node_dir = tmp_path / "node-side"
    node_dir.mkdir()
    with pytest.raises(DatasetNotFoundError, match="node-side") as err:
        node_data(cfg, {"partition-id": 0, "num-partitions": 2, "data-dir": str(node_dir)})
    assert "server-side" not in str(err.value)


# ----------------------------------------------------------------------------- scripts
def test_make_partitions_script(tmp_path, capsys):
    out = tmp_path / "parts"
    assert make_partitions.main(["--out", str(out), "--num-partitions", "3",
                                 "--run-config", "dataset='synthetic' alpha=0.5 seed=7"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["file"] for f in manifest["files"]] == ["client-0.pt", "client-1.pt", "client-2.pt"]
    cfg = build_config({"dataset": "synthetic", "alpha": 0.5, "seed": 7})
    total = 0
    for pid in range(3):
        blob = torch.load(out / f"client-{pid}.pt", weights_only=True)
        assert torch.equal(blob["y"], client_data(cfg, pid, 3)[1])  # the run's own partition
        assert (out / f"client-{pid}.pt").stat().st_mode & 0o777 == 0o600  # a client's data: owner only
        total += len(blob["y"])
    assert total == 2000
    capsys.readouterr()
    assert make_partitions.main(["--node-config-of", str(out / "client-2.pt")]) == 0
    assert capsys.readouterr().out.strip() == f"data-file='{out / 'client-2.pt'}' partition-id=2 num-partitions=3"
    for args, msg in ((["--run-config", "alpah=0.5"], "alpah: unknown key"),
                      (["--partition-ids", "0,5"], "--partition-ids: 5 not in [0, 2)"),
                      (["--node-config-of", str(out / "manifest.json")], "is not a readable partition file")):
        assert make_partitions.main(["--out", str(out), "--num-partitions", "2", *args]) == 1
        assert msg in capsys.readouterr().err


def test_make_partitions_as_a_command(tmp_path):
    proc = run([BIN / "python", DEPLOY / "make_partitions.py", "--out", tmp_path, "--num-partitions", 2,
                "--run-config", "dataset='synthetic'"])
    assert proc.returncode == 0 and "2 files and manifest.json" in proc.stdout, proc.stderr


def test_scripts_usage_and_bad_input(tmp_path):
    for script in ("make_certs.sh", "make_node_keys.sh", "start_superlink.sh", "start_supernode.sh"):
        proc = run(["bash", DEPLOY / script])
        assert proc.returncode == 2 and "usage" in proc.stderr.lower(), (script, proc.stderr)
    proc = run(["bash", DEPLOY / "start_superlink.sh", "--certs", tmp_path, "--bogus"])
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
    proc = run(["bash", DEPLOY / "start_superlink.sh", "--certs", tmp_path / "none"])
    assert proc.returncode == 1 and "none/ca.crt: file not found" in proc.stderr
    proc = run(["bash", DEPLOY / "start_superlink.sh", "--certs", tmp_path, "--port", "99999"])
    assert proc.returncode == 2 and "'99999' is not a port number" in proc.stderr
    for f in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / f).write_text("x")
    proc = run(["bash", DEPLOY / "start_superlink.sh", "--certs", tmp_path, "--max-body", "lots"])
    assert proc.returncode == 2 and "--max-body 'lots' is not a size" in proc.stderr
    proc = run(["bash", DEPLOY / "start_superlink.sh", "--certs", tmp_path, "--port", free_port(),
                "--internal-port", "0"])
    assert proc.returncode == 2 and "--internal-port '0' is not a port number" in proc.stderr
    node = ["bash", DEPLOY / "start_supernode.sh", "--superlink", "127.0.0.1:9", "--root-cert", tmp_path / "ca.crt"]
    proc = run([*node, "--key", tmp_path / "missing-key", "--data-file", tmp_path / "c.pt"])
    assert proc.returncode == 1 and "--key" in proc.stderr and "missing-key: file not found" in proc.stderr
    (tmp_path / "node.pub").write_text("ecdsa-sha2-nistp384 AAAA node")
    proc = run([*node, "--key", tmp_path / "node.pub", "--data-file", tmp_path / "c.pt"])
    assert proc.returncode == 2 and "is not a private key" in proc.stderr
    proc = run([*node, "--data-file", tmp_path / "c.pt"])
    assert proc.returncode == 2 and "--key PRIVATE_KEY is required" in proc.stderr
    proc = run([*node[:-2], "--key", tmp_path / "node.pub", "--data-file", tmp_path / "c.pt"])
    assert proc.returncode == 2 and "--root-cert CA_CRT is required" in proc.stderr



def test_flwr_deploy_bad_input(tmp_path, capsys):
    args = ["submit", "--superlink", "127.0.0.1:9", "--root-cert"]
    assert flwr_deploy.main([*args, str(tmp_path / "no-ca.crt")]) == 2
    assert "no-ca.crt: file not found" in capsys.readouterr().err
    (tmp_path / "ca.crt").write_text("x")
    assert flwr_deploy.main(["nodes", "--superlink", "127.0.0.1", "--root-cert", str(tmp_path / "ca.crt")]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flwr_deploy.main(["submit", "--superlink", "127.0.0.1:9"])
    assert "--root-cert" in capsys.readouterr().err


def test_start_scripts_refuse_a_busy_port(tmp_path):
    (tmp_path / "key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    for f in ("ca.crt", "server.crt", "server.key", "c.pt"):
        (tmp_path / f).write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(["bash", DEPLOY / "start_superlink.sh", "--certs", tmp_path, "--port", port])
        assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
        proc = run(["bash", DEPLOY / "start_supernode.sh", "--superlink", "127.0.0.1:9", "--root-cert",
                    tmp_path / "ca.crt", "--key", tmp_path / "key", "--data-file", tmp_path / "c.pt",
                    "--port", port])
        assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr


@needs_openssl
def test_make_certs_and_node_keys(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    certs, keys = tmp_path / "certs", tmp_path / "keys"
    proc = run(["bash", DEPLOY / "make_certs.sh", certs, "10.1.2.3", "link.example.org"],
               env={**os.environ, "CERT_KEY_BITS": "2048"})
    assert proc.returncode == 0, proc.stderr
    verify = run(["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.crt"])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    san = run(["openssl", "x509", "-in", certs / "server.crt", "-noout", "-ext", "subjectAltName"]).stdout
    for name in ("IP Address:10.1.2.3", "DNS:link.example.org", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in san
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    assert oct((certs / "operator.key").stat().st_mode & 0o777) == "0o600"
    # the operator's certificate authenticates a TLS client and nothing else; the server's only a server
    for cert, purpose, ok in (("operator.crt", "sslclient", True), ("operator.crt", "sslserver", False),
                              ("server.crt", "sslclient", False)):
        verify = run(["openssl", "verify", "-CAfile", certs / "ca.crt", "-purpose", purpose, certs / cert])
        assert (verify.returncode == 0) == ok, (cert, purpose, verify.stdout + verify.stderr)
    again = run(["bash", DEPLOY / "make_certs.sh", certs, "10.1.2.3"])
    assert again.returncode == 1 and "exists" in again.stderr  # never overwrites keys
    bad = run(["bash", DEPLOY / "make_certs.sh", tmp_path / "c2", "not a host"])
    assert bad.returncode == 2 and "neither an IP address nor a host name" in bad.stderr
    only = run(["bash", DEPLOY / "make_certs.sh", "--no-loopback", tmp_path / "c3", "10.1.2.3"],
               env={**os.environ, "CERT_KEY_BITS": "2048"})
    assert only.returncode == 0, only.stderr
    san = run(["openssl", "x509", "-in", tmp_path / "c3" / "server.crt", "-noout", "-ext", "subjectAltName"]).stdout
    assert san.split("\n", 1)[1].strip() == "IP Address:10.1.2.3", san  # no localhost, no 127.0.0.1
    proc = run(["bash", DEPLOY / "make_node_keys.sh", keys, "client-0"])
    assert proc.returncode == 0, proc.stderr
    assert try_load_public_key(keys / "client-0.pub")  # what `flwr supernode register` reads
    assert load_ssh_private_key((keys / "client-0").read_bytes(), None)  # what flower-supernode reads
    assert oct((keys / "client-0").stat().st_mode & 0o777) == "0o600"
    again = run(["bash", DEPLOY / "make_node_keys.sh", keys, "client-1", "client-0"])
    assert again.returncode == 1 and "exists" in again.stderr and not (keys / "client-1").exists()


# ----------------------------------------------------------------------------- real deployment
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    assert shutil.which("openssl"), "openssl is needed to make the test's certificates"
    if NO_NGINX:
        pytest.skip(NO_NGINX)
    d = Deployment(tmp_path_factory.mktemp("deploy"))
    try:
        make_material(d, ["client-0", "client-1", "rogue"], "127.0.0.1", other_ca=True)
        link = d.superlink("127.0.0.1")
        flwr_deploy.wait_superlink(d.address, d.certs / "ca.crt", timeout=90, proc=link)
        d.control = flwr_deploy.write_connection(d.root / "home-cli", d.address, d.certs / "ca.crt",
                                                 operator=d.operator)
        registered = flwr_deploy.register(d.control, [d.keys / "client-0.pub", d.keys / "client-1.pub"])
        d.node_ids = sorted(registered.values())
        for i in range(2):
            d.supernode(f"client-{i}", d.keys / f"client-{i}", d.parts / f"client-{i}.pt", d.certs / "ca.crt")
        yield d
    except BaseException:
        print(d.tails())
        raise
    finally:
        d.stop_all()


def refused(d: Deployment, name: str, *expected: str) -> None:
    """The SuperNode ``name`` exits non-zero, never gets a node id, and logs ``expected``."""
    code = d.wait_exit(name, timeout=90)
    assert code not in (None, 0), f"SuperNode {name} was not refused (exit {code})\n{d.tails()}"
    log = d.log(name)
    assert "SuperNode ID" not in log, d.tails()
    for text in expected:
        assert text in log, f"{name}: {text!r} not logged\n{d.tails()}"


@pytest.mark.slow
def test_unregistered_supernode_is_refused(deployment):
    d = deployment
    d.supernode("rogue", d.keys / "rogue", d.parts / "client-0.pt", d.certs / "ca.crt")
    # A SuperNode without any key may not register itself either.
    d.start("no-key", [BIN / "flower-supernode", "--superlink", d.address, "--root-certificates",
                       d.certs / "ca.crt", "--node-config", "partition-id=0 num-partitions=2",
                       "--port", free_port()])
    refused(d, "rogue", "Failed to activate SuperNode")
    refused(d, "no-key", "All SuperNodes must be registered")
    assert "No SuperNode found with the given public key" in d.log("superlink"), d.tails()
    assert sorted(n["node-id"] for n in flwr_deploy.nodes(d.control)) == d.node_ids


@pytest.mark.slow
def test_wrong_root_certificate_cannot_connect(deployment):
    d = deployment
    other_ca = d.root / "other-ca" / "ca.crt"
    # A SuperNode with a registered key that trusts another CA fails the TLS handshake ...
    d.supernode("wrong-ca", d.keys / "client-1", d.parts / "client-1.pt", other_ca)
    # ... a plain-HTTP (insecure) SuperNode gets nowhere either ...
    d.start("insecure", [BIN / "flower-supernode", "--insecure", "--superlink", d.address,
                         "--node-config", "partition-id=0 num-partitions=2", "--port", free_port(),
                         "--max-retries", "2", "--max-wait-time", "20"])
    # ... and so does any HTTPS client, the CLI (submitting runs, registering nodes) included.
    with pytest.raises(flwr_deploy.DeployError, match="CERTIFICATE_VERIFY_FAILED"):
        flwr_deploy.wait_superlink(d.address, other_ca, timeout=3)
    env = flwr_deploy.write_connection(d.root / "home-wrong-ca", d.address, other_ca)
    with pytest.raises(flwr_deploy.DeployError, match="Connection to the SuperLink is unavailable"):
        flwr_deploy.nodes(env)
    refused(d, "wrong-ca", "CERTIFICATE_VERIFY_FAILED")
    refused(d, "insecure", "could not establish a connection")


@pytest.mark.slow
def test_the_control_api_is_the_operators_alone(deployment, tmp_path):
    """Through the proxy, a client without the operator's certificate, or with one signed by
    another CA, can neither list, register, stop nor submit; the runtime API is closed to
    everyone; each refusal is one line of the proxy's log, and the SuperLink never saw them."""
    d = deployment
    ca = d.certs / "ca.crt"
    other = d.root / "other-ca"
    runs_before = flwr_deploy.runs(d.control)
    strangers = {
        "no certificate": flwr_deploy.write_connection(d.root / "home-stranger", d.address, ca),
        "another CA's": flwr_deploy.write_connection(d.root / "home-other", d.address, ca,
                                                     operator=(other / "operator.crt", other / "operator.key")),
    }
    for who, env in strangers.items():
        for attempt in (lambda: flwr_deploy.nodes(env), lambda: flwr_deploy.runs(env),
                        lambda: flwr_deploy.register(env, [d.keys / "rogue.pub"]),
                        lambda: flwr_deploy.stop(env, 1)):
            with pytest.raises(flwr_deploy.DeployError, match="only to the operator's client certificate"):
                attempt()
        log = io.StringIO()
        code, run_id, _ = flwr_deploy.submit(env, [submit_config(tmp_path / who)], timeout=60, log=log)
        assert (code, run_id) == (2, None), (who, log.getvalue())
        assert "403 Forbidden" in log.getvalue() or "400 Bad Request" in log.getvalue(), log.getvalue()
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(f"https://{d.address}/v1/runtime/acquire-task", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(request, timeout=10, context=context)
    proxy = d.proxy_log(last='"POST /v1/runtime/acquire-task" 403')
    for path in ("list-nodes", "list-runs", "register-node", "stop-run", "start-run"):
        assert any(f'/v1/control/{path}" 403 client-cert=NONE' in line for line in proxy), (path, proxy)
        assert any(f'/v1/control/{path}" 400 client-cert=FAILED' in line for line in proxy), (path, proxy)
    assert any('"POST /v1/runtime/acquire-task" 403' in line for line in proxy), proxy
    link = [line for line in d.log("superlink").splitlines() if "uvicorn.access" in line]
    assert not any("stop-run" in line or "start-run" in line for line in link), link
    # the operator's view: no rogue node, no new run
    assert sorted(n["node-id"] for n in flwr_deploy.nodes(d.control)) == d.node_ids
    assert flwr_deploy.runs(d.control) == runs_before


@pytest.mark.slow
def test_two_authorised_supernodes_run_mosaic(deployment, tmp_path):
    d = deployment
    nodes = flwr_deploy.wait_online(d.control, 2, timeout=60)
    assert sorted(n["node-id"] for n in nodes) == d.node_ids
    out = tmp_path / "results"
    d.logs["submit"] = log_path = d.root / "submit.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        code, run_id, status = flwr_deploy.submit(d.control, [submit_config(out)], timeout=300, log=log)
    seconds = time.monotonic() - t0
    assert code == 0 and status == "finished:completed", f"run {run_id}: {status}\n{d.tails()}"
    check_mosaic_results(out / "deploy", d.node_ids, d.parts)
    print(f"[test_deploy] 2-round Mosaic deployment run: {seconds:.1f} s")
