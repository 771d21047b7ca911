"""Deployment across a real network interface (slow, as root): the SuperLink lives in one network
namespace (198.51.100.1), the SuperNodes and the CLI in another (198.51.100.2), joined by a veth
pair and nothing else; TLS with a certificate made for 198.51.100.1 only, SuperNode
authentication on; two authorised SuperNodes run Mosaic to the end. Every process and both
namespaces are removed afterwards, also when the test fails.

The CLI (register, list nodes, ``flwr run``) runs in the SuperNodes' namespace: the submitter is
then another party across the network, as in production, so the Control API is reached over
the veth and its TLS is verified for 198.51.100.1, the same as the Fleet API's. (From the
SuperLink's own namespace the packets to its own address would go over loopback.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest

from tests.deploy_support import (BIN, DEPLOY, IP, Deployment, check_mosaic_results, in_netns,
                                  make_material, run, submit_config)

LINK_IP, NODES_IP = "198.51.100.1", "198.51.100.2"  # TEST-NET-2 (RFC 5737): routed nowhere


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None. Creating network namespaces needs root
    (CAP_SYS_ADMIN) and iproute2's ``ip``; the probe creates and deletes one."""
    if os.geteuid() != 0:
        return f"network namespaces need root (`ip netns add`); running as uid {os.geteuid()}"
    if shutil.which(IP) is None:
        return f"iproute2's `ip` not found ({IP})"
    probe = f"mosaic-probe-{os.getpid()}"
    made = run([IP, "netns", "add", probe], timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    gone = run([IP, "netns", "del", probe], timeout=30)
    assert gone.returncode == 0, f"could not delete the probe namespace {probe}: {gone.stderr}"
    return None


def namespaces() -> set[str]:
    listed = run([IP, "netns", "list"], timeout=30)
    assert listed.returncode == 0, listed.stderr
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def ip(*args: str, netns: str | None = None) -> str:
    proc = run(in_netns(netns, [IP, *args]), timeout=30)
    assert proc.returncode == 0, f"ip {' '.join(args)} (netns {netns}): {proc.stderr}"
    return proc.stdout


class Net:
    """Two namespaces joined by a veth pair: ``link`` (LINK_IP/24, veth ``link_if``) and
    ``nodes`` (NODES_IP/24, veth ``nodes_if``), loopback up in each; names unique per run."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.link, self.nodes = f"mosaic-link-{tag}", f"mosaic-nodes-{tag}"
        short = f"{os.getpid() % 10**6}{os.urandom(2).hex()}"  # interface names: at most 15 chars
        self.link_if, self.nodes_if = f"vl{short}", f"vn{short}"
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.link, self.nodes):
            ip("netns", "add", ns)
            self.made.append(ns)
        ip("link", "add", self.link_if, "netns", self.link, "type", "veth",
           "peer", "name", self.nodes_if, "netns", self.nodes)
        for ns, dev, addr in ((self.link, self.link_if, LINK_IP), (self.nodes, self.nodes_if, NODES_IP)):
            ip("link", "set", "lo", "up", netns=ns)
            ip("addr", "add", f"{addr}/24", "dev", dev, netns=ns)
            ip("link", "set", dev, "up", netns=ns)

    def pids(self) -> dict[str, list[int]]:
        """Processes still inside each namespace (``ip netns pids``)."""
        return {ns: [int(p) for p in run([IP, "netns", "pids", ns], timeout=30).stdout.split()]
                for ns in self.made}

    def remove(self) -> None:
        """Delete the namespaces (a veth end goes with its namespace); raise if any is left."""
        left = {ns: pids for ns, pids in self.pids().items() if pids}
        for pids in left.values():  # Deployment.stop_all already stopped them all; belt and braces
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        errors = [run([IP, "netns", "del", ns], timeout=30).stderr.strip() for ns in self.made]
        remaining = namespaces() & set(self.made)
        self.made = []
        assert not left, f"processes were still running in the test's namespaces: {left}"
        assert not remaining, f"namespaces left behind: {remaining} ({errors})"

    def tx_bytes(self) -> int:
        """Bytes the SuperNodes' side has sent over its veth end."""
        return int(json.loads(ip("-s", "-j", "link", "show", self.nodes_if, netns=self.nodes))[0]
                   ["stats64"]["tx"]["bytes"])


def deploy_cli(d: Deployment, netns: str, *args, timeout: float = 120):
    """``scripts/deploy/flwr_deploy.py ARGS --superlink ADDRESS --root-cert ca.crt`` in ``netns``
    (its FLWR_HOME under the test's root, so that Deployment.stop_all finds a leftover ``flwr``)."""
    cmd = in_netns(netns, [BIN / "python", DEPLOY / "flwr_deploy.py", *args, "--superlink", d.address,
                           "--root-cert", d.certs / "ca.crt", "--home", d.root / "home-cli"])
    return run(cmd, timeout=timeout, env=d.env)


@pytest.mark.slow
def test_deployment_across_network_namespaces(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    assert shutil.which("openssl"), "openssl is needed to make the test's certificates"
    t_start = time.monotonic()
    net, d = Net(), Deployment(tmp_path)
    try:
        net.create()
        make_material(d, ["client-0", "client-1"], LINK_IP, loopback=False)
        san = run(["openssl", "x509", "-in", d.certs / "server.crt", "-noout", "-ext", "subjectAltName"]).stdout
        assert san.split("\n", 1)[1].strip() == f"IP Address:{LINK_IP}", san  # that address, nothing else

        d.superlink(LINK_IP, netns=net.link)
        # the SuperLink is reachable only through the veth pair: not from this (the root) namespace
        with pytest.raises(OSError), socket.create_connection((LINK_IP, int(d.address.split(":")[1])), timeout=2):
            pass
        up = deploy_cli(d, net.nodes, "nodes", "--wait", 90, timeout=150)
        assert up.returncode == 0, f"{up.stdout}{up.stderr}\n{d.tails()}"
        reg = deploy_cli(d, net.nodes, "register", d.keys / "client-0.pub", d.keys / "client-1.pub")
        assert reg.returncode == 0, f"{reg.stdout}{reg.stderr}"
        for i in range(2):
            d.supernode(f"client-{i}", d.keys / f"client-{i}", d.parts / f"client-{i}.pt",
                        d.certs / "ca.crt", netns=net.nodes)
        online = deploy_cli(d, net.nodes, "nodes", "--online", 2, "--wait", 90, timeout=150)
        assert online.returncode == 0, f"{online.stdout}{online.stderr}\n{d.tails()}"
        node_ids = [line.split("\t")[0] for line in online.stdout.splitlines()]
        assert len(node_ids) == 2 and all(n.isdigit() for n in node_ids), online.stdout

        sent = net.tx_bytes()
        out = tmp_path / "results"
        t0 = time.monotonic()
        sub = deploy_cli(d, net.nodes, "submit", "--run-config", submit_config(out), "--timeout", 300, timeout=360)
        seconds = time.monotonic() - t0
        (tmp_path / "submit.log").write_text(sub.stdout + sub.stderr)
        assert sub.returncode == 0 and "status: finished:completed" in sub.stdout, \
            f"{sub.stdout[-3000:]}{sub.stderr}\n{d.tails()}"
        check_mosaic_results(out / "deploy", node_ids, d.parts)
        # the run's traffic (the app bundle, the models, the messages) crossed the veth pair
        assert net.tx_bytes() - sent > 100_000, (sent, net.tx_bytes())
        for name in ("client-0", "client-1"):
            assert f"SuperLink {d.address}" in d.log(name)
        print(f"[test_deploy_netns] 2-round Mosaic run across the veth pair: {seconds:.1f} s")
    except BaseException:
        print(d.tails())
        raise
    finally:
        try:
            d.stop_all()
        finally:
            net.remove()
        print(f"[test_deploy_netns] whole test, namespaces made and removed: {time.monotonic() - t_start:.1f} s")
    assert not namespaces() & {net.link, net.nodes}
