"""A deployed node's per-round state, on its own disk beside its ledgers.

Three things must not depend on the server, nor on Flower saving a node's context:
- secure aggregation's secrets and step, so one round masks at most one update with its pads (a
  context that Flower fails to save after the reply left would otherwise roll back and let a
  repeated step 3 mask a second update with the same pads: the server would learn their
  difference);
- which session masked a round's update, so a server cannot ask the same round again in a new
  session with one member left out and learn that member's update from the two sums (a node
  masks one update per run and round, once);
- what the node released in a round, so a server that restarts and asks the same round again
  (same run, round, adapter and configuration) gets the same release, and the node's ledger does
  not pay for that round twice.
It also keeps, as a hint checked again on every use, the noise multipliers the node calibrated
(a PRV search takes seconds, and a node starts a process per message).
Files are written atomically; names are digests, never the server's strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.common.adapter_state import from_npz, to_npz
from fedtune.common.atomic_file import locked, write_atomic

NOISE_FILE = "noise.json"  # calibrated noise multipliers by question, a hint (see NodeState)
NOISE_KEPT = 64
NOISE_FILE_BYTES = 65536  # far above 64 entries: a larger file is not one this node wrote


@dataclass(frozen=True)
class Release:
    """What one admitted round produced before the reply is built: the adapter state (plain) or
    the change to sum (secure aggregation), the rows it trained on and its loss."""

    arrays: dict[str, np.ndarray]
    examples: int
    loss: float


def release_key(run: str, server_round: int, adapter: dict[str, np.ndarray], config_json: str,
                kind: str) -> str:
    """The identity of a round's request: the same key means the same question asked again."""
    digest = hashlib.sha256()
    for part in (run, str(server_round), config_json, kind):
        digest.update(len(part.encode()).to_bytes(8, "big") + part.encode())
    for name in sorted(adapter):
        value = np.ascontiguousarray(adapter[name])
        digest.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class NodeState:
    """Per-round files of one deployed node under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def exclusive(self) -> AbstractContextManager[None]:
        """This node's round state to one message at a time, across its app processes (Flower
        may run two at once): a step 3 checks and records its round under it."""
        return locked(self.directory)

    def secagg(self, session: bytes) -> bytes | None:
        """This node's secure-aggregation state for `session`, if it has one."""
        path = self._path("secagg", session.hex())
        return path.read_bytes() if path.exists() else None

    def keep_secagg(self, session: bytes, state: bytes) -> None:
        write_atomic(self._path("secagg", session.hex()), state)

    def masked_in(self, run: str, server_round: int) -> bytes | None:
        """The session in which this node masked its update for `run`'s `server_round`."""
        path = self._path("masked", _round_name(run, server_round))
        return path.read_bytes() if path.exists() else None

    def keep_masked(self, run: str, server_round: int, session: bytes) -> None:
        write_atomic(self._path("masked", _round_name(run, server_round)), session)

    def release(self, key: str) -> Release | None:
        """The release recorded under `key`, if the node made one."""
        path = self._path("release", key)
        if not path.exists():
            return None
        arrays, meta = from_npz(path.read_bytes())
        return Release(arrays, int(meta["examples"]), float(meta["loss"]))

    def keep_release(self, key: str, release: Release) -> None:
        write_atomic(self._path("release", key),
                     to_npz(release.arrays, examples=release.examples, loss=release.loss))

    def recall_noise(self, question: str) -> float | None:
        """The noise multiplier kept for `question` (`common/privacy.py`'s NoiseMemo), if any."""
        return self._noise().get(question)

    def keep_noise(self, question: str, noise: float) -> None:
        """Keep the newest NOISE_KEPT calibrations: a server that asks a new question every
        message costs the node a search each time, never a growing file."""
        kept = {q: z for q, z in self._noise().items() if q != question}
        kept[question] = noise
        newest = dict(list(kept.items())[-NOISE_KEPT:])
        with contextlib.suppress(OSError):  # a hint: a full or read-only disk changes no reply
            write_atomic(self.directory / NOISE_FILE, json.dumps(newest).encode())

    def _noise(self) -> dict[str, float]:
        try:
            with open(self.directory / NOISE_FILE, "rb") as handle:
                text = handle.read(NOISE_FILE_BYTES + 1)
            kept = json.loads(text) if len(text) <= NOISE_FILE_BYTES else None
        except (OSError, ValueError, RecursionError):  # none yet, or unreadable: never needed
            return {}
        if not isinstance(kept, dict):
            return {}
        return {q: z for q, z in kept.items() if isinstance(z, float)}

    def _path(self, kind: str, name: str) -> Path:
        digest = hashlib.sha256(f"{kind}:{name}".encode()).hexdigest()[:40]
        return self.directory / f"{kind}-{digest}"


def _round_name(run: str, server_round: int) -> str:
    return hashlib.sha256(f"{len(run)}:{run}:{server_round}".encode()).hexdigest()
