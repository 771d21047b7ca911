import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

from client_app.app import app as client_app
from mosaic_flwr.core.checkpoint import config_changes
from mosaic_flwr.config import (PROJECT_ROOT, RENAMED, spec, strategy_names, ConfigError, build_config, config_heterogeneous, heterogeneous,
                                load_defaults, local_work, meta_data_for, merge_run_config, write_run_config)
from mosaic_flwr.testing.inprocess import InProcessGrid
from server_app.app import main as server_main


def test_defaults_cover_spec_exactly():
    defaults = load_defaults()  # and the old names' placeholders, "" (not given), so that Flower accepts them
    assert set(defaults) == set(spec()) | set(RENAMED) and all(defaults[old] == "" for old in RENAMED)
    assert set(RENAMED.values()) <= set(spec()) and not set(RENAMED) & set(spec())
    cfg = build_config({})
    assert cfg.strategy in strategy_names() and cfg.alpha > 0


def test_casts_untyped_values():
    cfg = build_config({"strategy": "fedavg", "alpha": 1, "num-server-rounds": 3.0, "download": "true",
                        "seed": "7"})
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float)
    assert cfg.num_server_rounds == 3 and cfg.download is True and cfg.seed == 7


def test_settings_file_then_explicit_override_wins_even_at_the_default():
    """A conf file then key=value strings, merged in order as the launchers do; Flower then
    merges them over the defaults (what the apps see), and every explicit value wins."""
    defaults = load_defaults()
    assert defaults["client-models"] == ""
    merged = merge_run_config(["conf/fmnist-families.toml"], cwd=PROJECT_ROOT)
    assert merged == {"dataset": "fmnist", "partition": "dirichlet", "alpha": 0.1,
                      "client-models": "cnn_small,cnn_wide,resnet8"}
    cfg = build_config({**defaults, **merged})
    assert cfg.client_models == "cnn_small,cnn_wide,resnet8" and cfg.alpha == 0.1
    # "client-models=''" equals the default: it still beats the file (it did not with presets)
    merged = merge_run_config(["conf/fmnist-families.toml", "alpha=0.3 client-models=''", "alpha=0.5"],
                              cwd=PROJECT_ROOT)
    cfg = build_config({**defaults, **merged})
    assert cfg.client_models == "" and cfg.alpha == 0.5 and cfg.dataset == "fmnist"


def test_every_conf_file_is_a_valid_run_config():
    files = sorted((PROJECT_ROOT / "conf").glob("*"))
    assert files and all(f.suffix == ".toml" for f in files)
    for f in files:
        build_config(merge_run_config([str(f)]))


def test_run_config_files_and_strings_fail_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--run-config: cannot read .*nope\.toml"):
        merge_run_config(["nope.toml"], cwd=tmp_path)
    # Tables flatten as Flower flattens them; a table no method owns is an unknown key.
    (tmp_path / "nested.toml").write_text("[tool]\nalpha = 1\n")
    assert merge_run_config(["nested.toml"], cwd=tmp_path) == {"tool.alpha": 1}
    with pytest.raises(ConfigError, match=r"^tool\.alpha: unknown key"):
        build_config(merge_run_config(["nested.toml"], cwd=tmp_path))
    with pytest.raises(ConfigError, match=r"^--run-config 'alpha=='"):
        merge_run_config(["alpha=="])


def test_a_written_run_config_reads_back_exactly(tmp_path):
    values = {"alpha": 0.1, "seed": 3, "checkpoint": False, "client-models": "a,b", "output-dir": "/x y/'z'"}
    path = write_run_config(values, tmp_path / "rc.toml")
    assert merge_run_config([str(path)]) == values
    # what flwr run does with a file passed alone
    assert parse_config_args([str(path)]) == values


def test_retired_preset_key_says_how_to_use_the_file():
    with pytest.raises(ConfigError, match=r"^preset: presets are run-config files now: instead of "
                                          r"preset='fmnist-dir0\.5' pass --run-config conf/fmnist-dir0\.5\.toml") as info:
        build_config({"preset": "fmnist-dir0.5"})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,pattern", [
    ({"local-epochs": 5}, r"^local-epochs/local-steps: both set \(local-epochs=5, local-steps=50\)"),
    ({"local-epochs": 2, "local-steps": 10}, r"^local-epochs/local-steps: both set"),
    ({"local-epochs": 0, "local-steps": 0}, r"^local-epochs/local-steps: both 0"),
])
def test_local_work_is_one_key_never_silently_ignored(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(override)


def test_local_work_is_stated():
    assert local_work(build_config({})) == "50 local SGD steps of batch 32"
    epochs = build_config({"local-epochs": 5, "local-steps": 0})
    assert epochs.local_epochs == 5 and local_work(epochs) == "5 local epoch(s) over the client's data in batches of 32"


@pytest.mark.parametrize("override,pattern", [
    ({"strategy": "fedsgd"}, r"^strategy: unknown value 'fedsgd'; allowed: \["),
    ({"dataset": "imagenet"}, r"^dataset: unknown value 'imagenet'; allowed: \["),
    ({"model": "vgg"}, r"^model: unknown value 'vgg'; allowed: \["),
    ({"partition": "powerlaw"}, r"^partition: unknown value 'powerlaw'; allowed: \["),
    ({"alpha": 0.0}, r"^alpha: must be > 0"),
    ({"alpha": -0.5}, r"^alpha: must be > 0"),
    ({"alpha": "high"}, r"^alpha: expected float"),
    ({"device": "tpu"}, r"^device: unknown value 'tpu'"),
    ({"fraction-train": 1.5}, r"^fraction-train: must be in \(0, 1\]"),
    ({"nonsense-key": 1}, r"^nonsense-key: unknown key"),
    ({"server-threads": -1}, r"^server-threads: must be >= 0"),
    ({"round-timeout": 0.0}, r"^round-timeout: must be > 0"),
    ({"min-replies": 0}, r"^min-replies: must be > 0"),
    ({"aggregation": "krum"}, r"^aggregation: unknown value 'krum'; allowed: \['mean', 'median', 'trimmed-mean'\]"),
    ({"trim-fraction": 0.5}, r"^trim-fraction: must be in \[0, 0.5\)"),
    ({"max-client-share": 0.0}, r"^max-client-share: must be in \(0, 1\], got 0.0"),
    ({"max-client-share": 1.5}, r"^max-client-share: must be in \(0, 1\], got 1.5"),
    ({"kd.expert-pass": True}, r"^kd.expert-pass: the expert pass trains kd.local-steps steps, which is 0"),
])
def test_bad_values_are_one_line_naming_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        build_config(override)
    assert "\n" not in str(info.value)


def _run_server(run_config: dict, num_nodes: int = 3) -> InProcessGrid:
    full = {**load_defaults(), **run_config}
    grid = InProcessGrid(client_app, full, num_nodes)
    server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=full))
    return grid


@pytest.mark.parametrize("override,num_nodes,pattern", [
    ({"strategy": "fedsgd"}, 3, "strategy"),
    ({"alpha": 0.0}, 3, "alpha"),
    ({"dataset": "mnist"}, 3, "mnist"),  # missing data set: names the path it looked in
    ({"dataset": "synthetic", "partition": "iid"}, 2500, "num-partitions: 2500 clients but only 2000"),
])
def test_server_rejects_bad_input_before_training(tmp_path, override, num_nodes, pattern):
    run_config = {"output-dir": str(tmp_path), "data-dir": str(tmp_path / "data"), **override}
    with pytest.raises(RuntimeError, match=pattern):
        grid = _run_server(run_config, num_nodes)
    assert "grid" not in locals()


def test_server_rejects_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match="output-dir: cannot write"):
        _run_server({"output-dir": str(blocker / "sub"), "dataset": "synthetic"})


def test_replace_keeps_values_and_applies_changes():
    cfg = build_config({**load_defaults(), **merge_run_config(["conf/fmnist-dir0.1.toml"], cwd=PROJECT_ROOT)})
    changed = cfg.replace(lr=0.5, local_steps=0, local_epochs=2)
    assert changed.lr == 0.5 and changed.alpha == 0.1 and changed.num_server_rounds == 20
    assert (changed.local_steps, changed.local_epochs) == (0, 2)
    assert changed.replace(lr=cfg.lr, local_steps=50, local_epochs=0) == cfg
    with pytest.raises(ConfigError, match="^lr: must be > 0"):
        cfg.replace(lr=-1.0)


def test_warmup_cannot_exceed_rounds():
    with pytest.raises(ConfigError, match="^warmup-rounds: 9 exceeds num-server-rounds 5"):
        build_config({"strategy": "mosaic", "warmup-rounds": 9, "num-server-rounds": 5})


def test_one_heterogeneity_rule_and_one_meta_data_rule():
    assert not heterogeneous(["cnn_small", "cnn_small"], [1.0, 1])
    assert heterogeneous(["cnn_small", "resnet8"], [1.0])
    assert heterogeneous(["cnn_small"], [1.0, 0.5]) and heterogeneous([], ["0.25"])
    assert not config_heterogeneous(load_defaults())
    assert config_heterogeneous({"client-models": "", "client-capacities": "1,0.5"})
    assert meta_data_for("auto", False) == "prototypes" and meta_data_for("auto", True) == "screened"
    for value in ("prototypes", "generated", "both", "screened"):
        assert meta_data_for(value, False) == value
    assert meta_data_for("generated", True) == "generated" and meta_data_for("screened", True) == "screened"
    with pytest.raises(ConfigError, match=r"^mosaic.meta-data: 'prototypes' .* but clients hold cnn_small@0.5;"):
        meta_data_for("prototypes", True, clients="cnn_small@0.5")
    # model families at full width: each family's prototypes through its own experts' heads, on request
    assert meta_data_for("auto", True, widths=False) == "screened"
    assert meta_data_for("prototypes", True, widths=False) == "prototypes"
    assert meta_data_for("both", True, widths=False) == "both"
    with pytest.raises(ConfigError, match=r"^mosaic.meta-data: 'prototypes' .* width-scaled"):
        meta_data_for("prototypes", True, widths=True)
    with pytest.raises(ConfigError, match=r"^mosaic.meta-data: 'clients' .* but clients hold cnn_small, resnet8;"):
        meta_data_for("clients", True, clients="cnn_small, resnet8", widths=False)


def test_a_checkpoint_from_before_the_local_work_rule_still_resumes():
    """Older checkpoints hold local-epochs=1 beside local-steps=50 (the epochs were ignored)."""
    current = build_config({}).to_dict()
    assert current["local-epochs"] == 0 and current["local-steps"] == 50
    assert config_changes({**current, "local-epochs": 1}, current) == []
    epochs = build_config({"local-steps": 0, "local-epochs": 1}).to_dict()
    assert config_changes({**epochs, "local-epochs": 2}, epochs) == ["local-epochs: 2 -> 1"]


def test_a_checkpoint_from_before_the_generator_key_resumes_as_conditional_and_dcgan_does_not():
    """``mosaic.generator`` may not change on resume; a checkpoint without it ran the conditional one."""
    current = build_config({}).to_dict()
    older = {k: v for k, v in current.items() if k not in ("mosaic.generator", "mosaic.dcgan-width")}
    assert config_changes(older, current) == []
    dcgan = build_config({"mosaic.generator": "dcgan"}).to_dict()
    assert config_changes(older, dcgan) == ["mosaic.generator: 'conditional' -> 'dcgan'"]
    assert config_changes(dcgan, {**dcgan, "mosaic.dcgan-width": 16}) == ["mosaic.dcgan-width: 64 -> 16"]


def test_only_the_runs_own_method_settings_must_match_on_resume():
    """Another method's settings do nothing in this run (and a checkpoint written before that
    method existed lacks them); the run's own method's settings must match."""
    current = build_config({"strategy": "fedrs"}).to_dict()
    older = {k: v for k, v in current.items() if not k.startswith("dfrd.")}
    assert config_changes(older, current) == []
    assert config_changes({**current, "dfrd.ema-decay": 0.5}, current) == []
    assert config_changes({**current, "fedrs.alpha": 0.1}, current) == ["fedrs.alpha: 0.1 -> 0.5"]
