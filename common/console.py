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

from rich.console import Console
from rich.logging import RichHandler

FLOWER_LOGGER = "flwr"
QUIET_WORKERS = "FEDTUNE_QUIET_WORKERS"  # set for its Ray workers by a non-verbose simulation
# A relayed line (a SuperNode's or `flwr run --stream`'s output) dropped unless --verbose.
_NOISE = re.compile(r"DEBUG|Warning:|warnings\.warn\(|DEPRECATED|deprecated feature|"
                    r"It will be removed|^\s*$|entirely in future versions", re.IGNORECASE)

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
    if not verbose:
        handler.addFilter(_drop_deprecation_banners)
        warnings.filterwarnings("ignore")
        # Child processes (Ray's workers, Flower's tools) read these at start-up.
        os.environ["PYTHONWARNINGS"] = "ignore"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flower.addHandler(handler)


def quiet_worker() -> None:
    """In a simulation's Ray worker of a non-verbose command, keep Flower's errors only: its
    warnings there (an actor "Manually terminating" at shutdown) reach the console through Ray
    whenever the worker's output is relayed before the run ends."""
    if os.environ.get(QUIET_WORKERS) == "1" and not _configured:
        logging.getLogger(FLOWER_LOGGER).setLevel(logging.ERROR)


def _drop_deprecation_banners(record: logging.LogRecord) -> bool:
    """Flower's "DEPRECATED FEATURE" banners speak to fedtune's developers, not its users
    (docs/flower.md says why fedtune stays on `run_simulation`)."""
    return "DEPRECATED FEATURE" not in str(record.msg)


def keep_line(line: str, verbose: bool) -> bool:
    """Whether a relayed line of a Flower tool's output reaches the console."""
    return verbose or not _NOISE.search(line)


def filtered(lines: Iterable[bytes], verbose: bool) -> Iterator[bytes]:
    """The lines of a child process's output a person should see."""
    for raw in lines:
        if keep_line(raw.decode(errors="replace"), verbose):
            yield raw
