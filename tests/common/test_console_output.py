"""What reaches a deployment's console from Flower's processes: each record once, no colour codes
where the output is no terminal, no empty records."""

from __future__ import annotations

import logging

import pytest

from fedtune.common import console

COLOURED = b"\x1b[92mINFO \x1b[0m:      round 1 done\n"


def test_colour_codes_reach_a_terminal_only():
    assert list(console.filtered([COLOURED], verbose=False)) == [COLOURED]
    assert list(console.filtered([COLOURED], verbose=False, plain=True)) == [
        b"INFO :      round 1 done\n"]


def test_flwr_runs_own_steps_are_shown_only_when_verbose():
    steps = [b"Using SuperLink: fedtune (127.0.0.1:42625)\n",
             b"\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `1847756857218007979`\n",
             b"INFO :      Start `flwr-serverapp` process\n"]
    started = b"Successfully started run 1847756857218007979\n"  # the run id: kept
    assert list(console.filtered([*steps, started], verbose=False)) == [started]
    assert list(console.filtered([*steps, started], verbose=True)) == [*steps, started]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_record_with_nothing_in_it_is_never_shown(verbose):
    empty = [b"\x1b[92mINFO \x1b[0m:      \n", b"INFO :      \n", b"WARNING :   \n"]
    assert list(console.filtered(empty, verbose=verbose)) == []


@pytest.fixture()
def app_process(monkeypatch):
    """A deployed app's process under a non-verbose command; Flower's logger restored after."""
    flower = logging.getLogger(console.FLOWER_LOGGER)
    monkeypatch.setattr(flower, "propagate", True)
    monkeypatch.setattr(flower, "filters", [])
    monkeypatch.setattr(console, "_configured", False)
    monkeypatch.delenv(console.QUIET_WORKERS, raising=False)
    monkeypatch.setenv(console.QUIET_APPS, "1")
    return flower


def record(level: int, path: str) -> logging.LogRecord:
    return logging.LogRecord(console.FLOWER_LOGGER, level, path, 1, "message", None, None)


def test_a_deployed_app_prints_fedtunes_lines_and_flowers_warnings_once(app_process):
    import flwr

    flowers = f"{flwr.__path__[0]}/server/grid/grid.py"
    console.quiet_worker()
    console.quiet_worker()  # idempotent: one filter

    assert app_process.propagate is False  # no second copy through the root logger
    assert len(app_process.filters) == 1
    assert app_process.filter(record(logging.INFO, __file__))  # fedtune's own line
    assert not app_process.filter(record(logging.INFO, flowers))  # Flower's chatter
    assert app_process.filter(record(logging.WARNING, flowers))


def test_a_verbose_commands_app_keeps_flowers_lines_but_prints_them_once(app_process,
                                                                          monkeypatch):
    monkeypatch.setenv(console.QUIET_APPS, "0")
    console.quiet_worker()
    assert app_process.propagate is False and app_process.filters == []
