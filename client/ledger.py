"""The privacy ledger: what a node's data set has spent, on the node's own disk.

One JSON file per data set, named by a fingerprint of its rows, so the same records share one
budget across runs, federations and node names. Every round the node trained is an entry; epsilon
is recomputed from the whole history by an Opacus accountant, never carried as a running sum.
The file is replaced atomically; a file that cannot be read stops training and is never reset.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomic
from common.data import Examples
from common.privacy import GaussianEvent, epsilon_spent

LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger is unreadable, corrupt or belongs to other data; training must not go on."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD this node released an update for."""

    run: str
    client: str  # the node's name in that run
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: str  # UTC, ISO 8601
    epsilon: float  # total after this round, at the ledger's delta

    @property
    def event(self) -> GaussianEvent:
        return GaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)


def fingerprint(examples: Examples) -> str:
    """SHA-256 of the rows as a multiset: the same records in any order give the same key."""
    rows = sorted(hashlib.sha256(json.dumps(list(examples.item(i))).encode()).digest()
                  for i in range(len(examples)))
    return hashlib.sha256(b"".join(rows)).hexdigest()


class Ledger:
    """The privacy spent by one data set; `open` it, check `epsilon_after`, then `record`."""

    def __init__(self, path: Path, data_fingerprint: str, records: int, delta: float,
                 accountant: str, entries: list[LedgerEntry]) -> None:
        self.path = path
        self.fingerprint = data_fingerprint
        self.records = records
        self.delta = delta
        self.accountant = accountant
        self.entries = entries

    @classmethod
    def open(cls, directory: str | Path, data_fingerprint: str, records: int, delta: float,
             accountant: str) -> Ledger:
        """The ledger of this data set in `directory`, or an empty one (written on `record`)."""
        path = Path(directory) / f"ledger-{data_fingerprint[:32]}.json"
        if not path.exists():
            return cls(path, data_fingerprint, records, delta, accountant, [])
        stored = _read(path)
        if stored.get("fingerprint") != data_fingerprint:
            raise LedgerError(f"privacy ledger {path} belongs to other data (fingerprint "
                              f"{stored.get('fingerprint')!r}); refusing to train")
        if stored.get("delta") != delta:
            raise LedgerError(f"privacy ledger {path} accounts at delta {stored.get('delta')!r}, "
                              f"this run asks {delta!r}; keep one delta per data set")
        try:
            entries = [LedgerEntry(**entry) for entry in stored["rounds"]]
        except (KeyError, TypeError) as error:
            raise LedgerError(f"privacy ledger {path} is corrupt ({error}); refusing to train "
                              "(it is kept as it is, never reset)") from None
        return cls(path, data_fingerprint, records, delta, accountant, entries)

    def spent(self) -> float:
        """Epsilon spent by every recorded round."""
        return epsilon_spent([e.event for e in self.entries], self.delta, self.accountant)

    def epsilon_after(self, event: GaussianEvent) -> float:
        """Epsilon the data set would have spent after one more round `event`."""
        history = [e.event for e in self.entries] + [event]
        return epsilon_spent(history, self.delta, self.accountant)

    def record(self, run: str, client: str, server_round: int,
               event: GaussianEvent) -> LedgerEntry:
        """Append a round and replace the file atomically (temp file, fsync, rename)."""
        epsilon = self.epsilon_after(event)
        entry = LedgerEntry(run=run, client=client, round=server_round,
                            noise_multiplier=event.noise_multiplier,
                            sample_rate=event.sample_rate, steps=event.steps,
                            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            epsilon=epsilon)
        body = {"version": LEDGER_VERSION, "fingerprint": self.fingerprint,
                "records": self.records, "delta": self.delta, "accountant": self.accountant,
                "epsilon": epsilon, "rounds": [asdict(e) for e in [*self.entries, entry]]}
        write_atomic(self.path, (json.dumps(body, indent=2) + "\n").encode())
        self.entries.append(entry)
        return entry


def _read(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LedgerError(f"privacy ledger {path} is unreadable ({error}); refusing to train "
                          "(it is kept as it is, never reset)") from None
    if not isinstance(stored, dict) or stored.get("version") != LEDGER_VERSION:
        raise LedgerError(f"privacy ledger {path} is not a version-{LEDGER_VERSION} fedtune "
                          "ledger; refusing to train")
    return stored
