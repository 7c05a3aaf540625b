"""server/config_guard.py: a restart keeps the run's configuration unless told otherwise."""

from __future__ import annotations

import json

import pytest

from fedtune.common.config import DP_SGD_STRATEGY, DP_SGD_TRAINING, PLAIN_TRAINING, RunConfig
from fedtune.common.run_dir import CONFIG_FILE
from fedtune.server.config_guard import (
    ConfigChangeError,
    changed_keys,
    check_restart,
    restarted,
)


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
    new = saved.with_overrides({"model.pooling": "pooler", "secagg.enabled": True, "train.lr": 0.5})

    assert changed_keys(saved, new) == ["model.pooling", "secagg.enabled", "train.lr"]


def test_a_value_written_out_equal_to_the_default_of_the_runs_kind_is_no_change():
    saved = RunConfig().with_overrides({"privacy.dp": True})  # training left to DP-SGD's defaults
    spelled_out = saved.with_overrides({
        "train.batch_size": DP_SGD_TRAINING["batch_size"], "train.lr": DP_SGD_TRAINING["lr"],
        "train.local_epochs": DP_SGD_TRAINING["local_epochs"],
        "federation.strategy": DP_SGD_STRATEGY, "lora.freeze_a": True})

    assert changed_keys(saved, spelled_out) == []
    # against the default, not the zero that stood for it: 0 -> 4 would have hidden 4 -> 2
    other = saved.with_overrides({"train.local_epochs": 2})
    assert changed_keys(saved, other) == ["train.local_epochs"]


def test_a_switch_to_dp_sgd_names_the_training_values_it_moves(tmp_path):
    saved, run_dir = started_run(tmp_path)
    dp = RunConfig().with_overrides({"privacy.dp": True})

    with pytest.raises(ConfigChangeError) as refused:
        check_restart(run_dir, dp, accept=False)

    moved = {"privacy.dp", "train.batch_size", "train.head_lr", "train.local_epochs", "train.lr"}
    assert set(changed_keys(saved, dp)) == moved
    assert restarted(saved, dp).head_init == "random"  # where the run's head started, as lora
    assert f"train.batch_size ({PLAIN_TRAINING['batch_size']!r} -> " \
           f"{DP_SGD_TRAINING['batch_size']!r})" in str(refused.value)


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

    assert "lora.freeze_a" not in changed_keys(saved, dp)
    check_restart(run_dir, dp, accept=True)

    now = RunConfig.from_mapping(json.loads((run_dir / CONFIG_FILE).read_text()))
    assert now.privacy.dp and now.adapter.freeze_a is False  # A keeps training, as it did


def test_a_release_that_changes_a_default_changes_no_running_run(tmp_path, monkeypatch):
    import fedtune.common.config as config_module

    started = RunConfig().with_overrides({"privacy.dp": True}).resolved()  # as saved by a run
    _, run_dir = started_run(tmp_path, **started.to_flat())
    newer = {**DP_SGD_TRAINING, "lr": DP_SGD_TRAINING["lr"] * 2}
    monkeypatch.setattr(config_module, "DP_SGD_TRAINING", newer)
    same_toml = RunConfig().with_overrides({"privacy.dp": True})
    assert same_toml.training.lr == newer["lr"]  # a new run would take the new default

    assert check_restart(run_dir, same_toml, accept=False) == []
    check_restart(run_dir, same_toml.with_overrides({"secagg.enabled": True}), accept=True)
    now = RunConfig.from_mapping(json.loads((run_dir / CONFIG_FILE).read_text()))
    assert now.training.lr == DP_SGD_TRAINING["lr"] and now.secagg.enabled
    assert now.train.lr == DP_SGD_TRAINING["lr"]  # written out, not a zero that would move


def test_resolved_writes_out_every_default_of_the_runs_kind_and_nothing_else():
    plain, dp = RunConfig(), RunConfig().with_overrides({"privacy.dp": True})

    assert plain.resolved().train.lr == PLAIN_TRAINING["lr"]
    assert dp.resolved().train.batch_size == DP_SGD_TRAINING["batch_size"]
    assert dp.resolved().federation.strategy == DP_SGD_STRATEGY
    assert dp.resolved().lora.freeze_a is True and plain.resolved().lora.freeze_a is False
    assert dp.resolved().resolved() == dp.resolved()
    assert dp.resolved().training == dp.training and dp.resolved().adapter == dp.adapter


def test_a_resumed_run_is_sized_from_the_configuration_it_goes_on_with(tmp_path):
    from fedtune.server.config_guard import continued
    from fedtune.server.fleet_limits import fleet_limits

    assert continued(tmp_path / "nothing", RunConfig()) is None
    _, run_dir = started_run(tmp_path, **{"secagg.enabled": True})  # plain: A and B train
    dp = RunConfig().with_overrides({"secagg.enabled": True, "privacy.dp": True,
                                     "federation.rounds": 8})
    check_restart(run_dir, dp, accept=True)

    goes_on = continued(run_dir, dp)
    assert goes_on.adapter.freeze_a is False and goes_on.federation.rounds == 8
    # the TOML alone (FFA-LoRA under DP-SGD) would size the proxy for half the adapter
    assert fleet_limits(goes_on).largest_object > fleet_limits(dp).largest_object


def test_fedtune_server_sizes_and_checks_a_resumed_run_by_its_saved_configuration(tmp_path,
                                                                                  capsys):
    from fedtune.server.deploy import RUN_DIR, ServerSettings, _guard_config

    state = tmp_path / "state"
    state.mkdir()
    started_run(state, **{"secagg.enabled": True})  # state/run: plain, A and B train
    assert RUN_DIR == "run"
    toml = tmp_path / "server.toml"
    toml.write_text("[privacy]\ndp = true\n[secagg]\nenabled = true\n[federation]\nrounds = 9\n")
    settings = ServerSettings(certs_dir=tmp_path, state_dir=state, config_file=toml, nodes=[],
                              accept_config_change=True)

    used = _guard_config(settings)

    assert used.privacy.dp and used.adapter.freeze_a is False  # not the TOML's FFA-LoRA
    assert used.output.dir == str(state / "run")
    said = capsys.readouterr().out
    assert "changed configuration (privacy.dp, train.batch_size" in said
    assert "keeps lora.freeze_a = False, which the TOML leaves to its default (True)" in said
    assert "now ends after round 9, the TOML's federation.rounds (its saved configuration " \
           "says 5)" in said and used.federation.rounds == 9


def test_fedtune_server_stops_a_killed_servers_leftovers_before_its_guard_rewrites_the_config(
        tmp_path, monkeypatch):
    from fedtune.server import deploy

    calls = []
    monkeypatch.setattr(deploy, "_check_inputs", lambda settings: (None, None, None))
    monkeypatch.setattr(deploy, "_stop_leftovers", lambda state: calls.append("leftovers"))

    def guard(settings):
        calls.append("guard")
        raise ConfigChangeError("refused")

    monkeypatch.setattr(deploy, "_guard_config", guard)
    settings = deploy.ServerSettings(certs_dir=tmp_path, state_dir=tmp_path / "state",
                                     config_file=tmp_path / "server.toml", nodes=[])
    with pytest.raises(ConfigChangeError):
        deploy.serve(settings)
    assert calls == ["leftovers", "guard"]  # a leftover ServerApp never runs on a rewritten config


def test_a_line_removed_from_the_toml_keeps_the_runs_value_and_says_so():
    from fedtune.server.config_guard import kept_from_the_run

    saved = RunConfig().with_overrides({"train.lr": 0.005}).resolved()
    removed = RunConfig()

    assert changed_keys(saved, removed) == []
    assert kept_from_the_run(saved, removed) == {"train.lr": (0.005, PLAIN_TRAINING["lr"])}
    assert kept_from_the_run(saved, removed.with_overrides({"train.lr": 0.005})) == {}


def test_a_run_saved_with_its_defaults_unwritten_is_pinned_when_it_resumes(tmp_path):
    from fedtune.server.federation import prepare_run_dir

    saved, run_dir = started_run(tmp_path, **{"privacy.dp": True})  # zeros, as releases wrote
    assert json.loads((run_dir / CONFIG_FILE).read_text())["train"]["lr"] == 0

    prepare_run_dir(run_dir, saved, resume=True)

    pinned = json.loads((run_dir / CONFIG_FILE).read_text())
    assert pinned["train"]["lr"] == DP_SGD_TRAINING["lr"] and pinned["lora"]["freeze_a"] is True
    assert RunConfig.from_mapping(pinned) == saved.resolved()
