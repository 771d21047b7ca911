"""A client's privacy ledger (``mosaic_flwr/privacy/ledger.py``): every release composed on
disk, across restarts, and refused past ``dp.epsilon``; the ClientApp's gate scores under DP
are noisy, counted, and refused beyond what the run planned."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from mosaic_flwr.privacy import dp as dpm
from mosaic_flwr.privacy.ledger import BudgetExceeded, Ledger, ledger_name

DELTA = 1e-5
INFO_CLASSES = 10  # the synthetic data set's classes


def _sigma(epsilon: float) -> float:
    return dpm.gaussian_sigma(epsilon, DELTA)


def test_releases_compose_and_one_past_the_budget_is_refused_and_not_written(tmp_path):
    path = tmp_path / "ledger.json"
    book = Ledger(path, budget=1.7, delta=DELTA)
    one = {"counts": (_sigma(1.0), 1.0, 1)}
    first = book.charge(one, run=1)
    assert first == pytest.approx(dpm.epsilon_of([one["counts"]], DELTA)) and 0.99 <= first <= 1.0
    second = book.charge({"gate": (_sigma(1.0), 1.0, 1)}, run=1)
    assert 1.0 < second < 1.7                      # composed: well below the sum of the two
    with pytest.raises(BudgetExceeded, match=r"refusing to release prototypes: this client has spent epsilon "
                                             r"1\.\d+ in 2 release\(s\) .* past dp.epsilon=1\.7"):
        book.charge({"prototypes": (_sigma(1.0), 1.0, 1)}, run=1)
    saved = json.loads(path.read_text())
    assert [e["what"] for e in saved["releases"]] == ["counts", "gate"]
    assert saved["epsilon-spent"] == pytest.approx(second)
    assert path.stat().st_mode & 0o077 == 0        # the owner's alone


def test_the_ledger_survives_a_restart_and_keeps_the_noisy_counts(tmp_path):
    path = tmp_path / "ledger.json"
    draws = []

    def draw():
        draws.append(1)
        return torch.tensor([5, 0, 7])

    counts = Ledger(path, budget=1.0, delta=DELTA).noisy_counts(draw, 3, _sigma(0.5))
    again = Ledger(path, budget=1.0, delta=DELTA)  # a restarted client reads what it released
    assert torch.equal(again.noisy_counts(draw, 3, _sigma(0.5)), counts) and len(draws) == 1
    assert again.epsilon() == pytest.approx(0.5, rel=0.02)
    with pytest.raises(BudgetExceeded):
        again.charge({"generator": (_sigma(0.9), 1.0, 1)})


def test_without_a_budget_the_ledger_records_and_refuses_nothing(tmp_path):
    book = Ledger(tmp_path / "l.json", budget=0.0, delta=DELTA)
    for _ in range(3):
        book.charge({"generator": (0.5, 0.01, 100)})
    assert len(json.loads((tmp_path / "l.json").read_text())["releases"]) == 3 and book.epsilon() > 0


def test_an_unreadable_ledger_releases_nothing(tmp_path):
    (tmp_path / "l.json").write_text("{not json")
    with pytest.raises(BudgetExceeded, match="unreadable"):
        Ledger(tmp_path / "l.json", budget=5.0, delta=DELTA)


def test_the_ledger_name_follows_the_data():
    y = torch.tensor([0, 1, 1, 2])
    assert ledger_name("fmnist", 3, 10, y) == ledger_name("fmnist", 3, 10, y.clone())
    assert ledger_name("fmnist", 3, 10, y) != ledger_name("fmnist", 3, 10, torch.tensor([0, 1, 2, 2]))
    assert ledger_name("fmnist", 3, 10, y).startswith("fmnist-client-3-of-10-")


def test_noisy_scores_stay_within_the_released_total():
    rng = torch.Generator().manual_seed(0)
    out = dpm.noisy_scores({"correct-before": 3, "correct-after": 98}, 100, 20.0, rng)
    assert set(out) == {"correct-before", "correct-after"} and all(0 <= v <= 100 for v in out.values())
    many = [dpm.noisy_scores({"c": 50}, 100, 2.0, rng)["c"] for _ in range(2000)]
    # one count: noise of std sigma * sqrt(1)
    assert torch.tensor(many, dtype=torch.float).std().item() == pytest.approx(2.0, rel=0.1)


# ----------------------------------------------------------------------------- the ClientApp
def _grid(tmp_path, num_nodes=1, **overrides):
    import client_app.app as capp
    from mosaic_flwr.config import load_defaults
    from mosaic_flwr.testing.inprocess import InProcessGrid
    run_config = {**load_defaults(), "dataset": "synthetic", "strategy": "mosaic", "dp.epsilon": 4.0,
                  "output-dir": str(tmp_path), **overrides}
    return InProcessGrid(capp.app, run_config, num_nodes)


def _score(grid, server_round: int) -> Message:
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.records import CONFIG, state_to_record
    from mosaic_flwr.core.task import build_arch, client_arch
    cfg = build_config(grid.run_config)
    state = state_to_record(build_arch(cfg, client_arch(cfg, {})).state_dict())
    content = RecordDict({CONFIG: ConfigRecord({"server-round": server_round, "candidates": ["before", "after"]}),
                          "candidate-before": state, "candidate-after": state})
    node = grid.node_ids[0]
    return list(grid.send_and_receive([Message(content, dst_node_id=node, message_type="evaluate")]))[0]


def test_gate_scores_under_dp_are_charged_and_one_beyond_the_plan_is_refused(tmp_path, caplog):
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.task import node_data
    grid = _grid(tmp_path)  # the default schedule: the gate scores twice (distillation, end of look-ahead)
    cfg = build_config(grid.run_config)
    settings = dpm.dp_settings(cfg.values)
    assert settings.gate_releases == 2
    caplog.set_level(logging.ERROR)
    first = _score(grid, 6)
    assert first.has_content()
    # the distillation round's uploads, as the client charges them (prototypes, generator)
    path = next((tmp_path / "privacy-ledger" / "run-1").glob("*.json"))
    n = len(node_data(cfg, grid.contexts[grid.node_ids[0]].node_config)[1])
    Ledger(path, budget=settings.epsilon, delta=DELTA).charge(
        {"prototypes": dpm.plan(settings, protos=True)["prototypes"],
         "generator": dpm.generator_mechanism(settings, n, cfg.of('mosaic').gen_batch_size, cfg.of('mosaic').gen_steps, protos=True)})
    second, third = _score(grid, 8), _score(grid, 9)
    assert second.has_content()   # the plan's second score fits
    assert third.has_error() and "privacy ledger: refusing to release gate" in third.error.reason
    assert "[privacy] privacy ledger: refusing to release gate" in caplog.text
    book = json.loads(path.read_text())
    assert [e["what"] for e in book["releases"]] == ["counts", "gate", "prototypes", "generator", "gate"]
    assert book["epsilon-spent"] == pytest.approx(settings.epsilon, rel=2e-3)
    for reply in (first, second):  # the example count is the released noisy total, never the true one
        assert reply.content.metric_records["metrics"]["num-examples"] == sum(book["counts"])


def test_a_gate_score_the_run_did_not_plan_is_refused(tmp_path):
    reply = _score(_grid(tmp_path, **{"kd.gate": "off"}), 6)
    assert reply.has_error() and "this run plans no gate scores" in reply.error.reason


# ----------------------------------------------------------------------------- count-floor
def test_coarsened_counts_declare_rare_classes_absent():
    from mosaic_flwr.methods.mosaic.client import coarsen_counts
    counts = torch.tensor([0, 1, 4, 5, 300])
    assert coarsen_counts(counts, 5).tolist() == [0, 0, 0, 5, 300]
    assert coarsen_counts(counts, 0) is counts


def test_with_a_count_floor_every_reply_declares_the_same_examples(tmp_path):
    """Discovery, training and the gate's scores all declare the floored counts' sum (the server
    leaves out a reply whose count differs), and the gate scores only the declared classes."""
    from mosaic_flwr.config import build_config
    from mosaic_flwr.core.records import CONFIG
    from mosaic_flwr.core.task import node_data
    skewed = {"dp.epsilon": 0.0, "partition": "dirichlet", "alpha": 0.3}
    grid = _grid(tmp_path, 3, **skewed)
    y = node_data(build_config(grid.run_config), grid.contexts[grid.node_ids[0]].node_config)[1]
    held = torch.bincount(y, minlength=INFO_CLASSES)
    floor = int(sorted(c for c in held.tolist() if c > 0)[1]) + 1   # the two rarest classes go
    grid = _grid(tmp_path, 3, **skewed, **{"count-floor": floor})
    declared = int(held[held >= floor].sum())
    query = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=grid.node_ids[0], message_type="query")
    found = list(grid.send_and_receive([query]))[0].content.metric_records["metrics"]
    assert found["num-examples"] == declared < len(y)
    assert [c for c in found["counts"] if 0 < c < floor] == []
    scored = _score(grid, 6).content.metric_records["metrics"]
    assert scored["num-examples"] == declared
    assert max(scored["correct-before"], scored["correct-after"]) <= declared


def test_simulated_runs_in_one_output_dir_keep_their_own_ledgers(tmp_path):
    """In simulation (no node-config ledger-dir) each run's clients are new: two runs of the
    same data in one output-dir (the in-process grid's run id is always 1) do not share a
    ledger, so the second is not refused for what the first spent."""
    for name in ("eps-8", "eps-1"):
        assert _score(_grid(tmp_path, **{"run-name": name}), 6).has_content()
    books = sorted(p.parent.name for p in (tmp_path / "privacy-ledger").glob("*/*.json"))
    assert books == ["run-1-eps-1", "run-1-eps-8"]
