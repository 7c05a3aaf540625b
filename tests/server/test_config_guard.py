"""server/config_guard.py: a restart keeps the run's configuration unless told otherwise."""

from __future__ import annotations

import json

import pytest

from fedtune.common.config import RunConfig
from fedtune.common.run_dir import CONFIG_FILE
from fedtune.server.config_guard import ConfigChangeError, changed_keys, check_restart


def started_run(tmp_path, **overrides) -> tuple[RunConfig, object]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = RunConfig().with_overrides({"output.dir": str(run_dir), **overrides})
    (run_dir / CONFIG_FILE).write_text(saved.to_json())
    return saved, run_dir


def test_only_rounds_and_the_run_directory_may_change():
    saved = RunConfig()
    new = saved.with_overrides({"federation.rounds": 9, "output.dir": "elsewhere"})

    assert changed_keys(saved, new) == []


def test_the_settings_of_an_audit_neither_side_runs_may_change():
    saved = RunConfig().with_overrides({"audit.canaries": 200})  # an earlier release's default
    assert changed_keys(saved, RunConfig()) == []
    audited = RunConfig().with_overrides({"audit.enabled": True})
    assert changed_keys(saved, audited) == ["audit.canaries", "audit.enabled"]


def test_every_other_difference_is_named_in_order():
    saved = RunConfig()
    new = saved.with_overrides({"privacy.dp": True, "secagg.enabled": True, "train.lr": 0.5})

    assert changed_keys(saved, new) == ["privacy.dp", "secagg.enabled", "train.lr"]


def test_a_changed_restart_is_refused_with_the_keys_and_values(tmp_path):
    saved, run_dir = started_run(tmp_path)
    new = saved.with_overrides({"privacy.dp": True, "federation.rounds": 7})

    with pytest.raises(ConfigChangeError) as refused:
        check_restart(run_dir, new, accept=False)

    assert "privacy.dp (False -> True)" in str(refused.value)
    assert "federation.rounds" not in str(refused.value)
    assert json.loads((run_dir / CONFIG_FILE).read_text())["privacy"]["dp"] is False


def test_an_accepted_change_becomes_the_runs_configuration_and_the_old_one_is_kept(tmp_path):
    saved, run_dir = started_run(tmp_path)
    new = saved.with_overrides({"secagg.enabled": True, "output.dir": "ignored"})

    changed = check_restart(run_dir, new, accept=True)

    assert changed == ["secagg.enabled"]
    now = json.loads((run_dir / CONFIG_FILE).read_text())
    assert now["secagg"]["enabled"] is True and now["output"]["dir"] == str(run_dir)
    [kept] = run_dir.glob("config.replaced-*.json")
    assert json.loads(kept.read_text())["secagg"]["enabled"] is False


def test_a_new_run_and_an_unchanged_restart_pass(tmp_path):
    assert check_restart(tmp_path / "nothing", RunConfig(), accept=False) == []
    saved, run_dir = started_run(tmp_path)
    assert check_restart(run_dir, saved.with_overrides({"federation.rounds": 5}),
                         accept=False) == []


def test_a_setting_the_new_toml_leaves_unset_keeps_what_the_run_used(tmp_path):
    # a DP-SGD run started before FFA-LoRA became the default saved `freeze_a: false`
    saved, run_dir = started_run(tmp_path, **{"privacy.dp": True, "lora.freeze_a": False})
    same_toml = RunConfig().with_overrides({"privacy.dp": True})  # freeze_a unset: on under DP

    assert changed_keys(saved, same_toml) == []
    assert check_restart(run_dir, same_toml, accept=False) == []
    # an explicit other value is a change; the unset one, accepted with another change, is
    # written out as the run used it, so the adapter keeps its shape
    explicit = same_toml.with_overrides({"lora.freeze_a": True})
    assert changed_keys(saved, explicit) == ["lora.freeze_a"]
    check_restart(run_dir, same_toml.with_overrides({"train.lr": 0.5}), accept=True)
    now = RunConfig.from_mapping(json.loads((run_dir / CONFIG_FILE).read_text()))
    assert now.lora.freeze_a is False and now.train.lr == 0.5


def test_an_accepted_switch_to_dp_keeps_the_adapters_shape(tmp_path):
    saved, run_dir = started_run(tmp_path)  # plain: FFA-LoRA off, lora.freeze_a unset
    dp = RunConfig().with_overrides({"privacy.dp": True})

    assert changed_keys(saved, dp) == ["privacy.dp"]
    check_restart(run_dir, dp, accept=True)

    now = RunConfig.from_mapping(json.loads((run_dir / CONFIG_FILE).read_text()))
    assert now.privacy.dp and now.adapter.freeze_a is False  # A keeps training, as it did
