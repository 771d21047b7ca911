"""The simulation on an existing Ray cluster (slow): a head (`ray start --head`) and a second Ray
node (`ray start --address`) on this machine, each with 1 CPU and its own temp dir; `flwr run .`
through scripts/flwr_sim.py --ray-address runs Mosaic to the end, and Ray's own record of the
tasks (the GCS's task events) shows ClientApp work finished on both nodes. Every process of
the cluster is stopped by PID afterwards, also when the test fails (`ray stop` would stop
every Ray process of the machine, other users' too).

Why --ray-address sets RAY_ADDRESS: Flower 1.42's federation config cannot name a Ray address.
flwr/simulation/app.py (_run_simulation_settings) fills the Ray backend's ``init_args`` from the
SimulationConfig proto, whose only init-args fields are num_cpus, num_gpus, logging_level and
log_to_driver; flwr/server/superlink/fleet/vce/backend/raybackend.py (init_ray) then calls
``ray.init(runtime_env=..., **init_args)`` with no address, and ray.init() connects to
``RAY_ADDRESS`` when it is set (ray/_private/worker.py). The simulation process is launched by
the SuperLink, so it inherits RAY_ADDRESS from the SuperLink's environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support import started_under
from tests.deploy_support import BIN, RUN_DATA, SMALL, flower_env, free_port, run

import flwr_sim  # noqa: E402  (scripts/ is on sys.path through tests.deploy_support)

ROOT = Path(__file__).resolve().parents[1]


def test_ray_address_must_be_host_port(capsys):
    for bad in ("6379", "ray://head:10001", "head:port", ""):
        assert flwr_sim.main(["--ray-address", bad]) == 2
        assert f"--ray-address {bad!r}: expected HOST:PORT" in capsys.readouterr().err


class RayCluster:
    """Ray nodes started with ``ray start`` on this machine, under the short directory ``root``
    (Ray's socket paths must stay under 108 characters). Each node has its own temp dir, 1 CPU,
    a small object store and free ports; every process Ray starts inherits FLWR_HOME=root/home,
    which is how :meth:`stop` finds them (by PID)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = flower_env(root / "home", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dirs: list[Path] = []

    def start_node(self, head: bool) -> None:
        temp = self.root / ("head" if head else f"node{len(self.temp_dirs)}")
        self.temp_dirs.append(temp)
        cmd = [BIN / "ray", "start", "--num-cpus", 1, "--object-store-memory", 100_000_000,
               "--temp-dir", temp, "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
               "--runtime-env-agent-port", free_port(), "--metrics-export-port", free_port()]
        if head:
            cmd += ["--head", "--port", self.port, "--include-dashboard", "false",
                    "--dashboard-port", free_port(), "--ray-client-server-port", free_port()]
        else:
            cmd += ["--address", self.address]
        proc = run(cmd, timeout=180, env=self.env)
        (self.root / f"{temp.name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}"

    def gcs(self, method: str, request):
        """One call to the cluster's GCS (its gRPC API, what Ray's state API reads underneath;
        the state API itself needs the dashboard, which Flower's `ray` without extras lacks)."""
        import grpc
        from ray.core.generated import gcs_service_pb2_grpc as services
        stub_class = {"GetAllNodeInfo": services.NodeInfoGcsServiceStub,
                      "GetTaskEvents": services.TaskInfoGcsServiceStub}[method]
        with grpc.insecure_channel(self.address) as channel:
            return getattr(stub_class(channel), method)(request, timeout=30)

    def nodes(self) -> dict[str, str]:
        """{node id: the node's temp dir} of the alive nodes."""
        from ray.core.generated import gcs_pb2, gcs_service_pb2
        reply = self.gcs("GetAllNodeInfo", gcs_service_pb2.GetAllNodeInfoRequest())
        return {n.node_id.hex(): n.temp_dir for n in reply.node_info_list
                if n.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE}

    def finished_tasks(self, name: str) -> Counter:
        """How many tasks called ``name`` finished on each node (node id -> count)."""
        from ray.core.generated import common_pb2, gcs_service_pb2
        reply = self.gcs("GetTaskEvents", gcs_service_pb2.GetTaskEventsRequest(limit=100_000))
        done = Counter()
        for event in reply.events_by_task:
            update = event.state_updates
            if event.task_info.name == name and common_pb2.TaskStatus.FINISHED in update.state_ts_ns:
                done[update.node_id.hex()] += 1
        return done

    def stop(self) -> None:
        """SIGTERM every process of the cluster (by PID), SIGKILL what is left after 5 s; raise
        if any survives."""
        marker = self.root / "home"
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in started_under(marker):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while started_under(marker) and time.monotonic() < deadline:
                time.sleep(0.2)
        survivors = started_under(marker)
        assert not survivors, f"Ray processes of the test still running: {survivors}"


@pytest.fixture
def ray_cluster():
    # Not under tmp_path: Ray's unix sockets live under the temp dir, and their paths must stay short.
    # A temp dir other than /tmp/ray also keeps other ray.init() calls of this machine from
    # finding this cluster (they look for /tmp/ray/ray_current_cluster).
    root = Path(tempfile.mkdtemp(prefix="mray-"))
    cluster = RayCluster(root)
    try:
        cluster.start_node(head=True)
        cluster.start_node(head=False)
        yield cluster
    except BaseException:
        for log in sorted(root.glob("*.log")):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        try:
            cluster.stop()
        finally:
            subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.slow
def test_simulation_on_an_existing_ray_cluster(ray_cluster, tmp_path):
    cluster = ray_cluster
    nodes = cluster.nodes()
    assert len(nodes) == 2, nodes
    by_dir = {Path(temp).name: node for node, temp in nodes.items()}
    assert set(by_dir) == {"head", "node1"}, nodes  # two nodes, each with its own temp dir
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = run([sys.executable, ROOT / "scripts" / "flwr_sim.py", "--num-supernodes", 2, "--cpus-per-client", 1,
                "--ray-address", cluster.address, "--run-config",
                f"{RUN_DATA} {SMALL} server-threads=1 client-threads=1 output-dir='{out}' run-name='ray'"],
               timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.monotonic() - t0
    (tmp_path / "flwr_sim.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"on the Ray cluster at {cluster.address}" in proc.stdout
    rounds = json.loads((out / "ray" / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[1].get("phase") == "distill", rounds
    assert json.loads((out / "ray" / "summary.json").read_text())["num_clients"] == 2
    # Ray's record: ClientApp messages (ClientAppActor.run) finished on the head AND on the other node
    done = cluster.finished_tasks("ClientAppActor.run")
    assert set(done) == set(nodes), (done, nodes)
    assert all(done[node] >= 1 for node in nodes), done
    print(f"[test_ray_cluster] ClientAppActor.run per node: "
          f"head {done[by_dir['head']]}, second node {done[by_dir['node1']]}; flwr_sim.py: {seconds:.1f} s")
