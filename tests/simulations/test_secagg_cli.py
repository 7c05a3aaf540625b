"""Secure aggregation through `fedtune simulate`: the same federation, only the sum revealed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedtune.common.config import RunConfig
from fedtune.server.checkpoint import load_checkpoint
from fedtune.server.metrics_log import read_rounds
from tests.simulations.test_cli import fedtune


@pytest.mark.slow
def test_secagg_gives_the_plain_fedavg_result(tiny_model_dir, toy_data_dir, tmp_path):
    common = ("--model", tiny_model_dir, "--data", toy_data_dir, "--num-clients", 4,
              "--rounds", 2, "--batch-size", 8, "--lr", 0.01, "--fraction-train", 0.75)
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    assert fedtune("simulate", *common, "--out", plain).returncode == 0
    done = fedtune("simulate", *common, "--secagg", "--out", secure)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(read_rounds(plain), read_rounds(secure), strict=True):
        assert a["clients"] == b["clients"] == 3
        assert a["client_accuracy"].keys() == b["client_accuracy"].keys()  # same sampling
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9)
        # the loss travels as a share of the 32-bit encoding beside the adapter: ~1e-4 relative
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    # One round from one start: the 32-bit encoding's average is off by < n / (scale x summed
    # weight), ~7e-6 here (clients of ~20 rows weigh 2e-4 each against secagg.max_examples).
    # Later rounds train from starts that differ by that much, and Adam's sign-like steps can
    # turn such a difference into one of a learning rate, so only round 1 is compared exactly.
    first = "checkpoints/round-0001.pt"
    x, y = load_checkpoint(plain / first).arrays, load_checkpoint(secure / first).arrays
    for key in x:
        np.testing.assert_allclose(y[key], x[key], atol=1e-5)


@pytest.mark.slow
def test_secagg_with_dp_sgd_keeps_ledgers(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    done = fedtune("simulate", "--model", tiny_model_dir, "--data", toy_data_dir,
                   "--num-clients", 3, "--rounds", 1, "--batch-size", 8, "--secagg", "--dp",
                   "--epsilon", 5, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = read_rounds(out)
    assert row["clients"] == 3 and len(row["epsilon"]) == 3
    assert len(list((out / "ledgers").glob("ledger-*.json"))) == 3


def test_secagg_needs_three_clients(tmp_path):
    done = fedtune("simulate", "--secagg", "--num-clients", 2, "--out", tmp_path / "run")
    assert done.returncode == 2 and "must be >= 3 with secure aggregation" in done.stderr


INSPECT = """
import json, sys
from fedtune.common.config import RunConfig
from fedtune.server import secagg_exchange
from fedtune.simulations.engine import simulate

seen = []
original = secagg_exchange._Link.exchange

def recording(self, names, action, content_for):
    replies = original(self, names, action, content_for)
    for reply in replies.values():
        content = reply.content
        metrics = {k: v for r in content.metric_records.values() for k, v in r.items()}
        arrays = sorted(k for r in content.array_records.values() for k in r)
        seen.append({"action": action, "metrics": metrics, "arrays": arrays})
    return replies

secagg_exchange._Link.exchange = recording
simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), num_workers=1)
print("SEEN=" + json.dumps(seen))
"""


@pytest.mark.slow
def test_under_secagg_the_server_receives_no_per_client_count_or_loss(tiny_model_dir,
                                                                      toy_data_dir, tmp_path):
    settings = {"model.name": str(tiny_model_dir), "data.path": str(toy_data_dir),
                "federation.num_clients": 3, "federation.rounds": 1, "train.batch_size": 8,
                "secagg.enabled": True, "output.dir": str(tmp_path / "run"),
                "federation.strategy": "fedadam"}  # a server optimiser needs only the sum
    done = subprocess.run([sys.executable, "-c", INSPECT, json.dumps(settings)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.split("SEEN=")[-1])
    masked = [reply for reply in seen if reply["action"] == "secagg_masked"]
    assert len(masked) == 3
    for reply in masked:
        assert reply["arrays"] == ["masked"]
        assert set(reply["metrics"]) <= {"unit-weight", "epsilon"}
    assert all(reply["action"] == "secagg_masked" or not reply["arrays"] for reply in seen)
    assert not any({"num-examples", "train-loss"} & set(reply["metrics"]) for reply in seen)
    (row,) = read_rounds(tmp_path / "run")
    assert row["clients"] == 3 and row["train_loss"] > 0  # the server still has the mean loss


TOTALS = """
import json, sys
from fedtune.common.config import RunConfig
from fedtune.common.secagg import summation
from fedtune.simulations.engine import simulate

totals = []
original = summation.Summation.average

def recording(self, total, like, summed):  # the server's decoded sum: the most it holds
    totals.append({"changes": total[:-3].tolist(), "summed": summed,
                   "weight": float(total[-3]), "noise_std": self.noise_std,
                   "survivors": self.survivors})
    return original(self, total, like, summed)

summation.Summation.average = recording
simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), num_workers=1)
print("TOTALS=" + json.dumps(totals))
"""


@pytest.mark.slow
def test_client_level_dp_under_secagg_the_server_never_holds_an_unnoised_sum(
        tiny_model_dir, toy_data_dir, tmp_path):
    clip, z, clients = 0.05, 1.0, 5
    settings = {"model.name": str(tiny_model_dir), "data.path": str(toy_data_dir),
                "federation.num_clients": clients, "federation.rounds": 2,
                "train.batch_size": 8, "secagg.enabled": True, "privacy.dp": True,
                "privacy.level": "client", "privacy.clip_norm": clip,
                "privacy.noise_multiplier": z, "output.dir": str(tmp_path / "run")}
    done = subprocess.run([sys.executable, "-c", TOTALS, json.dumps(settings)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    totals = json.loads(done.stdout.split("TOTALS=")[-1])
    assert len(totals) == 2
    for total in totals:
        summed, changes = total["summed"], np.asarray(total["changes"])
        assert summed == clients and total["weight"] == pytest.approx(clients, abs=1e-3)
        # 4 of 5 survivors (one dropout tolerated), one of them perhaps a colluder: the noise
        # is sized for 3 honest shares
        assert total["survivors"] == 4 and total["noise_std"] == pytest.approx(z * clip / 3**.5)
        # each client's clipped change has norm <= clip, so an un-noised sum has an RMS of at
        # most clients x clip / sqrt(d); the noise of 5 shares sized for 3 has RMS z clip
        # sqrt(5/3), far above it
        unnoised_rms_at_most = clients * clip / np.sqrt(changes.size)
        expected = z * clip * np.sqrt(clients / 3)
        rms = float(np.sqrt(np.mean(changes**2)))
        assert rms > 10 * unnoised_rms_at_most
        assert rms == pytest.approx(expected, rel=0.1)
    from fedtune.common.privacy import epsilon_spent
    from fedtune.server.client_level_release import ServerSideNoise
    rows = read_rounds(tmp_path / "run")
    accounted = ServerSideNoise(RunConfig.from_mapping(
        {k: v for k, v in settings.items() if k != "output.dir"}), seeded=True)
    assert rows[-1]["epsilon_client_level"] == pytest.approx(
        epsilon_spent([accounted.event] * 2, accounted.delta, accounted.accountant))
