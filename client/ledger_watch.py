"""What a node's operator reads in its log after each round it trained: the round, the epsilon
its data set has spent with it, the budget, and where the ledger is.

`fedtune client` cannot see inside the ClientApp (another process, started by Flower), but the
ledger on its disk is where every round is recorded before it trains, so the command reads the
new entries from there. A ledger it cannot read is left to the ClientApp, which refuses to train
on it and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

LEDGER_GLOB = "ledger-*.json"  # client/ledger.py: one file per data set


class LedgerWatch:
    """The rounds the ledgers in one directory recorded since the last look."""

    def __init__(self, directory: Path, budget: float | None) -> None:
        self.directory, self.budget = directory, budget
        self.seen = {path: len(_rounds(path)) for path in self._ledgers()}
        self._stamp = self._stamps()

    def new_rounds(self) -> list[str]:
        """One line per round recorded since the last call (cheap when nothing changed)."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return []
        self._stamp = stamp
        lines = []
        for path in self._ledgers():
            rounds = _rounds(path)
            for entry in rounds[self.seen.get(path, 0):]:
                lines.append(self.line(path, entry))
            self.seen[path] = len(rounds)
        return lines

    def line(self, path: Path, entry: dict) -> str:
        budget = f" of budget {self.budget:g}" if self.budget is not None else ""
        return (f"fedtune: round {entry.get('round')} of run {entry.get('run')}: epsilon "
                f"spent {float(entry.get('epsilon', 0.0)):.3f}{budget} (recorded before it "
                f"trained); ledger {path.resolve()}")

    def _ledgers(self) -> list[Path]:
        return sorted(self.directory.glob(LEDGER_GLOB)) if self.directory.is_dir() else []

    def _stamps(self) -> dict[Path, tuple[int, int, int]]:
        """Each ledger's (inode, size, mtime): a ledger is replaced whole on every write."""
        stamps = {}
        for path in self._ledgers():
            try:
                stat = path.stat()
            except OSError:
                continue
            stamps[path] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return stamps


def _rounds(path: Path) -> list[dict]:
    try:
        rounds = json.loads(path.read_text()).get("rounds", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [entry for entry in rounds if isinstance(entry, dict)] \
        if isinstance(rounds, list) else []
