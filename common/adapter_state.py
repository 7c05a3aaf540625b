"""An adapter's trainable state as named numpy arrays: to and from Flower's records, and whether
it fits a model's names and shapes.

No torch here: a node checks what it receives before it loads anything, and a deployed node
starts a process per message (a secure-aggregation step that trains nothing starts in a second).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def fit_problem(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray]) -> str:
    """What keeps `state` from fitting tensors of `expected` names and shapes; '' if nothing."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        return (f"adapter keys do not match the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name]):
            return (f"adapter tensor {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[name])}")
    return ""
