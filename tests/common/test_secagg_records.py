"""The protocol's records: each packed and unpacked in common/secagg/records.py alone."""

import pytest
from flwr.app import ConfigRecord

from fedtune.common.secagg.records import (
    RecordError,
    signature_from_record,
    signature_to_record,
    survivors_from_record,
    survivors_to_record,
)


def test_the_survivor_set_and_a_signature_round_trip():
    record = ConfigRecord({**survivors_to_record(["a", "b"]), **signature_to_record(b"sig")})
    assert survivors_from_record(record) == ["a", "b"]
    assert signature_from_record(record) == b"sig"


def test_a_survivor_set_that_is_no_list_of_names_is_refused():
    with pytest.raises(RecordError, match="survivor set"):
        survivors_from_record(ConfigRecord({"survivors": [1, 2]}))
