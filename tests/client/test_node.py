"""What a deployed node is: its rows split by its own key, row by row."""

from __future__ import annotations

import numpy as np

from fedtune.client.node import keyed_held_out
from fedtune.common.data import Examples


def rows(count: int, start: int = 0) -> Examples:
    return Examples(texts=[f"row {i}" for i in range(start, start + count)],
                    labels=np.arange(start, start + count) % 3)


def test_adding_a_row_moves_no_other_row_between_training_and_held_out():
    # Prepare: a data set and its neighbour with one more row
    base, grown = rows(500), rows(501)
    # Execute
    held, held_grown = keyed_held_out(base, 0.2, key=7), keyed_held_out(grown, 0.2, key=7)
    # Assert: the first 500 rows keep their sides; about a fifth is held out
    np.testing.assert_array_equal(held, held_grown[:500])
    assert 0.14 < held.mean() < 0.26
    assert not np.array_equal(held, keyed_held_out(base, 0.2, key=8))  # the key decides
    assert not keyed_held_out(base, 0.0, key=7).any()
