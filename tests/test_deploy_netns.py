"""Deployment across a real network interface (slow, as root): the SuperLink lives in one network
namespace (198.51.100.1), the SuperNodes and the operator's CLI in another (198.51.100.2), an
outsider in a third (203.0.113.2, routed to the SuperLink and nothing else), joined by veth
pairs; TLS with a certificate made for 198.51.100.1 (and the loopback names the SuperLink's
proxy uses inside its own machine), SuperNode authentication on, the Control API behind the
operator-only proxy. Two authorised SuperNodes run Mosaic to the end; the outsider, who holds
the public CA certificate, can neither register a node, list, stop or submit runs, nor reach the
SuperLink's own port; the operator can do all of it. Every process and namespace is removed
afterwards, also when the test fails.

The CLI runs in the SuperNodes' namespace: the submitter is then another party across the
network, as in production, so the Control API is reached over the veth and its TLS is verified
for 198.51.100.1, the same as the Fleet API's. (From the SuperLink's own namespace the packets
to its own address would go over loopback.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time

import pytest

from tests.deploy_support import (BIN, DEPLOY, IP, NO_NGINX, Deployment, check_mosaic_results, in_netns,
                                  make_material, run, submit_config)

LINK_IP, NODES_IP = "198.51.100.1", "198.51.100.2"  # TEST-NET-2 (RFC 5737): routed nowhere
GATE_IP, OUTSIDER_IP = "203.0.113.1", "203.0.113.2"  # TEST-NET-3: the outsider's link to the SuperLink


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
    """Three namespaces: ``link`` (LINK_IP/24 on veth ``link_if``, GATE_IP/24 on ``gate_if``),
    ``nodes`` (NODES_IP/24, veth ``nodes_if``, paired with ``link_if``) and ``outsider``
    (OUTSIDER_IP/24 on ``out_if``, paired with ``gate_if``, with a route to LINK_IP through
    GATE_IP); loopback up in each; names unique per run."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.link, self.nodes, self.outsider = (f"mosaic-{role}-{tag}" for role in ("link", "nodes", "out"))
        short = f"{os.getpid() % 10**6}{os.urandom(2).hex()}"  # interface names: at most 15 chars
        self.link_if, self.nodes_if, self.gate_if, self.out_if = (f"v{c}{short}" for c in "lngo")
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.link, self.nodes, self.outsider):
            ip("netns", "add", ns)
            self.made.append(ns)
        for (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) in (
                ((self.link, self.link_if, LINK_IP), (self.nodes, self.nodes_if, NODES_IP)),
                ((self.link, self.gate_if, GATE_IP), (self.outsider, self.out_if, OUTSIDER_IP))):
            ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
            for ns, dev, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
                ip("link", "set", "lo", "up", netns=ns)
                ip("addr", "add", f"{addr}/24", "dev", dev, netns=ns)
                ip("link", "set", dev, "up", netns=ns)
        ip("route", "add", f"{LINK_IP}/32", "via", GATE_IP, netns=self.outsider)

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


def cli_command(d: Deployment, netns: str, *args, operator: bool = True) -> list:
    """``scripts/deploy/flwr_deploy.py ARGS --superlink ADDRESS --root-cert ca.crt`` in ``netns``,
    with the operator's certificate unless not ``operator`` (its FLWR_HOME under the test's
    root, so that Deployment.stop_all finds a leftover ``flwr``)."""
    who = "operator" if operator else "outsider"
    return in_netns(netns, [BIN / "python", DEPLOY / "flwr_deploy.py", *args, "--superlink", d.address,
                            "--root-cert", d.certs / "ca.crt", "--home", d.root / f"home-{who}-{args[0]}",
                            *(["--operator-cert", d.operator[0], "--operator-key", d.operator[1]]
                              if operator else [])])


def deploy_cli(d: Deployment, netns: str, *args, operator: bool = True, timeout: float = 120):
    return run(cli_command(d, netns, *args, operator=operator), timeout=timeout, env=d.env)


def submit_in_background(d: Deployment, name: str, netns: str, *configs: str) -> int:
    """Start ``flwr_deploy.py submit`` as the operator (its log: ``d.log(name)``; ``configs``
    merged in order); return the run id once the SuperLink has started the run."""
    d.start(name, cli_command(d, netns, "submit", *(a for c in configs for a in ("--run-config", c)),
                              "--timeout", 300))
    deadline = time.monotonic() + 120
    while not (m := re.search(r"Successfully started run (\d+)", d.log(name))):
        assert d.procs[name].poll() is None and time.monotonic() < deadline, f"no run started\n{d.tails()}"
        time.sleep(0.3)
    return int(m.group(1))


def outsider_is_refused(d: Deployment, netns: str, *args) -> str:
    """``flwr_deploy.py ARGS`` without the operator's certificate fails with the proxy's 403."""
    proc = deploy_cli(d, netns, *args, operator=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "403 Forbidden" in said, f"outsider {args[0]}: {proc.returncode}\n{said}"
    return said


@pytest.mark.slow
def test_deployment_across_network_namespaces(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    assert shutil.which("openssl"), "openssl is needed to make the test's certificates"
    if NO_NGINX:
        pytest.skip(NO_NGINX)
    t_start = time.monotonic()
    net, d = Net(), Deployment(tmp_path)
    try:
        net.create()
        make_material(d, ["client-0", "client-1", "rogue"], LINK_IP)
        san = run(["openssl", "x509", "-in", d.certs / "server.crt", "-noout", "-ext", "subjectAltName"]).stdout
        # that address and the proxy's own loopback names, nothing else
        assert san.split("\n", 1)[1].strip() == f"IP Address:{LINK_IP}, DNS:localhost, IP Address:127.0.0.1", san

        d.superlink(LINK_IP, netns=net.link)
        port = int(d.address.split(":")[1])
        # the SuperLink is reachable only through the veth pairs: not from this (the root) namespace
        with pytest.raises(OSError), socket.create_connection((LINK_IP, port), timeout=2):
            pass
        up = deploy_cli(d, net.nodes, "nodes", "--wait", 90, timeout=150)
        assert up.returncode == 0, f"{up.stdout}{up.stderr}\n{d.tails()}"
        # the outsider reaches the proxy, but not the SuperLink's own port (127.0.0.1 of its machine)
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
        for target, reachable in ((port, True), (d.internal_port, False)):
            proc = run(in_netns(net.outsider, [BIN / "python", "-c", probe, LINK_IP, target]), timeout=30)
            assert (proc.returncode == 0) == reachable, (target, proc.stderr)

        reg = deploy_cli(d, net.nodes, "register", d.keys / "client-0.pub", d.keys / "client-1.pub")
        assert reg.returncode == 0, f"{reg.stdout}{reg.stderr}"
        for i in range(2):
            d.supernode(f"client-{i}", d.keys / f"client-{i}", d.parts / f"client-{i}.pt",
                        d.certs / "ca.crt", netns=net.nodes)
        online = deploy_cli(d, net.nodes, "nodes", "--online", 2, "--wait", 90, timeout=150)
        assert online.returncode == 0, f"{online.stdout}{online.stderr}\n{d.tails()}"
        node_ids = [line.split("\t")[0] for line in online.stdout.splitlines()]
        assert len(node_ids) == 2 and all(n.isdigit() for n in node_ids), online.stdout

        # the outsider, holding only the public CA certificate
        outsider_is_refused(d, net.outsider, "register", d.keys / "rogue.pub")
        outsider_is_refused(d, net.outsider, "nodes")
        outsider_is_refused(d, net.outsider, "submit", "--run-config", submit_config(tmp_path / "stranger"))

        sent = net.tx_bytes()
        out = tmp_path / "results"
        t0 = time.monotonic()
        run_id = submit_in_background(d, "submit", net.nodes, submit_config(out))
        # while the operator's run is on, the outsider can neither see nor stop it
        outsider_is_refused(d, net.outsider, "runs")
        outsider_is_refused(d, net.outsider, "stop", run_id)
        assert d.wait_exit("submit", timeout=360) == 0, d.tails()
        seconds = time.monotonic() - t0
        assert f"run {run_id} status: finished:completed" in d.log("submit"), d.tails()
        check_mosaic_results(out / "deploy", node_ids, d.parts)
        # the run's traffic (the app bundle, the models, the messages) crossed the veth pair
        assert net.tx_bytes() - sent > 100_000, (sent, net.tx_bytes())
        for name in ("client-0", "client-1"):
            assert f"SuperLink {d.address}" in d.log(name)

        # the operator lists runs and stops one
        second = submit_in_background(d, "submit-2", net.nodes,
                                      submit_config(tmp_path / "stopped"), "num-server-rounds=50")
        stopped = deploy_cli(d, net.nodes, "stop", second)
        assert stopped.returncode == 0, f"{stopped.stdout}{stopped.stderr}"
        assert d.wait_exit("submit-2", timeout=120) == 1, d.tails()
        listed = deploy_cli(d, net.nodes, "runs")
        assert listed.returncode == 0, listed.stderr
        status = dict(line.split("\t")[:2] for line in listed.stdout.splitlines())
        assert status == {str(run_id): "finished:completed", str(second): "finished:stopped"}, listed.stdout
        online = deploy_cli(d, net.nodes, "nodes")
        assert sorted(line.split("\t")[0] for line in online.stdout.splitlines()) == sorted(node_ids)  # no rogue

        # each of the outsider's attempts is one refused line of the proxy's log, from its address
        proxy = d.proxy_log(last=f'{OUTSIDER_IP} "POST /v1/control/stop-run" 403')
        for path in ("register-node", "list-nodes", "start-run", "list-runs", "stop-run"):
            assert any(f'{OUTSIDER_IP} "POST /v1/control/{path}" 403 client-cert=NONE' in line
                       for line in proxy), (path, proxy)
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
    assert not namespaces() & {net.link, net.nodes, net.outsider}
