"""What a person sees on the console: fedtune's own progress and errors, not its libraries' chatter.

By default library warnings (transformers', Ray's FutureWarnings), Flower's DEBUG and INFO lines
and its deprecation banners are off, and Flower's records print once (not again through the root
logger a library configured); `--verbose` brings them all back.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

FLOWER_LOGGER = "flwr"
QUIET_WORKERS = "FEDTUNE_QUIET_WORKERS"  # set for its Ray workers by a non-verbose simulation
# set by a non-verbose command for the app processes Flower starts under it (a deployed
# ServerApp or ClientApp): they then print Flower's own records from WARNING up only
QUIET_APPS = "FEDTUNE_QUIET_APPS"
# A relayed line (a SuperNode's or `flwr run --stream`'s output) dropped unless --verbose.
_NOISE = re.compile(r"DEBUG|Warning:|warnings\.warn\(|DEPRECATED|deprecated feature|"
                    r"It will be removed|^\s*$|entirely in future versions|"
                    # `flwr run --stream`'s own steps: fedtune's ready line already said them
                    r"^Using SuperLink:|Starting logstream|Start `flwr-serverapp` process",
                    re.IGNORECASE)
# Flower's `log(INFO, "")`, a line with a level and nothing else: never shown
_EMPTY_RECORD = re.compile(r"^\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*$")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

FOREIGN_TEXT_LIMIT = 300  # characters of another party's text shown in a log line or record


def printable(text: object, limit: int = FOREIGN_TEXT_LIMIT) -> str:
    """Another party's text (a client's refusal reason, an error, its metric names) as one
    bounded line: control characters escaped (no forged log lines, no terminal escapes)."""
    text = str(text)
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text) - limit} more characters)"


_console = Console(stderr=True)
_configured = False  # configure() ran in this process: the command's own, not a worker


def console() -> Console:
    """The one console fedtune prints to (stderr); progress displays and log lines share it."""
    return _console


def configure(verbose: bool) -> None:
    """Set up this process's (and its children's) console output once, at the command's start."""
    global _configured
    _configured = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import flwr.common.logger  # noqa: F401  (Flower adds its console handler on import)

    flower = logging.getLogger(FLOWER_LOGGER)
    flower.propagate = False  # each record once: no second copy through the root logger
    for handler in list(flower.handlers):
        if type(handler).__name__ == "ConsoleHandler":  # Flower's own: prints past the display
            flower.removeHandler(handler)
    handler = RichHandler(console=_console, show_time=verbose, show_path=False,
                          level=logging.DEBUG if verbose else logging.WARNING)
    os.environ[QUIET_APPS] = "0" if verbose else "1"  # read by the app processes under it
    if not verbose:
        handler.addFilter(_drop_deprecation_banners)
        warnings.filterwarnings("ignore")
        # Child processes (Ray's workers, Flower's tools) read these at start-up.
        os.environ["PYTHONWARNINGS"] = "ignore"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flower.addHandler(handler)


def quiet_worker() -> None:
    """In an app process a command started (a simulation's Ray worker, a deployed ServerApp or
    ClientApp; never the command's own process): Flower's records once, not a second time
    through the root logger that opacus configures when it is imported. Under a non-verbose
    command, a simulation's workers keep Flower's errors alone (their warnings, an actor
    "Manually terminating" at shutdown, reach the console through Ray whenever the worker's
    output is relayed before the run ends) and a deployed app drops Flower's own DEBUG and
    INFO records (blank lines, each message received and sent) but keeps fedtune's."""
    if _configured:
        return
    flower = logging.getLogger(FLOWER_LOGGER)
    flower.propagate = False
    if os.environ.get(QUIET_WORKERS) == "1":
        flower.setLevel(logging.ERROR)
    elif os.environ.get(QUIET_APPS) == "1" and _fedtune_or_warning not in flower.filters:
        flower.addFilter(_fedtune_or_warning)


def _fedtune_or_warning(record: logging.LogRecord) -> bool:
    """A record of fedtune's own code at any level, or of Flower's from WARNING up."""
    import flwr

    return record.levelno >= logging.WARNING or \
        not record.pathname.startswith(str(Path(flwr.__file__).parent))


def _drop_deprecation_banners(record: logging.LogRecord) -> bool:
    """Flower's "DEPRECATED FEATURE" banners speak to fedtune's developers, not its users
    (docs/flower.md says why fedtune stays on `run_simulation`)."""
    return "DEPRECATED FEATURE" not in str(record.msg)


def keep_line(line: str, verbose: bool) -> bool:
    """Whether a relayed line of a Flower tool's output reaches the console."""
    line = _COLOUR.sub("", line)
    return not _EMPTY_RECORD.match(line) and (verbose or not _NOISE.search(line))


def filtered(lines: Iterable[bytes], verbose: bool, *, plain: bool = False) -> Iterator[bytes]:
    """The lines of a child process's output a person should see; `plain` (output that is no
    terminal: a file, a pipe, a service's journal): without colour codes."""
    for raw in lines:
        text = raw.decode(errors="replace")
        if keep_line(text, verbose):
            yield _COLOUR.sub("", text).encode() if plain else raw
