"""The client's side of secure aggregation: four steps, one per message from the server.

`SecAggClient` keeps its secrets (two X25519 private keys and a self-mask seed) on the node
between messages and checks everything the server sends it: steps in order, its own keys echoed
back unchanged, disjoint reveal lists, one reveal per round. The server never receives a secret
of this client except as Shamir shares held by its neighbours.
"""

from __future__ import annotations

import json
import secrets

import numpy as np

from common.secagg import channel, prg, ring, shamir
from common.secagg.protocol import Cohort, Reveal, mask_sign, pairwise_seed, share_context


class SecAggViolation(ValueError):
    """The server asked for something out of order or unsafe; the client refuses."""


class SecAggClient:
    """One client's state in one round, kept on the node between steps (`to_bytes`)."""

    def __init__(self, name: str, session: bytes, server_round: int) -> None:
        self.name, self.session, self.round = name, session, server_round
        self.step = "keys"
        self.c_key = channel.private_bytes(channel.new_private_key())
        self.s_key = channel.private_bytes(channel.new_private_key())
        self.self_seed = secrets.token_bytes(32)
        self.cohort: Cohort | None = None
        self.received: dict[str, bytes] = {}
        self.partners: list[str] = []

    # -- step 1 ---------------------------------------------------------------------------
    def public_keys(self) -> tuple[bytes, bytes]:
        return (channel.public_bytes(channel.private_from_bytes(self.c_key)),
                channel.public_bytes(channel.private_from_bytes(self.s_key)))

    # -- step 2 ---------------------------------------------------------------------------
    def share_secrets(self, cohort: Cohort) -> dict[str, bytes]:
        """Shamir-share the self-mask seed and mask key among the neighbours, each share
        encrypted for its recipient; returns {recipient: ciphertext}."""
        self._expect("keys")
        if self.name not in cohort.names:
            raise SecAggViolation(f"{self.name} is not in the cohort the server sent")
        position = cohort.names.index(self.name)
        if (cohort.c_public[position], cohort.s_public[position]) != self.public_keys():
            raise SecAggViolation("the server changed this client's public keys")
        holders = sorted([*cohort.graph()[self.name], self.name])  # a share for itself too
        if not (2 <= cohort.threshold <= len(holders) and 2 * cohort.threshold > len(holders)):
            raise SecAggViolation(f"threshold {cohort.threshold} is unsafe or unreachable with "
                                  f"{len(holders)} share holders (it must be a majority)")
        b_shares = shamir.split(self.self_seed, len(holders), cohort.threshold)
        s_shares = shamir.split(self.s_key, len(holders), cohort.threshold)
        sealed = {}
        for holder, (x, b_share), (_, s_share) in zip(holders, b_shares, s_shares, strict=True):
            plaintext = json.dumps({"from": self.name, "to": holder, "x": x, "b": b_share.hex(),
                                    "s": s_share.hex()}).encode()
            key = self._share_key(cohort, holder)
            sealed[holder] = channel.seal(key, plaintext, self._context(self.name, holder))
        self.cohort, self.step = cohort, "shares"
        return sealed

    # -- step 3 ---------------------------------------------------------------------------
    def check_shares(self, received: dict[str, bytes]) -> None:
        """Refuse a delivery of shares the masking step could not use safely (checked before
        any training, and again by `mask`)."""
        self._expect("shares")
        cohort = self._cohort()
        holders = {*cohort.graph()[self.name], self.name}
        unknown = sorted(set(received) - holders)
        if unknown:
            raise SecAggViolation(f"shares from clients that are not neighbours: {unknown}")
        if self.name not in received:
            raise SecAggViolation("the server withheld this client's share of its own secrets")
        if len(received) < cohort.threshold:
            raise SecAggViolation(f"only {len(received)} clients delivered shares; "
                                  f"{cohort.threshold} are needed")

    def mask(self, received: dict[str, bytes], vector: np.ndarray) -> np.ndarray:
        """The encoded vector plus the self mask plus a pairwise mask per delivered neighbour."""
        self.check_shares(received)
        cohort = self._cohort()
        self.received = dict(received)
        self.partners = sorted(set(received) - {self.name})
        encoded = ring.encode(vector, len(cohort.names))
        masked = encoded + prg.expand(self.self_seed, len(encoded))
        for peer in self.partners:
            seed = pairwise_seed(self.s_key, cohort.public(peer, "s"), self.session)
            pad = prg.expand(seed, len(encoded))
            masked = masked + pad if mask_sign(self.name, peer) > 0 else masked - pad
        self.step = "masked"
        return masked

    # -- step 4 ---------------------------------------------------------------------------
    def reveal(self, survivors: list[str], dropped: list[str], *,
               min_survivors: int = 3) -> list[Reveal]:
        """For each client whose shares it holds (itself included): the self-mask share if that
        client survived, the mask-key share if it dropped; never both, only once per round, and
        nothing when fewer than `min_survivors` inputs would be summed (the node's policy)."""
        self._expect("masked")
        cohort = self._cohort()
        if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
            raise SecAggViolation("the survivor or dropped list names a client twice")
        strangers = sorted((set(survivors) | set(dropped)) - set(cohort.names))
        if strangers:
            raise SecAggViolation(f"clients outside this round's cohort listed: {strangers}")
        overlap = sorted(set(survivors) & set(dropped))
        if overlap:
            raise SecAggViolation(f"asked for both shares of {overlap}: refusing")
        if self.name not in survivors:
            raise SecAggViolation("this client sent its masked input but is listed as dropped")
        if len(survivors) < min_survivors:
            raise SecAggViolation(f"min-cohort: only {len(survivors)} survivors; this node "
                                  f"reveals nothing for a sum of fewer than {min_survivors}")
        if len(survivors) < cohort.threshold:
            raise SecAggViolation(f"only {len(survivors)} survivors; revealing shares below the "
                                  f"threshold {cohort.threshold} would not help")
        self.step = "revealed"
        reveals = []
        for peer in sorted(self.received):
            if peer not in survivors and peer not in dropped:
                continue
            share = self._open(cohort, peer)
            kind = "b" if peer in survivors else "s"
            reveals.append(Reveal(owner=peer, kind=kind, x=share["x"],
                                  share=bytes.fromhex(share[kind])))
        return reveals

    # -- persistence between messages ------------------------------------------------------
    def to_bytes(self) -> bytes:
        cohort = self.cohort
        return json.dumps({
            "name": self.name, "session": self.session.hex(), "round": self.round,
            "step": self.step, "c": self.c_key.hex(), "s": self.s_key.hex(),
            "b": self.self_seed.hex(), "partners": self.partners,
            "received": {k: v.hex() for k, v in self.received.items()},
            "cohort": None if cohort is None else {
                "names": cohort.names, "c": [k.hex() for k in cohort.c_public],
                "s": [k.hex() for k in cohort.s_public], "k": cohort.neighbours,
                "t": cohort.threshold, "seed": cohort.graph_seed},
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        stored = json.loads(data)
        client = cls.__new__(cls)
        client.name, client.round = stored["name"], stored["round"]
        client.session = bytes.fromhex(stored["session"])
        client.step = stored["step"]
        client.c_key, client.s_key = bytes.fromhex(stored["c"]), bytes.fromhex(stored["s"])
        client.self_seed = bytes.fromhex(stored["b"])
        client.partners = stored["partners"]
        client.received = {k: bytes.fromhex(v) for k, v in stored["received"].items()}
        c = stored["cohort"]
        client.cohort = None if c is None else Cohort(
            c["names"], [bytes.fromhex(k) for k in c["c"]], [bytes.fromhex(k) for k in c["s"]],
            c["k"], c["t"], c["seed"])
        return client

    # -- helpers ---------------------------------------------------------------------------
    def expect(self, step: str) -> None:
        """Refuse a message for another step than the one this client is at."""
        self._expect(step)

    def _expect(self, step: str) -> None:
        if self.step != step:
            raise SecAggViolation(f"out of order: this client is at step '{self.step}', the "
                                  f"message needs step '{step}'")

    def _cohort(self) -> Cohort:
        assert self.cohort is not None  # set in step 2, which _expect has checked
        return self.cohort

    def _context(self, sender: str, recipient: str) -> bytes:
        return share_context(self.session, self.round, sender, recipient)

    def _share_key(self, cohort: Cohort, peer: str) -> bytes:
        return channel.shared_key(channel.private_from_bytes(self.c_key),
                                  cohort.public(peer, "c"), channel.SHARE_PURPOSE,
                                  self.session)

    def _open(self, cohort: Cohort, peer: str) -> dict:
        plaintext = channel.open_sealed(self._share_key(cohort, peer), self.received[peer],
                                        self._context(peer, self.name))
        share = json.loads(plaintext)
        if share.get("from") != peer or share.get("to") != self.name:
            raise SecAggViolation(f"share from {peer} names the wrong sender or recipient")
        return share

