"""Secure aggregation's steps on deployed nodes, driven by a server of our own making: steps in
order, one mask per round kept on the node's disk, and the same reply kind whatever the rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedtune.client import app as client_app
from fedtune.client.secagg import SecAggViolation
from fedtune.common import record_keys as keys
from fedtune.common.secagg.records import cohort_to_record, keys_from_record, sealed_to_record
from fedtune.server.secagg import SecAggServer
from tests.client.conftest import (
    data_dir,
    ledger_rounds,
    node_context,
    request,
    run_config,
    toy_rows,
)
from tests.client.test_local_round import TRIGGER, crafted_adapter, reply_kind

NODES = ("hospital-a", "hospital-b", "hospital-c")
POLICY = {"budget-epsilon": 100.0, "require-peers": False, "max-epsilon-per-round": 50.0,
          "max-epsilon-per-run": 50.0}


def secure_config(model_dir, data, **overrides):
    return run_config(model_dir, data, **{"secagg.enabled": True, "federation.num_clients": 3,
                                          "train.local_steps": 1, "privacy.noise_multiplier": 1.0,
                                          **overrides})


def contexts(model_dir, datas, tmp_path, **policy):
    made = {}
    for name, data in zip(NODES, datas, strict=True):
        context = node_context(model_dir, data, tmp_path / f"ledger-{name}", **POLICY, **policy)
        context.node_config["name"] = name
        made[name] = context
    return made


def up_to_step_three(config, nodes, server):
    """Steps 1 and 2 for every node; returns each node's step-3 message."""
    session = {keys.SECAGG_SESSION: server.session}
    published = {}
    for name, context in nodes.items():
        reply = client_app.secagg_keys(request(config, "train.secagg_keys", **session), context)
        published[name] = keys_from_record(reply.content[keys.CONFIG])
    cohort = server.make_cohort(published)
    sealed = {}
    for name, context in nodes.items():
        message = request(config, "train.secagg_shares", **session, **cohort_to_record(cohort))
        reply = client_app.secagg_shares(message, context)
        record = reply.content[keys.CONFIG]
        sealed[name] = dict(zip(record["to-names"], record["to-sealed"], strict=True))
    inbox = server.route(sealed)
    return {name: (session, sealed_to_record(inbox[name], "from")) for name in nodes}


def step_three(config, nodes, name, prepared, adapter=None):
    session, shares = prepared[name]
    message = request(config, "train.secagg_masked", adapter=adapter, **session, **shares)
    return client_app.secagg_masked(message, nodes[name])


def test_a_repeated_step_one_and_a_step_three_out_of_order_are_refused_before_training(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = secure_config(tiny_model_dir, toy_data_dir)
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **POLICY)
    session = {keys.SECAGG_SESSION: b"s" * 16}
    reply = client_app.secagg_keys(request(config, "train.secagg_keys", **session), context)
    assert keys.STATUS not in reply.content[keys.CONFIG], reply.content[keys.CONFIG]
    with pytest.raises(SecAggViolation, match="second step 1"):
        client_app.secagg_keys(request(config, "train.secagg_keys", **session), context)
    with pytest.raises(SecAggViolation, match="out of order"):
        client_app.secagg_masked(request(config, "train.secagg_masked", **session), context)
    assert ledger_rounds(ledger) == []  # nothing trained, nothing spent


def test_a_node_without_pinned_peers_refuses_secure_aggregation_unless_waived(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = secure_config(tiny_model_dir, toy_data_dir)
    strict = node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger",
                          **{**POLICY, "require-peers": True})
    reply = client_app.secagg_keys(request(config, "train.secagg_keys",
                                           **{keys.SECAGG_SESSION: b"p" * 16}), strict)
    assert reply.content[keys.CONFIG][keys.STATUS] == keys.POLICY_REFUSED
    assert "peers" in reply.content[keys.CONFIG][keys.REASON]


def test_a_step_three_replayed_after_flower_lost_the_nodes_context_is_refused(
        tiny_model_dir, tmp_path):
    datas = [data_dir(tmp_path / f"data-{i}", toy_rows(30, offset=30 * i)) for i in range(3)]
    config = secure_config(tiny_model_dir, datas[0])
    nodes = contexts(tiny_model_dir, datas, tmp_path)
    prepared = up_to_step_three(config, nodes, SecAggServer(server_round=1))
    # Flower pushes the reply, then fails to save the context: the node's state rolls back
    before = copy.deepcopy(nodes[NODES[0]].state)
    first = step_three(config, nodes, NODES[0], prepared)
    assert keys.MASKED in first.content[keys.ARRAYS]
    nodes[NODES[0]].state = before
    with pytest.raises(SecAggViolation, match="out of order"):  # the node's own disk says so
        step_three(config, nodes, NODES[0], prepared)
    assert len(ledger_rounds(tmp_path / f"ledger-{NODES[0]}")) == 1


def test_a_row_a_crafted_adapter_overflows_changes_no_masked_reply(tiny_model_dir, tmp_path):
    rows = toy_rows(30)
    kinds = {}
    for case, extra in (("plain", []), ("triggered", [{"text": TRIGGER, "label": 1}])):
        datas = [data_dir(tmp_path / case / f"data-{i}", [*rows, *extra] if i == 0 else
                          toy_rows(30, offset=30 * i)) for i in range(3)]
        config = secure_config(tiny_model_dir, datas[0], **{"privacy.noise_multiplier": 1.0,
                                                            "train.batch_size": 1_000_000})
        adapter = crafted_adapter(config, [r["text"] for r in rows], TRIGGER)
        nodes = contexts(tiny_model_dir, datas, tmp_path / case,
                         **{"max-adapter-value": 3.4e38})
        prepared = up_to_step_three(config, nodes, SecAggServer(server_round=1))
        reply = step_three(config, nodes, NODES[0], prepared, adapter=adapter)
        masked = reply.content[keys.ARRAYS][keys.MASKED].numpy()
        kinds[case] = (*reply_kind(reply), masked.dtype.str, masked.shape)
    assert kinds["plain"] == kinds["triggered"]
    assert kinds["plain"][0] == (keys.ARRAYS,)
    assert np.dtype(kinds["plain"][-2]).kind == "u"  # a ring vector, not an error


def test_a_round_masked_in_one_session_is_not_masked_again_in_another(tiny_model_dir, tmp_path):
    # a server that runs round 1 again in a fresh session (with one member left out, say) would
    # learn that member's update from the difference of the two sums: a node masks it once
    datas = [data_dir(tmp_path / f"data-{i}", toy_rows(30, offset=30 * i)) for i in range(3)]
    config = secure_config(tiny_model_dir, datas[0])
    nodes = contexts(tiny_model_dir, datas, tmp_path)
    first = up_to_step_three(config, nodes, SecAggServer(server_round=1))
    for name in NODES:
        assert keys.ARRAYS in step_three(config, nodes, name, first).content.array_records
    second = up_to_step_three(config, nodes, SecAggServer(server_round=1))
    for name in NODES:
        reply = step_three(config, nodes, name, second)
        assert "masked in another session" in reply.content[keys.CONFIG][keys.REASON]
        assert not reply.content.array_records
        assert len(ledger_rounds(tmp_path / f"ledger-{name}")) == 1


def test_a_step_three_holds_the_nodes_round_state_until_its_mask_is_recorded(
        tiny_model_dir, tmp_path, monkeypatch):
    # Flower may start two app processes at once: a second step 3 must wait for the first to
    # record its round, and then finds it masked (no two masked replies with the same pads)
    import fcntl
    import os

    from fedtune.client import secagg_steps

    datas = [data_dir(tmp_path / f"data-{i}", toy_rows(30, offset=30 * i)) for i in range(3)]
    config = secure_config(tiny_model_dir, datas[0])
    nodes = contexts(tiny_model_dir, datas, tmp_path)
    prepared = up_to_step_three(config, nodes, SecAggServer(server_round=1))
    rounds = tmp_path / f"ledger-{NODES[0]}" / "rounds"
    held = []

    def probe(request):
        fd = os.open(rounds, os.O_RDONLY)  # another process's attempt, as flock sees it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return masking(request)

    masking = secagg_steps._mask
    monkeypatch.setattr(secagg_steps, "_mask", probe)
    reply = step_three(config, nodes, NODES[0], prepared)
    assert keys.MASKED in reply.content[keys.ARRAYS] and held == [True]
