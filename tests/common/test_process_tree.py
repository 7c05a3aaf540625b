"""Stopping everything a command started, including what its children started in sessions of
their own (as Flower's SuperLink starts its SuperExec)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fedtune.common.process_tree import (
    StopRequested,
    alive,
    descendants,
    mentioning,
    stop_on_signals,
    stop_tree,
)

# A child that starts a grandchild in a new session (out of the child's process group), then
# ignores SIGTERM or not as asked (the grandchild keeps the default), then prints the
# grandchild's pid: once it is read, the child is ready (a handler set after the print lost the
# race on a loaded machine).
TREE = """
import signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                              start_new_session=True)
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(grandchild.pid, flush=True)
time.sleep(300)
"""


def start_tree(kind: str) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen([sys.executable, "-c", TREE, kind], stdout=subprocess.PIPE,
                             text=True)
    grandchild = int(child.stdout.readline())
    return child, grandchild


@pytest.mark.parametrize("kind", ["polite", "stubborn"])
def test_a_tree_is_stopped_with_its_detached_grandchild(kind):
    child, grandchild = start_tree(kind)
    assert grandchild in descendants(child.pid)

    started = time.monotonic()
    killed = stop_tree([child], grace=2)

    assert not alive(child.pid) and not alive(grandchild)
    assert killed == ([child.pid] if kind == "stubborn" else [])
    assert time.monotonic() - started < 8


def test_a_stop_signal_becomes_an_exception_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested) as stop, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert stop.value.signum == signal.SIGTERM and str(stop.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_leftovers_are_found_by_their_state_directory_and_their_command(tmp_path):
    state = f"{tmp_path}/state/"
    sleep = "import time; time.sleep(60)"
    ours = subprocess.Popen([sys.executable, "-c", sleep, "flower-superlink", f"{state}db"])
    reader = subprocess.Popen([sys.executable, "-c", sleep, "tail", f"{state}superlink.log"])
    sibling = subprocess.Popen([sys.executable, "-c", sleep, "flower-superlink",
                                f"{tmp_path}/state-2/db"])
    try:
        time.sleep(0.5)
        assert mentioning(state, ("flower-superlink", "nginx")) == [ours.pid]
    finally:
        for process in (ours, reader, sibling):
            process.kill()
            process.wait()
