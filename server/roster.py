"""Stable client names behind Flower's node ids, so sampling and per-client records repeat.

Node ids change when a simulation restarts; a name does not. A simulated node is named by the
engine's record (`simulations/node_names.py`); a node under `fedtune server` by the key it was
registered with (its `--node` file's stem, `server/node_registry.py`): neither costs a message,
and a deployed node cannot choose its name. Only where no such record exists (a bare `flwr run`)
is a node asked its name (one `identify` query). A name is never taken from the node holding it:
a second claim is refused, so one node cannot act, or refuse, in another's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune.common import record_keys as keys
from fedtune.common.console import printable

MAX_NAME = 100  # characters of a name a simulated client gives itself: it lands in every log


def answering_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for. An error the SuperLink writes in a node's place (it
    stopped heartbeating, or did not answer in time) has the SuperLink as its sender."""
    for message in sent:
        if message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


class Roster:
    """Maps connected node ids to names; retired names are never sampled again."""

    def __init__(self, known: Callable[[int], str | None] | None = None, *,
                 ask: bool = True) -> None:
        """`known`: names a node id without asking it, or None when it cannot; `ask`: whether
        a node `known` cannot name is asked its name (False: it is left out, as a deployed
        node whose key was not registered by name)."""
        self._known, self._ask = known, ask
        self._node_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._refused: dict[int, str] = {}  # node id -> a name it claimed that another holds
        self.retired: set[str] = set()

    def name_of(self, node_id: int) -> str:
        return self._name_of.get(node_id, f"node-{node_id}")

    def active(self) -> list[tuple[str, int]]:
        """(name, node id) of every known, connected, not retired client, sorted by name."""
        return sorted((n, i) for n, i in self._node_of.items() if n not in self.retired)

    def retire(self, name: str) -> None:
        self.retired.add(name)

    def refresh(self, grid: Grid, wait_for: int, timeout: float) -> None:
        """Ask new nodes for their names; wait until `wait_for` clients are connected.

        Retired clients count as connected: a node that spent its budget is still there.
        """
        waited, shown = 0.0, -1
        while True:
            connected = set(grid.get_node_ids())
            self._forget(set(self._name_of) - connected)
            unknown = self._name_known(sorted(connected - set(self._name_of)
                                              - set(self._refused)))
            if unknown and self._ask:
                self._identify(grid, unknown, timeout)
            if len(self._node_of) >= wait_for:
                return
            if len(self._node_of) != shown:  # one line each time the count changes
                shown = len(self._node_of)
                log(INFO, "Waiting for clients: %d of %d connected", shown, wait_for)
            if waited >= timeout:
                raise TimeoutError(f"only {len(self._node_of)} of {wait_for} clients connected "
                                   f"within {timeout:.0f}s")
            time.sleep(1.0)
            waited += 1.0

    def _name_known(self, node_ids: list[int]) -> list[int]:
        """Name the nodes `known` can name; return the ones that must be asked."""
        if self._known is None:
            return node_ids
        unknown = []
        for node_id in node_ids:
            name = self._known(node_id)
            if name is None:
                unknown.append(node_id)
            else:
                self._add(node_id, name)
        return unknown

    def _identify(self, grid: Grid, node_ids: list[int], timeout: float) -> None:
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                   for n in node_ids]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node_id = answering_node(reply, queries)
            if reply.has_error():
                log(WARNING, "Node %d did not identify itself: %s", node_id,
                    printable(reply.error.reason))
                continue
            config = reply.content.config_records.get(keys.CONFIG)
            name = None if config is None else config.get(keys.CLIENT_NAME)
            if not isinstance(name, str) or not name or printable(name) != name \
                    or len(name) > MAX_NAME:
                log(WARNING, "Node %d did not identify itself: no usable name in its reply "
                    "(a printable line of at most %d characters)", node_id, MAX_NAME)
                continue
            self._add(node_id, name)

    def _add(self, node_id: int, name: str) -> None:
        holder = self._node_of.get(name)
        if holder is not None and holder != node_id:  # refused, never an eviction
            self._refused[node_id] = name
            log(WARNING, "Node %d claims the name %s, which node %d holds: it is left out",
                node_id, name, holder)
            return
        self._node_of[name], self._name_of[node_id] = node_id, name

    def _forget(self, node_ids: set[int]) -> None:
        for node_id in node_ids:
            name = self._name_of.pop(node_id)
            if self._node_of.get(name) == node_id:
                del self._node_of[name]
