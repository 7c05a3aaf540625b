"""Outsiders without a registered key, on raw TLS connections to the Fleet proxy: oversized
bodies, trickled bodies, stalled requests, and junk bodies at the size limit, each from its own
source addresses in 127.0.0.0/8, bounded in time and in number of requests.

Each request's outcome is the HTTP status nginx (or the SuperLink behind it) answered, or
`closed` when the connection ended without an answer, or `held` when the outsider itself gave
up at the deadline with the request still open (`unanswered` if it began too late to tell).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("oversized", "trickle", "stall", "junk")
TARGET = "/v1/fleet/push-object"  # the route a node's adapter goes through
PIECE = 64 * 1024


@dataclass(frozen=True)
class Plan:
    """How much load, from where, for how long."""

    addresses: int = 12  # 127.0.0.2 onwards; each plays one kind, in turn
    seconds: float = 60.0  # the outsiders stop at this deadline
    requests: int = 4000  # and after this many requests in all
    oversized_bytes: int = 64 * 1024 * 1024  # what an oversized request announces or streams
    streams: int = 4  # concurrent connections per address (trickle: limit_conn + 4, junk:
    # limit_conn)
    trickle_every: float = 5.0  # s between two bytes of a trickled body
    kinds: tuple[str, ...] = KINDS

    def sources(self) -> list[tuple[str, str]]:
        """(source address, kind) for each outsider address."""
        return [(f"127.0.0.{2 + i}", self.kinds[i % len(self.kinds)])
                for i in range(self.addresses)]


@dataclass
class Tally:
    """Outcomes per kind: statuses, seconds until the answer, body bytes sent."""

    started: int = 0
    statuses: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in KINDS})
    seconds: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    sent: Counter = field(default_factory=Counter)

    def record(self, kind: str, status: str, seconds: float, sent: int) -> None:
        self.statuses[kind][status] += 1
        self.seconds[kind].append(seconds)
        self.sent[kind] += sent

    def summary(self) -> dict[str, dict]:
        out = {}
        for kind in KINDS:
            times = sorted(self.seconds[kind])
            out[kind] = {"requests": len(times), "statuses": dict(self.statuses[kind]),
                         "body_mib_sent": round(self.sent[kind] / 2**20, 1),
                         "median_s": round(times[len(times) // 2], 2) if times else None,
                         "max_s": round(times[-1], 2) if times else None}
        return out


class Outsiders:
    """The load against one proxy; `run` returns when the deadline or the request cap is hit."""

    def __init__(self, port: int, ca_cert: Path, body_limit: int, connections: int,
                 plan: Plan) -> None:
        self.port, self.plan, self.body_limit = port, plan, body_limit
        self.connections = connections  # the proxy's limit_conn per address
        self.context = ssl.create_default_context(cafile=str(ca_cert))
        self.tally = Tally()
        self.deadline = 0.0

    async def run(self) -> Tally:
        self.deadline = time.monotonic() + self.plan.seconds
        tasks = []
        for source, kind in self.plan.sources():
            # trickles try more than limit_conn lets in; junk fills what it lets in
            streams = {"trickle": self.connections + 4,
                       "junk": self.connections}.get(kind, self.plan.streams)
            loop = getattr(self, f"_{kind}")
            tasks += [asyncio.create_task(self._repeat(loop, kind, source)) for _ in
                      range(streams)]
        await asyncio.gather(*tasks)
        return self.tally

    def _open_budget(self) -> bool:
        if time.monotonic() >= self.deadline or self.tally.started >= self.plan.requests:
            return False
        self.tally.started += 1
        return True

    async def _repeat(self, attempt, kind: str, source: str) -> None:
        while self._open_budget():
            began, sent = time.monotonic(), [0]
            try:
                status = await attempt(source, sent)
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ConnectionError):
                status = "closed"
            self.tally.record(kind, status, time.monotonic() - began, sent[0])
            if kind == "trickle" and status != "held":
                await asyncio.sleep(1)  # refused: try again, without spending the budget

    @asynccontextmanager
    async def _exchange(self, source: str):
        """(writer, the answer's status as a task) of a fresh connection from `source`; the
        connection is dropped without a TLS goodbye afterwards, as an outsider would."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.context, server_hostname="localhost",
            local_addr=(source, 0))
        answer = asyncio.create_task(_status(reader))
        try:
            yield writer, answer
        finally:
            answer.cancel()
            writer.transport.abort()

    def _head(self, length: int | None) -> bytes:
        framing = (f"Content-Length: {length}" if length is not None
                   else "Transfer-Encoding: chunked")
        return (f"POST {TARGET} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/protobuf\r\n{framing}\r\n\r\n").encode()

    async def _oversized(self, source: str, sent: list[int]) -> str:
        """Announce (or, chunked, stream without a length) far more than the limit."""
        chunked = self.tally.started % 2 == 0
        async with self._exchange(source) as (writer, answer):
            writer.write(self._head(None if chunked else self.plan.oversized_bytes))
            piece = os.urandom(PIECE)
            while sent[0] < self.plan.oversized_bytes and not answer.done():
                writer.write(b"%x\r\n%s\r\n" % (PIECE, piece) if chunked else piece)
                await writer.drain()
                sent[0] += PIECE
            return await asyncio.wait_for(answer, 30)

    async def _trickle(self, source: str, sent: list[int]) -> str:
        """A body just under the limit, one byte at a time, slower than any node sends."""
        async with self._exchange(source) as (writer, answer):
            writer.write(self._head(self.body_limit - 1))
            while time.monotonic() < self.deadline:
                writer.write(b"x")
                await writer.drain()
                sent[0] += 1
                done, _ = await asyncio.wait({answer}, timeout=min(
                    self.plan.trickle_every, max(0.0, self.deadline - time.monotonic())))
                if done:
                    return answer.result()
            return "held" if sent[0] > 1 else "unanswered"  # nginx let it in, or had no time

    async def _stall(self, source: str, sent: list[int]) -> str:
        """Half the headers, or the headers and a little of the body, then nothing."""
        async with self._exchange(source) as (writer, answer):
            head = self._head(self.body_limit - 1)
            if self.tally.started % 2:
                writer.write(head[:len(head) // 2])
            else:
                writer.write(head + b"x" * 100)
                sent[0] += 100
            await writer.drain()
            remaining = self.deadline - time.monotonic()
            done, _ = await asyncio.wait({answer}, timeout=max(0.0, remaining))
            return answer.result() if done else "held"

    async def _junk(self, source: str, sent: list[int]) -> str:
        """Whole bodies of random bytes at the limit, as fast as the proxy answers."""
        async with self._exchange(source) as (writer, answer):
            size = self.body_limit - 1024
            writer.write(self._head(size) + os.urandom(size))
            await writer.drain()
            sent[0] += size
            return await asyncio.wait_for(answer, 30)


async def _status(reader: asyncio.StreamReader) -> str:
    """The status code of the answer, or `closed`."""
    line = await reader.readline()
    parts = line.split()
    return parts[1].decode() if len(parts) >= 2 and line.startswith(b"HTTP/") else "closed"
