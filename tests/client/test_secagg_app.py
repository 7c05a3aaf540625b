"""The ClientApp's secure-aggregation handlers hold a round to what step 1 saw."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client.app import secagg_keys, secagg_shares
from fedtune.client.secagg import SecAggViolation
from fedtune.common import record_keys as keys
from fedtune.common.config import RunConfig


def message(config: RunConfig, session: bytes, **extra) -> Message:
    settings = {keys.RUN_CONFIG: json.dumps(config.to_flat()), keys.SERVER_ROUND: 1,
                keys.SECAGG_SESSION: session, **extra}
    return Message(RecordDict({keys.CONFIG: ConfigRecord(settings)}), dst_node_id=0,
                   message_type="train.secagg_keys")


def test_a_run_configuration_changed_after_step_1_is_refused(message_identity):
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    settings = {"secagg.enabled": True, "privacy.dp": True, "privacy.level": "client",
                "privacy.noise_multiplier": 1.0, "federation.num_clients": 3}
    config = RunConfig.from_mapping(settings)
    session = b"s" * 16
    reply = secagg_keys(message(config, session), context)
    assert keys.CONFIG in reply.content.config_records
    # the noise share is sized from dropout_tolerance: a server that lowers it after step 1
    # (to make clients sign for fewer survivors) is refused before anything else
    drifted = RunConfig.from_mapping({**settings, "secagg.dropout_tolerance": 0.0})
    with pytest.raises(SecAggViolation, match="configuration changed within the round"):
        secagg_shares(message(drifted, session), context)


def deployed(tmp_path, toy_data_dir, **policy) -> tuple[Context, dict]:
    """A deployed hospital-a: its node key, its data, the consortium's bundle of a and b."""
    from fedtune.common import certs
    from fedtune.common.consortium import bundle

    keys = {n: certs.node_key(tmp_path / "keys", n) for n in ("hospital-a", "hospital-b")}
    peers = bundle(tmp_path / "peers", [public for _, public in keys.values()]).directory
    node_config = {"data-path": str(toy_data_dir), "ledger-dir": str(tmp_path / "ledger"),
                   "name": "hospital-a", "node-key": str(keys["hospital-a"][0]),
                   "budget-epsilon": 100.0, "peers": str(peers), **policy}
    node_config = {k: v for k, v in node_config.items() if v is not None}
    context = Context(run_id=1, node_id=0, node_config=node_config, state=RecordDict(),
                      run_config={})
    return context, keys


def secure_dp_config(model: str) -> RunConfig:
    return RunConfig.from_mapping({"model.name": model, "secagg.enabled": True,
                                   "privacy.dp": True, "privacy.noise_multiplier": 1.0,
                                   "federation.num_clients": 3, "train.batch_size": 8,
                                   "privacy.planning_rows": 60})


def refused_rules(reply: Message) -> str:
    config = reply.content[keys.CONFIG]
    assert config[keys.STATUS] == keys.POLICY_REFUSED  # counted in clients_refused
    return str(config[keys.REASON])


def test_a_default_deployed_node_refuses_a_cohort_member_the_server_made_up(
        message_identity, tmp_path, toy_data_dir, tiny_model_dir):
    from fedtune.client.secagg import SecAggClient
    from fedtune.common.secagg.records import cohort_to_record, keys_from_record
    from fedtune.common.secagg.signing import Signer
    from fedtune.server.secagg import SecAggServer

    context, node_keys = deployed(tmp_path, toy_data_dir, models=str(tiny_model_dir))
    config = secure_dp_config(str(tiny_model_dir))
    server = SecAggServer(server_round=1)
    reply = secagg_keys(message(config, server.session), context)
    own = keys_from_record(reply.content[keys.CONFIG])
    real_b = SecAggClient("hospital-b", server.session, 1,
                          Signer.from_file(node_keys["hospital-b"][0]))
    invented = SecAggClient("hospital-x", server.session, 1)  # keys of the server's own
    cohort = server.make_cohort({"hospital-a": own, "hospital-b": real_b.signed_keys(),
                                 "hospital-x": invented.signed_keys()})
    shares = secagg_shares(message(config, server.session, **cohort_to_record(cohort)), context)
    assert "peers: the signing key of hospital-x is not the one this node pins" in \
        refused_rules(shares)
    assert keys.CONFIG in shares.content.config_records and not \
        shares.content.config_records[keys.CONFIG].get("to-sealed")  # no share left the node


def test_a_deployed_node_without_pinned_peers_refuses_unless_waived_and_never_at_client_level(
        message_identity, tmp_path, toy_data_dir, tiny_model_dir):
    context, _ = deployed(tmp_path, toy_data_dir, models=str(tiny_model_dir), peers=None)
    config = secure_dp_config(str(tiny_model_dir))
    assert "peers: this node uses secure aggregation only with its consortium's keys" in \
        refused_rules(secagg_keys(message(config, b"s" * 16), context))
    waived, _ = deployed(tmp_path / "w", toy_data_dir, models=str(tiny_model_dir), peers=None,
                         **{"require-peers": False})
    reply = secagg_keys(message(config, b"s" * 16), waived)
    assert keys.STATUS not in reply.content[keys.CONFIG]  # its keys: it takes part
    client_level = RunConfig.from_mapping({
        "model.name": str(tiny_model_dir), "secagg.enabled": True, "privacy.dp": True,
        "privacy.level": "client", "privacy.noise_multiplier": 1.0, "federation.num_clients": 3,
        "privacy.planning_rows": 60})
    both, _ = deployed(tmp_path / "c", toy_data_dir, models=str(tiny_model_dir), peers=None,
                       **{"require-peers": False, "require-dp": False})
    assert "peers: client-level DP under secure aggregation needs" in \
        refused_rules(secagg_keys(message(client_level, b"t" * 16), both))


def test_a_step_that_trains_nothing_runs_without_the_model_libraries():
    # a deployed node starts a process per message: a secure-aggregation step that only shares,
    # signs or reveals must not pay seconds of torch, PEFT, Transformers and Opacus imports
    script = """
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedtune.client import app
from fedtune.client.secagg import SecAggViolation
from fedtune.common import record_keys as keys
from fedtune.common.config import RunConfig
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
config = RunConfig.from_mapping({"secagg.enabled": True, "privacy.dp": True,
                                 "privacy.noise_multiplier": 1.0, "federation.num_clients": 3})
context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config={})
for handler in (app.secagg_shares, app.secagg_consistency, app.secagg_unmask):
    settings = {keys.RUN_CONFIG: config.to_json(), keys.SERVER_ROUND: 1,
                keys.SECAGG_SESSION: b"s" * 16}
    try:
        handler(Message(RecordDict({keys.CONFIG: ConfigRecord(settings)}), dst_node_id=0,
                        message_type="train"), context)
    except SecAggViolation as refused:  # no step 1 in this process: read, checked, refused
        assert "no secure-aggregation round in progress" in str(refused)
print(sorted({"torch", "peft", "transformers", "opacus"} & set(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
