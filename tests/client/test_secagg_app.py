"""The ClientApp's secure-aggregation handlers hold a round to what step 1 saw."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import secagg_keys, secagg_shares
from client.secagg import SecAggViolation
from common import record_keys as keys
from common.config import RunConfig


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
