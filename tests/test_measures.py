"""The measurement studies of bench/run.py (bench/measures.py: speed, scaling, privacy-dp,
privacy-audit, attack): their specs load, a bad one is a one-line error before any run, and a
study runs through the runner into the results directory it is given."""

from __future__ import annotations

import json

import pytest

from bench import measures, run
from bench.common import ROOT, SpecError

STUDIES = ROOT / "bench" / "studies"


def test_every_measurement_driver_has_a_spec_and_every_spec_loads():
    specs = {p.stem: run.load_spec(p) for p in STUDIES.glob("*.toml") if measures.driver_of(p)}
    assert {s["driver"] for s in specs.values()} == set(measures.STUDIES)
    assert {"speed", "speed-quick", "scaling", "privacy-dp", "privacy-audit", "attack"} <= set(specs)
    for name, spec in specs.items():  # each names every parameter of its study, the defaults where it does not
        assert spec["name"] == name and set(spec) == {"driver", "name", *measures.STUDIES[spec["driver"]][0]}
    assert specs["speed"]["sections"] == ["overhead", "teacher", "phases", "memory"]
    assert specs["speed-quick"]["rounds"] == 3 and specs["speed-quick"]["teacher-seconds"] == 1.0
    assert specs["scaling"]["clients"] == [10, 50, 100] and specs["scaling"]["run-config"] == measures.SHORT
    assert specs["privacy-dp"]["levels"] == list(measures.LEVELS) and specs["attack"]["factor"] == 1000
    assert measures.driver_of(STUDIES / "smoke.toml") is None and measures.driver_of(STUDIES / "missing.toml") is None


def test_set_replaces_spec_values_as_toml_or_text_and_lists_from_commas():
    spec = measures.load_spec(STUDIES / "scaling.toml", ["clients=1000", "strategy=fedavg", "probe=true",
                                                          "run-config=partition='shards' alpha=0.1",
                                                          "probe-clients=10,100", "name=scaling-x"])
    assert spec["clients"] == [1000] and spec["strategy"] == "fedavg" and spec["probe"] is True
    assert spec["run-config"] == "partition='shards' alpha=0.1" and spec["probe-clients"] == [10, 100]
    assert spec["name"] == "scaling-x"
    assert measures.load_spec(STUDIES / "speed.toml", ["sections=teacher", "teacher-seconds=1"])["teacher-seconds"] == 1.0
    assert measures.load_spec(STUDIES / "speed.toml", ["sections=teacher"])["sections"] == ["teacher"]
    assert measures.load_spec(STUDIES / "privacy-dp.toml", ["levels=inf,8"])["levels"] == ["inf", "8"]  # text items
    assert measures.load_spec(STUDIES / "privacy-audit.toml", ["alphas=1"])["alphas"] == [1.0]


def test_a_bad_measurement_spec_is_one_line_and_exit_2_before_any_run(tmp_path, capsys):
    for text, sets, error in (('driver = "speed"\nsection = ["teacher"]\n', [], "unknown key(s) section"),
                              ('driver = "attack"\nclients = "five"\n', [], "clients = 'five': expected int"),
                              ('driver = "scaling"\nclients = 10\n', [], "clients = 10: expected list"),
                              ('driver = "privacy-dp"\n', ["--set", "level=8"], "unknown key(s) level"),
                              ('driver = "privacy-audit"\n', ["--set", "rounds=x"], "rounds = 'x': expected int"),
                              ('driver = "privacy-dp"\nlevels = [8]\n', [], "levels = [8]: expected list")):
        (tmp_path / "s.toml").write_text(text)
        code = run.main([str(tmp_path / "s.toml"), "--runs-root", str(tmp_path / "runs"),
                         "--results-dir", str(tmp_path / "results"), *sets])
        err = capsys.readouterr().err
        assert code == 2 and error in err and err.count("\n") == 1, err
        with pytest.raises(SpecError, match="s.toml"):
            measures.load_spec(tmp_path / "s.toml", sets[1:])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_the_teacher_section_runs_through_the_runner_and_a_later_section_keeps_it(tmp_path):
    args = ["--runs-root", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    assert run.main([str(STUDIES / "speed.toml"), *args, "--set", "sections=teacher", "experts=2",
                     "teacher-seconds=0.01", "teacher-batch=4"]) == 0
    data = json.loads((tmp_path / "results" / "speed.json").read_text())
    (row,) = data["sections"]["teacher"]["rows"]
    assert row["experts"] == 2 and row["batch"] == 4 and row["stacked-loop"]["max_abs_diff"] < 1e-4
    assert set(data) == {"machine", "sections"} and "server_threads" in data["sections"]["teacher"]["provenance"]
    assert run.main([str(STUDIES / "speed.toml"), *args, "--table-only"]) == 0  # nothing runs; the section is kept
    md = (tmp_path / "results" / "speed.md").read_text()
    assert "## 2. Distillation teacher" in md and "| cpu | 2 |" in md
    assert json.loads((tmp_path / "results" / "speed.json").read_text())["sections"] == data["sections"]


def test_timed_refuses_a_target_that_does_not_exist_and_times_nested_calls_once():
    """The speed study's phase timers patch functions by name: a name its owner no longer
    defines (the code moved) is an error before anything runs, not a phase silently timed as
    0 s; an inherited method is not its subclass's own. Nested timed calls count for the inner
    name only, so the names' seconds add up to the wall time they cover."""
    import time
    from collections import defaultdict
    from types import SimpleNamespace

    from mosaic_flwr.distill.server import DistillStrategy
    from mosaic_flwr.methods.mosaic.strategy import MosaicStrategy

    seconds = defaultdict(float)
    with pytest.raises(LookupError, match=r"MosaicStrategy\.distillation"):  # DistillStrategy's, inherited
        with measures.timed([(DistillStrategy, "distillation", "d"), (MosaicStrategy, "distillation", "d")], seconds):
            pass
    assert "distillation" not in vars(MosaicStrategy)  # nothing was patched
    with pytest.raises(LookupError, match="no_such_function"):
        with measures.timed([(measures, "no_such_function", "x")], seconds):
            pass

    mod = SimpleNamespace()

    def inner():
        time.sleep(0.05)

    def outer():
        time.sleep(0.05)
        mod.inner()
        return "done"
    mod.inner, mod.outer = inner, outer
    with measures.timed([(mod, "outer", "outer"), (mod, "inner", "inner")], seconds):
        t0 = time.perf_counter()
        assert mod.outer() == "done"
        wall = time.perf_counter() - t0
    assert mod.inner is inner and mod.outer is outer  # restored
    assert seconds["inner"] >= 0.05 and seconds["outer"] >= 0.05
    assert seconds["outer"] <= wall - seconds["inner"] + 1e-6  # the inner call is not counted twice
    assert abs(seconds["inner"] + seconds["outer"] - wall) < 0.02
