"""Outsiders against the Fleet proxy while a real loopback federation runs (a short version of
`benchmarks/outsider_load.py`): the run completes, no oversized or slow body reaches the
SuperLink, and the SuperLink's memory stays bounded."""

from __future__ import annotations

import pytest

from benchmarks.outsider_load import Federated, measure
from benchmarks.outsiders import Plan

pytestmark = pytest.mark.slow
# What the SuperLink may grow by while outsiders are at it. Measured: 32 MiB under these limits
# (the run's own growth included: 12 MiB without outsiders); 158 MiB under the former ones
# (512 MiB bodies streamed to the SuperLink, 64 connections per address), the same load.
GROWTH_MIB = 64


def test_outsiders_neither_stop_the_run_nor_grow_the_superlink(tmp_path, tiny_model_dir):
    plan = Plan(addresses=4, seconds=15, requests=600, oversized_bytes=16 * 2**20)

    figures = measure(tmp_path / "load", Federated(model=str(tiny_model_dir), clients=2,
                                                   rounds=1, private=False), plan)

    assert figures["server_exit"] == 0 and figures["rounds"] == [1]
    assert figures["clients_per_round"] == [2]
    outsiders, limits = figures["outsiders"], figures["limits"]
    assert set(outsiders["oversized"]["statuses"]) <= {"413", "closed"}
    assert outsiders["oversized"]["statuses"]["413"] >= 1
    stalled = outsiders["stall"]
    assert stalled["statuses"]["closed"] >= 1  # cut by nginx, not by the outsider
    assert stalled["max_s"] <= limits["body_timeout"] + 3
    trickled = outsiders["trickle"]["statuses"]
    assert trickled.get("held", 0) <= limits["connections"] and trickled["503"] >= 1
    reached = figures["access_log"]["outsider_requests_reaching_superlink"]
    assert sum(reached.values()) <= outsiders["junk"]["requests"]  # only whole bodies at the limit
    assert figures["access_log"]["largest_node_request_bytes"] <= limits["body_bytes"]
    memory = figures["superlink_rss_mib"]
    assert memory["peak_with_outsiders"] - memory["before_outsiders"] <= GROWTH_MIB, memory
