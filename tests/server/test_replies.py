"""Every plain update is untrusted at the server: each kind of malformed reply is named and
rejected, a well-formed one passes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedtune.common import record_keys as keys
from fedtune.common.config import RunConfig
from fedtune.server.replies import ReplyRejected, check_masked_metrics, check_update
from fedtune.server.train_outcome import reported_epsilon

GLOBAL = {"lora_A": np.zeros((4, 8), dtype=np.float32), "head": np.zeros(3, dtype=np.float32)}
CONFIG = RunConfig()


def reply(arrays=None, metrics=None, *, extra_record=False, shift=0.01) -> Message:
    """A train reply (built inside a test: messages need the task identity the fixture sets)."""
    arrays = {k: v + shift for k, v in GLOBAL.items()} if arrays is None else arrays
    metrics = {keys.NUM_EXAMPLES: 40, keys.UNIT_WEIGHT: 1, keys.TRAIN_LOSS: 0.7} \
        if metrics is None else metrics
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          keys.METRICS: MetricRecord(metrics)})
    if extra_record:
        content["more"] = MetricRecord({"x": 1.0})
    return Message(content, dst_node_id=0, message_type="train")


def with_array(name, value):
    return {**{k: v + 0.01 for k, v in GLOBAL.items()}, name: value}


def test_a_well_formed_update_passes():
    check_update(reply(), GLOBAL, CONFIG)


MALFORMED = [
    (dict(arrays={"lora_A": GLOBAL["lora_A"]}), "missing \\['head'\\]"),
    (dict(arrays=with_array("extra", np.zeros(2, np.float32))), "unexpected \\['extra'\\]"),
    (dict(arrays=with_array("head", np.zeros((1, 3), np.float32))), "expected float32\\[3\\]"),
    (dict(arrays=with_array("head", np.zeros(3, np.float64))), "expected float32"),
    (dict(arrays=with_array("head", np.array([0, np.nan, 0], np.float32))), "NaN"),
    (dict(arrays=with_array("head", np.full(3, 1e6, np.float32))), "max_update_norm"),
    (dict(metrics={keys.NUM_EXAMPLES: 10**12, keys.UNIT_WEIGHT: 1, keys.TRAIN_LOSS: 0.7}),
     "outside"),
    (dict(metrics={keys.NUM_EXAMPLES: 2.5, keys.UNIT_WEIGHT: 1, keys.TRAIN_LOSS: 0.7}),
     "integer"),
    (dict(metrics={keys.NUM_EXAMPLES: 40, keys.UNIT_WEIGHT: 1}), "differ from the expected"),
    (dict(metrics={keys.NUM_EXAMPLES: 40, keys.UNIT_WEIGHT: 1, keys.TRAIN_LOSS: float("inf")}),
     "finite"),
    (dict(metrics={keys.NUM_EXAMPLES: 40, keys.UNIT_WEIGHT: 9, keys.TRAIN_LOSS: 0.7}),
     "unit-weight"),
    (dict(extra_record=True), "one 'arrays' and one 'metrics'"),
]


@pytest.mark.parametrize(("bad", "reason"), MALFORMED, ids=[
    "missing", "unexpected", "shape", "dtype", "nan", "norm", "count", "fractional-count",
    "missing-metric", "inf-metric", "weight", "extra-record"])
def test_each_malformed_update_is_rejected_with_its_reason(bad, reason):
    with pytest.raises(ReplyRejected, match=reason):
        check_update(reply(**bad), GLOBAL, CONFIG)


def test_under_client_level_dp_an_update_beyond_the_clip_norm_is_rejected():
    config = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client",
                                     "privacy.clip_norm": 0.1})
    metrics = {keys.UNIT_WEIGHT: 1}  # under DP no count leaves a node
    check_update(reply(metrics=metrics, shift=0.01), GLOBAL, config)  # norm 0.059: clipped
    with pytest.raises(ReplyRejected, match="clip norm"):
        check_update(reply(metrics=metrics, shift=0.1), GLOBAL, config)  # norm 0.59


def masked_reply(metrics) -> Message:
    content = RecordDict({} if metrics is None else {keys.METRICS: MetricRecord(metrics)})
    return Message(content, dst_node_id=0, message_type="train.secagg_masked")


@pytest.mark.parametrize("metrics", [{keys.UNIT_WEIGHT: 1}, {keys.UNIT_WEIGHT: 1,
                                                             keys.EPSILON: 2.5}])
def test_a_masked_reply_may_carry_its_unit_weight_and_epsilon(metrics):
    check_masked_metrics(masked_reply(metrics))


@pytest.mark.parametrize(("metrics", "reason"), [
    (None, "no 'metrics' record"),
    ({}, "are not 'unit-weight'"),
    ({keys.UNIT_WEIGHT: 1, keys.NUM_EXAMPLES: 40}, "are not 'unit-weight'"),
    ({keys.UNIT_WEIGHT: 1, keys.EPSILON: [1.0, 2.0]}, "epsilon must be a finite number"),
    ({keys.UNIT_WEIGHT: 1, keys.EPSILON: float("nan")}, "epsilon must be a finite number"),
    ({keys.UNIT_WEIGHT: 7}, "unit-weight must be 1"),
], ids=["no-record", "empty", "clear-count", "list", "nan", "weight"])
def test_malformed_metrics_of_a_masked_reply_are_rejected(metrics, reason):
    with pytest.raises(ReplyRejected, match=reason):
        check_masked_metrics(masked_reply(metrics))


@pytest.mark.parametrize(("value", "read"), [(2.5, 2.5), (3, 3.0), ([1.0, 2.0], None),
                                             (float("nan"), None), (float("inf"), None)])
def test_a_reported_epsilon_that_is_no_finite_number_is_ignored(value, read):
    """Read from every reply, even a rejected one or a refusal: it must never raise."""
    assert reported_epsilon(masked_reply({keys.UNIT_WEIGHT: 1, keys.EPSILON: value})) == read
    assert reported_epsilon(masked_reply(None)) is None
