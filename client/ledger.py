"""The privacy ledger: what a node's data set has spent, on the node's own disk.

One JSON file per data set, named by a fingerprint of its records, so the same records share one
budget across runs, federations, splits and node names. Every round the node trained is an entry;
epsilon is recomputed from the whole history by an Opacus accountant, never carried as a running
sum. A round is recorded *before* it trains, under an exclusive lock with the file read again
inside it, so concurrent runs over one data set cannot both pass the budget or drop each other's
entries. The file is replaced atomically; a file that cannot be read stops training and is never
reset. The recorded events are the truth: read at another delta (a node whose policy changed it,
or a ledger kept at 1/(10 n) before nodes fixed their delta) the same history is simply accounted
at the new one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedtune.common.atomic_file import locked, write_atomic
from fedtune.common.config import DEFAULT_ACCOUNTANT
from fedtune.common.data import Examples
from fedtune.common.privacy import GaussianEvent, epsilon_spent

LEDGER_VERSION = 1
# The accountant of a ledger written before ledgers named theirs (RDP was the only default then).
FORMER_DEFAULT_ACCOUNTANT = "rdp"


class LedgerError(RuntimeError):
    """The ledger is unreadable, corrupt or belongs to other data; training must not go on."""


class BudgetExhausted(LedgerError):
    """One more round would take the data set past its budget; nothing was recorded."""

    def __init__(self, spent: float, after: float, budget: float) -> None:
        super().__init__(f"privacy budget {budget:g} would be passed (epsilon spent {spent:.3f}, "
                         f"{after:.3f} after this round); not training")
        self.spent = spent


@dataclass(frozen=True)
class LedgerEntry:
    """One release of this node's data: a round of DP-SGD it trained (and so may have released
    an update for), or a noised evaluation answer."""

    run: str
    client: str  # the node's name in that run
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: str  # UTC, ISO 8601
    epsilon: float  # total after this round, at the ledger's delta
    kind: str = "dp-sgd"  # what was released: a DP-SGD round, or a noised "evaluation" answer

    @property
    def event(self) -> GaussianEvent:
        return GaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)


def fingerprint(examples: Examples) -> str:
    """SHA-256 of the rows as a multiset: the same records in any order give the same key."""
    return _multiset_digest(json.dumps(list(examples.item(i))).encode()
                            for i in range(len(examples)))


def fingerprint_records(records: Iterable[Any]) -> str:
    """SHA-256 of raw records (e.g. a data file's rows) as a multiset, independent of how any
    run interprets them: key order inside a record and row order do not matter."""
    return _multiset_digest(json.dumps(r, sort_keys=True, ensure_ascii=False).encode()
                            for r in records)


def _multiset_digest(encoded: Iterable[bytes]) -> str:
    rows = sorted(hashlib.sha256(item).digest() for item in encoded)
    return hashlib.sha256(b"".join(rows)).hexdigest()


class Ledger:
    """The privacy spent by one data set; `open` it, check `epsilon_after`, then `spend`."""

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
        """The ledger of this data set in `directory`, or an empty one (written on `spend`).

        An empty `accountant` (the default) keeps an existing ledger's own accountant, so a
        ledger kept with RDP before PRV became the default goes on with RDP, and gives a new
        ledger PRV; a named one must match the ledger's (checked in `_read_entries`)."""
        path = Path(directory) / f"ledger-{data_fingerprint[:32]}.json"
        if not accountant:
            accountant = (_read(path).get("accountant", FORMER_DEFAULT_ACCOUNTANT)
                          if path.exists() else DEFAULT_ACCOUNTANT)
        ledger = cls(path, data_fingerprint, records, delta, accountant, [])
        ledger.entries = ledger._read_entries()
        return ledger

    def spent(self) -> float:
        """Epsilon spent by every recorded round."""
        return epsilon_spent([e.event for e in self.entries], self.delta, self.accountant)

    def epsilon_after(self, event: GaussianEvent) -> float:
        """Epsilon the data set would have spent after one more round `event`."""
        history = [e.event for e in self.entries] + [event]
        return epsilon_spent(history, self.delta, self.accountant)

    def spend(self, run: str, client: str, server_round: int, event: GaussianEvent,
              budget: float, kind: str = "dp-sgd") -> LedgerEntry:
        """Record one round if it keeps the data set within `budget` (else BudgetExhausted).

        Under an exclusive lock on the ledger directory, the file is read again, the budget
        checked against every entry now in it, and the file replaced atomically (temp file,
        fsync, rename): another process spending from the same data set waits, then sees this
        round.
        """
        with locked(self.path.parent):
            self.entries = self._read_entries()
            epsilon = self.epsilon_after(event)
            if epsilon > budget:
                raise BudgetExhausted(self.spent(), epsilon, budget)
            entry = LedgerEntry(run=run, client=client, round=server_round,
                                noise_multiplier=event.noise_multiplier,
                                sample_rate=event.sample_rate, steps=event.steps,
                                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                epsilon=epsilon, kind=kind)
            body = {"version": LEDGER_VERSION, "fingerprint": self.fingerprint,
                    "records": self.records, "delta": self.delta,
                    "accountant": self.accountant, "epsilon": epsilon,
                    "rounds": [asdict(e) for e in [*self.entries, entry]]}
            write_atomic(self.path, (json.dumps(body, indent=2) + "\n").encode())
            self.entries.append(entry)
            return entry

    def record(self, run: str, client: str, server_round: int,
               event: GaussianEvent) -> LedgerEntry:
        """Record one round whatever it spends (tests and tools; training uses `spend`)."""
        return self.spend(run, client, server_round, event, budget=float("inf"))

    def _read_entries(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        stored = _read(self.path)
        path = self.path
        if stored.get("fingerprint") != self.fingerprint:
            raise LedgerError(f"privacy ledger {path} belongs to other data (fingerprint "
                              f"{stored.get('fingerprint')!r}); refusing to train")
        if stored.get("delta") != self.delta:  # the events are the record; delta is a view
            log(WARNING, "Privacy ledger %s was kept at delta %r; accounting its history at "
                "this node's delta %r from now on", path, stored.get("delta"), self.delta)
        if stored.get("accountant", FORMER_DEFAULT_ACCOUNTANT) != self.accountant:
            raise LedgerError(f"privacy ledger {path} is kept with the "
                              f"{stored.get('accountant')!r} accountant, this node asks "
                              f"{self.accountant!r}; keep one accountant per data set")
        try:
            return [LedgerEntry(**entry) for entry in stored["rounds"]]
        except (KeyError, TypeError) as error:
            raise LedgerError(f"privacy ledger {path} is corrupt ({error}); refusing to train "
                              "(it is kept as it is, never reset)") from None


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
