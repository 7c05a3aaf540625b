"""Progress a person can follow: while a round runs, which exchange it is in, how many clients have
answered and for how long; after it, one line with its accuracy and the privacy spent.

On a terminal this is one live `rich` display; elsewhere (a log file, `flwr run --stream`) only the
lines printed after each round. The simulation engine starts a display for its whole run
(`use`); the ServerApp reports to whichever display is current.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.common.console import console as shared_console


class RoundProgress:
    """One bar for the current round: clients answered of those asked, time, last accuracy and
    epsilon."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or shared_console()
        self.rounds = 0
        self._round = 0
        self._live = Progress(
            TextColumn("[bold cyan]{task.description}"), BarColumn(bar_width=24),
            TextColumn("{task.fields[answered]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"), console=self.console, transient=True,
            refresh_per_second=2)
        self._task = self._live.add_task("starting", total=None, answered="", last="",
                                         visible=False)
        self._expected: int | None = None
        self._answered = 0
        self._last = ""  # the previous round's figures
        self._started = False

    def start(self) -> None:
        if self.console.is_terminal and not self._started:
            self._live.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._live.stop()
            self._started = False

    def round_started(self, server_round: int, rounds: int) -> None:
        self._round, self.rounds = server_round, rounds
        self._expected = None
        self._live.reset(self._task, description=f"round {server_round}/{rounds}", total=None,
                         answered="", last=self._last, visible=True)

    def exchange(self, step: str, expected: int | None = None) -> None:
        """A new step of the round: a message exchange with `expected` clients asked, or the
        server's own work (None); the time shown stays the round's."""
        description = f"round {self._round}/{self.rounds} {step}" if self._round else step
        self._expected, self._answered = expected, 0
        self._live.update(self._task, description=description, total=expected, completed=0,
                          answered=self._count(), visible=True)

    def answered(self, count: int = 1) -> None:
        """`count` more clients have answered the current exchange."""
        self._answered += count
        self._live.update(self._task, completed=self._answered, answered=self._count())

    def _count(self) -> str:
        return "" if self._expected is None else f"{self._answered}/{self._expected} clients"

    def round_done(self, row: dict[str, Any]) -> None:
        """Print the round's line above the display and keep its figures on the bar."""
        self.console.print(round_line(row, self.rounds), highlight=False, soft_wrap=True)
        accuracy = f"accuracy {row['accuracy']:.3f}"
        epsilon = _epsilon(row)
        self._last = f"last: {accuracy}" + (f"  ε {epsilon:.2f}" if epsilon is not None else "")
        self._live.update(self._task, last=self._last)

    def watch(self, grid: Grid) -> Grid:
        """`grid`, reporting each reply to this display as it arrives."""
        return grid if isinstance(grid, WatchedGrid) else WatchedGrid(grid, self)


STEPS = {"query": "naming clients", "train": "training", "evaluate": "evaluating"}


class WatchedGrid(Grid):
    """A Grid that counts replies as they arrive; everything else is the wrapped Grid's."""

    def __init__(self, grid: Grid, progress: RoundProgress) -> None:
        self.inner, self.progress = grid, progress

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Flower's own push-then-poll loop (`Grid.send_and_receive`), counting replies."""
        messages = list(messages)
        if messages:
            kind = messages[0].metadata.message_type
            base, _, stage = kind.partition(".")
            self.progress.exchange(stage.replace("_", " ") or STEPS.get(base, base),
                                   len(messages))
        waiting = set(self.inner.push_messages(messages))
        replies: list[Message] = []
        end = None if timeout is None else time.time() + timeout
        interval = float(getattr(self.inner, "pull_interval", 0.1))
        while waiting and (end is None or time.time() < end):
            arrived = list(self.inner.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if arrived:
                self.progress.answered(len(arrived))
            if waiting:
                time.sleep(interval)
        return replies


@contextmanager
def shown(progress: RoundProgress) -> Iterator[RoundProgress]:
    """`progress` on the console while the block runs (the caller hands it to the ServerApp)."""
    progress.start()
    try:
        yield progress
    finally:
        progress.stop()


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The line printed after each round."""
    worst = row.get("client_accuracy_worst")
    worst_text = f"  worst client {worst:.3f}" if worst is not None else ""
    epsilon = _epsilon(row)
    epsilon_text = f"  ε {epsilon:.2f}" if epsilon is not None else ""
    perplexity = row.get("perplexity")
    loss_text = f"  loss {row['loss']:.3f}" + (f"  perplexity [bold]{perplexity:.2f}[/]"
                                               if perplexity is not None else "")
    clients = f"  clients {row['clients']}" if "clients" in row else ""
    if "round_abandoned" in row:  # the adapter did not change: say why, not just "clients 0"
        clients = f"  [bold red]abandoned[/] ({escape(row['round_abandoned'])})"
    return (f"[bold cyan]round {row['round']}/{rounds}[/]{clients}"
            f"  accuracy [bold]{row['accuracy']:.3f}[/]{loss_text}"
            f"{worst_text}{epsilon_text}  {row['seconds']:.1f}s")


def _epsilon(row: dict[str, Any]) -> float | None:
    return row.get("epsilon_max", row.get("epsilon_client_level"))
