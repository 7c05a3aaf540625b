"""The real `fedtune` command as benchmarks run it: a child process, its wall time, and the
rounds it logged, read through the run directory's own reader."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.server.metrics_log import read_rounds
from fedtune.server.run_summary import failed_replies


@dataclass(frozen=True)
class Finished:
    """How one `fedtune` process ended: `error` is its last stderr line when it failed."""

    seconds: float
    error: str | None


def fedtune(command: str, flags: Sequence[object], out: Path | None = None,
            env: Mapping[str, str] | None = None, check: bool = False) -> Finished:
    """`python -m fedtune COMMAND FLAGS [--out OUT]`, captured and timed; a failure is returned,
    or raised with `check` (with the end of its stderr, for whoever reads the benchmark's log)."""
    argv = [sys.executable, "-m", "fedtune", command, *map(str, flags)]
    if out is not None:
        argv += ["--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True,
                          env=None if env is None else dict(env))
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode == 0:
        return Finished(seconds, None)
    lines = done.stderr.strip().splitlines()
    error = lines[-1] if lines else f"exit {done.returncode}"
    if check:
        raise RuntimeError(f"{' '.join(argv[2:])} failed: {done.stderr[-2000:] or error}")
    return Finished(seconds, error)


def last_round(out: Path) -> dict[str, Any]:
    """The metrics row of the last round a finished run logged."""
    return read_rounds(out)[-1]


def lost_clients(out: Path) -> str:
    """Why a finished run's figures do not count ("" when they do): a sampled client that
    failed (`failed_replies`, what `fedtune simulate` warns of) or a round that aggregated
    nothing. A simulation's clients fail only when something outside the run breaks (Ray ends
    its actors under memory pressure), and the run then goes on from a smaller average or none,
    exit status 0, so its last accuracy is not the setting's."""
    rows = read_rounds(out)
    abandoned = [f"round {row['round']} abandoned ({row['round_abandoned']})"
                 for row in rows if row.get("round_abandoned")]
    return "; ".join(filter(None, [failed_replies(rows), *abandoned]))
