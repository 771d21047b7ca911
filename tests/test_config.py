import pytest
from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from mosaic_flwr.config import SPEC, ConfigError, build_config, load_defaults
from mosaic_flwr.inprocess import InProcessGrid
from server_app.app import main as server_main


def test_defaults_cover_spec_exactly():
    assert set(load_defaults()) == set(SPEC)
    cfg = build_config({})
    assert cfg.strategy in ("fedavg", "fedprox", "mosaic", "feddf") and cfg.alpha > 0


def test_casts_untyped_values():
    cfg = build_config({"strategy": "fedavg", "alpha": 1, "num-server-rounds": 3.0, "download": "true",
                        "seed": "7"})
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float)
    assert cfg.num_server_rounds == 3 and cfg.download is True and cfg.seed == 7


def test_preset_then_explicit_override():
    defaults = load_defaults()
    cfg = build_config({**defaults, "preset": "fmnist-dir0.1"})
    assert cfg.alpha == 0.1 and cfg.num_server_rounds == 20
    cfg = build_config({**defaults, "preset": "fmnist-dir0.1", "alpha": 0.3})
    assert cfg.alpha == 0.3 and cfg.num_server_rounds == 20


@pytest.mark.parametrize("override,pattern", [
    ({"strategy": "fedsgd"}, r"^strategy: unknown value 'fedsgd'; allowed: \["),
    ({"dataset": "imagenet"}, r"^dataset: unknown value 'imagenet'; allowed: \["),
    ({"model": "vgg"}, r"^model: unknown value 'vgg'; allowed: \["),
    ({"partition": "powerlaw"}, r"^partition: unknown value 'powerlaw'; allowed: \["),
    ({"alpha": 0.0}, r"^alpha: must be > 0"),
    ({"alpha": -0.5}, r"^alpha: must be > 0"),
    ({"alpha": "high"}, r"^alpha: expected float"),
    ({"device": "tpu"}, r"^device: unknown value 'tpu'"),
    ({"preset": "nope"}, r"^preset: unknown value 'nope'; allowed: \["),
    ({"fraction-train": 1.5}, r"^fraction-train: must be in \(0, 1\]"),
    ({"nonsense-key": 1}, r"^nonsense-key: unknown key"),
    ({"server-threads": -1}, r"^server-threads: must be >= 0"),
    ({"round-timeout": 0.0}, r"^round-timeout: must be > 0"),
    ({"min-replies": 0}, r"^min-replies: must be > 0"),
    ({"aggregation": "krum"}, r"^aggregation: unknown value 'krum'; allowed: \['mean', 'median', 'trimmed-mean'\]"),
    ({"trim-fraction": 0.5}, r"^trim-fraction: must be in \[0, 0.5\)"),
    ({"max-client-share": 0.0}, r"^max-client-share: must be in \(0, 1\], got 0.0"),
    ({"max-client-share": 1.5}, r"^max-client-share: must be in \(0, 1\], got 1.5"),
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


def test_replace_keeps_preset_values_and_applies_changes():
    cfg = build_config({**load_defaults(), "preset": "fmnist-dir0.1"})
    changed = cfg.replace(lr=0.5)
    assert changed.lr == 0.5 and changed.alpha == 0.1 and changed.preset == "fmnist-dir0.1"
    with pytest.raises(ConfigError, match="^lr: must be > 0"):
        cfg.replace(lr=-1.0)


def test_warmup_cannot_exceed_rounds():
    with pytest.raises(ConfigError, match="^warmup-rounds: 9 exceeds num-server-rounds 5"):
        build_config({"strategy": "mosaic", "warmup-rounds": 9, "num-server-rounds": 5})
