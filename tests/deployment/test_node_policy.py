"""The node's policy against a real server: SuperLink and SuperNodes as separate processes on
loopback. Whatever the server's configuration asks, a node with the default policy refuses what
its rules forbid, names the rule, and sends nothing derived from its data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtune.common.client_dp import client_level_plan
from fedtune.common.config import RunConfig
from fedtune.common.ports import free_local_port
from fedtune.common.task import build_task
from fedtune.server.checkpoint import latest_checkpoint
from fedtune.server.metrics_log import read_rounds
from tests.deployment.test_deployment import Federation

pytestmark = pytest.mark.slow

DEFAULT = ("--budget-epsilon", "8")  # the strict defaults with the one value they need
DP = "[privacy]\ndp = true\nepsilon = 8.0\n"


def run_two_node_federation(federation: Federation, permissive: tuple[str, ...]) -> dict:
    """hospital-a with the default policy, hospital-b with `permissive`; one round."""
    server = federation.server("a", "b")
    federation.client("a", policy=DEFAULT)
    federation.client("b", policy=permissive)
    assert server.wait(timeout=600) == 0, federation.log("server.log")[-3000:]
    (row,) = read_rounds(federation.state / "run")
    return row


def assert_refused(federation: Federation, row: dict, rule: str) -> None:
    assert row["clients"] == 1  # hospital-b's update only
    assert rule in row["clients_refused"]["hospital-a"]
    assert "Refused by this node's privacy policy" in federation.log("client-a.log")
    assert rule in federation.log("client-a.log")
    assert not list((federation.root / "ledger-a").glob("ledger-*.json"))  # nothing spent


@pytest.mark.parametrize(("extra", "permissive", "rule"), [
    ("[privacy]\ndp = false\n", ("--allow-no-dp", "--allow-no-secagg"), "require-dp"),
    (DP, ("--budget-epsilon", "16", "--allow-no-secagg"), "max-epsilon-per-run"),
    ("[privacy]\ndp = true\nnoise_multiplier = 0.1\n",
     ("--budget-epsilon", "4000", "--allow-no-secagg", "--min-noise-multiplier", "0.05"),
     "min-noise-multiplier"),
], ids=["dp-off", "run-above-half-the-budget", "noise-below-floor"])
def test_a_default_node_refuses_what_its_policy_forbids_and_a_permissive_one_trains(
        tmp_path, tiny_model_dir, extra, permissive, rule):
    federation = Federation(tmp_path, tiny_model_dir, rounds=1, extra=extra)
    try:
        row = run_two_node_federation(federation, permissive)
    finally:
        federation.stop()
    assert_refused(federation, row, rule)


def test_without_secure_aggregation_the_default_node_refuses_and_every_run_shares_one_ledger(
        tmp_path, tiny_model_dir):
    """Two federations with different seeds and held-out fractions over the same node data:
    hospital-b's one ledger holds both runs' rounds."""
    federation = Federation(tmp_path, tiny_model_dir, rounds=1,
                            extra=DP + "[partition]\nlocal_test_fraction = 0.2\n")
    roomy = ("--budget-epsilon", "20", "--allow-no-secagg")  # room for both runs' epsilon 8
    try:
        row = run_two_node_federation(federation, roomy)
        federation.stop()
        assert_refused(federation, row, "require-secagg")
        federation.state = tmp_path / "state-2"  # a second federation, another seed and split
        federation.port = free_local_port()
        federation.config.write_text("seed = 1\n" + federation.config.read_text().replace(
            "local_test_fraction = 0.2", "local_test_fraction = 0.1"))
        second = run_two_node_federation(federation, roomy)
    finally:
        federation.stop()
    (ledger,) = (tmp_path / "ledger-b").glob("ledger-*.json")
    rounds = json.loads(ledger.read_text())["rounds"]
    assert len(rounds) == 2 and len({entry["run"] for entry in rounds}) == 2
    assert rounds[1]["epsilon"] > rounds[0]["epsilon"]  # the second run spent on top
    assert second["clients"] == 1 and second["epsilon"]["hospital-b"] == rounds[1]["epsilon"]


def test_deployed_client_level_noise_cannot_be_regenerated_from_the_run_configuration(
        tmp_path, tiny_model_dir):
    """Client-level DP is refused by a default node (the server, not the node, adds its noise);
    with a node that allows it, the server's noise comes from its own entropy: subtracting the
    noise every client could compute from the seed leaves no update within the clip norm."""
    federation = Federation(tmp_path, tiny_model_dir, rounds=1,
                            extra='[privacy]\ndp = true\nlevel = "client"\nepsilon = 8.0\n')
    try:
        # the floor applies to client-level noise too (epsilon 8 in one release at delta 1e-5
        # is z = 0.60, above it; the permissive node lowers it anyway)
        row = run_two_node_federation(federation, ("--allow-no-dp", "--allow-no-secagg",
                                                   "--min-noise-multiplier", "0.3"))
    finally:
        federation.stop()
    assert_refused(federation, row, "require-dp")
    run_dir = federation.state / "run"
    config = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    initial = build_task(config).initial_adapter
    noised = latest_checkpoint(run_dir).arrays  # mean of one clipped update, plus noise
    event, _ = client_level_plan(config)
    std = event.noise_multiplier * config.privacy.clip_norm / row["clients"]
    rng = np.random.default_rng([config.seed, 3, 1])  # what a client could regenerate
    guess = {k: noised[k] - rng.normal(0.0, std, size=v.shape) for k, v in initial.items()}
    residual = np.sqrt(sum(float(np.sum((guess[k] - initial[k]) ** 2)) for k in initial))
    assert residual > 10 * config.privacy.clip_norm
