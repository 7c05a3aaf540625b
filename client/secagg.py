"""The client's side of secure aggregation: four steps, one per message from the server.

`SecAggClient` keeps its secrets (two X25519 private keys and a self-mask seed) on the node
between messages and checks everything the server sends it: steps in order, its own keys echoed
back unchanged, disjoint reveal lists, one reveal per round. The server never receives a secret
of this client except as Shamir shares held by its neighbours. A neighbour whose shares do not
open is left out of this client's masks and named in a signed complaint (`complaint`), so the
round can go on without it.
"""

from __future__ import annotations

import json
import math
import secrets

import numpy as np

from fedtune.client.node import Node
from fedtune.client.policy import PEERS
from fedtune.common.config import RunConfig
from fedtune.common.secagg import channel, prg, ring, shamir
from fedtune.common.secagg.graph import default_neighbours
from fedtune.common.secagg.protocol import (
    Cohort,
    Reveal,
    Routing,
    mask_sign,
    pairwise_seed,
    routing_digest,
    routing_problem,
    share_context,
    two_thirds,
)
from fedtune.common.secagg.records import cohort_from_json, cohort_to_json, complaint_to_record
from fedtune.common.secagg.signing import (
    Signer,
    complaint_statement,
    keys_statement,
    survivors_statement,
    verifies,
)


class SecAggViolation(ValueError):
    """The server asked for something out of order or unsafe; the client refuses."""


def peer_violations(node: Node, config: RunConfig) -> list[str]:
    """The `peers` rule a secure round breaks on this node (empty: none). A deployed node
    takes part only with its consortium's keys pinned, unless its operator waived that
    (`--allow-unpinned-peers`); under client-level DP even then, since a server that could
    fill a cohort with clients of its own would know their noise shares. Simulated nodes are
    the researcher's own."""
    if node.simulated or node.policy.peers:
        return []
    if config.privacy.client_level:
        return [f"{PEERS}: client-level DP under secure aggregation needs the consortium's keys "
                "pinned (--peers): the noise counts on the other members being real clients"]
    if node.policy.require_peers:
        return [f"{PEERS}: this node uses secure aggregation only with its consortium's keys "
                "pinned (--peers DIR from `fedtune certs consortium`)"]
    return []


class SecAggClient:
    """One client's state in one round, kept on the node between steps (`to_bytes`)."""

    def __init__(self, name: str, session: bytes, server_round: int,
                 signer: Signer | None = None) -> None:
        self.name, self.session, self.round = name, session, server_round
        self.step = "keys"
        self.c_key = channel.private_bytes(channel.new_private_key())
        self.s_key = channel.private_bytes(channel.new_private_key())
        self.self_seed = secrets.token_bytes(32)
        self.signer = signer or Signer.fresh()
        self.cohort: Cohort | None = None
        self.received: dict[str, bytes] = {}
        self.partners: list[str] = []
        self.survivors: list[str] = []  # the survivor set this client signed
        self.routing = ""  # the digest of the delivery of shares it signed (hex)
        self.config_digest = ""  # the run configuration of this round, pinned at step 1
        self.accused: list[str] = []  # neighbours whose shares to this client did not open
        self._checked: dict[str, bytes] | None = None  # the delivery check_shares passed

    # -- step 1 ---------------------------------------------------------------------------
    def public_keys(self) -> tuple[bytes, bytes]:
        return (channel.public_bytes(channel.private_from_bytes(self.c_key)),
                channel.public_bytes(channel.private_from_bytes(self.s_key)))

    def signed_keys(self) -> tuple[bytes, bytes, bytes, bytes]:
        """(share key, mask key, signing key, the signature binding them to round and name)."""
        c, s = self.public_keys()
        return c, s, self.signer.public(), self.signer.sign(
            keys_statement(self.session, self.round, self.name, c, s))

    # -- step 2 ---------------------------------------------------------------------------
    def share_secrets(self, cohort: Cohort,
                      pinned: dict[str, bytes] | None = None) -> dict[str, bytes]:
        """Shamir-share the self-mask seed and mask key among the neighbours, each share
        encrypted for its recipient; returns {recipient: ciphertext}.

        Every member's keys must carry a valid signature; with `pinned` (the node's peers'
        long-term keys), by the key pinned for that name, so a server cannot slip in keys of
        its own."""
        self._expect("keys")
        if self.name not in cohort.names:
            raise SecAggViolation(f"{self.name} is not in the cohort the server sent")
        position = cohort.position[self.name]
        own = (cohort.c_public[position], cohort.s_public[position], cohort.sig_public[position])
        if own != self.signed_keys()[:3]:
            raise SecAggViolation("the server changed this client's public keys")
        self._check_signed_keys(cohort, pinned)
        self._check_graph(cohort)
        holders = cohort.holders(self.name)  # a share for itself too
        if not (max(2, two_thirds(len(holders))) <= cohort.threshold <= len(holders)):
            raise SecAggViolation(f"threshold {cohort.threshold} is unsafe or unreachable with "
                                  f"{len(holders)} share holders (it must be over two thirds)")
        b_shares = shamir.split(self.self_seed, len(holders), cohort.threshold)
        s_shares = shamir.split(self.s_key, len(holders), cohort.threshold)
        sealed = {}
        for holder, (x, b_share), (_, s_share) in zip(holders, b_shares, s_shares, strict=True):
            plaintext = x.to_bytes(4, "big") + b_share + s_share  # who to whom: in the AEAD data
            key = self._share_key(cohort, holder)
            sealed[holder] = channel.seal(key, plaintext, self._context(self.name, holder))
        self.cohort, self.step = cohort, "shares"
        return sealed

    # -- step 3 ---------------------------------------------------------------------------
    def check_shares(self, received: dict[str, bytes], *,
                     min_delivered: float = 0.0) -> list[str]:
        """The neighbours whose shares do not open (to be left out and named in a complaint),
        or a refusal of a delivery the masking step could not use safely, checked before any
        training: only neighbours', its own among them and opening, and at least the threshold
        and `min_delivered` (a share of its holders: a server that withholds most neighbours'
        shares could leave this client masked by colluders alone) that open."""
        self._expect("shares")
        cohort = self._cohort()
        holders = {*cohort.graph()[self.name], self.name}
        unknown = sorted(set(received) - holders)
        if unknown:
            raise SecAggViolation(f"shares from clients that are not neighbours: {unknown}")
        if self.name not in received:
            raise SecAggViolation("the server withheld this client's share of its own secrets")
        needed = max(cohort.threshold, math.ceil(min_delivered * len(holders) - 1e-9))
        accused = []
        for peer in sorted(received):
            try:
                self._open(cohort, peer, received)
            except SecAggViolation:
                if peer == self.name:
                    raise
                accused.append(peer)
        if len(received) - len(accused) < needed:
            bad = f" ({len(accused)} do not open: {accused})" if accused else ""
            raise SecAggViolation(f"only {len(received) - len(accused)} of {len(holders)} "
                                  f"share holders delivered shares that open{bad}; {needed} "
                                  "are needed")
        self._checked, self.accused = dict(received), accused
        return accused

    def complaint(self) -> dict | None:
        """The step-3 reply's complaint record: the neighbours whose shares did not open (they
        are not in this client's masks) and its signature naming them, for the server to leave
        them out; None when all opened."""
        if not self.accused:
            return None
        return complaint_to_record(self.accused, self.signer.sign(complaint_statement(
            self.session, self.round, self.name, self.accused)))

    def mask(self, received: dict[str, bytes], vector: np.ndarray, encoding: ring.Encoding,
             rng: np.random.Generator) -> np.ndarray:
        """The encoded vector plus the self mask plus a pairwise mask per delivered neighbour.

        `encoding` is the client's own (`summation_for`), for the cohort it was sent."""
        self._expect("shares")  # masks twice with the same pads would leak the difference
        if received != self._checked:  # each share is decrypted once per delivery
            self.check_shares(received)  # the caller checked min_delivered with its policy
        cohort = self._cohort()
        if encoding.clients != len(cohort.names):
            raise SecAggViolation(f"encoding for {encoding.clients} clients, but the cohort has "
                                  f"{len(cohort.names)}")
        self.received = {p: c for p, c in received.items() if p not in self.accused}
        self.partners = sorted(set(self.received) - {self.name})
        encoded = encoding.encode(vector, rng)
        masked = encoded + prg.expand(self.self_seed, len(encoded))
        for peer in self.partners:
            seed = pairwise_seed(self.s_key, cohort.public(peer, "s"), self.session)
            pad = prg.expand(seed, len(encoded))
            masked = masked + pad if mask_sign(self.name, peer) > 0 else masked - pad
        self.step = "masked"
        return masked

    # -- consistency ----------------------------------------------------------------------
    def sign_survivors(self, survivors: list[str], routing: Routing, *,
                       min_survivors: int = 3) -> bytes:
        """Sign the announced survivor set and delivery of shares, once per round, after
        checking them: a reveal later needs over two thirds of the cohort to have signed
        the same."""
        self._expect("masked")
        self._check_survivors(survivors, min_survivors)
        delivered = sorted(sender for sender, recipient in set(routing)
                           if recipient == self.name)
        if delivered != sorted(self.received):
            raise SecAggViolation("the announced delivery of shares to this client is not what "
                                  "it received")
        if (problem := routing_problem(routing, survivors)) is not None:
            raise SecAggViolation(problem)
        self.survivors, self.routing = sorted(survivors), routing_digest(routing).hex()
        self.step = "signed"
        return self.signer.sign(self._statement())

    def _statement(self) -> bytes:
        return survivors_statement(self.session, self.round, self.survivors,
                                   bytes.fromhex(self.routing))

    # -- step 4 ---------------------------------------------------------------------------
    def reveal(self, survivors: list[str], routing: Routing, signatures: dict[str, bytes], *,
               min_survivors: int = 3) -> list[Reveal]:
        """For each client whose shares it holds (itself included): the self-mask share if that
        client is in the survivor set, the mask-key share if not (it dropped); so never both,
        and only once per round. Only for the survivor set this client signed, once a majority
        of the cohort signed it too, and never for fewer than `min_survivors` inputs (the
        node's policy). The dropped clients follow from the set: the server cannot name them."""
        self._expect("signed")
        cohort = self._cohort()
        self._check_survivors(survivors, min_survivors)
        if sorted(survivors) != self.survivors or routing_digest(routing).hex() != self.routing:
            raise SecAggViolation("the survivor set or delivery differs from the one this client "
                                  "signed")
        statement = self._statement()
        valid = [name for name, signature in signatures.items() if name in self.survivors
                 and verifies(cohort.public(name, "sig"), signature, statement)]
        if len(valid) < cohort.signatures_needed():
            raise SecAggViolation(f"only {len(valid)} survivors signed this survivor set; "
                                  f"{cohort.signatures_needed()} are needed before revealing")
        self.step = "revealed"
        reveals = []
        for peer in sorted(self.received):
            share = self._open(cohort, peer)
            kind = "b" if peer in self.survivors else "s"
            reveals.append(Reveal(owner=peer, kind=kind, x=share["x"], share=share[kind]))
        return reveals

    def _check_survivors(self, survivors: list[str], min_survivors: int) -> None:
        cohort = self._cohort()
        if len(set(survivors)) != len(survivors):
            raise SecAggViolation("the survivor list names a client twice")
        strangers = sorted(set(survivors) - set(cohort.names))
        if strangers:
            raise SecAggViolation(f"clients outside this round's cohort listed: {strangers}")
        if self.name not in survivors:
            raise SecAggViolation("this client sent its masked input but is listed as dropped")
        if len(survivors) < min_survivors:
            raise SecAggViolation(f"min-cohort: only {len(survivors)} survivors; this node "
                                  f"reveals nothing for a sum of fewer than {min_survivors}")
        if len(survivors) < cohort.threshold:
            raise SecAggViolation(f"only {len(survivors)} survivors; revealing shares below the "
                                  f"threshold {cohort.threshold} would not help")

    def _check_graph(self, cohort: Cohort) -> None:
        """The neighbour graph follows from the cohort's keys, never from the server's choice,
        and is at least as dense as the default (a sparse one isolates clients cheaply)."""
        if cohort.graph_seed != cohort.expected_seed(self.session):
            raise SecAggViolation("the neighbour graph's seed is not the one the cohort's keys "
                                  "give")
        n = len(cohort.names)
        if cohort.neighbours < min(n - 1, default_neighbours(n)):
            raise SecAggViolation(f"{cohort.neighbours} neighbours is fewer than "
                                  f"{default_neighbours(n)}, the least for {n} clients")

    @staticmethod
    def pin_violations(cohort: Cohort, pinned: dict[str, bytes] | None) -> list[str]:
        """The `peers` rule a cohort breaks: a member whose signing key is not the one this
        node pins for its name (a client the server made up, or a substituted key)."""
        if pinned is None:
            return []
        strangers = [name for name in cohort.names
                     if pinned.get(name) != cohort.public(name, "sig")]
        if not strangers:
            return []
        return [f"{PEERS}: the signing key of {', '.join(strangers[:5])} is not the one this node "
                "pins for that name"]

    def _check_signed_keys(self, cohort: Cohort, pinned: dict[str, bytes] | None) -> None:
        """Pinned signing keys for every member (they sign the survivor set later); a valid
        key signature for each neighbour, the keys this client will use."""
        if broken := self.pin_violations(cohort, pinned):
            raise SecAggViolation(broken[0])
        for name in [*cohort.graph()[self.name], self.name]:
            c, s, sig = (cohort.public(name, kind) for kind in ("c", "s", "sig"))
            signature = cohort.key_signatures[cohort.position[name]]
            if not verifies(sig, signature, keys_statement(self.session, self.round, name, c, s)):
                raise SecAggViolation(f"the round keys of {name} carry no valid signature")

    # -- persistence between messages ------------------------------------------------------
    def to_bytes(self) -> bytes:
        cohort = self.cohort
        return json.dumps({
            "name": self.name, "session": self.session.hex(), "round": self.round,
            "step": self.step, "c": self.c_key.hex(), "s": self.s_key.hex(),
            "b": self.self_seed.hex(), "partners": self.partners,
            "signer": self.signer.to_state(), "survivors": self.survivors,
            "routing": self.routing, "config": self.config_digest, "accused": self.accused,
            "received": {k: v.hex() for k, v in self.received.items()},
            "cohort": None if cohort is None else cohort_to_json(cohort),
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
        client.signer = Signer.from_state(stored["signer"])
        client.survivors, client.routing = stored["survivors"], stored["routing"]
        client.config_digest, client.accused = stored["config"], stored.get("accused", [])
        client._checked = None  # a resumed client checks its delivery again
        client.received = {k: bytes.fromhex(v) for k, v in stored["received"].items()}
        client.cohort = None if stored["cohort"] is None else cohort_from_json(stored["cohort"])
        return client

    # -- helpers ---------------------------------------------------------------------------
    def cohort_size(self) -> int:
        return len(self._cohort().names)

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

    def _open(self, cohort: Cohort, peer: str,
              received: dict[str, bytes] | None = None) -> dict:
        """The pair of shares `peer` sealed for this client (authenticated as from `peer` to
        this client in this round by the ciphertext's associated data)."""
        sealed = (self.received if received is None else received)[peer]
        try:
            plaintext = channel.open_sealed(self._share_key(cohort, peer), sealed,
                                            self._context(peer, self.name))
        except channel.ChannelError as error:
            raise SecAggViolation(f"the shares from {peer} do not open: {error}") from None
        if len(plaintext) != 4 + 2 * shamir.SHARE_BYTES:
            raise SecAggViolation(f"the shares from {peer} have the wrong length")
        x = int.from_bytes(plaintext[:4], "big")
        if x != cohort.share_index(peer, self.name):
            raise SecAggViolation(f"the shares from {peer} are for another holder (x = {x})")
        b_end = 4 + shamir.SHARE_BYTES
        return {"x": x, "b": plaintext[4:b_end], "s": plaintext[b_end:]}

