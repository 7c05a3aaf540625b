"""What client and server agree on: the cohort broadcast, reveals, bindings and mask signs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from fedtune.common.secagg import channel
from fedtune.common.secagg.graph import neighbours


@dataclass(frozen=True)
class Cohort:
    """The server's broadcast after step 1: everyone's public keys and the round's parameters."""

    names: list[str]
    c_public: list[bytes]  # share-encryption keys
    s_public: list[bytes]  # pairwise-mask keys
    neighbours: int
    threshold: int
    graph_seed: int
    sig_public: list[bytes] = field(default_factory=list)  # signing keys (OpenSSH)
    key_signatures: list[bytes] = field(default_factory=list)  # each over its round keys

    def graph(self) -> dict[str, list[str]]:
        return self._graph

    @cached_property
    def _graph(self) -> dict[str, list[str]]:
        return neighbours(self.names, self.neighbours, self.graph_seed)

    def holders(self, owner: str) -> list[str]:
        """Who holds shares of `owner`'s secrets, in the order of their indices (its
        neighbours and itself)."""
        return sorted([*self.graph()[owner], owner])

    def share_index(self, owner: str, holder: str) -> int:
        """The x at which `holder` holds `owner`'s shares: fixed by the cohort, so a revealer
        cannot claim another holder's index."""
        return self.holders(owner).index(holder) + 1

    @cached_property
    def position(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def public(self, name: str, kind: str) -> bytes:
        keys = {"c": self.c_public, "s": self.s_public, "sig": self.sig_public}[kind]
        return keys[self.position[name]]

    def signatures_needed(self) -> int:
        """Consistency signatures a reveal needs: over two thirds of the cohort (two survivor
        sets could both collect that many only if more than a third signed twice) and t."""
        return max(self.threshold, two_thirds(len(self.names)))

    def expected_seed(self, session: bytes) -> int:
        """The graph seed every client recomputes from the cohort's keys: the server cannot
        pick a graph that puts its colluders around one client."""
        return graph_seed(session, self.names, self.c_public, self.s_public)


def two_thirds(count: int) -> int:
    """The least integer above 2 count / 3. As a threshold of h holders it keeps a client's two
    secrets apart unless over h/3 holders collude; as a quorum, likewise for equivocation."""
    return 2 * count // 3 + 1


def fields(*parts: bytes) -> bytes:
    """An unambiguous concatenation: each part prefixed by its 4-byte length."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def graph_seed(session: bytes, names: list[str], c_public: list[bytes],
               s_public: list[bytes]) -> int:
    columns = [part for n, c, s in zip(names, c_public, s_public, strict=True)
               for part in (n.encode(), c, s)]
    digest = hashlib.sha256(fields(b"fedtune secagg graph v1", session, *columns)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


Routing = list[tuple[str, str]]  # (sender, recipient) of each delivered pair of shares


def routing_digest(routing: Iterable[tuple[str, str]]) -> bytes:
    """What every survivor signs about who delivered shares to whom (so all agree on it)."""
    pairs = sorted(set(routing))
    return hashlib.sha256(fields(b"fedtune secagg routing v1",
                                 *(fields(a.encode(), b.encode()) for a, b in pairs))).digest()


def routing_problem(routing: Routing, survivors: list[str]) -> str | None:
    """Why the announced delivery of shares among the survivors is unsafe, else None: masks
    between two survivors must go both ways (or they do not cancel), and the survivors' mask
    graph must be connected, or the masks of a part of it cancel alone and the server learns
    that part's sum."""
    among = set(survivors)
    pairs = {(a, b) for a, b in routing if a in among and b in among and a != b}
    one_way = sorted((a, b) for a, b in pairs if (b, a) not in pairs)
    if one_way:
        return f"shares delivered one way only between survivors: {one_way[:3]}"
    linked: dict[str, set[str]] = {name: set() for name in among}
    for a, b in pairs:
        linked[a].add(b)
    seen, stack = set(), [min(among)] if among else []
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(linked[name] - seen)
    if seen != among:
        return (f"the survivors' masks fall apart into groups ({len(seen)} of {len(among)} "
                "linked to the first): the server would learn a group's sum")
    return None


@dataclass(frozen=True)
class Reveal:
    """One share handed to the server: of `owner`'s self-mask seed ('b') or mask key ('s')."""

    owner: str
    kind: str
    x: int
    share: bytes


def share_context(session: bytes, server_round: int, sender: str, recipient: str) -> bytes:
    """What a share ciphertext is bound to: this round's session, its sender and recipient."""
    return fields(session, str(server_round).encode(), sender.encode(), recipient.encode())


def mask_sign(own: str, peer: str) -> int:
    """+1 for the smaller name of a pair, -1 for the larger: the pair's masks cancel."""
    return 1 if own < peer else -1


def pairwise_seed(own_s_key: bytes, peer_s_public: bytes, session: bytes) -> bytes:
    """The seed both ends of a pair derive for their mask (and the server, from a dropped
    client's rebuilt key)."""
    return channel.shared_key(channel.private_from_bytes(own_s_key), peer_s_public,
                              channel.MASK_PURPOSE, session)
