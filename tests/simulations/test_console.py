"""The first run a newcomer sees: `fedtune simulate` on the built-in default, on a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fedtune.common.console import keep_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
def test_the_default_simulation_shows_progress_and_no_library_noise(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"}  # a terminal
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-m", "fedtune", "simulate", "--num-clients", "2",
                           "--rounds", "1", "--local-steps", "2", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    screen = ANSI.sub("", done.stdout + done.stderr).replace("\r", "\n")
    lines = [line for line in screen.splitlines() if line.strip()]
    noisy = [line for line in lines if re.search("debug|warning|deprecated", line, re.I)]
    assert not noisy, noisy[:5]
    # the live display while the round runs, then the round's line
    assert any(re.search(r"round 1/1 training .*\d/2 clients \d:\d\d:\d\d", x) for x in lines)
    assert any(re.search(r"round 1/1  clients 2  accuracy \d\.\d{3}", x) for x in lines)


def test_relayed_noise_is_dropped_unless_verbose():
    banner = "WARNING :   DEPRECATED FEATURE: The `run_simulation` function is deprecated"
    future = "/x/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated"
    debug = "DEBUG :   Pre-registering run with id 5"
    kept = "INFO :      [RUN 1, ROUND 2]"
    assert [keep_line(x, verbose=False) for x in (banner, future, debug, kept)] == [
        False, False, False, True]
    assert all(keep_line(x, verbose=True) for x in (banner, future, debug, kept))


def test_only_a_non_verbose_commands_workers_keep_flowers_errors_alone(monkeypatch):
    import logging

    from fedtune.common import console

    flower = logging.getLogger(console.FLOWER_LOGGER)
    monkeypatch.setattr(flower, "level", logging.DEBUG)  # restored after the test
    monkeypatch.setattr(flower, "propagate", flower.propagate)
    monkeypatch.setattr(console, "_configured", False)
    monkeypatch.delenv(console.QUIET_WORKERS, raising=False)
    console.quiet_worker()  # a deployed node, or a verbose run's worker: untouched
    assert flower.level == logging.DEBUG
    monkeypatch.setenv(console.QUIET_WORKERS, "1")
    monkeypatch.setattr(console, "_configured", True)
    console.quiet_worker()  # the command's own process keeps its warnings
    assert flower.level == logging.DEBUG
    monkeypatch.setattr(console, "_configured", False)
    console.quiet_worker()  # a worker of a non-verbose command
    assert flower.level == logging.ERROR
