"""Secure aggregation through `fedtune simulate`: the same federation, only the sum revealed."""

from __future__ import annotations

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
