"""Under secure aggregation a malformed step reply is dropped with its reason in
`clients_rejected` (the protocol's `rejected`), never raised into the round loop."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.common import record_keys as keys
from fedtune.common.secagg.records import keys_from_record, reveals_from_record, sealed_from_record
from fedtune.server.secagg import SecAggServer
from fedtune.server.secagg_exchange import _masked_vector, _parse


def reply(**records) -> Message:
    return Message(RecordDict(records), dst_node_id=0, message_type="train.secagg")


KEY = bytes(range(1, 33))
MALFORMED = [  # (parse, its extra argument, the reply, what the reason says)
    (keys_from_record, (), dict(), "public keys: no 'config' record"),
    (keys_from_record, (), dict(config=ConfigRecord({"c-public": "x", "s-public": KEY})),
     "public keys: 'c-public' must be bytes"),
    (sealed_from_record, ("to",), dict(config=ConfigRecord({"to-names": ["a", "b"],
                                                             "to-sealed": [KEY]})),
     "encrypted shares: 'to' ciphertexts do not match their names"),
    (sealed_from_record, ("to",), dict(config=ConfigRecord({"to-names": 5,
                                                             "to-sealed": [KEY]})),
     "encrypted shares: "),  # not a list at all: whatever the parser raises, it is caught
    (reveals_from_record, (), dict(config=ConfigRecord({"owners": ["a"], "kinds": [],
                                                         "xs": [], "shares": []})),
     "unmask shares: reveal record columns differ in length"),
    (reveals_from_record, (), dict(config=ConfigRecord({"owners": ["a"], "kinds": ["b"],
                                                         "xs": ["one"], "shares": [KEY]})),
     "unmask shares: "),
]


@pytest.mark.parametrize(("parse", "args", "bad", "reason"), MALFORMED, ids=[
    "keys-no-record", "keys-not-bytes", "shares-misaligned", "shares-not-a-list",
    "reveal-columns", "reveal-x-not-int"])
def test_a_record_that_does_not_parse_rejects_its_sender(parse, args, bad, reason):
    protocol = SecAggServer(1)
    what = reason.split(":")[0]
    assert _parse(protocol, what, parse, reply(**bad), "client-3", *args) is None
    assert protocol.rejected["client-3"].startswith(reason)


def test_a_record_that_parses_rejects_nobody():
    protocol = SecAggServer(1)
    signed = (KEY, KEY[::-1], b"ssh-ed25519 AAAA", b"signature")
    good = reply(config=ConfigRecord(dict(zip(
        ("c-public", "s-public", "sig-public", "key-signature"), signed, strict=True))))
    assert _parse(protocol, "public keys", keys_from_record, good, "client-3") == signed
    assert protocol.rejected == {}


def masked_protocol() -> SecAggServer:
    """A protocol whose vector check accepts anything: these tests are about the rest of the
    reply (the vector checks are in test_secagg_protocol.py)."""
    protocol = SecAggServer(1)
    protocol.check_masked = lambda name, vector, length: None
    return protocol


VECTOR = ArrayRecord({keys.MASKED: Array(np.arange(4, dtype=np.uint32))})


def test_a_well_formed_masked_reply_is_taken():
    protocol = masked_protocol()
    good = reply(arrays=VECTOR, metrics=MetricRecord({keys.UNIT_WEIGHT: 1}))
    assert _masked_vector(protocol, "client-3", good, 4) is not None
    assert protocol.rejected == {}


@pytest.mark.parametrize(("bad", "reason"), [
    (dict(metrics=MetricRecord({keys.UNIT_WEIGHT: 1})), "no 'masked' vector"),
    (dict(arrays=ArrayRecord({"other": Array(np.zeros(4))}),
           metrics=MetricRecord({keys.UNIT_WEIGHT: 1})), "no 'masked' vector"),
    (dict(arrays=VECTOR), "no 'metrics' record"),
    (dict(arrays=VECTOR, metrics=MetricRecord({keys.UNIT_WEIGHT: 1, keys.EPSILON: [1.0]})),
     "epsilon must be a finite number"),
], ids=["no-arrays", "no-masked-entry", "no-metrics", "epsilon-list"])
def test_a_masked_reply_missing_its_vector_or_metrics_is_rejected(bad, reason):
    protocol = masked_protocol()
    assert _masked_vector(protocol, "client-3", reply(**bad), 4) is None
    assert protocol.rejected["client-3"].startswith("masked input: ")
    assert reason in protocol.rejected["client-3"]


def test_a_valid_complaint_leaves_the_accused_out_and_a_forged_one_its_author():
    from fedtune.client.secagg import SecAggClient
    from fedtune.server.secagg_exchange import _masked_inputs

    protocol = SecAggServer(1)
    clients = {f"client-0{i}": SecAggClient(f"client-0{i}", protocol.session, 1)
               for i in range(7)}
    cohort = protocol.make_cohort({n: c.signed_keys() for n, c in clients.items()})
    protocol.route({n: c.share_secrets(cohort) for n, c in clients.items()})
    protocol.check_masked = lambda name, vector, length: None
    clients["client-00"].accused = ["client-01"]
    clients["client-02"].accused = ["client-03"]
    forged = {**clients["client-02"].complaint(), "complaint": b"\0" * 64}
    replies = {n: reply(arrays=VECTOR, metrics=MetricRecord({keys.UNIT_WEIGHT: 1})) for n in
               clients}
    replies["client-00"].content[keys.CONFIG] = ConfigRecord(clients["client-00"].complaint())
    replies["client-02"].content[keys.CONFIG] = ConfigRecord(forged)
    masked, metrics, blamed = _masked_inputs(protocol, replies, 4)
    assert blamed == {"client-01": "its shares to client-00 do not open (signed complaint)"}
    assert sorted(masked) == sorted(metrics) == ["client-00", "client-03", "client-04",
                                                 "client-05", "client-06"]
    assert protocol.rejected == {"client-02": "its complaint carries no valid signature"}
    assert "client-01" not in protocol.holders["client-00"]  # its shares are not in the masks
