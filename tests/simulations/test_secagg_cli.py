"""Secure aggregation through `fedtune simulate`: the same federation, only the sum revealed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from server.checkpoint import latest_checkpoint
from server.metrics_log import read_rounds
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
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    x, y = latest_checkpoint(plain).arrays, latest_checkpoint(secure).arrays
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
from common.config import RunConfig
from server import secagg_exchange
from simulations.engine import simulate

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
                "secagg.enabled": True, "output.dir": str(tmp_path / "run")}
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
