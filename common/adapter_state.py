"""An adapter's trainable state as named numpy arrays: to and from Flower's records, and whether
it fits a model's names and shapes.

No torch here: a node checks what it receives before it loads anything, and a deployed node
starts a process per message (a secure-aggregation step that trains nothing starts in a second).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_npz(state: Mapping[str, np.ndarray], **meta: Any) -> bytes:
    """`state` and JSON-safe `meta` as the bytes of one .npz file (a node's kept release, a
    simulated canary client's release); read back with `from_npz`, never unpickled."""
    buffer = io.BytesIO()
    header = {"names": sorted(state), **meta}
    np.savez(buffer, __meta__=np.array(json.dumps(header)),
             **{name: np.asarray(v) for name, v in state.items()})
    return buffer.getvalue()


def from_npz(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state, meta) of bytes `to_npz` wrote."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        meta = json.loads(str(stored["__meta__"]))
        return {name: stored[name] for name in meta["names"]}, meta


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
