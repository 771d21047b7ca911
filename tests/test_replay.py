"""mosaic_flwr.testing.replay: one round's client work replayed into several server variants
(bench's ablation and converged studies). A branch with the fork's own settings must be the
run itself, to the bit; a branch with other settings must differ only after the fork."""

import pytest
from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import load_defaults
from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy
from mosaic_flwr.testing.inprocess import InProcessGrid
from mosaic_flwr.testing.replay import Fork
from server_app.app import setup
from tests.support import QUICK_MOSAIC, round_of, same_state, untimed_scores

NODES = 3


def context(tmp_path, name: str, **over) -> Context:
    rc = {**load_defaults(), **QUICK_MOSAIC, "strategy": "mosaic", "checkpoint": False,
          "output-dir": str(tmp_path), "run-name": name, **over}
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)


def train_rounds(grid: InProcessGrid) -> list[int]:
    return [round_of(m) for m in grid.sent if m.metadata.message_type.startswith("train")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run played through, no fork."""
    tmp = tmp_path_factory.mktemp("straight")
    ctx = context(tmp, "straight")
    sc = setup(InProcessGrid(client_app, ctx.run_config, NODES), ctx)
    strategy = MosaicStrategy(sc)
    strategy.run()
    return strategy


def test_a_branch_with_the_forks_settings_is_the_run_itself(tmp_path, straight):
    ctx = context(tmp_path, "fork")
    grid = InProcessGrid(client_app, ctx.run_config, NODES)
    w = QUICK_MOSAIC["warmup-rounds"]
    fork = Fork.at(MosaicStrategy(setup(grid, ctx)), w)
    assert fork.server_round == w and len(fork.replies) == NODES
    assert train_rounds(grid) == [r for r in range(1, w + 1) for _ in range(NODES)]  # client work up to w, once

    branch = fork.run(setup(grid, context(tmp_path, "branch")))
    assert untimed_scores(branch.sc.results.rounds) == untimed_scores(straight.sc.results.rounds)
    same_state(branch.state_dict(), straight.state_dict())
    assert train_rounds(grid).count(w) == NODES  # the forked round was replayed, not sent again


@pytest.mark.slow  # the quick loop forks in test_a_branch_with_the_forks_settings_is_the_run_itself (above)
def test_variants_branch_from_the_same_replies_and_differ_after_the_fork(tmp_path, straight):
    ctx = context(tmp_path, "fork")
    grid = InProcessGrid(client_app, ctx.run_config, NODES)
    w = QUICK_MOSAIC["warmup-rounds"]
    fork = Fork.at(MosaicStrategy(setup(grid, ctx)), w)
    short = fork.branch(setup(grid, context(tmp_path, "kd2", **{"kd.steps": 2})))
    plain = fork.branch(setup(grid, context(tmp_path, "nometa", **{"mosaic.meta": False})))
    again = fork.branch(setup(grid, context(tmp_path, "again")))
    ref = straight.sc.results.rounds
    for variant in (short, plain):
        rows = variant.sc.results.rounds
        assert len(rows) == w + 1  # a branch: the forked round applied, nothing after
        assert untimed_scores(rows[:w]) == untimed_scores(ref[:w])  # the shared rounds
        for same in ("acc-before-distill", "acc-ensemble", "train-loss"):
            assert rows[w][same] == ref[w][same], same  # the same replies
        assert rows[w]["client-cpu-seconds"] == fork.train_metrics["client-cpu-seconds"]  # the round's client work
    assert short.sc.results.rounds[w]["kd-final-loss"] != ref[w]["kd-final-loss"]  # its own distillation
    assert "meta-inputs" in ref[w] and "meta-inputs" not in plain.sc.results.rounds[w]  # its own teacher
    assert untimed_scores(again.sc.results.rounds) == untimed_scores(ref[: w + 1])  # earlier branches left no trace
    assert fork.strategy.keep_models is False and fork.strategy.recorded is None


def test_keep_models_keeps_every_client_model_of_the_forked_round(tmp_path):
    ctx = context(tmp_path, "fork")
    grid = InProcessGrid(client_app, ctx.run_config, NODES)
    fork = Fork.at(MosaicStrategy(setup(grid, ctx)), 1, keep_models=True)
    assert len(fork.items) == NODES and all(payload.state is not None for _, payload in fork.items)


def test_a_fork_before_round_one_is_refused(tmp_path):
    ctx = context(tmp_path, "fork")
    with pytest.raises(ValueError, match="at least 1"):
        Fork.at(MosaicStrategy(setup(InProcessGrid(client_app, ctx.run_config, NODES), ctx)), 0)
