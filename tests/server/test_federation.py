"""A round that aggregated no update says so, and why, in its metrics row."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedtune.server.federation import abandoned_column
from fedtune.server.train_outcome import TrainOutcome


def outcome(**fields) -> TrainOutcome:
    values = {"arrays": None, "metrics": None, "clients": 0, "failures": 0, "bytes_up": 0,
              "bytes_down": 0, "epsilon": {}, "exhausted": []}
    return TrainOutcome(**{**values, **fields})


def test_a_trained_round_is_not_marked():
    assert abandoned_column(outcome(arrays=ArrayRecord(), clients=2)) == {}


def test_an_abandoned_round_names_the_protocols_reason_and_who_refused():
    row = abandoned_column(outcome(abandoned="only 2 clients sent keys; 3 are needed",
                                   failures=2, exhausted=["hospital-c"],
                                   refused={"hospital-d": "require-dp"}))
    assert row == {"round_abandoned": "only 2 clients sent keys; 3 are needed; budget spent: "
                                "hospital-c; refused by node policy: hospital-d"}


def test_a_plain_round_without_updates_counts_the_silent():
    assert abandoned_column(outcome(failures=3)) == {
        "round_abandoned": "3 failed or did not answer"}
    assert abandoned_column(outcome()) == {"round_abandoned": "no client answered"}
