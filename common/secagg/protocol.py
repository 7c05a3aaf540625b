"""What client and server agree on: the cohort broadcast, reveals, bindings and mask signs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.secagg import channel
from common.secagg.graph import neighbours


@dataclass(frozen=True)
class Cohort:
    """The server's broadcast after step 1: everyone's public keys and the round's parameters."""

    names: list[str]
    c_public: list[bytes]  # share-encryption keys
    s_public: list[bytes]  # pairwise-mask keys
    neighbours: int
    threshold: int
    graph_seed: int

    def graph(self) -> dict[str, list[str]]:
        return neighbours(self.names, self.neighbours, self.graph_seed)

    def public(self, name: str, kind: str) -> bytes:
        keys = self.c_public if kind == "c" else self.s_public
        return keys[self.names.index(name)]


@dataclass(frozen=True)
class Reveal:
    """One share handed to the server: of `owner`'s self-mask seed ('b') or mask key ('s')."""

    owner: str
    kind: str
    x: int
    share: bytes


def share_context(session: bytes, server_round: int, sender: str, recipient: str) -> bytes:
    """What a share ciphertext is bound to: this round's session, its sender and recipient."""
    return b"|".join([session, str(server_round).encode(), sender.encode(), recipient.encode()])


def mask_sign(own: str, peer: str) -> int:
    """+1 for the smaller name of a pair, -1 for the larger: the pair's masks cancel."""
    return 1 if own < peer else -1


def pairwise_seed(own_s_key: bytes, peer_s_public: bytes, session: bytes) -> bytes:
    """The seed both ends of a pair derive for their mask (and the server, from a dropped
    client's rebuilt key)."""
    return channel.shared_key(channel.private_from_bytes(own_s_key), peer_s_public,
                              channel.MASK_PURPOSE, session)


TOTALS = ("examples", "loss-sum")  # a client's scalars that the server may learn only summed


def to_vector(state: dict[str, np.ndarray], weight: float,
              totals: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """weight x every tensor (sorted by name, flattened), the weight itself, then the client's
    `TOTALS` (example count, loss sum): inside the masked vector, the server sees only sums."""
    parts = [weight * np.asarray(state[k], dtype=np.float64).ravel() for k in sorted(state)]
    return np.concatenate([*parts, [float(weight)], np.asarray(totals, dtype=np.float64)])


def vector_length(like: dict[str, np.ndarray]) -> int:
    return sum(int(np.asarray(v).size) for v in like.values()) + 1 + len(TOTALS)


def average_from_sum(total: np.ndarray,
                     like: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(tensors shaped as `like`, divided by the summed weight; the summed `TOTALS`)."""
    weight = total[-1 - len(TOTALS)]
    if not weight > 0:
        raise ValueError(f"summed weight must be > 0, got {weight}")
    state, offset = {}, 0
    for key in sorted(like):
        template = np.asarray(like[key])
        chunk = total[offset:offset + template.size] / weight
        state[key] = chunk.reshape(template.shape).astype(template.dtype)
        offset += template.size
    sums = {name: float(value) for name, value in zip(TOTALS, total[-len(TOTALS):], strict=True)}
    return state, sums
