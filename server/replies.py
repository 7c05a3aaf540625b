"""Every train reply is untrusted at the server: checked before it is aggregated, and dropped
with its reason when malformed, so one bad client never stops the run or skews the average.

A plain update must carry exactly the global adapter's tensors (names, shapes, float dtypes),
finite values, an L2 change from the global adapter within `federation.max_update_norm`, and,
without DP, an integer example count in [1, MAX_EXAMPLES] (a claim of 10^12 examples would
otherwise own the average). Under DP no count is sent (every update weighs the same: a node's
row count is its own), and under client-level DP the change must be within the clipping norm.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Message

from fedtune.common import record_keys as keys
from fedtune.common.config import RunConfig
from fedtune.common.console import printable

MAX_EXAMPLES = 100_000_000  # more rows than any one client holds
CLIP_SLACK = 1.0 + 1e-4  # float32 rounding of a clipped update


class ReplyRejected(ValueError):
    """Why one client's reply cannot be aggregated (bounded and escaped: it quotes the
    client's own names)."""

    def __init__(self, why: str) -> None:
        super().__init__(printable(why))


def check_update(reply: Message, global_state: dict[str, np.ndarray],
                 config: RunConfig) -> None:
    """Raise ReplyRejected naming the first problem of a plain train reply."""
    content = reply.content
    if list(content.array_records) != [keys.ARRAYS] or \
            list(content.metric_records) != [keys.METRICS]:
        raise ReplyRejected(f"the reply must hold one '{keys.ARRAYS}' and one '{keys.METRICS}' "
                            f"record, got {sorted(content.array_records)} and "
                            f"{sorted(content.metric_records)}")
    _check_metrics(content[keys.METRICS], config)
    record = content[keys.ARRAYS]
    missing = sorted(set(global_state) - set(record))
    extra = sorted(set(record) - set(global_state))
    if missing or extra:
        raise ReplyRejected(f"adapter tensors differ from the global adapter's: missing "
                            f"{missing[:3]}, unexpected {extra[:3]}")
    squares = 0.0
    for name, expected in global_state.items():
        value = _array(record, name)
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise ReplyRejected(f"tensor {name} is {value.dtype}{list(value.shape)}, expected "
                                f"{expected.dtype}{list(expected.shape)}")
        if not np.isfinite(value).all():
            raise ReplyRejected(f"tensor {name} holds NaN or infinite values")
        squares += float(np.sum((value.astype(np.float64) - expected) ** 2))
    _check_norm(math.sqrt(squares), config)
    if not config.privacy.dp:
        _check_examples(content[keys.METRICS].get(keys.NUM_EXAMPLES))


def expected_metrics(config: RunConfig) -> set[str]:
    """The metric keys a node sends with a plain update under this configuration."""
    privacy = config.privacy
    if not privacy.dp:
        return {keys.UNIT_WEIGHT, keys.NUM_EXAMPLES, keys.TRAIN_LOSS}
    if privacy.sample_level:
        return {keys.UNIT_WEIGHT, keys.EPSILON}
    return {keys.UNIT_WEIGHT}


def check_masked_metrics(reply: Message) -> None:
    """Raise ReplyRejected unless a masked (secure aggregation) reply's clear metrics are a unit
    weight of 1 and at most the node's epsilon: the count and loss travel inside the vector."""
    metrics = reply.content.metric_records.get(keys.METRICS)
    if metrics is None:
        raise ReplyRejected(f"no '{keys.METRICS}' record")
    if not {keys.UNIT_WEIGHT} <= set(metrics) <= {keys.UNIT_WEIGHT, keys.EPSILON}:
        raise ReplyRejected(f"metrics {sorted(metrics)} are not '{keys.UNIT_WEIGHT}' and at "
                            f"most '{keys.EPSILON}'")
    _check_values(metrics)


def _check_metrics(metrics: Any, config: RunConfig) -> None:
    expected = expected_metrics(config)
    if set(metrics) != expected:
        raise ReplyRejected(f"metrics {sorted(metrics)} differ from the expected "
                            f"{sorted(expected)}")
    _check_values(metrics)


def _check_values(metrics: Any) -> None:
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ReplyRejected(f"metric {name} must be a finite number, got {value!r}")
    if metrics[keys.UNIT_WEIGHT] != 1:
        raise ReplyRejected(f"unit-weight must be 1, got {metrics[keys.UNIT_WEIGHT]!r}")


def _array(record: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(record[name].numpy())
    except Exception as error:  # a tensor that does not deserialise is the client's fault
        raise ReplyRejected(f"tensor {name} cannot be read: {error}") from None


def _check_norm(norm: float, config: RunConfig) -> None:
    bound = config.federation.max_update_norm
    if norm > bound:
        raise ReplyRejected(f"update norm {norm:.3g} exceeds federation.max_update_norm {bound:g}")
    privacy = config.privacy
    if privacy.client_level and norm > privacy.clip_norm * CLIP_SLACK:
        raise ReplyRejected(f"update norm {norm:.3g} exceeds the client-level clip norm "
                            f"{privacy.clip_norm:g}")


def _check_examples(count: Any) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, float)) or count != int(count):
        raise ReplyRejected(f"num-examples must be an integer, got {count!r}")
    if not 1 <= count <= MAX_EXAMPLES:
        raise ReplyRejected(f"num-examples {count!r} is outside [1, {MAX_EXAMPLES}]")
