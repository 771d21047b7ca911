"""The pure parts of the benchmarks (bench/): seed statistics, resuming the grid, payload
sizes, peak-memory polling, and the centralised reference on the synthetic data set."""

import json
import math
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from bench.common import PeakMemory, classify, fmt_mean_std, mean_std, payload_bytes, wire_bytes
from bench.grid import CENTRAL, Cell, aggregate, grid_cells, run_grid
from mosaic_flwr.core.central import federated_sample_passes, samples_in_steps, train_central
from mosaic_flwr.config import build_config


def test_mean_std_is_sample_std():
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)
    assert mean_std([0.3]) == (0.3, 0.0)
    assert fmt_mean_std([0.5, 0.7, 0.9], 3) == "0.700 ± 0.200"
    assert fmt_mean_std([]) == "-"
    with pytest.raises(ValueError):
        mean_std([])


def test_cells_are_ordered_by_seed_with_central_once_per_seed():
    cells = grid_cells(["fedavg", "mosaic"], [0.1, 1.0], [1, 2])
    assert [c.name for c in cells[:5]] == ["central-s1", "fedavg-a0.1-s1", "mosaic-a0.1-s1",
                                           "fedavg-a1-s1", "mosaic-a1-s1"]
    assert len(cells) == 2 * (1 + 4) and len({c.name for c in cells}) == len(cells)
    assert [c.name for c in grid_cells(["fedavg"], [0.01], [3], central=False)] == ["fedavg-a0.01-s3"]


def test_aggregate_groups_seeds_per_strategy_and_alpha():
    results = {
        Cell("fedavg", 0.1, 1): {"final_accuracy": 0.6, "best_accuracy": 0.7, "wall_seconds": 10},
        Cell("fedavg", 0.1, 2): {"final_accuracy": 0.8, "best_accuracy": 0.9, "wall_seconds": 20},
        Cell("mosaic", 0.1, 1): {"final_accuracy": 0.75, "best_accuracy": 0.75,
                                 "distillation": {"acc-before-distill": 0.6, "acc-teacher": 0.7,
                                                  "acc-after-distill": 0.72}},
        Cell(CENTRAL, None, 1): {"final_accuracy": 0.9, "best_accuracy": 0.91},
    }
    groups = aggregate(results)
    g = groups[("fedavg", 0.1)]
    assert g["seeds"] == [1, 2] and g["final"] == [0.6, 0.8] and g["best"] == [0.7, 0.9]
    assert mean_std(g["final"]) == (pytest.approx(0.7), pytest.approx(math.sqrt(0.02)))
    assert groups[("mosaic", 0.1)]["acc-after-distill"] == [0.72]
    assert groups[(CENTRAL, None)]["final"] == [0.9]


def test_run_grid_skips_finished_cells(tmp_path):
    cells = grid_cells(["fedavg", "mosaic"], [0.1], [7])
    done = tmp_path / cells[1].name
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"final_accuracy": 0.5, "best_accuracy": 0.6}))
    ran = []

    def runner(cell):
        ran.append(cell.name)
        return None if cell.variant == "mosaic" else {"final_accuracy": 0.9, "best_accuracy": 0.9}

    results = run_grid(cells, tmp_path, runner)
    assert ran == ["central-s7", "mosaic-a0.1-s7"]          # the finished cell was not rerun
    assert results[cells[1]]["final_accuracy"] == 0.5       # ... but its summary is used
    assert cells[2] not in results                          # a failed cell is left out


def test_payload_bytes_counts_tensor_nbytes_per_record():
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.zeros(10, 3), "b": torch.zeros(3, dtype=torch.float64),
                               "n": torch.zeros(2, dtype=torch.long)}),
        "metrics": MetricRecord({"num-examples": 5, "counts": [1, 2, 3]}),
        "config": ConfigRecord({"name": "abc"}),
    })
    sizes = payload_bytes(content)
    assert sizes["arrays"] == 10 * 3 * 4 + 3 * 8 + 2 * 8
    assert sizes["metrics"] == len("num-examples") + 8 + len("counts") + 3 * 8
    assert sizes["config"] == len("name") + 3
    assert sizes["total"] == sizes["arrays"] + sizes["metrics"] + sizes["config"]
    assert wire_bytes(content) > sizes["arrays"]  # serialised: data + headers


def test_peak_memory_sees_a_child_process_peak():
    code = "import time; b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with PeakMemory(proc.pid, interval=0.2) as mem:
        proc.wait()
    roles = mem.by_role()
    assert roles["other"]["peak_mib"] >= 64 and roles["other"]["processes"] == 1
    assert classify("ray::ClientAppActor.run") == "client"
    assert classify("python flwr-simulation --runtime-api-address x") == "server"


def test_sample_passes_match_the_clients_batches():
    assert samples_in_steps(100, 32, 4) == 100        # one epoch: 32 + 32 + 32 + 4
    assert samples_in_steps(100, 32, 5) == 132
    assert samples_in_steps(10, 32, 3) == 30          # a small client: 3 passes of 10
    cfg = build_config({"strategy": "fedavg", "num-server-rounds": 2, "local-steps": 4, "batch-size": 32})
    assert federated_sample_passes(cfg, [100, 10]) == 2 * (100 + 40)
    epochs = build_config({"strategy": "fedavg", "num-server-rounds": 3, "local-steps": 0, "local-epochs": 2})
    assert federated_sample_passes(epochs, [100, 10]) == 3 * 2 * 110
    half = build_config({"strategy": "fedavg", "num-server-rounds": 1, "local-steps": 0, "local-epochs": 1, "fraction-train": 0.5,
                         "min-train-clients": 1})
    assert federated_sample_passes(half, [100, 10, 20, 30]) == pytest.approx(0.5 * 160)


@pytest.fixture
def one_thread():
    """Tiny models train much faster on one thread, the more so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_central_on_synthetic_data(one_thread):
    cfg = build_config({"strategy": "fedavg", "dataset": "synthetic", "partition": "iid", "num-server-rounds": 2,
                        "local-steps": 5, "batch-size": 16, "seed": 3})
    r = train_central(cfg, num_clients=4)
    assert r["train_samples"] == 2000                     # the union of the 4 partitions
    assert r["sample_passes"] == 2 * 4 * 5 * 16 and r["steps"] == 40
    assert [h["round"] for h in r["rounds"]] == [1, 2]
    assert r["final_accuracy"] == r["rounds"][-1]["accuracy"]
    assert r["best_accuracy"] == max(h["accuracy"] for h in r["rounds"])
    assert r["final_accuracy"] > 0.5                      # 40 steps learn the patterns
    again = train_central(cfg, num_clients=4)
    assert again["final_accuracy"] == r["final_accuracy"]  # deterministic for a seed


def test_paired_differences_and_their_95_percent_interval():
    from bench.grid import paired_lines, val_table

    res = {Cell("mosaic", 0.1, s): {"final_accuracy": 0.70 + d, "final_val_accuracy": 0.71}
           for s, d in ((42, 0.01), (43, 0.02), (44, 0.03))}
    res.update({Cell("mosaic-nometa", 0.1, s): {"final_accuracy": 0.70, "final_val_accuracy": 0.69}
                for s in (42, 43, 44)})
    res[Cell("mosaic-nometa", 0.1, 45)] = {"final_accuracy": 0.1}  # unpaired seed: left out
    row = [l for l in paired_lines(res, "mosaic", ["mosaic", "mosaic-nometa"], [0.1]) if "−" in l][0]
    # mean 0.02, sd 0.01, t(0.975, 2) = 4.303: half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert "+0.0200 [-0.0048, +0.0448] (+0.010, +0.020, +0.030)" in row
    val = paired_lines(res, "mosaic", ["mosaic", "mosaic-nometa"], [0.1], key="final_val_accuracy")
    assert any("+0.0200 [+0.0200, +0.0200]" in l for l in val)
    groups = aggregate({c: {**s, "best_accuracy": s["final_accuracy"]} for c, s in res.items()
                        if "final_val_accuracy" in s})
    assert any(l.startswith("| mosaic | 0.7100") for l in val_table(groups, ["mosaic"], [0.1]))


def test_converged_report_counts_each_clients_steps():
    """Classifier steps per client in the continuation rounds: local steps per round,
    ``kd.local-steps`` at the distillation round, one more training per look-ahead
    round; generator steps for the distilling strategies only."""
    from bench.common import paired_interval
    from bench.converged_report import client_steps

    rows = [{"round": 0}, {"round": 1}, {"round": 2, "shadow-clients": 10}, {"round": 3, "shadow-clients": 10}]
    base = {"local-steps": 50, "mosaic.gen-steps": 200, "kd.local-steps": 0, "num-server-rounds": 3}
    assert client_steps({"config": {**base, "strategy": "fedavg"}, "rows": rows[:1] + [{"round": r} for r in (1, 2, 3)]}
                        ) == (150, 0)
    assert client_steps({"config": {**base, "strategy": "mosaic"}, "rows": rows}) == (250, 200)
    assert client_steps({"config": {**base, "strategy": "mosaic", "kd.local-steps": 200},
                         "rows": rows[:2] + [{"round": 2}, {"round": 3}]}) == (300, 200)
    assert client_steps({"config": {**base, "strategy": "mosaic", "kd.local-steps": 10, "kd.expert-pass": True},
                         "rows": rows[:2] + [{"round": 2}, {"round": 3}]}) == (160, 200)
    assert client_steps({"config": {**base, "strategy": "mosaic"}, "rows": rows[:1]}) is None  # incomplete log
    assert paired_interval([0.01, 0.03], scale=100, digits=1) == "+2.0 [-10.7, +14.7] (+1.0, +3.0)"


def test_scaling_curve_finds_the_first_round_at_the_target_and_the_work_to_it(tmp_path, monkeypatch):
    import bench.common
    from bench.scaling_curve import curve_table, main
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    rows = [{"round": 0, "accuracy": 0.1}, {"round": 1, "accuracy": 0.5, "client-seconds": 2.0},
            {"round": 2, "accuracy": 0.7, "client-seconds": 3.0}, {"round": 3, "accuracy": 0.65, "client-seconds": 4.0}]
    lines, data = curve_table(rows, 0.6)
    assert data["first_round_at_target"] == 2 and data["client_seconds_to_target"] == 5.0
    assert data["curve"][-1] == [3, 0.65] and any("first at or above" in line for line in lines)
    assert curve_table(rows, 0.9)[1]["first_round_at_target"] is None
    # A tiny in-process run, then a second call goes on from its checkpoint to more rounds.
    rc = "dataset='synthetic' local-steps=2 fraction-train=0.5"
    assert main(["--clients", "4", "--rounds", "2", "--run-config", rc, "--runs-dir", str(tmp_path),
                 "--name", "curve-test"]) == 0
    assert main(["--clients", "4", "--rounds", "3", "--run-config", rc, "--runs-dir", str(tmp_path),
                 "--name", "curve-test", "--target", "0.0"]) == 0
    saved = json.loads((tmp_path / "curve-test" / "run" / "metrics.json").read_text())
    assert [r["round"] for r in saved] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "results" / "curve-test.json").read_text())["first_round_at_target"] == 0
    assert main(["--run-config", "alpha=-1", "--runs-dir", str(tmp_path), "--name", "bad"]) == 2


def test_bn_reestimate_uses_the_images_and_leaves_the_model_alone():
    from bench.slice_check import reestimate_bn

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = [torch.randn(30, 2, 4, 4) * 3 + 5, torch.randn(70, 2, 4, 4) - 1]
    out = reestimate_bn(model, images, batch_size=25)
    pooled = torch.cat(images).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(out[0].running_mean, pooled.mean(1), atol=1e-4)  # 4 batches of 25 across both tensors
    assert not out.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_slice_check_scores_the_widths_as_the_server_does(tmp_path):
    from bench.slice_check import check
    from tests.support import run_inprocess

    res = run_inprocess(tmp_path, num_nodes=2, strategy="fedavg", dataset="synthetic", model="resnet8",
                        **{"client-capacities": "1,0.5", "local-steps": 40, "num-server-rounds": 2, "warmup-rounds": 1,
                           "privacy-audit": False})
    summary = json.loads((res["dir"] / "summary.json").read_text())
    rows = {(r["model"], r["slice"], r["bn"]): r for r in check(res["dir"], per_client=50, last_rounds=1)["rows"]}
    assert set(rows) == {("resnet8", "full width", "checkpoint"), ("resnet8", "full width", "re-estimated"),
                         ("resnet8@0.5", "fixed slice", "checkpoint"), ("resnet8@0.5", "fixed slice", "re-estimated"),
                         ("resnet8@0.5", "rolling window of round 2", "checkpoint"),
                         ("resnet8@0.5", "rolling window of round 2", "re-estimated")}
    assert summary["final_accuracy_by_model"]["resnet8"] > 0.5  # trained: the comparison below is not chance = chance
    for model, got in summary["final_accuracy_by_model"].items():  # the server's own figures
        label = "full width" if model == "resnet8" else "fixed slice"
        assert rows[(model, label, "checkpoint")]["accuracy"] == pytest.approx(got, abs=1e-4), model


def bench_imports() -> dict[str, set[str]]:
    """bench module -> the bench modules it imports anywhere in it (functions included), from the source."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bench"
    mods = {p.stem for p in root.glob("*.py")}
    graph = {}
    for p in sorted(root.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "bench":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("bench."):
                    deps.add(node.module.split(".")[1])
        graph[p.stem] = (deps & mods) - {p.stem}
    return graph


def test_bench_modules_import_each_other_without_a_cycle():
    from graphlib import CycleError, TopologicalSorter

    graph = bench_imports()
    assert {"common", "report", "ledger", "grid", "headline", "converged", "converged_report"} <= set(graph)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # pragma: no cover - the failure message names the cycle
        pytest.fail(f"bench modules import each other in a circle: {' -> '.join(exc.args[1])}")
    assert order.index("common") < order.index("report") < order.index("converged_report") < order.index("headline")


def test_method_lists_come_from_the_registry():
    """Every comparison's methods derive from mosaic_flwr.registry: a new method (FedGen) appears
    beside its peers without a bench edit; what is left out is named with its reason."""
    from bench import common, converged, grid, headline
    from mosaic_flwr.registry import STRATEGIES

    peers = [m for m in STRATEGIES if m not in common.ABLATIONS]
    assert "fedgen" in peers and set(peers) == set(common.compared())
    assert set(peers) <= set(headline.HEADLINE) and set(STRATEGIES) <= set(grid.STRATEGIES)
    assert all(converged.VARIANTS[m] == (m, {}) for m in STRATEGIES)
    assert [common.distils(m) for m in common.compared()] == sorted(common.distils(m) for m in common.compared())
    assert common.label("fedgen") == "FedGen" and common.label("mosaic-nometa") == "Mosaic without meta model"
    for name, part in headline.PARTS.items():  # a part leaves a method out only with its reason in the cut
        for m in set(peers) - set(part.variants):
            assert headline.label(m) in part.cut, (name, m)


def test_a_study_spec_runs_its_grid_once_records_it_and_tables_it_from_the_ledger(tmp_path, monkeypatch):
    """bench/run.py: methods x alphas x seeds from a TOML spec on the synthetic data set; a method
    the settings refuse records why; the ledger is data, and a fresh runs root runs nothing again."""
    import bench.common
    from bench import ledger, run

    spec = tmp_path / "tiny.toml"
    spec.write_text('methods = ["fedavg", "fedbn", "fedgen"]\nalphas = [0.5]\nseeds = [1]\nclients = 3\n'
                    'run-config = ["dataset=\'synthetic\' num-server-rounds=1 local-steps=2 test-subset=0"]\n')
    assert run.load_spec(spec)["methods"] == ["fedavg", "fedbn", "fedgen"]
    registry = tmp_path / "all.toml"
    registry.write_text('methods = "registry"\n')
    assert set(run.load_spec(registry)["methods"]) == set(bench.common.compared())
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    book = tmp_path / "results" / "ledger" / "tiny.json"
    run.main([str(spec), "--runs-root", str(tmp_path / "runs"), "--ledger", str(book)])
    recorded = ledger.read(book)["runs"]
    assert set(recorded) == {"fedavg-a0.5-s1", "fedbn-a0.5-s1", "fedgen-a0.5-s1"}
    assert "BatchNorm" in recorded["fedbn-a0.5-s1"]["refused"]["reason"]
    md = (tmp_path / "results" / "tiny.md").read_text()
    assert "| FedGen | " in md and "| FedBN | refused: " in md and "Runs finished: 2 of 3" in md
    data = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert set(data["accuracy"]["fedgen|0.5"]) == {"1"}
    assert run.run(run.load_spec(spec), tmp_path / "fresh", book) == []  # every run is in the ledger


def test_named_variants_are_data_with_valid_settings():
    """bench/studies/variants.toml: one table of named variants for every study; each names a
    registered method and settings the config accepts; the late-distillation rows distil at the
    converged protocol's last round."""
    from bench import common, converged
    from mosaic_flwr.config import build_config, load_defaults
    from mosaic_flwr.registry import STRATEGIES

    assert common.VARIANTS and not set(common.VARIANTS) & set(STRATEGIES)
    for name, (strategy, settings) in common.VARIANTS.items():
        assert strategy in STRATEGIES, name
        build_config({**load_defaults(), "strategy": strategy, **settings})  # an unknown key or value raises
        assert converged.VARIANTS[name] == (strategy, settings)
    assert common.variant_config("fedavg") == ("fedavg", {})
    assert common.variant_config("mosaic-nometa") == ("mosaic", {"mosaic.meta": False})
    assert common.VARIANTS["mosaic-late"][1]["warmup-rounds"] == converged.CONTINUE_ROUNDS
    assert common.toml_values({"a": 1e-4, "b": True, "c": "x"}) == 'a=0.0001 b=true c="x"'
