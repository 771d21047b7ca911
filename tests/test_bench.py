"""The pure parts of the benchmarks (bench/): seed statistics, a study's runs and resuming them,
its tables, payload sizes, peak-memory polling, and the centralised reference on the synthetic
data set."""

import json
import math
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from bench.common import CENTRAL, PeakMemory, classify, fmt_mean_std, mean_std, payload_bytes, wire_bytes
from bench.report import aggregate
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


def test_a_study_runs_seed_by_seed_with_central_once_per_seed():
    from bench.run import plan

    spec = {"methods": ["fedavg", "mosaic"], "alphas": [0.1, 1.0], "seeds": [1, 2], "central": True}
    cells = plan(spec)
    assert [c.name for c in cells[:5]] == ["central-s1", "fedavg-a0.1-s1", "mosaic-a0.1-s1",
                                           "fedavg-a1-s1", "mosaic-a1-s1"]
    assert len(cells) == 2 * (1 + 4) and len({c.name for c in cells}) == len(cells)
    one = {**spec, "methods": ["fedavg"], "alphas": [0.01], "seeds": [3], "central": False}
    assert [c.name for c in plan(one)] == ["fedavg-a0.01-s3"]


def test_aggregate_groups_seeds_per_strategy_and_alpha():
    runs = {
        ("fedavg", 0.1, 2): {"final_accuracy": 0.8, "best_accuracy": 0.9, "wall_seconds": 20},
        ("fedavg", 0.1, 1): {"final_accuracy": 0.6, "best_accuracy": 0.7, "wall_seconds": 10},
        ("mosaic", 0.1, 1): {"final_accuracy": 0.75, "best_accuracy": 0.75,
                             "distillation": {"acc-before-distill": 0.6, "acc-teacher": 0.7,
                                              "acc-after-distill": 0.72}},
        (CENTRAL, None, 1): {"final_accuracy": 0.9, "best_accuracy": 0.91},
    }
    groups = aggregate(runs)
    g = groups[("fedavg", 0.1)]
    assert g["seeds"] == [1, 2] and g["final"] == [0.6, 0.8] and g["best"] == [0.7, 0.9]  # in seed order
    assert mean_std(g["final"]) == (pytest.approx(0.7), pytest.approx(math.sqrt(0.02)))
    assert groups[("mosaic", 0.1)]["acc-after-distill"] == [0.72]
    assert groups[(CENTRAL, None)]["final"] == [0.9]


def test_a_study_skips_finished_runs_goes_on_after_a_failed_one_and_exits_1(tmp_path, monkeypatch):
    """bench/run.py: a run finished in the runs root is not rerun (but recorded and tabulated); the
    centralised reference runs once per seed, before the methods; a failed simulation is reported,
    the runs after it go on, and the command exits 1."""
    import bench.common
    from bench import ledger, run

    spec = tmp_path / "g.toml"
    spec.write_text('driver = "simulation"\nmethods = ["fedavg", "mosaic", "fedprox"]\nalphas = [0.1]\n'
                    'seeds = [7]\ncentral = true\n')
    done = tmp_path / "runs" / "g" / "fedavg-a0.1-s7"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"final_accuracy": 0.5, "best_accuracy": 0.6}))
    ran = []

    def run_one(spec, cell, out):
        ran.append(cell.name)
        if cell.variant == "mosaic":
            return "failed"
        (out / cell.name).mkdir()
        summary = {"final_accuracy": 0.9, "best_accuracy": 0.9}
        if cell.variant == CENTRAL:
            summary.update(train_samples=600, sample_passes=1000, steps=10)
        (out / cell.name / "summary.json").write_text(json.dumps(summary))
        return "finished"

    monkeypatch.setattr(run, "run_one", run_one)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    book = tmp_path / "ledger.json"
    assert run.main([str(spec), "--runs-root", str(tmp_path / "runs"), "--ledger", str(book)]) == 1
    assert ran == ["central-s7", "mosaic-a0.1-s7", "fedprox-a0.1-s7"]  # the finished run was not rerun
    assert set(ledger.read(book)["runs"]) == {"central-s7", "fedavg-a0.1-s7", "fedprox-a0.1-s7"}
    md = (tmp_path / "results" / "g.md").read_text()
    assert "| FedAvg | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 | 1 |" in md and "| central (upper bound) | 0.9000" in md
    assert "| FedProx − FedAvg | +0.4000 (1 seed) |" in md and "Runs finished: 3 of 4" in md
    assert "**Centralised reference:**" in md and (tmp_path / "results" / "g.png").is_file()
    ran.clear()
    assert run.main([str(spec), "--runs-root", str(tmp_path / "fresh"), "--ledger", str(book),
                     "--methods", "fedavg", "fedprox"]) == 0
    assert ran == []  # every run of the narrowed study is in the ledger


def test_a_bad_spec_is_one_line_and_exit_2_before_any_run(tmp_path, capsys):
    from bench import run

    for text, error in (('methods = ["fedavg", "fedsgd"]\n', "unknown method 'fedsgd'"),
                        ('method = "registry"\n', "unknown key(s) method"),
                        ('driver = "ray"\n', "unknown driver 'ray'"),
                        ('run-config = ["num-rounds=3"]\n', "num-rounds"),
                        ('methods = ["mosaic"]\nreference = "fedavg"\n', "reference 'fedavg' is not one of"),
                        ('methods = ["mosaic"]\ndriver = "simulation"\nfork = true\n', "fork = true needs the in-process"),
                        ("pretrain-rounds = -1\n", "pretrain-rounds must be a whole number"),
                        ('seeds = ["42"]\n', "seeds must be a list of integers"),
                        ('run-config = "num-server-rounds=3"\n', "run-config must be a list of strings"),
                        ("pretrain-rounds = 2\nfork = true\n", "pretrain-rounds needs the in-process driver"),
                        ('pretrain-rounds = 2\ndriver = "simulation"\n', "pretrain-rounds needs the in-process driver")):
        (tmp_path / "s.toml").write_text(text)
        assert run.main([str(tmp_path / "s.toml"), "--runs-root", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert error in err and err.count("\n") == 1, err
    # --table-only without a ledger: no empty table over the committed one
    (tmp_path / "s.toml").write_text('methods = ["fedavg"]\n')
    assert run.main([str(tmp_path / "s.toml"), "--table-only", "--ledger", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "none.json does not exist" in err and err.count("\n") == 1, err
    assert not (run.RESULTS / "s.md").exists()
    for driver in ("inprocess", "simulation"):  # a named variant (bench/variants.toml) runs under either
        (tmp_path / "s.toml").write_text(f'methods = ["mosaic-kd500"]\ndriver = "{driver}"\n')
        assert run.load_spec(tmp_path / "s.toml")["methods"] == ["mosaic-kd500"]
    assert not (tmp_path / "runs").exists()


def test_every_study_spec_of_the_repository_loads():
    from bench import run
    from bench.common import ROOT

    studies = ROOT / "bench" / "studies"
    specs = {p.stem: run.load_spec(p) for p in studies.glob("*.toml")}
    assert {"smoke", "grid", "grid-quick", "families"} <= set(specs)
    # the headline comparison's parts are studies like any other, of the converged protocol
    parts = {"headline-fmnist", "headline-cifar10", "headline-cifar10-families"}
    assert parts <= set(specs) and all(specs[p]["pretrain_rounds"] > 0 for p in parts)
    assert "fedbn" not in specs["headline-cifar10-families"]["methods"]  # its leave-out
    cifar = specs["headline-cifar10"]  # its only-seeds: the data-free rivals at seed 42 alone
    assert [c.variant for c in run.plan(cifar) if c.alpha == 0.1 and c.seed == 43] == sorted(
        (m for m in cifar["methods"] if m not in ("dense", "fedftg", "dfrd")), key=run.run_rank)
    assert {"dense", "fedftg", "dfrd"} <= {c.variant for c in run.plan(cifar) if c.seed == 42}
    assert [c.name for c in run.plan(specs["grid-quick"])] == ["central-s42", "fedavg-a0.1-s42", "mosaic-a0.1-s42"]


def test_a_simulation_study_hands_flwr_sim_the_run_config_the_in_process_driver_resolves(tmp_path):
    """driver = "simulation": scripts/flwr_sim.py gets the spec's run config in order (its files from
    the repository), then the run's own (method, variant, alpha, seed, place); merged as flwr_sim.py
    merges them, that is the config the in-process driver builds for the same run."""
    from bench import run
    from bench.common import ROOT, sim_command
    from mosaic_flwr.config import merge_run_config

    spec = tmp_path / "fam.toml"
    spec.write_text('driver = "simulation"\nmethods = ["fedavg", "mosaic-nometa"]\nclients = 4\n'
                    'run-config = ["conf/fmnist-families.toml", "num-server-rounds=2 alpha=0.5"]\n')
    s = run.load_spec(spec, seeds=[43], overrides=["local-steps=3"])
    cell, out = run.plan(s)[1], tmp_path / "runs"
    assert cell.name == "mosaic-nometa-a0.1-s43"
    cmd = sim_command(**run.simulation(s, cell, out))
    assert cmd[1] == str(ROOT / "scripts" / "flwr_sim.py") and cmd[cmd.index("--num-supernodes") + 1] == "4"
    values = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--run-config"]
    assert values[:3] == [str(ROOT / "conf" / "fmnist-families.toml"), "num-server-rounds=2 alpha=0.5", "local-steps=3"]
    merged = merge_run_config(values)
    assert {k: merged[k] for k in ("strategy", "mosaic.meta", "alpha", "seed", "local-steps", "num-server-rounds",
                                   "client-models", "run-name")} == {
        "strategy": "mosaic", "mosaic.meta": False, "alpha": 0.1, "seed": 43, "local-steps": 3,
        "num-server-rounds": 2, "client-models": "cnn_small,cnn_wide,resnet8", "run-name": cell.name}
    rc = run.run_config(s, cell, out.resolve())
    assert {k: rc[k] for k in merged} == merged  # both drivers run the same config


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
    from bench.report import paired_lines, val_table

    runs = {("mosaic", 0.1, s): {"final_accuracy": 0.70 + d, "final_val_accuracy": 0.71}
            for s, d in ((42, 0.01), (43, 0.02), (44, 0.03))}
    runs.update({("mosaic-nometa", 0.1, s): {"final_accuracy": 0.70, "final_val_accuracy": 0.69}
                 for s in (42, 43, 44)})
    runs[("mosaic-nometa", 0.1, 45)] = {"final_accuracy": 0.1}  # unpaired seed: left out
    pairs = [("mosaic", "mosaic-nometa")]
    row = [line for line in paired_lines(runs, pairs, [0.1]) if "−" in line][0]
    # mean 0.02, sd 0.01, t(0.975, 2) = 4.303: half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert row == "| Mosaic − Mosaic without meta model | +0.0200 [-0.0048, +0.0448] (+0.010, +0.020, +0.030) |"
    val = paired_lines(runs, pairs, [0.1], key="final_val_accuracy")
    assert any("+0.0200 [+0.0200, +0.0200]" in line for line in val)
    assert paired_lines(runs, [("mosaic", "fedavg")], [0.1]) == []  # no runs of one side: no table
    groups = aggregate({k: {**s, "best_accuracy": s["final_accuracy"]} for k, s in runs.items()
                        if "final_val_accuracy" in s})
    assert any(line.startswith("| Mosaic | 0.7100") for line in val_table(groups, ["mosaic"], [0.1]))


def test_the_protocol_report_counts_each_clients_steps():
    """Classifier steps per client in the continuation rounds: local steps per round,
    ``kd.local-steps`` at the distillation round, one more training per look-ahead
    round; generator steps for the distilling strategies only."""
    from bench.common import paired_interval
    from bench.protocol_report import client_steps

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
    from bench.archive.scaling_curve import curve_table, main
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
    from bench.archive.slice_check import reestimate_bn

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = [torch.randn(30, 2, 4, 4) * 3 + 5, torch.randn(70, 2, 4, 4) - 1]
    out = reestimate_bn(model, images, batch_size=25)
    pooled = torch.cat(images).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(out[0].running_mean, pooled.mean(1), atol=1e-4)  # 4 batches of 25 across both tensors
    assert not out.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_slice_check_scores_the_widths_as_the_server_does(tmp_path):
    from bench.archive.slice_check import check
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
    assert {"common", "report", "ledger", "run", "headline", "oracle", "protocol_report", "measures"} <= set(graph)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # pragma: no cover - the failure message names the cycle
        pytest.fail(f"bench modules import each other in a circle: {' -> '.join(exc.args[1])}")
    assert order.index("common") < order.index("report") < order.index("protocol_report") < order.index("run")
    assert order.index("oracle") < order.index("run") < order.index("headline")
    assert order.index("measures") < order.index("run")


def test_method_lists_come_from_the_registry():
    """Every comparison's methods derive from mosaic_flwr.registry: a new method (FedGen) appears
    beside its peers without a bench edit; what is left out is named with its reason."""
    from bench import common, headline, run
    from mosaic_flwr.registry import STRATEGIES

    peers = [m for m in STRATEGIES if m not in common.ABLATIONS]
    assert "fedgen" in peers and set(peers) == set(common.compared())
    assert set(peers) <= set(headline.HEADLINE)
    grid = run.load_spec(common.ROOT / "bench" / "studies" / "grid.toml")
    assert set(grid["methods"]) == {*STRATEGIES, "mosaic-nometa"} and grid["central"] and grid["driver"] == "simulation"
    assert all(common.runnable()[m] == (m, {}) for m in STRATEGIES)
    assert [common.distils(m) for m in common.compared()] == sorted(common.distils(m) for m in common.compared())
    assert common.label("fedgen") == "FedGen" and common.label("mosaic-nometa") == "Mosaic without meta model"
    for name, part in headline.PARTS.items():  # a part leaves a method out only with its reason in the cut
        for m in set(peers) - set(part.variants):
            assert headline.label(m) in part.cut, (name, m)


def test_a_study_spec_runs_its_grid_once_records_it_and_tables_it_from_the_ledger(tmp_path, monkeypatch):
    """bench/run.py: methods x alphas x seeds and the centralised reference from a TOML spec on the
    synthetic data set, in-process; a method the settings refuse records why; the ledger is data,
    and a fresh runs root runs nothing again."""
    import bench.common
    from bench import ledger, run

    spec = tmp_path / "tiny.toml"
    spec.write_text('methods = ["fedavg", "fedbn", "fedgen"]\nalphas = [0.5]\nseeds = [1]\nclients = 3\n'
                    'central = true\n'
                    'run-config = ["dataset=\'synthetic\' num-server-rounds=1 local-steps=2 test-subset=0"]\n')
    assert run.load_spec(spec)["methods"] == ["fedavg", "fedbn", "fedgen"]
    registry = tmp_path / "all.toml"
    registry.write_text('methods = "registry"\n')
    assert set(run.load_spec(registry)["methods"]) == set(bench.common.compared())
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    book = tmp_path / "results" / "ledger" / "tiny.json"
    assert run.main([str(spec), "--runs-root", str(tmp_path / "runs"), "--ledger", str(book)]) == 0
    recorded = ledger.read(book)["runs"]
    assert set(recorded) == {"central-s1", "fedavg-a0.5-s1", "fedbn-a0.5-s1", "fedgen-a0.5-s1"}
    assert "BatchNorm" in recorded["fedbn-a0.5-s1"]["refused"]["reason"]
    md = (tmp_path / "results" / "tiny.md").read_text()
    assert "| FedGen | " in md and "| central (upper bound) | " in md and "| FedGen − FedAvg | " in md
    assert "Refused by their settings (before any training): FedBN: " in md and "Runs finished: 3 of 4" in md
    data = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert data["groups"]["fedgen|0.5"]["seeds"] == [1] and data["refused"].keys() == {"fedbn"}
    assert run.run(run.load_spec(spec), tmp_path / "fresh", book) == {}  # every run is in the ledger


def test_named_variants_are_data_with_valid_settings():
    """bench/variants.toml: one table of named variants for every study; each names a
    registered method and settings the config accepts; the late-distillation rows distil at the
    converged protocol's last round."""
    from bench import common, run
    from mosaic_flwr.config import build_config, load_defaults
    from mosaic_flwr.registry import STRATEGIES

    assert common.VARIANTS and not set(common.VARIANTS) & set(STRATEGIES)
    for name, (strategy, settings) in common.VARIANTS.items():
        assert strategy in STRATEGIES, name
        build_config({**load_defaults(), "strategy": strategy, **settings})  # an unknown key or value raises
        assert common.runnable()[name] == (strategy, settings)
    assert common.variant_config("fedavg") == ("fedavg", {})
    assert common.variant_config("mosaic-nometa") == ("mosaic", {"mosaic.meta": False})
    assert common.VARIANTS["mosaic-late"][1]["warmup-rounds"] == run.CONTINUE_ROUNDS
    assert common.toml_values({"a": 1e-4, "b": True, "c": "x"}) == 'a=0.0001 b=true c="x"'


@pytest.mark.slow  # ~30 s; the quick loop forks through tests/test_replay.py
def test_a_forked_study_shares_one_federation_per_cell_and_records_every_method(tmp_path, monkeypatch):
    """fork = true (bench/studies/ablation.toml): per (alpha, seed) one federation to the
    distillation round's replies, then each method's server; the methods share the rounds before
    the fork to the bit and differ after it, and a finished study runs nothing again."""
    import bench.common
    from bench import ledger, run

    spec = tmp_path / "forked.toml"
    spec.write_text('methods = ["mosaic", "mosaic-nometa"]\nalphas = [1.0]\nseeds = [1]\nclients = 3\nfork = true\n'
                    'reference = "mosaic"\n'
                    'run-config = ["dataset=\'synthetic\' num-server-rounds=3 warmup-rounds=2 local-steps=5 '
                    'batch-size=16 mosaic.gen-steps=5 mosaic.gen-batch-size=8 mosaic.proto-k=2 mosaic.meta-epochs=3 '
                    'mosaic.meta-samples-per-class=4 kd.steps=8 kd.batch-size=16 kd.gate=\'off\' test-subset=0"]\n')
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    book = tmp_path / "ledger.json"
    assert run.main([str(spec), "--runs-root", str(tmp_path / "runs"), "--ledger", str(book)]) == 0
    recorded = ledger.read(book)["runs"]
    assert set(recorded) == {"mosaic-a1-s1", "mosaic-nometa-a1-s1"}
    rows = {name: json.loads((tmp_path / "runs" / "forked" / name / "metrics.json").read_text()) for name in recorded}
    meta, plain = rows["mosaic-a1-s1"], rows["mosaic-nometa-a1-s1"]
    drop = lambda r: {k: v for k, v in r.items() if "seconds" not in k}
    assert [drop(r) for r in meta[:2]] == [drop(r) for r in plain[:2]]  # rounds 0-1: one federation
    assert meta[2]["acc-before-distill"] == plain[2]["acc-before-distill"]  # the same replies at the fork
    assert "meta-inputs" in meta[2] and "meta-inputs" not in plain[2]  # each its own teacher
    assert all(json.loads((tmp_path / "runs" / "forked" / n / "bench.json").read_text())["shared_seconds"] > 0
               for n in recorded)
    assert "Mosaic without meta model − Mosaic" in (tmp_path / "results" / "forked.md").read_text()
    assert run.run(run.load_spec(spec), tmp_path / "fresh", book) == {}


@pytest.mark.slow
def test_a_converged_study_starts_every_method_from_one_pretraining_and_forks_the_distilling_ones(tmp_path, monkeypatch):
    """pretrain-rounds (the converged protocol, as each headline part runs it): per (alpha, seed) FedAvg
    pre-trains once; every method continues from its checkpoint, Mosaic's rows from ONE round 1 of
    client work with the teacher-ceiling diagnostic, FedBN refused on cnn_small (equal compute: the
    tiny headline grid, tests/test_headline.py); the central reference has the sample passes of both stages; protocol_report's tables;
    a fresh runs root with the ledger runs nothing."""
    import bench.common
    from bench import ledger, protocol_report, run

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(protocol_report, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    spec = tmp_path / "conv.toml"
    spec.write_text('methods = ["fedavg", "fedbn", "mosaic", "mosaic-nometa"]\nalphas = [0.5]\n'
                    'seeds = [1]\nclients = 2\ncentral = true\npretrain-rounds = 1\nrun-config = ["dataset=\'synthetic\' '
                    'local-steps=2 mosaic.gen-steps=2 mosaic.gen-batch-size=4 kd.steps=2 kd.batch-size=8 '
                    'mosaic.meta-epochs=2 mosaic.meta-samples-per-class=4 mosaic.proto-k=2 test-subset=0"]\n')
    book = tmp_path / "ledger.json"
    assert run.main([str(spec), "--runs-root", str(tmp_path / "runs"), "--ledger", str(book)]) == 0
    got = ledger.read(book)
    assert set(got["runs"]) == {"pretrain-a0.5-s1", "central-s1", *(f"{m}-a0.5-s1" for m in (
        "fedavg", "fedbn", "mosaic", "mosaic-nometa"))}
    assert "BatchNorm" in got["runs"]["fedbn-a0.5-s1"]["refused"]["reason"] and list(got["files"]) == ["oracle-a0.5-s1.json"]
    runs = got["runs"]
    for m in ("fedavg", "mosaic", "mosaic-nometa"):
        assert runs[f"{m}-a0.5-s1"]["config"]["init-from"].endswith("pretrain-a0.5-s1"), m
        assert runs[f"{m}-a0.5-s1"]["config"]["lr-schedule"] == "step"
    assert runs["pretrain-a0.5-s1"]["config"]["num-server-rounds"] == 1
    assert runs["pretrain-a0.5-s1"]["config"]["lr-schedule"] == "constant"
    shared = {runs[f"{m}-a0.5-s1"]["bench"]["shared_seconds"] for m in ("mosaic", "mosaic-nometa")}
    assert len(shared) == 1 and shared.pop() > 0  # one round 1 for both
    meta, plain = (runs[f"{m}-a0.5-s1"]["metrics"] for m in ("mosaic", "mosaic-nometa"))
    assert meta[1]["acc-before-distill"] == plain[1]["acc-before-distill"]
    assert runs["central-s1"]["summary"]["config"]["num-server-rounds"] == 1 + run.CONTINUE_ROUNDS
    assert "# Mosaic from a converged FedAvg" in (tmp_path / "results" / "conv.md").read_text()
    assert run.run(run.load_spec(spec), tmp_path / "fresh", book) == {}
    assert not list((tmp_path / "fresh").rglob("*.pt"))
