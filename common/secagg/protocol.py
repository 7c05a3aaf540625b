"""What client and server agree on: the cohort broadcast, reveals, bindings and mask signs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.secagg import channel
from common.secagg.graph import neighbours
from common.secagg.ring import Encoding


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
        return neighbours(self.names, self.neighbours, self.graph_seed)

    def public(self, name: str, kind: str) -> bytes:
        keys = {"c": self.c_public, "s": self.s_public, "sig": self.sig_public}[kind]
        return keys[self.names.index(name)]

    def signatures_needed(self) -> int:
        """Consistency signatures a reveal needs: a majority of the cohort (so two survivor
        sets can never both collect enough, each client signing once) and the threshold."""
        return max(self.threshold, len(self.names) // 2 + 1)


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
MAX_LOSS = 20.0  # a client's mean loss counts at most this much in the summed loss (ln 150 = 5)


@dataclass(frozen=True)
class Summation:
    """What one round sums, fixed by the run configuration and the cohort size, so every client
    and the server derive the same (`summation_for`): each client sends

        [w x clip(delta, bound) ..., w, e, e x l]

    with delta its change of the adapter (plus its share of the Gaussian noise under client-level
    DP), e = min(examples, max_examples) / max_examples, w = e (1 when unweighted, as under
    client-level DP) and l = min(loss, MAX_LOSS) / MAX_LOSS. Every entry is within the bound,
    so the cohort's 32-bit encodings cannot overflow."""

    clients: int  # the cohort size
    bound: float  # largest |change| of one adapter value that is summed exactly
    max_examples: int  # examples that give a client full weight
    weighted: bool = True  # False: every client counts once (client-level DP)
    noise_std: float = 0.0  # each client's share of the noise (client-level DP), per value
    survivors: int = 0  # the fewest masked inputs any sum is revealed for (noise is sized for it)

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.clients, max(self.bound, 1.0))

    def to_vector(self, delta: dict[str, np.ndarray], examples: int, loss: float) -> np.ndarray:
        """The client's input: weighted, clipped change (sorted by name), weight, totals."""
        e = min(examples, self.max_examples) / self.max_examples
        w = e if self.weighted else 1.0
        parts = [w * np.clip(np.asarray(delta[k], dtype=np.float64).ravel(), -self.bound,
                             self.bound) for k in sorted(delta)]
        loss_share = min(max(float(loss), 0.0), MAX_LOSS) / MAX_LOSS
        return np.concatenate([*parts, [w, e, e * loss_share]])

    def average(self, total: np.ndarray,
                like: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(the weighted average change, shaped as `like`; the summed `TOTALS`) from the
        decoded sum."""
        weight = total[-3]
        if not weight > 0:
            raise ValueError(f"summed weight must be > 0, got {weight}")
        state, offset = {}, 0
        for key in sorted(like):
            template = np.asarray(like[key])
            chunk = total[offset:offset + template.size] / weight
            state[key] = chunk.reshape(template.shape)
            offset += template.size
        return state, {"examples": float(total[-2] * self.max_examples),
                       "loss-sum": float(total[-1] * self.max_examples * MAX_LOSS)}


def vector_length(like: dict[str, np.ndarray]) -> int:
    return sum(int(np.asarray(v).size) for v in like.values()) + 1 + len(TOTALS)
