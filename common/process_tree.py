"""`fedtune server` and `fedtune client` own the processes they start, and the processes those
start: a stop request ends them all, quickly, and nothing is left holding a port.

Flower's tools do not stay in one process group: the SuperLink starts `flower-superexec` in a
session of its own, which starts the ServerApp; the SuperNode starts `flower-superexec`, which
starts each ClientApp. So a stop walks the tree (Linux `/proc`), signals every process in it at
once, and kills what is still there after a grace period. The command also becomes a child
subreaper, so a process whose parent died is re-parented to it and stays in its tree.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
PROC = Path("/proc")


class StopRequested(BaseException):
    """SIGTERM or SIGINT reached the command: unwind, stopping what it started.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def become_subreaper() -> None:
    """Orphans of this process's descendants come to it, not to init (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise StopRequested (in the main thread)."""

    def raise_stop(signum: int, _frame: FrameType | None) -> None:
        raise StopRequested(signum)

    previous = {s: signal.signal(s, raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_signals() -> None:
    """After a stop began: a second Ctrl-C must not interrupt the clean-up."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _parent(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in sorted(children.get(queue.pop(0), [])):
            found.append(child)
            queue.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie waiting to be reaped is not)."""
    state = _stat(pid)
    return state is not None and state[0] not in ("Z", "X")


def stop_tree(roots: Iterable[subprocess.Popen | None], grace: float = 10.0, *,
              orphans: bool = False) -> list[int]:
    """SIGTERM each root and every descendant at once; SIGKILL whatever is left after `grace`
    seconds; reap them. `orphans`: also every other descendant of this process (a subreaper's
    adopted ones). Returns the pids that had to be killed."""
    roots = [p for p in roots if p is not None]
    pids = [pid for p in roots if p.poll() is None for pid in (p.pid, *descendants(p.pid))]
    if orphans:
        pids += descendants(os.getpid())
    killed = stop_pids(pids, grace)
    for process in roots:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    return killed


def stop_pids(pids: Iterable[int], grace: float = 10.0) -> list[int]:
    """SIGTERM these processes at once, SIGKILL those left after `grace` seconds, reap those
    that are this process's children; return the killed ones."""
    pids = list(dict.fromkeys(pids))
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        _reap(pids)
        time.sleep(0.1)
    killed = [pid for pid in pids if alive(pid)]
    _signal_all(killed, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL takes effect soon, not at once
    while True:
        _reap(pids)
        if not any(alive(pid) for pid in killed) or time.monotonic() >= deadline:
            return killed
        time.sleep(0.1)


def mentioning(text: str, commands: tuple[str, ...]) -> list[int]:
    """Live processes, other than this one, whose command line holds `text` (a path) and one of
    `commands` (so that a `tail -f` of a log there is not one of them)."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in command and any(c in command for c in commands) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _reap(pids: list[int]) -> None:
    """Collect the exit status of those of `pids` that are (now) this process's children."""
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _parent(pid: int) -> int | None:
    state = _stat(pid)
    return None if state is None else int(state[1])


def _stat(pid: int) -> list[str] | None:
    """(state, ppid, ...) from /proc/PID/stat, or None when the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the command name may hold spaces and ")"


def open_by_others(path: Path) -> list[int]:
    """The processes other than this one with `path` open (those whose /proc this user reads)."""
    target, holders = str(path.resolve()), []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                holders.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return holders
