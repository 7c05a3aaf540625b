"""The privacy audit end to end: audit.json after a run, the report line, DP runs compared."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtune.common.config import RunConfig
from fedtune.common.one_run_audit import best_guess
from fedtune.common.run_dir import AUDIT_RELEASES_DIR
from fedtune.common.task import cached_task
from fedtune.simulations.audit import audit_run, initial_scores, membership_scores
from fedtune.simulations.centralized import train_centralized
from fedtune.simulations.report import audit_line, summarise, write_report
from tests.simulations.test_cli import fedtune

FIELDS = {"epsilon_lower_bound", "canaries", "confidence", "epsilon_reported", "delta",
          "guesses", "guesses_right", "tpr_at_1pct_fpr", "defect", "meaning"}


def tiny(model, data, out, **extra) -> RunConfig:
    return RunConfig.from_mapping({"model.name": str(model), "data.path": str(data),
                                   "federation.num_clients": 2, "federation.rounds": 1,
                                   "train.batch_size": 8, "train.lr": 0.01,
                                   "output.dir": str(out), **extra})


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_centralised_audit_writes_audit_json_and_the_report_shows_it(tiny_model_dir,
                                                                      toy_data_dir, tmp_path):
    config = tiny(tiny_model_dir, toy_data_dir, tmp_path / "run",
                  **{"audit.enabled": True, "audit.canaries": 40})
    train_centralized(config)
    body = audit_run(config, centralized=True)
    assert json.loads((tmp_path / "run" / "audit.json").read_text()) == body
    assert set(body) >= FIELDS and body["canaries"] == 40 and body["confidence"] == 0.95
    assert body["epsilon_reported"] is None and body["defect"] is False
    assert body["epsilon_lower_bound"] >= 0 and 0 < body["delta"] < 0.1
    assert body["underpowered"] == (body["epsilon_detectable_max"] < 1)
    assert body["epsilon_lower_bound"] <= body["epsilon_detectable_max"]
    task = cached_task(config)  # the guesses rank what training changed, not the raw scores
    canaries = task.canaries()
    change = membership_scores(task, canaries.rows) - initial_scores(task, canaries.rows)
    expect = best_guess(change, canaries.included, body["delta"], 0.95)
    assert body["guesses_tried"] == [{"in": g.positives, "out": g.negatives, "right": g.right,
                                      "epsilon": g.epsilon} for g in expect]
    write_report(tmp_path / "run")
    assert "Privacy audit: epsilon >= " in (tmp_path / "run" / "report.md").read_text()


def test_canaries_are_scored_by_what_training_changed(tiny_model_dir, toy_data_dir, tmp_path):
    from fedtune.common.adapter import trainable_state

    config = tiny(tiny_model_dir, toy_data_dir, tmp_path / "run",
                  **{"audit.enabled": True, "audit.canaries": 40})
    train_centralized(config)
    task = cached_task(config)
    rows, trained = task.canaries().rows, trainable_state(task.model)
    final, initial = membership_scores(task, rows), initial_scores(task, rows)
    left = trainable_state(task.model)  # the trained adapter is back in place afterwards
    assert all(np.array_equal(trained[key], left[key]) for key in trained)
    assert np.array_equal(membership_scores(task, rows), final)
    assert not np.allclose(final, initial)  # the seed's head scores the canaries otherwise


def test_without_dp_the_audit_measures_at_1e5_unless_a_delta_is_set(tiny_model_dir,
                                                                   toy_data_dir, tmp_path):
    from fedtune.simulations.audit import NO_DP_DELTA, reported_privacy

    config = tiny(tiny_model_dir, toy_data_dir, tmp_path,
                  **{"audit.enabled": True, "audit.canaries": 20})
    epsilon, delta, meaning = reported_privacy(config, cached_task(config), tmp_path)
    assert epsilon is None and delta == NO_DP_DELTA == 1e-5 and meaning.startswith("no DP")
    told = config.with_overrides({"privacy.delta": 1e-3})
    assert reported_privacy(told, cached_task(told), tmp_path)[1] == 1e-3


def test_settings_of_a_disabled_audit_change_nothing(tiny_model_dir, toy_data_dir, tmp_path):
    plain = tiny(tiny_model_dir, toy_data_dir, tmp_path / "plain")
    off = tiny(tiny_model_dir, toy_data_dir, tmp_path / "off",
               **{"audit.canaries": 999, "audit.clients": 2, "audit.length": 3})
    assert without_time(train_centralized(plain)) == without_time(train_centralized(off))


def test_the_report_puts_the_bound_beside_the_claim_and_names_a_defect():
    rows = [{"round": 1, "accuracy": 0.5, "loss": 1.0, "epsilon_max": 2.0}]
    audit = {"epsilon_lower_bound": 2.5, "epsilon_reported": 2.0, "confidence": 0.95,
             "guesses": 50, "guesses_right": 49, "canaries": 200, "tpr_at_1pct_fpr": 0.4,
             "defect": True}
    text = summarise(rows, audit)
    assert "epsilon >= 2.500 at 95% confidence beside ledger epsilon 2.000" in text
    assert "DEFECT" in text
    assert "DEFECT" not in summarise(rows, {**audit, "epsilon_lower_bound": 1.0,
                                            "defect": False})


def test_an_audit_too_weak_for_the_claim_says_what_it_can_detect_at_most():
    audit = {"epsilon_lower_bound": 0.0, "epsilon_reported": None, "confidence": 0.95,
             "guesses": 20, "guesses_right": 8, "canaries": 40, "tpr_at_1pct_fpr": 0.06,
             "defect": False, "delta": 0.02, "epsilon_detectable_max": 0.0, "underpowered": True}
    line = audit_line(audit)
    assert "This audit can detect at most epsilon 0.000" in line and "less than 1:" in line
    strong = {**audit, "epsilon_detectable_max": 2.7, "underpowered": False}
    assert "can detect at most" not in audit_line(strong)
    claimed = {**audit, "epsilon_reported": 8.0, "epsilon_detectable_max": 2.7}
    assert "less than the ledger's 8.000" in audit_line(claimed)


def test_a_low_bound_without_dp_never_reads_as_no_leakage():
    audit = {"epsilon_lower_bound": 0.3, "epsilon_reported": None, "confidence": 0.95,
             "guesses": 40, "guesses_right": 28, "canaries": 500, "tpr_at_1pct_fpr": 0.02,
             "defect": False, "delta": 1e-5, "epsilon_detectable_max": 4.6,
             "underpowered": False}
    assert "not that the data are safe" in audit_line(audit)
    assert "not that the data are safe" not in audit_line({**audit, "epsilon_lower_bound": 1.2})
    assert "not that the data are safe" not in audit_line({**audit, "epsilon_reported": 8.0})


@pytest.mark.slow
def test_a_dp_simulation_is_audited_against_the_canary_clients_ledger(tiny_model_dir,
                                                                     toy_data_dir, tmp_path):
    out = tmp_path / "run"
    done = fedtune("simulate", "--model", tiny_model_dir, "--data", toy_data_dir,
                   "--num-clients", 2, "--rounds", 1, "--batch-size", 8, "--dp", "--epsilon", 2,
                   "--audit", "--canaries", 40, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    body = json.loads((out / "audit.json").read_text())
    ledgers = [json.loads(p.read_text()) for p in (out / "ledgers").glob("ledger-*.json")]
    holder = [b for b in ledgers if b["rounds"][0]["client"] == "client-0"]
    assert len(holder) == 1 and body["epsilon_reported"] == pytest.approx(holder[0]["epsilon"])
    assert body["delta"] == holder[0]["delta"]
    assert body["epsilon_lower_bound"] <= body["epsilon_reported"] and not body["defect"]
    assert body["vantage"] == "the last release of the client holding each canary"
    kept = sorted(p.name for p in (out / AUDIT_RELEASES_DIR).iterdir())
    assert kept == ["client-0-round-0001.npz"]  # the canary client's, no other's
    assert "audit: epsilon >= " not in done.stderr and "Privacy audit" in done.stdout
    assert fedtune("report", out).returncode == 0
    assert "Privacy audit" in (out / "report.md").read_text()


def test_a_causal_lm_audit_adds_the_secrets_exposure(tiny_gpt2_dir, instruction_data_dir,
                                                     tmp_path):
    config = tiny(tiny_gpt2_dir, instruction_data_dir, tmp_path / "run",
                  **{"model.task": "causal-lm", "audit.enabled": True, "audit.canaries": 20,
                     "audit.references": 15})
    train_centralized(config)
    body = audit_run(config, centralized=True)
    assert body["exposure_cap"] == pytest.approx(4.0)  # log2(15 + 1)
    assert 0 <= body["exposure_included_mean"] <= body["exposure_max"] <= 4.0
    assert body["score"].startswith("minus the secret's loss")


def test_a_deployment_refuses_an_audit_it_could_not_run():
    from fedtune.common.config import ConfigError
    from fedtune.server.app import config_from_run_config

    with pytest.raises(ConfigError, match=r"audit\.enabled"):
        config_from_run_config({"audit.enabled": True, "output.dir": "unused"})


@pytest.mark.parametrize(("flags", "message"), [
    (["--canary-clients", "3", "--num-clients", "2"], "audit.clients"),
    (["--canaries", "5"], "audit.canaries"),
])
def test_bad_audit_settings_exit_2_with_one_line(flags, message, tmp_path, capsys):
    from fedtune.cli import main

    assert main(["simulate", "--audit", *flags, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


def test_client_level_dp_is_compared_with_the_run_s_client_level_epsilon(tiny_model_dir,
                                                                        toy_data_dir, tmp_path):
    from fedtune.common.client_dp import client_level_plan
    from fedtune.common.task import cached_task
    from fedtune.simulations.audit import reported_privacy

    config = tiny(tiny_model_dir, toy_data_dir, tmp_path,
                  **{"privacy.dp": True, "privacy.level": "client", "audit.enabled": True,
                     "audit.canaries": 20})
    rows = [{"round": 1, "epsilon_client_level": 0.7}, {"round": 2, "epsilon_client_level": 1.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    epsilon, delta, meaning = reported_privacy(config, cached_task(config), tmp_path)
    assert epsilon == 1.2 and delta == client_level_plan(config)[1]
    assert meaning.startswith("client-level DP")


def test_a_simulation_scores_canaries_in_the_release_of_the_client_holding_them(
        tiny_model_dir, toy_data_dir, tmp_path):
    from fedtune.common.adapter import load_trainable_state, trainable_state
    from fedtune.common.canaries import keep_release, releases_directory

    config = tiny(tiny_model_dir, toy_data_dir, tmp_path / "run",
                  **{"audit.enabled": True, "audit.canaries": 40})
    train_centralized(config)
    task = cached_task(config)
    canaries, trained = task.canaries(), trainable_state(task.model)
    expect = membership_scores(task, canaries.rows) - initial_scores(task, canaries.rows)
    keep_release(releases_directory(tmp_path / "run"), 0, 1, trained)
    load_trainable_state(task.model, task.initial_adapter)  # no checkpoint: the release decides
    body = audit_run(config, centralized=False)
    assert body["vantage"] == "the last release of the client holding each canary"
    right = best_guess(expect, canaries.included, body["delta"], 0.95)
    assert [g["right"] for g in body["guesses_tried"]] == [g.right for g in right]
    assert not np.allclose(expect, 0)

    client_level = config.with_overrides({"privacy.dp": True, "privacy.level": "client"})
    (tmp_path / "run" / "metrics.jsonl").write_text('{"round": 1}\n')
    body = audit_run(client_level, centralized=False)  # its noise is the server's: global model
    assert body["vantage"] == "the final global adapter"
    two = config.with_overrides({"audit.clients": 2, "federation.num_clients": 2})
    assert audit_run(two, centralized=False)["vantage"] == "the final global adapter"  # no 1's


def test_only_a_simulated_canary_client_keeps_its_release_where_simulate_said(
        tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fedtune.client.local_round import _keep_for_audit
    from fedtune.client.node import Node
    from fedtune.common.canaries import RELEASES_ENV, kept_release

    config = tiny(tiny_model_dir, toy_data_dir, tmp_path / "run",
                  **{"audit.enabled": True, "audit.clients": 1})
    state = {"w": np.ones(3, np.float32)}
    holder = Node.from_node_config({"partition-id": 0, "num-partitions": 2})
    monkeypatch.delenv(RELEASES_ENV, raising=False)
    _keep_for_audit(SimpleNamespace(config=config, node=holder, server_round=1), state)
    assert not (tmp_path / "run").exists()  # a run config alone makes no node write anything

    monkeypatch.setenv(RELEASES_ENV, str(tmp_path / "kept"))
    deployed = Node.from_node_config({"data-path": str(toy_data_dir), "budget-epsilon": 8.0})
    for node in (deployed, Node.from_node_config({"partition-id": 1, "num-partitions": 2})):
        _keep_for_audit(SimpleNamespace(config=config, node=node, server_round=1), state)
    assert not (tmp_path / "kept").exists()  # no canaries there: nothing kept
    off = config.with_overrides({"audit.enabled": False})
    _keep_for_audit(SimpleNamespace(config=off, node=holder, server_round=1), state)
    assert not (tmp_path / "kept").exists()
    _keep_for_audit(SimpleNamespace(config=config, node=holder, server_round=1), state)
    assert np.array_equal(kept_release(tmp_path / "kept", 0)["w"], state["w"])


def test_a_late_reply_never_replaces_a_newer_round_s_kept_release(tmp_path):
    from fedtune.common.adapter_state import to_npz
    from fedtune.common.canaries import keep_release, kept_release

    keep_release(tmp_path, 0, 2, {"w": np.full(2, 2.0)})
    keep_release(tmp_path, 0, 1, {"w": np.full(2, 1.0)})  # round 1's training finished last
    keep_release(tmp_path, 1, 1, {"w": np.full(2, 9.0)})  # another client's is its own
    assert kept_release(tmp_path, 0)["w"].tolist() == [2.0, 2.0]
    assert not (tmp_path / "client-0-round-0001.npz").exists()
    keep_release(tmp_path, 0, 3, {"w": np.full(2, 3.0)})
    assert kept_release(tmp_path, 0)["w"].tolist() == [3.0, 3.0]
    assert kept_release(tmp_path, 1)["w"].tolist() == [9.0, 9.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # older rounds go
        "client-0-round-0003.npz", "client-1-round-0001.npz"]
    (tmp_path / "client-2.npz").write_bytes(to_npz({"w": np.full(2, 7.0)}))  # an older fedtune's
    assert kept_release(tmp_path, 2)["w"].tolist() == [7.0, 7.0]
    keep_release(tmp_path, 2, 1, {"w": np.full(2, 8.0)})
    assert kept_release(tmp_path, 2)["w"].tolist() == [8.0, 8.0]
    assert not (tmp_path / "client-2.npz").exists()


def test_a_new_run_never_audits_releases_an_earlier_unfinished_run_left(tmp_path):
    from fedtune.common.canaries import keep_release, kept_release, releases_directory
    from fedtune.server.federation import prepare_run_dir

    keep_release(releases_directory(tmp_path), 0, 1, {"w": np.zeros(2)})
    prepare_run_dir(tmp_path, RunConfig.from_mapping({"output.dir": str(tmp_path)}),
                    resume=False)
    assert kept_release(releases_directory(tmp_path), 0) is None
    elsewhere = tmp_path / "elsewhere"  # a link is removed, never what it points at
    keep_release(elsewhere, 0, 1, {"w": np.zeros(2)})
    releases_directory(tmp_path).symlink_to(elsewhere)
    (tmp_path / "config.json").unlink()
    prepare_run_dir(tmp_path, RunConfig.from_mapping({"output.dir": str(tmp_path)}),
                    resume=False)
    assert not releases_directory(tmp_path).exists() and kept_release(elsewhere, 0) is not None


def test_a_deployed_node_never_inherits_a_simulation_s_release_directory(monkeypatch):
    from fedtune.client.deploy import node_env
    from fedtune.client.policy import NodePolicy
    from fedtune.common.canaries import RELEASES_ENV

    monkeypatch.setenv(RELEASES_ENV, "/tmp/some-run/audit-releases")
    assert RELEASES_ENV not in node_env(NodePolicy(require_dp=False))


def test_the_audit_line_names_the_adapter_it_scored():
    audit = {"epsilon_lower_bound": 1.2, "epsilon_reported": None, "confidence": 0.95,
             "guesses": 30, "guesses_right": 29, "canaries": 300, "tpr_at_1pct_fpr": 0.1,
             "defect": False, "vantage": "the final global adapter"}
    assert "scored in the final global adapter)" in audit_line(audit)
