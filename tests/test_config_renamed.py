"""The settings namespaced by owner (``kd.*``, ``dp.*``, ``mosaic.*``) and their old names: an
old name works for one release, read as the new one with one warning line per name; old and
new given with different values is a ConfigError; old run folders (config.json, checkpoints
with the old names) are still read and resumed."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.common.config import fuse_dicts

import mosaic_flwr.config as config
from mosaic_flwr.config import (PROJECT_ROOT, RENAMED, ConfigError, build_config, load_defaults, merge_run_config,
                                renamed, spec)
from mosaic_flwr.core.checkpoint import config_changes, load_checkpoint, save_checkpoint, warm_start_changes


@pytest.fixture
def warnings_seen(monkeypatch, caplog):
    """The deprecation lines logged (Flower's logger) from now on, each old name afresh."""
    monkeypatch.setattr(config, "_warned", set())
    caplog.set_level(logging.WARNING, logger="flwr")
    return lambda: [r.getMessage() for r in caplog.records if "is deprecated" in r.getMessage()]


def old_style(values: dict) -> dict:
    """``values`` as a run folder from before the namespaces holds them: every renamed key under
    its old name, and the retired ``preset`` (always ``""`` then)."""
    new_to_old = {new: old for old, new in RENAMED.items()}
    return {"preset": "", **{new_to_old.get(k, k): v for k, v in values.items()}}


def test_every_old_name_maps_to_a_declared_key_and_namespaces_hold_no_top_level_name():
    keys = spec()
    assert set(RENAMED.values()) <= set(keys) and not set(RENAMED) & set(keys)
    assert {new.split(".", 1)[0] for new in RENAMED.values()} == {"kd", "dp", "mosaic"}
    assert "preset" not in keys and "preset" not in load_defaults()
    cfg = build_config({})
    assert (cfg.of("kd").steps, cfg.of("dp").epsilon, cfg.of("mosaic").meta_data) == (100, 0.0, "auto")
    with pytest.raises(AttributeError):
        cfg.kd_steps  # noqa: B018  (the old attribute is gone: a read site left behind fails loudly)


@pytest.mark.parametrize("old,new,value", [
    ("kd-steps", "kd.steps", 7),
    ("distill-gate", "kd.gate", "off"),
    ("report-test-subset", "kd.report-test-subset", 500),
    ("dp-epsilon", "dp.epsilon", 8.0),
    ("dp-accountant", "dp.accountant", "prv"),
    ("meta-data", "mosaic.meta-data", "both"),
    ("mosaic-meta", "mosaic.meta", False),
    ("gen-steps", "mosaic.gen-steps", 3),
])
def test_an_old_name_resolves_as_the_new_one_with_one_warning_line(warnings_seen, old, new, value):
    base = {"strategy": "mosaic"}
    via_old, via_new = build_config({**base, old: value}), build_config({**base, new: value})
    assert via_old == via_new and via_old.to_dict()[new] == value and old not in via_old.to_dict()
    build_config({**base, old: value})  # again: no second line in this process
    assert warnings_seen() == [f"{old} is deprecated: use {new} (the old name stops working in the next release)"]


def test_old_and_new_name_with_different_values_is_a_config_error_and_equal_values_are_not(warnings_seen):
    with pytest.raises(ConfigError, match=r"^kd-steps: the old name of kd\.steps, given beside it with a different "
                                          r"value \(kd-steps=7, kd\.steps=8\); give only kd\.steps$"):
        build_config({"kd-steps": 7, "kd.steps": 8})
    with pytest.raises(ConfigError, match=r"^dp-delta: the old name of dp\.delta"):
        build_config({"dp-delta": 1e-6, "dp.delta": 1e-7})
    assert build_config({"meta-ema": 0.9, "mosaic.meta-ema": "0.9"}).of("mosaic").meta_ema == 0.9


def test_flower_accepts_the_old_names_and_its_merged_config_resolves_them(warnings_seen):
    """Flower refuses an override key that ``pyproject.toml`` does not declare, so each old name
    is declared there as ``""`` (not given); in the config Flower merged (every default present)
    the new name at its default is Flower's, not the user's: the old name's value wins."""
    defaults = load_defaults()
    fused = fuse_dicts(defaults, {"kd-steps": 7, "dp-audit": True}, check_keys=True)
    cfg = build_config(fused)
    assert cfg.of("kd").steps == 7 and cfg.of("dp").audit is True
    assert build_config(defaults) == build_config({})  # the placeholders alone change nothing, silently
    assert len(warnings_seen()) == 2
    with pytest.raises(ConfigError, match=r"^kd-steps: the old name of kd\.steps"):
        build_config({**defaults, "kd.steps": 9, "kd-steps": 7})  # the new one set too, differently


def test_run_config_files_and_strings_with_old_names_merge_as_the_new_ones(tmp_path, warnings_seen):
    old_file = tmp_path / "old.toml"
    old_file.write_text('kd-steps = 50\ndistill-gate = "off"\nproto-k = 3\n[feddf]\ntransfer-size = 100\n')
    merged = merge_run_config([str(old_file), "kd.steps=60 dp-epsilon=8.0"], cwd=PROJECT_ROOT)
    assert merged == {"kd.steps": 60, "kd.gate": "off", "mosaic.proto-k": 3, "feddf.transfer-size": 100,
                      "dp.epsilon": 8.0}  # a later argument's new name beats an earlier file's old one
    assert sorted(m.split()[0] for m in warnings_seen()) == ["distill-gate", "dp-epsilon", "kd-steps", "proto-k"]
    with pytest.raises(ConfigError, match=r"^kd-steps: the old name of kd\.steps"):
        merge_run_config(["kd-steps=5 kd.steps=6"])


def test_replace_takes_an_old_name_and_the_client_builds_quietly(warnings_seen):
    cfg = build_config({})
    assert cfg.replace(kd_steps=5).of("kd").steps == 5
    assert cfg.replace(**{"kd.steps": 6}).of("kd").steps == 6
    assert warnings_seen() == ["kd-steps is deprecated: use kd.steps (the old name stops working in the next release)"]
    build_config({"gen-lr": 0.01}, warn=False)  # the ClientApp's build: the server has said it
    assert len(warnings_seen()) == 1


def test_the_retired_preset_key():
    assert "preset" not in renamed({"preset": "", "alpha": 1.0})
    with pytest.raises(ConfigError, match=r"^preset: presets are run-config files now: instead of preset='x' "
                                          r"pass --run-config conf/x\.toml"):
        merge_run_config(["preset='x'"])


def test_an_old_run_folders_config_json_is_read_and_compares_equal(warnings_seen):
    """A config.json written before the namespaces (old names, ``preset``) builds the same
    config, and resume's and init-from's comparisons see no change against today's."""
    current = build_config({"strategy": "mosaic", "kd.steps": 30, "mosaic.meta-data": "both"}).to_dict()
    saved = json.loads(json.dumps(old_style(current)))  # as written to disk
    assert "kd-steps" in saved and "kd.steps" not in saved and saved["preset"] == ""
    assert build_config(saved).to_dict() == current
    assert config_changes(saved, current) == [] and warm_start_changes(saved, current) == []
    assert config_changes({**saved, "kd-steps": 50}, current) == ["kd.steps: 50 -> 30"]
    assert config_changes({**saved, "dp-epsilon": 8.0}, {**current, "strategy": "fedavg"}) == [
        "dp.epsilon: 8.0 -> 0.0", "strategy: 'mosaic' -> 'fedavg'"]  # the shared namespaces count for any method


def test_a_checkpoint_with_the_old_names_resumes(tmp_path):
    from tests.test_e2e_inprocess import run_inprocess

    base = {"strategy": "fedavg", "dataset": "synthetic", "partition": "iid", "local-steps": 2,
            "min-partition-size": 1, "kd.steps": 20}
    out = run_inprocess(tmp_path, num_nodes=2, **base, **{"num-server-rounds": 1})["dir"]
    state = load_checkpoint(out)
    assert state["config"]["kd.steps"] == 20
    state["config"] = old_style(state["config"])  # a checkpoint written before the namespaces
    save_checkpoint(out, state)
    assert load_checkpoint(out)["config"]["kd-steps"] == 20
    run_inprocess(tmp_path, num_nodes=2, **base, **{"resume": str(out), "num-server-rounds": 2})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1 and summary["rounds"] == 2
    state = load_checkpoint(out)
    state["config"] = {**old_style(state["config"]), "kd-steps": 40}  # what it ran differs: refused
    save_checkpoint(out, state)
    with pytest.raises(Exception, match=r"kd\.steps: 40 -> 20"):
        run_inprocess(tmp_path, num_nodes=2, **base, **{"resume": str(out), "num-server-rounds": 3})
