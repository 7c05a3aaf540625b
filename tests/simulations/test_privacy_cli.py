"""Differential privacy through `fedtune simulate`: ledgers, budgets, refusals, resume."""

from __future__ import annotations

import json

import pytest

from fedtune.client.dp_plan import plan_round
from fedtune.common.config import RunConfig
from fedtune.common.privacy import epsilon_spent
from fedtune.common.task import cached_task
from fedtune.server.metrics_log import read_rounds
from tests.simulations.test_cli import fedtune


def ledgers(run_dir) -> dict[str, list[dict]]:
    """Ledger entries keyed by the client that wrote them."""
    found = {}
    for path in sorted((run_dir / "ledgers").glob("ledger-*.json")):
        body = json.loads(path.read_text())
        found[body["rounds"][0]["client"]] = body["rounds"]
    return found


@pytest.mark.slow
def test_a_client_at_its_budget_refuses_and_the_run_goes_on_without_it(
        tiny_model_dir, toy_data_dir, tmp_path):
    settings = {"model.name": str(tiny_model_dir), "data.path": str(toy_data_dir),
                "federation.num_clients": 3, "federation.rounds": 3, "train.batch_size": 8,
                "train.lr": 0.01, "privacy.dp": True, "privacy.epsilon": 4.0}
    config = RunConfig.from_mapping(settings)
    rows = len(cached_task(config).client_examples(config.partition, 0, 3)[0])
    plan = plan_round(config, rows)
    accountant = config.privacy.accountant_or_default  # a new ledger's (PRV)
    one, two = (epsilon_spent([plan.event] * k, plan.delta, accountant) for k in (1, 2))
    budget = (one + two) / 2  # enough for round 1, not for round 2
    path = tmp_path / "dp.toml"
    config = config.with_overrides({"privacy.client_budgets": [f"client-0={budget}"]})
    path.write_text(_toml(config.to_dict()))
    out = tmp_path / "run"
    done = fedtune("simulate", "--config", path, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]

    r1, r2, r3 = read_rounds(out)
    assert r1["clients"] == 3 and sorted(r1["epsilon"]) == ["client-0", "client-1", "client-2"]
    assert r1["epsilon"]["client-0"] == pytest.approx(one, rel=1e-6)
    assert r2["clients_exhausted"] == ["client-0"] and r2["clients"] == 2
    assert r2["epsilon"]["client-0"] == pytest.approx(one, rel=1e-6)  # spent, not planned
    assert r3["clients"] == 2 and "client-0" not in r3["epsilon"]  # no longer sampled
    assert "clients_exhausted" not in r3
    assert all(0 < eps <= 4.0 for eps in r3["epsilon"].values())

    spent = ledgers(out)
    assert {name: len(entries) for name, entries in spent.items()} == {
        "client-0": 1, "client-1": 3, "client-2": 3}
    assert spent["client-0"][-1]["epsilon"] <= budget

    # A resumed run with one more round: the ledgers continue from disk, not from zero, so
    # the others now refuse too (four rounds would pass epsilon 4) and nothing more is spent.
    resumed = fedtune("simulate", "--resume", out, "--rounds", 4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r4 = read_rounds(out)[-1]
    assert r4["round"] == 4 and r4["clients"] == 0
    assert r4["clients_exhausted"] == ["client-1", "client-2"]
    assert ledgers(out) == spent


@pytest.mark.slow
def test_client_level_dp_accounts_one_release_per_round(tiny_model_dir, toy_data_dir,
                                                        tmp_path):
    out = tmp_path / "run"
    done = fedtune("simulate", "--model", tiny_model_dir, "--data", toy_data_dir,
                   "--num-clients", 3, "--rounds", 2, "--batch-size", 8, "--dp",
                   "--dp-level", "client", "--epsilon", 20, "--clip-norm", 0.05,
                   "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    r1, r2 = read_rounds(out)
    assert r1["clients"] == r2["clients"] == 3
    assert 0 < r1["epsilon_client_level"] < r2["epsilon_client_level"] <= 20.0
    assert not (out / "ledgers").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--dp", "--epsilon", 1e-9], "no noise multiplier reaches epsilon"),
    (["--dp", "--dp-level", "user"], "`privacy.level` must be one of"),
    (["--dp", "--max-grad-norm", 0], "`train.max_grad_norm` must be in [1e-06, 1e+06] under "
                                      "DP-SGD"),
])
def test_impossible_privacy_settings_exit_2(tmp_path, args, message):
    done = fedtune("simulate", *args, "--out", tmp_path / "run")
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr


def test_the_centralised_baseline_has_no_dp_mode(tmp_path):
    done = fedtune("centralized", "--dp", "--out", tmp_path / "run")
    assert done.returncode == 2 and "drop --dp" in done.stderr


def _toml(nested: dict) -> str:
    lines = []
    for section, values in nested.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()
                      if value is not None]  # TOML has no null: unset is left out
        else:
            lines.insert(0, f"{section} = {json.dumps(values)}")
    return "\n".join(lines) + "\n"
