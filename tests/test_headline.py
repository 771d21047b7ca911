"""bench/headline.py: the cells, the equal-compute accounting, and one
whole tiny grid on synthetic data (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import headline, protocol_report, run as runner
from bench.common import pretrain_name, runnable, variant_name
from bench.ledger import finished as ledger_finished
from bench.protocol_report import client_units
from bench.run import equal_compute_rounds
from bench.headline import Part
from bench.report import by_model_table
from mosaic_flwr.testing import inprocess
from mosaic_flwr.core.checkpoint import load_checkpoint
from tests.support import Crash, crash_in


def rows(secs: list[float], gen_round: int | None = None, shadow: tuple[int, ...] = ()) -> list[dict]:
    out = [{"round": 0}]
    for r, s in enumerate(secs, start=1):
        row = {"round": r, "client-seconds": s}
        if r == gen_round:
            row["gen-seconds-mean"] = 1.0
        if r in shadow:
            row["shadow-clients"] = 10
        out.append(row)
    return out


def test_client_units_count_plain_rounds_of_the_same_run():
    assert client_units(rows([10.0, 10.0, 10.0])) == pytest.approx(3.0)
    # a generator round worth 8 plain rounds, then two plain rounds
    assert client_units(rows([80.0, 10.0, 10.0], gen_round=1)) == pytest.approx(10.0)
    # the look-ahead trains twice in a round: that round is two rounds' work, its unit is half
    assert client_units(rows([80.0, 20.0, 20.0], gen_round=1, shadow=(2, 3))) == pytest.approx(12.0)
    # the machine's speed does not matter, only the ratio within the run
    assert client_units(rows([160.0, 20.0, 20.0], gen_round=1)) == pytest.approx(10.0)
    assert client_units(rows([10.0, None, 10.0])) is None  # an old run without client seconds
    assert client_units(rows([80.0], gen_round=1)) is None  # no plain round to measure a unit with



def test_client_units_use_cpu_seconds_where_every_round_has_them():
    """Wall seconds of a generator round slowed 5x by another process on the same cores would make
    it 40 plain rounds; its CPU seconds still say 8."""
    loaded = rows([400.0, 10.0, 10.0], gen_round=1)
    for r, cpu in zip(loaded[1:], (80.0, 10.0, 10.0)):
        r["client-cpu-seconds"] = cpu
    assert client_units(loaded) == pytest.approx(10.0)
    del loaded[2]["client-cpu-seconds"]  # a round without them: wall seconds throughout, never a mix
    assert client_units(loaded) == pytest.approx(42.0)


def test_equal_compute_rounds_wait_for_the_target_and_match_its_work(tmp_path):
    assert equal_compute_rounds(tmp_path, "fedavg-eqc", 0.1, 1, 3) is None
    run = tmp_path / variant_name("mosaic", 0.1, 1)
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(rows([140.0, 15.0, 15.0], gen_round=1)))
    assert equal_compute_rounds(tmp_path, "fedavg-eqc", 0.1, 1, 3) is None  # not finished yet
    (run / "summary.json").write_text("{}")
    eq = equal_compute_rounds(tmp_path, "fedavg-eqc", 0.1, 1, 3)
    assert eq["rounds"] == round((140 + 30) / 15) and eq["target"] == "mosaic"
    (run / "metrics.json").write_text(json.dumps(rows([15.0, 15.0, 15.0])))
    assert equal_compute_rounds(tmp_path, "fedprox-eqc", 0.1, 1, 3)["rounds"] == 3  # never fewer rounds


def test_cells_run_each_pre_training_with_its_continuation_and_central_per_seed(monkeypatch):
    """A cell (part, alpha, seed) is its pre-training and its continuation (bench.run.converged), a
    seed's central reference (alpha None) comes after its alphas: the units --shard deals out."""
    monkeypatch.setitem(headline.PARTS, "t", Part("t", (), (0.1, 1.0), (1, 2), 2))
    got = headline.cells(["t"])
    assert got[:3] == [("t", 0.1, 1), ("t", 1.0, 1), ("t", None, 1)]
    assert len(got) == 6


def test_every_part_names_known_variants_and_valid_run_configs():
    from mosaic_flwr.config import PROJECT_ROOT, build_config, load_defaults, merge_run_config

    for name, part in headline.PARTS.items():
        assert set(part.variants) <= set(runnable()), name
        rc = merge_run_config(list(part.run_config), cwd=PROJECT_ROOT) if part.run_config else {}
        build_config({**load_defaults(), **rc})  # raises ConfigError on a bad part


def test_the_parts_read_from_their_spec_file_are_those_the_code_held():
    """bench/studies/headline-<part>.toml give every part the values bench/headline.py kept as
    Python before them (at bda338e), field by field, in the same order: the default methods computed from
    the registry, FedDF's CIFAR-10 transfer set on the validation split, the data-free rivals'
    seed cut, FedBN left out of the families, their cut and notes from headline-notes.json."""
    from bench.common import compared

    default = (*compared(), "mosaic-nometa", "fedavg-eqc", "fedprox-eqc")
    cifar = ("conf/cifar10-cpu.toml", "num-server-rounds=3", "feddf.transfer-set='holdout'")
    before = {
        "fmnist": {"title": "Fashion-MNIST, 10 clients, cnn_small", "run_config": (), "alphas": (0.01, 0.1, 1.0),
                   "seeds": (42, 43, 44), "pretrain_rounds": 30, "variants": default, "central": True,
                   "only_seeds": {}},
        "cifar10": {"title": "CIFAR-10 (CPU preset), 10 clients, ResNet-8", "run_config": cifar,
                    "alphas": (0.01, 0.1, 1.0), "seeds": (42, 43), "pretrain_rounds": 100, "variants": default,
                    "central": True, "only_seeds": {"dense": (42,), "fedftg": (42,), "dfrd": (42,)}},
        "cifar10-families": {"title": "CIFAR-10 (CPU preset), model families resnet8 / cnn_small / cnn_wide",
                             "run_config": (*cifar, "client-models='resnet8,cnn_small,cnn_wide'"), "alphas": (0.1,),
                             "seeds": (42,), "pretrain_rounds": 100,
                             "variants": tuple(v for v in default if v != "fedbn"), "central": False,
                             "only_seeds": {}},
    }
    notes = json.loads((Path(headline.__file__).parent / "results" / "headline-notes.json").read_text())["parts"]
    assert headline.HEADLINE == default
    assert list(headline.PARTS) == list(before)  # the order the grid runs them in
    for name, fields in before.items():
        part = headline.PARTS[name]
        for key, value in {**fields, "cut": notes[name]["cut"], "notes": notes[name]["notes"]}.items():
            assert getattr(part, key) == value and type(getattr(part, key)) is type(value), (name, key)
        assert part == Part(**fields, cut=notes[name]["cut"], notes=notes[name]["notes"])


PART = 'title = "t"\nalphas = [0.1]\nseeds = [1, 2]\npretrain-rounds = 2\n'


def test_a_part_names_its_methods_by_group_and_leaves_some_out(tmp_path):
    """A part is a bench/run.py study spec: its methods by group, less its leave-out, a cut
    method at some of its seeds only (only-seeds); bench/run.py runs it as the headline does."""
    from bench.common import compared, distils

    spec = tmp_path / "headline-t.toml"
    spec.write_text(PART + 'methods = ["distilling", "fedavg"]\nleave-out = ["dense"]\n'
                    'only-seeds = { mosaic = [1] }\ncentral = false\n')
    t = Part(**headline.load_part(spec))
    assert t.variants == (*(m for m in compared() if distils(m) and m != "dense"), "fedavg")
    assert t.methods(2) == [m for m in t.methods(1) if m != "mosaic"] and not t.central
    study = runner.load_spec(spec)
    assert [c.variant for c in runner.plan(study) if c.seed == 2] == t.methods(2)  # bench/run.py's cells: the same
    spec.write_text('title = "u"\nmethods = ["fedavg"]\nalphas = [1]\nseeds = [3]\npretrain-rounds = 4\n')
    assert Part(**headline.load_part(spec)) == Part("u", (), (1.0,), (3,), 4, variants=("fedavg",), central=False)


def test_a_bad_headline_part_is_one_line_naming_its_file(tmp_path):
    """A part's spec is read by bench.run.load_spec: its errors name the file (the part), in one
    line; a headline part must run the converged protocol (pretrain-rounds)."""
    from bench.common import SpecError

    spec = tmp_path / "headline-t.toml"
    for text, error in (('metods = ["registry"]\n' + PART, "unknown key(s) metods"),
                        (PART + "centrl = false\n", "unknown key(s) centrl"),
                        ('title = "t"\nalphas = [0.1]\nseeds = [1]\n', "pretrain-rounds must be a positive integer"),
                        ('methods = ["fedavg", "fedsgd"]\n' + PART, "unknown method 'fedsgd'"),
                        (PART + 'methods = ["fedavg"]\nleave-out = ["fedbn"]\n',
                         "leave-out names fedbn, which the study does not run"),
                        (PART + "only-seeds = { fedsgd = [1] }\n", "unknown method 'fedsgd'"),
                        (PART + "only-seeds = { dense = [3] }\n", "only-seeds of dense names seeds"),
                        (PART + 'methods = ["fedavg"]\nonly-seeds = { dense = [1] }\n',
                         "only-seeds names dense, which the study does not run"),
                        (PART.replace("seeds = [1, 2]", 'seeds = "42"'), "seeds must be a list of integers"),
                        (PART.replace("alphas = [0.1]", "alphas = []"), "alphas and seeds must name"),
                        (PART + 'central = "no"\n', "central and fork must be true or false"),
                        (PART.replace("= 2\n", "= 0\n"), "pretrain-rounds must be a positive integer")):
        spec.write_text(text)
        with pytest.raises(SpecError) as got:
            headline.load_part(spec)
        assert error in str(got.value) and str(spec) in str(got.value) and "\n" not in str(got.value), text


TINY = ('dataset="synthetic" local-steps=3 mosaic.gen-steps=3 mosaic.gen-batch-size=4 kd.steps=3 kd.batch-size=8 mosaic.meta-epochs=2 '
        'mosaic.meta-samples-per-class=4 mosaic.proto-k=2 feddf.transfer-size=64 test-subset=0',)


@pytest.mark.slow
def test_a_tiny_headline_grid_runs_resumes_and_reports(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(headline, "RESULTS", results)
    monkeypatch.setattr(protocol_report, "RESULTS", results)
    monkeypatch.setitem(headline.PARTS, "tiny", Part(
        "tiny", TINY, (0.1,), (1,), 2, variants=("fedavg", "fedbn", "feddf", "mosaic", "mosaic-nometa", "fedavg-eqc")))
    # the equal-compute run (tens of rounds on CIFAR-10) and a distilling rival die in their round
    # 2, after round 1's checkpoint; the grid's next calls go on from there instead of starting again
    real_grid, crashed = inprocess.InProcessGrid, []

    def grid(client_app, rc, num_nodes, **kw):
        if rc["run-name"] in ("fedavg-eqc-a0.1-s1", "feddf-a0.1-s1") and rc["run-name"] not in crashed:
            crashed.append(rc["run-name"])
            kw["hook"] = crash_in(2)
        return real_grid(client_app, rc, num_nodes, **kw)

    monkeypatch.setattr(inprocess, "InProcessGrid", grid)
    out = tmp_path / "headline-tiny"
    for name in ("fedavg-eqc-a0.1-s1", "feddf-a0.1-s1"):  # the order the cell runs them
        with pytest.raises(Crash):
            headline.main(["--parts", "tiny", "--runs-root", str(tmp_path)])
        assert load_checkpoint(out / name)["round"] == 1 and not (out / name / "summary.json").exists()
    # the next call goes on from the checkpoints in the runs root (outside the repository)
    headline.main(["--parts", "tiny", "--runs-root", str(tmp_path)])
    ledger = headline.ledger_file("tiny", results / "ledger")
    assert crashed == ["fedavg-eqc-a0.1-s1", "feddf-a0.1-s1"]
    for name in crashed:
        assert json.loads((out / name / "summary.json").read_text())["resumed_after_round"] == 1
    # FedBN refuses cnn_small before any training, once, with the reason on disk and in the table
    assert "BatchNorm" in json.loads((out / "fedbn-a0.1-s1" / "refused.json").read_text())["reason"]
    for v in ("fedavg", "feddf", "mosaic", "mosaic-nometa", "fedavg-eqc"):
        assert (out / f"{v}-a0.1-s1" / "summary.json").is_file(), v
    # equal compute: FedAvg got the rounds Mosaic's clients' work buys (more than 3: the generators)
    eq = json.loads((out / "fedavg-eqc-a0.1-s1" / "bench.json").read_text())["equal_compute"]
    mosaic_rows = json.loads((out / "mosaic-a0.1-s1" / "metrics.json").read_text())
    assert eq["rounds"] == round(client_units(mosaic_rows)) > 3
    assert json.loads((out / "fedavg-eqc-a0.1-s1" / "summary.json").read_text())["rounds"] == eq["rounds"]
    md = (results / "headline.md").read_text()
    assert "| FedBN | refused |" in md and "Mosaic minus each method" in md and "Gap closure" in md
    assert "α=0.1: " in md and "(1 seed)" in md and "(1 seeds)" not in md
    assert "1 of 1 central" in md
    assert (results / "headline-tiny.png").stat().st_size > 0
    assert (results / "headline-tiny-detail.md").is_file()
    # resumes: a second call runs nothing (every run directory is left as it was)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    headline.run(["tiny"], tmp_path, (0, 1))
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    # the ledger (bench/results/ledger/headline-tiny.json) holds every finished run as data, no
    # checkpoint, and the table was read from it; a new machine with an empty runs root runs nothing again
    from bench import ledger as ledger_

    recorded = ledger_.read(ledger)["runs"]
    assert set(recorded) == {p.name for p in out.iterdir() if p.is_dir() and ledger_finished(p)
                             and not p.name.startswith("round1-")}
    assert recorded["mosaic-a0.1-s1"]["metrics"] and "output-dir" not in recorded["mosaic-a0.1-s1"]["config"]
    fresh = tmp_path / "fresh"
    headline.run(["tiny"], fresh, (0, 1), results / "ledger")
    assert {p.parent.name for p in (fresh / "headline-tiny").glob("*/summary.json")} == {
        n for n, e in recorded.items() if "summary" in e}
    assert not list(fresh.rglob("*.pt"))  # nothing trained: every run came from the ledger


def _run(path, files=("summary.json", "metrics.json", "config.json", "checkpoint.pt")):
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text(json.dumps({"final_accuracy": 0.5, "final_val_accuracy": 0.4}) if f == "summary.json"
                              else "x")
    return path


def test_the_ledger_keeps_finished_runs_as_data_and_gives_them_back(tmp_path):
    from bench import ledger as ledger_

    runs, ledger = tmp_path / "runs", tmp_path / "ledger.json"
    _run(runs / "fedavg-a0.1-s1")
    (runs / "fedavg-a0.1-s1" / "metrics.json").write_text("[{\"round\": 0}]")
    (runs / "fedavg-a0.1-s1" / "config.json").write_text(json.dumps({"lr": 0.1, "output-dir": "/here"}))
    _run(runs / "fedbn-a0.1-s1", files=("refused.json",))
    (runs / "fedbn-a0.1-s1" / "refused.json").write_text(json.dumps({"reason": "no BatchNorm"}))
    _run(runs / "mosaic-a0.1-s1", files=("config.json", "checkpoint.pt"))  # interrupted: not finished
    _run(runs / "round1-a0.1-s1")  # the shared round 1's scratch directory
    (runs / "oracle-a0.1-s1.json").write_text("{}")
    assert ledger_.record(runs, ledger) == ["fedavg-a0.1-s1", "fedbn-a0.1-s1"]
    got = ledger_.read(ledger)
    assert got["runs"]["fedavg-a0.1-s1"] == {"summary": {"final_accuracy": 0.5, "final_val_accuracy": 0.4},
                                             "config": {"lr": 0.1}, "metrics": [{"round": 0}]}  # no checkpoint
    assert got["files"] == {"oracle-a0.1-s1.json": {}} and "mosaic-a0.1-s1" not in got["runs"]
    assert ledger_.record(runs, ledger) == []  # already there: left as it is
    # a record restored from an earlier table (its summary alone) gives way to the whole run
    got["runs"]["fedavg-a0.1-s1"] = {"summary": {"restored": "from a table"}}
    ledger_.write(ledger, got)
    assert ledger_.record(runs, ledger) == ["fedavg-a0.1-s1"]
    assert "restored" not in ledger_.read(ledger)["runs"]["fedavg-a0.1-s1"]["summary"]
    # a new machine: the ledger's runs come back; an interrupted attempt there is replaced
    fresh = tmp_path / "fresh"
    _run(fresh / "fedavg-a0.1-s1", files=("config.json",))
    assert ledger_.materialize(ledger, fresh) == ["fedavg-a0.1-s1", "fedbn-a0.1-s1"]
    assert ledger_finished(fresh / "fedavg-a0.1-s1") and (fresh / "fedavg-a0.1-s1" / "metrics.json").is_file()
    assert json.loads((fresh / "fedbn-a0.1-s1" / "refused.json").read_text())["reason"] == "no BatchNorm"
    assert ledger_.materialize(ledger, fresh) == [] and (fresh / "oracle-a0.1-s1.json").is_file()


def test_a_pretraining_without_its_checkpoint_is_rerun_and_must_reproduce_the_record(tmp_path):
    part = Part("t", (), (0.1,), (1,), 2, variants=("fedavg", "mosaic"))
    pre = _run(tmp_path / "pretrain-a0.1-s1", files=("summary.json",))
    calls = []

    def ensure_start(rerun):  # as bench.run.converged calls it for the part's cell
        started = [v for v in part.variants if (tmp_path / variant_name(v, 0.1, 1) / "summary.json").is_file()]
        runner.ensure_start(pre, headline.pending(part, tmp_path, 0.1, 1), started, rerun)

    def rerun(final=0.5):
        calls.append(final)
        _run(pre, files=("checkpoint.pt",))
        (pre / "summary.json").write_text(json.dumps({"final_accuracy": final, "final_val_accuracy": 0.4}))

    ensure_start(rerun)
    assert calls == [0.5] and (pre / "checkpoint.pt").is_file()
    ensure_start(rerun)  # the checkpoint is there now: nothing to do
    assert calls == [0.5]
    (pre / "checkpoint.pt").unlink()
    ensure_start(lambda: rerun(0.7))  # no method ran from it: the new start
    assert calls == [0.5, 0.7]
    (pre / "summary.json").write_text(json.dumps({"final_accuracy": 0.5, "final_val_accuracy": 0.4}))
    (pre / "checkpoint.pt").unlink()
    _run(tmp_path / "fedavg-a0.1-s1", files=("summary.json",))  # ran from the recorded start
    with pytest.raises(runner.NotReproduced, match="final_accuracy: recorded 0.5, now 0.6"):
        ensure_start(lambda: rerun(0.6))
    # every run of the cell finished: a lost checkpoint is not needed, nothing is rerun
    (pre / "checkpoint.pt").unlink()
    _run(tmp_path / "mosaic-a0.1-s1", files=("summary.json",))
    ensure_start(rerun)
    assert calls == [0.5, 0.7, 0.6]


def test_the_grid_stops_before_any_training_when_a_data_set_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(headline.PARTS, "t", Part("t", (f"data-dir='{tmp_path}'",), (0.1,), (1,), 2,
                                                  variants=("fedavg", "feddf")))
    # Fashion-MNIST is found (Debian's package is searched too); FedDF's transfer set, MNIST, is not there
    with pytest.raises(SystemExit, match=r"nothing was run: t, feddf: feddf.transfer-set: 'mnist' .* missing.*"
                                         + str(tmp_path)):
        headline.run(["t"], tmp_path / "runs", (0, 1), tmp_path / "ledger")
    assert not (tmp_path / "runs").exists()


def test_a_method_the_part_refuses_leaves_nothing_to_do(tmp_path):
    part = Part("t", (), (0.1,), (1,), 2, variants=("fedavg", "fedbn"))  # cnn_small: no BatchNorm
    assert headline.refuses(part, "fedbn") and not headline.refuses(part, "fedavg")
    assert headline.pending(part, tmp_path, 0.1, 1) == ["fedavg"]
    _run(tmp_path / "fedavg-a0.1-s1", files=("summary.json",))
    assert headline.pending(part, tmp_path, 0.1, 1) == []


def test_the_grid_refuses_only_what_a_cell_would_refuse(tmp_path):
    """A refusal is judged on the run config a cell runs (validation split included): FedDF on
    CIFAR-10 distils on the validation images and must not be skipped as refused."""
    cifar = headline.PARTS["cifar10"]
    assert headline.variant_config(cifar, "feddf")["feddf.transfer-set"] == "holdout"
    assert not any(headline.refuses(cifar, v) for v in cifar.variants)
    assert "feddf" in headline.pending(cifar, tmp_path, 0.1, 43)
    assert headline.refuses(headline.PARTS["fmnist"], "fedbn")  # cnn_small: no BatchNorm


def test_a_cell_runs_mosaic_before_the_costly_rivals_and_a_cut_method_only_at_its_seeds(tmp_path):
    part = Part("t", (), (0.1,), (1, 2), 2, variants=("fedavg", "feddf", "dfrd", "mosaic", "fedavg-eqc"),
                only_seeds={"dfrd": (1,)})
    assert part.methods(1) == ["fedavg", "mosaic", "fedavg-eqc", "feddf", "dfrd"]
    assert part.methods(2) == ["fedavg", "mosaic", "fedavg-eqc", "feddf"]
    assert headline.pending(part, tmp_path, 0.1, 2) == ["fedavg", "mosaic", "fedavg-eqc", "feddf"]
    spec = headline.study(part, "t")
    assert spec["name"] == "headline-t" and spec["pretrain_rounds"] == 2
    assert {"server-threads=1", "client-threads=1"} <= set(spec["run_config"])  # one process per core
    assert {"server-threads=2", "client-threads=2"} <= set(headline.study(part, "t", threads=2)["run_config"])
    for name, p in headline.PARTS.items():  # a cut names the part's own methods and seeds
        assert set(p.only_seeds) <= set(p.variants) and all(set(s) <= set(p.seeds) for s in p.only_seeds.values()), name


def test_a_cell_runs_its_variants_in_the_order_asked(tmp_path, monkeypatch):
    """A distilling group at its first member's place, equal compute once its target is done."""
    pre = tmp_path / "pretrain-a0.1-s1"
    _run(pre, files=("summary.json", "checkpoint.pt"))
    order = []

    def finished(name: str) -> None:
        _run(tmp_path / name, files=("summary.json",))
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            [{"round": r, "client-seconds": 2.0} for r in (1, 2, 3)]))

    def run_inprocess(rc, num_clients, title, **extra):
        order.append(rc["run-name"])
        finished(rc["run-name"])
        return {"final_accuracy": 0.5}

    def forked(spec, base, members, driver, title, at=None, oracle=None):
        order.append(f"round1+{'+'.join(c.variant for c in members)}")
        for c in members:
            finished(c.name)
        oracle.write_text("{}")

    monkeypatch.setattr(runner, "run_inprocess", run_inprocess)
    monkeypatch.setattr(runner, "forked", forked)
    spec = headline.study(Part("t", (), (0.1,), (1,), 2), "t")
    runner.converged({**spec, "clients": 2}, 0.1, 1, tmp_path, ["fedavg-eqc", "fedavg", "mosaic", "feddf", "mosaic-nometa"])
    assert order == ["fedavg-a0.1-s1", "round1+mosaic+mosaic-nometa", "fedavg-eqc-a0.1-s1", "feddf-a0.1-s1"]


def test_the_validation_split_picks_the_round_not_the_test_set():
    rows = [{"round": 0, "accuracy": 0.20, "val-accuracy": 0.21},
            {"round": 1, "accuracy": 0.45, "val-accuracy": 0.30},   # best on test, not on validation
            {"round": 2, "accuracy": 0.38, "val-accuracy": 0.40},
            {"round": 3, "accuracy": 0.36, "val-accuracy": 0.40},   # a tie: the earlier round costs less
            {"round": 4, "accuracy": 0.41}]                         # no validation score: not a candidate
    assert protocol_report.best_validation(rows) == (2, 0.38)
    assert protocol_report.best_validation([{"round": 0, "accuracy": 0.2}]) is None
    assert protocol_report.best_validation([]) is None


def test_equal_compute_is_also_compared_at_the_rounds_the_validation_split_picks():
    """Mosaic minus an equal-compute row per seed, each at its validation-chosen round: a long run's
    last round landing in a trough must not read as Mosaic's win."""
    def run(*acc_val):
        return {"rows": [{"round": r, "accuracy": a, "val-accuracy": v} for r, (a, v) in enumerate(acc_val)]}

    runs = {("mosaic", 0.1, 1): run((0.30, 0.30), (0.35, 0.34)),
            ("fedavg-eqc", 0.1, 1): run((0.30, 0.30), (0.40, 0.41), (0.33, 0.32)),  # final 0.33, chosen 0.40
            ("mosaic", 0.1, 2): run((0.30, 0.30), (0.36, 0.35)),
            ("fedavg-eqc", 0.1, 2): {"rows": None}}  # restored without per-round scores: left out
    assert protocol_report.chosen_differences(runs, "fedavg-eqc", 0.1, (1, 2)) == pytest.approx([-0.05])
    assert protocol_report.chosen_differences(runs, "fedprox-eqc", 0.1, (1, 2)) == []


def test_a_families_cell_reports_every_model_the_clients_hold():
    part = Part("t", (), (0.1,), (1, 2), 2, variants=("fedavg", "mosaic"))
    runs = {("fedavg", 0.1, s): {"final_accuracy_by_model": {"resnet8": 0.30 + d, "cnn_small": 0.40},
                                 "final_accuracy_clients": 0.35} for s, d in ((1, 0.0), (2, 0.02))}
    lines = by_model_table(runs, part.variants, part.alphas, part.seeds)
    assert "| α=0.1 resnet8 | α=0.1 cnn_small | α=0.1 clients |" in lines[3]
    assert lines[-1] == "| FedAvg | 31.0 | 40.0 | 35.0 |"  # mean over the seeds; Mosaic has no runs: no row
    one_model = {k: {"final_accuracy_by_model": {"cnn_small": 0.4}} for k in runs}
    assert by_model_table(one_model, part.variants, part.alphas, part.seeds) == []  # a homogeneous cell: no such table


def test_a_part_without_a_central_reference_reports_none(tmp_path, monkeypatch):
    """The families part has no centralised reference: no central row, no gap closure, and its
    footer counts pre-trainings only (not '0 of 0 central')."""
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    monkeypatch.setitem(headline.PARTS, "t", Part("t", (), (0.1,), (1,), 2, variants=("fedavg", "mosaic"), central=False))
    (tmp_path / "headline-t").mkdir()
    (tmp_path / "headline-t.png").write_bytes(b"a plot of runs no longer in the ledger")
    md, data = headline.part_table("t", tmp_path)
    assert not (tmp_path / "headline-t.png").exists()  # no finished run: no plot, not a stale one
    assert "At the distillation round" not in md  # nor an empty table
    assert "central" not in md and data["central"] == {}
    assert "Runs finished: 0 of 2 (+ 0 of 1 pre-trainings)." in md
    monkeypatch.setitem(headline.PARTS, "t", Part("t", (), (0.1,), (1,), 2, variants=("fedavg", "mosaic")))
    assert "(+ 0 of 1 pre-trainings, 0 of 1 central)." in headline.part_table("t", tmp_path)[0]


def test_the_plan_counts_a_shared_round_once_and_estimates_what_is_left(tmp_path, monkeypatch):
    """--plan: done = the finished runs' core-seconds (wall seconds times torch threads; a
    resumed one's rounds before the interruption included), a distilling group's shared round 1
    once; left = the mean of the same run kind in the part, a kind never run named as unmeasured."""
    part = Part("t", (), (0.1,), (1, 2), 2, variants=("fedavg", "mosaic", "mosaic-nometa"))
    monkeypatch.setitem(headline.PARTS, "t", part)
    out = headline.runs_dir("t", tmp_path)

    def finished(run: str, wall: float, shared: float | None = None, threads: int | None = None, **summary) -> None:
        (out / run).mkdir(parents=True)
        (out / run / "summary.json").write_text(json.dumps({"wall_seconds": wall, **summary}))
        bench = {k: v for k, v in (("shared_seconds", shared), ("torch_threads", threads)) if v is not None}
        if bench:
            (out / run / "bench.json").write_text(json.dumps(bench))

    # resumed after its round 2: 900 s before the interruption (its checkpointed rounds' seconds)
    finished(pretrain_name(0.1, 1), 2700.0, resumed_after_round=2)
    (out / pretrain_name(0.1, 1) / "metrics.json").write_text(json.dumps(
        [{"round": 0, "seconds": 10.0}, {"round": 1, "seconds": 400.0}, {"round": 2, "seconds": 490.0},
         {"round": 3, "seconds": 2000.0}]))
    finished(variant_name("fedavg", 0.1, 1), 180.0, threads=2)  # 360 core-seconds
    finished(variant_name("mosaic", 0.1, 1), 1800.0, shared=900.0)
    finished(variant_name("mosaic-nometa", 0.1, 1), 1440.0, shared=900.0)
    lines = headline.plan(["t"], tmp_path).splitlines()
    # seed 1: 3600 + 360 + 1800 + (1440 - 900) s = 1.75 h; its central never ran
    assert lines[0].startswith("t alpha=0.1 seed=1: 4 of 5 done, 1.75 h")
    assert lines[0].endswith("left: 1, ~0.0 h + 1 not yet measured")
    # seed 2: every kind at the mean of seed 1's (the group's member without the shared round)
    assert lines[1].startswith("t alpha=0.1 seed=2: 0 of 5 done") and "left: 5, ~1.8 h + 1 not yet measured" in lines[1]
    assert lines[2].startswith("t: 1.8 core-hours done") and "~1.8 core-hours left" in lines[2]
    assert lines[-1].endswith("not yet measured (counted 0): t:central")


def test_the_plan_counts_a_pretraining_recorded_without_its_checkpoint_as_left(tmp_path, monkeypatch):
    """A pre-training restored from an earlier table (its summary alone, no checkpoint) in a
    cell with runs left is run again before them (``ensure_start``): --plan counts it as left,
    at the part's mean pre-training time; in a finished cell it costs nothing more."""
    monkeypatch.setitem(headline.PARTS, "t", Part("t", (), (0.1,), (1, 2, 3), 2, variants=("fedavg",), central=False))
    out = headline.runs_dir("t", tmp_path)

    def finished(run: str, **summary) -> Path:
        (out / run).mkdir(parents=True)
        (out / run / "summary.json").write_text(json.dumps(summary))
        return out / run

    (finished(pretrain_name(0.1, 1), wall_seconds=3600.0) / headline.START).write_bytes(b"model")
    finished(pretrain_name(0.1, 2), restored=True)  # runs left: pre-trained again
    finished(pretrain_name(0.1, 3), restored=True)
    finished(variant_name("fedavg", 0.1, 3), wall_seconds=360.0)  # cell 3 complete
    lines = headline.plan(["t"], tmp_path).splitlines()
    # no central reference in this part: a cell is its pre-training and its one method
    assert lines[0] == "t alpha=0.1 seed=1: 1 of 2 done, 1.00 h: pretrain 60m; left: 1, ~0.1 h"
    assert lines[1] == "t alpha=0.1 seed=2: 0 of 2 done, 0.00 h; left: 2, ~1.1 h"
    assert lines[2] == "t alpha=0.1 seed=3: 2 of 2 done, 0.10 h: pretrain 0m, fedavg 6m"


def test_git_keeps_no_checkpoint_and_no_run_state():
    """Runs (checkpoints, runs in flight) live outside the repository; a checkpoint anywhere in
    it stays out of git, and no run directory is tracked: the ledger of finished runs is data."""
    import subprocess
    from pathlib import Path

    root = Path(headline.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=root).returncode == 0

    assert ignored("bench/results/headline-runs/headline-cifar10/pretrain-a0.1-s42/checkpoint.pt")
    assert ignored("bench/runs/headline-cifar10/feddf-a0.1-s42/checkpoint.pt") and ignored("outputs/r/checkpoint.pt")
    tracked = subprocess.run(["git", "ls-files", "bench"], cwd=root, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.endswith((".pt", "summary.json", "metrics.json"))]
    from bench.common import RUNS

    assert root not in RUNS.resolve().parents or "MOSAIC_FLWR_RUNS" in __import__("os").environ


def test_the_plan_estimates_a_kind_a_part_never_ran_from_a_part_on_the_same_data_set(tmp_path, monkeypatch):
    """The model-families cell's rivals had no run there yet: --plan estimates them from the
    runs of the same kind in the other parts on the same data set, and says so; a kind no part
    ran stays unmeasured."""
    monkeypatch.setitem(headline.PARTS, "t", Part("t", (), (0.1,), (1,), 2, variants=("fedavg", "feddf"), central=False))
    monkeypatch.setitem(headline.PARTS, "u", Part("u", (), (0.1,), (1,), 2, variants=("feddf",), central=False))
    run = headline.runs_dir("u", tmp_path) / variant_name("feddf", 0.1, 1)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 1800.0}))
    lines = headline.plan(["t"], tmp_path).splitlines()
    # t: pre-training and FedAvg never ran anywhere, FedDF at u's 30 minutes
    assert lines[0] == "t alpha=0.1 seed=1: 0 of 3 done, 0.00 h; left: 3, ~0.5 h (1 of them at u's times) + 2 not yet measured"
    assert lines[-1] == ("all: ~0.5 core-hours left, ~0.2 h on 2 cores; estimated from another part on the same data "
                         "set: t:feddf; not yet measured (counted 0): t:fedavg, t:pretrain")


def test_kept_rounds_counts_an_every_round_methods_gated_distillations():
    """DFRD at CIFAR-10 alpha=0.01 seed 42 kept its round-1 distillation and refused rounds 2-3: the
    last round alone ("0 of 1") hid it. A method that distils once has no such count."""
    dfrd = [{"round": 0}, {"round": 1, "gate-kept": 1.0}, {"round": 2, "gate-kept": 0.0}, {"round": 3, "gate-kept": 0.0}]
    feddf = [{"round": 1, "gate-kept": 0.0}, {"round": 2, "gate-kept": 0.0}, {"round": 3, "gate-kept": 1.0}]
    assert protocol_report.kept_rounds([dfrd]) == (1, 3)
    assert protocol_report.kept_rounds([dfrd, feddf, []]) == (2, 6)  # summed over seeds; a restored run has no rows
    assert protocol_report.kept_rounds([[{"round": 1, "gate-kept": 1.0}, {"round": 2}]]) is None  # Mosaic: once


def test_gate_disagreements_lists_the_decisions_the_validation_split_contradicts():
    def row(rnd, kept, before, after, vb, va):
        return {"round": rnd, "gate-kept": kept, "gate-before": before, "gate-after": after,
                "val-before-distill": vb, "val-after-distill": va}

    n, lines = protocol_report.gate_disagreements({
        "Mosaic": [{"round": 0}, row(1, 0.0, 0.303, 0.275, 0.171, 0.272)],   # refused, validation +10.1
        "FedDF": [row(1, 1.0, 0.50, 0.52, 0.50, 0.40),                       # kept, validation -10
                  row(2, 0.0, 0.50, 0.49, 0.500, 0.503),                     # refused, a tie on validation
                  row(3, 1.0, 0.50, 0.52, 0.50, 0.51)]})                     # both agree
    assert n == 4
    assert lines == ["Mosaic round 1: refused (clients' data 30.3 → 27.5 %), validation 17.1 → 27.2 %",
                     "FedDF round 1: kept (clients' data 50.0 → 52.0 %), validation 50.0 → 40.0 %"]
    assert protocol_report.gate_disagreements({"FedAvg": [{"round": 1, "accuracy": 0.5}]}) == (0, [])


def test_threads_below_one_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        headline.main(["--parts", "fmnist", "--runs-root", str(tmp_path), "--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_gap_closure_uses_the_seeds_both_methods_finished():
    runs = {("mosaic", 0.1, 1): 0.80, ("mosaic", 0.1, 2): 0.70, ("fedavg", 0.1, 1): 0.70,  # seed 2: no FedAvg run
            ("fedavg", 1.0, 1): 0.85}
    runs = {k: {"final_accuracy": x} for k, x in runs.items()}
    gap = protocol_report.gap_closure(runs, "mosaic", 0.1, (1, 2), [0.90, 0.90])
    assert gap[1] == 1 and gap[0] == pytest.approx((0.80 - 0.70) / (0.90 - 0.70))
    assert protocol_report.gap_closure(runs, "mosaic", 1.0, (1, 2), [0.90, 0.90]) is None  # no Mosaic run
    assert protocol_report.gap_closure(runs, "mosaic", 0.1, (1, 2), []) is None  # no central reference: no gap closure


def test_the_verdict_pairs_by_seed_and_never_gives_mosaic_a_tie(monkeypatch):
    part = Part("t", (), (0.1,), (1, 2), 2, variants=("fedavg", "fedprox", "dense", "mosaic", "fedavg-eqc"))
    monkeypatch.setitem(headline.PARTS, "t", part)

    def rows(vals):  # per-round validation and test accuracy
        return [{"round": r, "val-accuracy": v, "accuracy": t} for r, (v, t) in enumerate(vals, 1)]

    runs = {("fedavg", 0.1, 1): {"final_accuracy": 0.50, "rows": []}, ("fedavg", 0.1, 2): {"final_accuracy": 0.60, "rows": []},
            ("fedprox", 0.1, 1): {"final_accuracy": 0.50, "rows": []}, ("fedprox", 0.1, 2): {"final_accuracy": 0.62, "rows": []},
            ("dense", 0.1, 1): {"final_accuracy": 0.90, "rows": []},  # seed 1 only: not comparable over Mosaic's seeds
            ("mosaic", 0.1, 1): {"final_accuracy": 0.52, "rows": rows([(0.3, 0.51), (0.4, 0.52)])},
            ("mosaic", 0.1, 2): {"final_accuracy": 0.60, "rows": rows([(0.3, 0.59), (0.4, 0.60)])},
            ("fedavg-eqc", 0.1, 1): {"final_accuracy": 0.50, "rows": rows([(0.5, 0.56), (0.4, 0.50)])}}
    (v,) = headline.verdict(part, runs)
    assert v["seeds"] == 2 and v["equal_rounds"] == pytest.approx([0.02, 0.0])
    assert v["equal_compute"] == pytest.approx([0.02])  # seed 1 only has an equal-compute run
    assert v["equal_compute_chosen"] == pytest.approx([0.52 - 0.56])  # FedAvg's best validation round: its first
    assert v["best"] == "fedprox" and v["best_accuracy"] == pytest.approx(0.56) and v["tied"] == ["mosaic"]
    table = "\n".join(headline._verdict_table(["t"], {"t": [v]}))
    assert "| +1.0 [" in table and "| -4.0 (1 seed) |" in table
    assert "FedProx 56.00 (tied: Mosaic) |" in table  # a tie is the baseline's, and Mosaic's figure is not repeated
    assert headline._verdict_table(["t"], {"t": []}) == []
