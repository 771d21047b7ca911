"""What the tests share: data checks, Flower identities, the in-process run, fault hooks and
the resume check, tiny configs, and fake banks for the aggregation tests.

Test modules import from here, never from each other; ``conftest.py`` keeps pytest's hooks."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import build_config, load_defaults
from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.core.fedavg import FedAvgStrategy
from mosaic_flwr.core.records import ClientInfo, state_to_record
from mosaic_flwr.core.server import ServerContext
from mosaic_flwr.core.task import Arch
from mosaic_flwr.data.files import user_data_dir
from mosaic_flwr.data.fetch import mnist_location
from mosaic_flwr.testing.inprocess import InProcessGrid
from server_app.app import main as server_main

C = 10


def fmnist_data():
    """Fashion-MNIST ``(train, test)`` (cached by the loader). The setup installs it, so where
    it is missing the calling test FAILS, with the loader's message naming where it looked;
    no test is ever skipped for it."""
    from mosaic_flwr.data import DatasetNotFoundError, load_dataset
    try:
        return load_dataset("fmnist")
    except DatasetNotFoundError as exc:
        problem = str(exc)
    pytest.fail(f"Fashion-MNIST is missing: {problem}. Run `bash scripts/setup.sh`, which "
                "installs it; tests that need it fail rather than skip.", pytrace=False)


def requires_fmnist(test):
    """Decorator: the test fails (in its call, not at collection) where Fashion-MNIST is missing."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        fmnist_data()
        return test(*args, **kwargs)
    return run


def as_flower_server() -> None:
    """Let this process build Flower messages as the server would (run 1, node 1): Flower
    reads the sender's identity from ``TaskIdentity``, which only a running app sets."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 0, 1


def started_under(root: Path) -> list[int]:
    """PIDs of live processes whose FLWR_HOME lies under ``root``: every process this test
    starts sets one there, and SuperExec, ServerApp and ClientApp processes inherit it (they
    run detached, in sessions of their own)."""
    marker = f"FLWR_HOME={root}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if state != "Z" and any(var.startswith(marker) for var in environ):
            pids.append(int(entry.name))
    return pids


def run_inprocess(tmp_path, num_nodes=3, grid_options=None, **overrides) -> dict:
    """Run the ServerApp's main on an in-process grid; ``grid_options`` go to ``InProcessGrid``
    (fault ``hook``, ``first_node_id``)."""
    run_config = {**load_defaults(), "output-dir": str(tmp_path), "run-name": "run",
                  "num-server-rounds": 2, "local-steps": 30, "batch-size": 32, **overrides}
    grid = InProcessGrid(client_app, run_config, num_nodes, **(grid_options or {}))
    server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                              run_config=run_config))
    return {"dir": tmp_path / "run", "grid": grid}


# The synthetic data set keeps these runs short; the mechanisms do not depend on the data.
SYNTH = {"dataset": "synthetic", "alpha": 1.0}


TINY_MOSAIC = {**SYNTH, "strategy": "mosaic", "num-server-rounds": 3, "warmup-rounds": 2, "local-steps": 10,
               "mosaic.gen-steps": 20, "kd.steps": 5, "mosaic.meta-epochs": 5}


# A Mosaic run of three rounds on synthetic data, without the gate (it has its own tests)
QUICK_MOSAIC = {"dataset": "synthetic", "alpha": 1.0, "num-server-rounds": 3, "warmup-rounds": 2,
                "local-steps": 5, "batch-size": 16, "mosaic.gen-steps": 5, "mosaic.gen-batch-size": 8, "mosaic.proto-k": 2,
                "mosaic.meta-epochs": 3, "mosaic.meta-samples-per-class": 4, "kd.steps": 8, "kd.batch-size": 16,
                "kd.lr": 1e-3, "kd.gate": "off"}  # the gate has its own tests (test_warm_start_gate.py)


def round_of(incoming: Message) -> int:
    """The server round a message belongs to (0: the discovery query)."""
    configs = incoming.content.config_records
    return int(configs["config"]["server-round"]) if "config" in configs else 0


def metric_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())


def untimed_scores(rows: list[dict]) -> list[tuple]:
    """Everything a round reports except wall-clock times."""
    return [tuple(sorted((k, v) for k, v in r.items() if "seconds" not in k)) for r in rows]


class Crash(BaseException):
    """The server dying mid-round (a BaseException: nothing on the way catches it)."""


def crash_in(server_round: int, then=None):
    """A grid hook: the server dies when a reply of round ``server_round`` arrives; other
    replies go through ``then`` (another hook) when given."""
    def crash(grid, node, incoming, reply):
        if round_of(incoming) == server_round:
            raise Crash
        return reply if then is None else then(grid, node, incoming, reply)
    return crash


def untimed(summary: dict) -> dict:
    """A summary (or its distillation part) without wall-clock times."""
    return {k: v for k, v in summary.items() if "seconds" not in k}


NODE_KEYS = frozenset({"node", "node-id"})  # transport addresses: a resumed run's SuperNodes may have new ids


def same_state(a, b, where: str = "state") -> None:
    """Assert two checkpointed states are equal: tensors bit for bit, everything else ``==``,
    except file names inside the run folder (compared by name), wall-clock times and node ids."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = {k for k in a if "seconds" not in str(k) and k not in NODE_KEYS}
        assert keys == {k for k in b if "seconds" not in str(k) and k not in NODE_KEYS}, f"{where}: keys differ"
        for k in keys:
            same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, str) and "/" in a:
        assert Path(a).name == Path(b).name, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def crash_then_resume(root: Path, crash_rounds, *, hook=None, first_node_id: int | None = 500, on_crash=None,
                      **run_config) -> Path:
    """Run ``run_config`` under ``root``, the server dying in each of ``crash_rounds`` in turn
    and resumed from its checkpoint (on new node ids from ``first_node_id`` on, as after a
    restart of the SuperNodes; None: the same ids), to the end. ``hook`` sees every reply of
    every run; ``on_crash(round, run_dir)`` after each crash. The run folder."""
    run_dir = root / "run"
    resume = {}
    for i, server_round in enumerate(crash_rounds):
        options = {"hook": crash_in(server_round, hook)}
        if resume and first_node_id is not None:
            options["first_node_id"] = first_node_id + 100 * i
        with pytest.raises(Crash):
            run_inprocess(root, grid_options=options, **resume, **run_config)
        if on_crash is not None:
            on_crash(server_round, run_dir)
        resume = {"resume": str(run_dir)}
    options = {"hook": hook} if hook is not None else {}
    if first_node_id is not None:
        options["first_node_id"] = first_node_id + 100 * len(crash_rounds)
    run_inprocess(root, grid_options=options, **resume, **run_config)
    return run_dir


def assert_same_run(full: Path, resumed: Path, *, resumed_after: int) -> None:
    """The resume-equality check, one for every strategy: a run resumed after round
    ``resumed_after`` reports what the uninterrupted run reports (every round's scores but
    wall-clock times, the final accuracy, the distillation summary) and ends with the same
    strategy state in its checkpoint (global models, experts, generators, RNG-free state)."""
    assert untimed_scores(metric_rows(resumed)) == untimed_scores(metric_rows(full))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, resumed))
    assert b["resumed_after_round"] == resumed_after
    assert a["final_accuracy"] == b["final_accuracy"]
    assert untimed(a.get("distillation", {})) == untimed(b.get("distillation", {}))
    same_state(load_checkpoint(full)["strategy"], load_checkpoint(resumed)["strategy"], "strategy")


def mnist_dir() -> Path:
    """The user's verified MNIST (``scripts/test.sh`` obtains it before pytest starts)."""
    found = mnist_location(user_data_dir())
    if found is None:
        pytest.fail(f"MNIST is not in {user_data_dir()} (mnist/ or MNIST/raw/, published md5s): run "
                    "`bash scripts/setup.sh --data mnist` (--data-from DIR on an offline machine)", pytrace=False)
    return found


def scalars_of(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``directory``: tag -> [(step, value)]
    as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hetero_counts(examples: int) -> torch.Tensor:
    """Declared label counts of a client with ``examples`` examples (at least C)."""
    counts = torch.ones(C, dtype=torch.long)
    counts[0] += examples - C
    return counts


def hetero_bank(archs: dict[int, Arch], examples: dict[int, int] | None = None, **cfg_over) -> FedAvgStrategy:
    as_flower_server()
    cfg = build_config({"strategy": "fedavg", "dataset": "synthetic", **cfg_over})
    examples = examples or {}
    clients = {n: ClientInfo(n, i, hetero_counts(examples.get(n, C)), a.model, a.capacity)
               for i, (n, a) in enumerate(archs.items())}
    sc = ServerContext(cfg=cfg, grid=None, device=torch.device("cpu"), test_x=None,
                       test_y=None, results=None, num_nodes=len(clients), clients=clients)
    return FedAvgStrategy(sc)


def hetero_reply(strategy: FedAvgStrategy, node: int, arch: Arch, value: float, n: int) -> Message:
    state = {k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
             for k, v in strategy.template(arch).items()}
    content = RecordDict({"arrays": state_to_record(state),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=Message(RecordDict({}), dst_node_id=node, message_type="train"))


TWO_TENSORS = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def two_tensor_reply(w: float, n: int, node: int, *, key="w", shape=(2, 2)) -> Message:
    as_flower_server()
    arrays = {key: torch.full(shape, w), "b": torch.full((2,), w)}
    out = Message(RecordDict({"arrays": ArrayRecord({k: v for k, v in arrays.items()})}),
                  dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=out)


class TwoTensorBank:
    """A bank over a two-tensor model: the template is ``TWO_TENSORS``, the start is zeros."""

    def __init__(self, cls, **cfg):
        sc = ServerContext(cfg=build_config({"dataset": "synthetic", **cfg}), grid=None,
                           device=torch.device("cpu"), test_x=None, test_y=None,
                           results=None, num_nodes=5)
        self.strategy = cls(sc)
        self.strategy._templates = {a: TWO_TENSORS for a in self.strategy.archs}
        self.strategy.globals = {f: {k: v.clone() for k, v in TWO_TENSORS.items()} for f in self.strategy.globals}
