"""The server's side of secure aggregation: build the cohort, route encrypted shares, and
recover only the sum of the masked inputs it received.

`SecAggServer` is pure (no Flower), so the protocol can be driven and attacked in tests; the
message exchange that drives it is `server/secagg_exchange.py`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.common.logger import log

from fedtune.common.secagg import channel, prg, ring, shamir
from fedtune.common.secagg.graph import default_neighbours
from fedtune.common.secagg.protocol import (
    Cohort,
    Reveal,
    Routing,
    graph_seed,
    mask_sign,
    pairwise_seed,
    routing_digest,
    two_thirds,
)
from fedtune.common.secagg.signing import (
    complaint_statement,
    keys_statement,
    survivors_statement,
    verifies,
)


class SecAggAbort(RuntimeError):
    """The round cannot be completed securely (too few clients left); it is abandoned."""


def default_threshold(holders: int) -> int:
    """Over two thirds of the holders of each client's shares (its neighbours and itself),
    >= 2: the least clients accept, so up to a third of holders may drop out."""
    return max(2, two_thirds(holders))


def _counted(clients: int) -> str:
    return "no client" if clients == 0 else "1 client" if clients == 1 else f"{clients} clients"


@dataclass
class SecAggServer:
    """One round of the protocol at the server."""

    server_round: int
    threshold_setting: int = 0  # 0 = default_threshold
    neighbours_setting: int = 0  # 0 = default_neighbours
    session: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    cohort: Cohort | None = None
    holders: dict[str, list[str]] = field(default_factory=dict)  # whose shares each one holds
    partners: dict[str, list[str]] = field(default_factory=dict)  # pairwise masks in its input
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why its keys were refused
    accusers: dict[str, list[str]] = field(default_factory=dict)  # accused -> valid complainers
    receivers: dict[str, list[str]] = field(default_factory=dict)  # who got its shares

    def make_cohort(self, keys: Mapping[str, tuple[bytes, bytes, bytes, bytes]]) -> Cohort:
        """Step 1 -> 2: everyone's signed public keys, the graph and the threshold."""
        keys = {name: pair for name, pair in keys.items() if not self.key_problem(name, pair)}
        names = sorted(keys)
        k = min(max(self.neighbours_setting, default_neighbours(len(names))), len(names) - 1)
        t = self.threshold_setting or default_threshold(k + 1)
        if len(names) < 3:
            raise SecAggAbort(f"{_counted(len(names))} sent usable keys; a secure sum needs 3 "
                              "at least")
        if t > k + 1:
            raise SecAggAbort(f"{_counted(len(names))} with {k} neighbours each cannot meet "
                              f"threshold {t} (secagg.threshold)")
        c_public, s_public = [keys[n][0] for n in names], [keys[n][1] for n in names]
        self.cohort = Cohort(names, c_public, s_public, k, t,
                             graph_seed(self.session, names, c_public, s_public),
                             [keys[n][2] for n in names], [keys[n][3] for n in names])
        return self.cohort

    def key_problem(self, name: str, signed: tuple[bytes, bytes, bytes, bytes]) -> str | None:
        """Why a client's step-1 keys are refused (it is left out of the cohort), else None.

        A low-order point such as all zeros would make every peer's key agreement fail; keys
        without a valid signature would make every honest peer refuse the cohort."""
        problems = []
        pair = signed[:2]
        for kind, key in zip(("share-encryption", "mask"), pair, strict=True):
            try:
                channel.check_public_key(key)
            except channel.ChannelError as error:
                problems.append(f"{kind} key: {error}")
        if pair[0] == pair[1] and not problems:
            problems.append("its two public keys are the same")
        if not verifies(signed[2], signed[3], keys_statement(self.session, self.server_round,
                                                             name, *pair)):
            problems.append("its keys carry no valid signature")
        if problems:
            self.rejected[name] = "; ".join(problems)
            log(WARNING, "Public keys of %s refused: %s", name, self.rejected[name])
        return self.rejected.get(name)

    def route(self, sealed: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Step 2 -> 3: the ciphertexts addressed to each client that answered step 2.

        Ciphertexts from unknown senders or to non-neighbours are dropped here."""
        cohort = self._cohort()
        graph = cohort.graph()
        senders = sorted(name for name in sealed if name in graph)
        inbox: dict[str, dict[str, bytes]] = {name: {} for name in senders}
        for sender in senders:
            for recipient, ciphertext in sealed[sender].items():
                if recipient in inbox and (recipient in graph[sender] or recipient == sender):
                    inbox[recipient][sender] = ciphertext
        self.holders = {name: sorted(inbox[name]) for name in senders}
        self.partners = {name: [s for s in self.holders[name] if s != name] for name in senders}
        return inbox

    def check_masked(self, name: str, masked: np.ndarray, length: int) -> None:
        """Refuse a masked input that cannot be summed (raises ValueError with the reason)."""
        if name not in self.partners:
            raise ValueError(f"{name} is not in this round's step 3")
        if masked.dtype != ring.DTYPE:
            raise ValueError(f"{name} sent a {masked.dtype} vector, not a ring "
                             f"({np.dtype(ring.DTYPE).name}) vector")
        if masked.shape != (length,):
            raise ValueError(f"{name} sent a vector of shape {masked.shape}, expected ({length},)")

    def unmask(self, masked: Mapping[str, np.ndarray],
               reveals: Mapping[str, list[Reveal]]) -> np.ndarray:
        """Step 4: the sum of the survivors' encoded inputs, or SecAggAbort."""
        cohort = self._cohort()
        survivors = sorted(masked)
        dropped = sorted(set(self.partners) - set(masked))
        total = np.zeros_like(next(iter(masked.values())))
        for name in survivors:
            total = total + masked[name]
        b_shares, s_shares = self._collect(reveals, set(survivors), set(dropped))
        for name in survivors:
            seed = self._rebuild(b_shares, name, "self-mask seed")
            total = total - prg.expand(seed, len(total))
        for gone in dropped:
            masked_with = [name for name in survivors if gone in self.partners[name]]
            if not masked_with:  # e.g. blamed by all: no survivor's input holds its pads
                continue
            s_key = self._rebuild(s_shares, gone, "mask key")
            if channel.public_bytes(channel.private_from_bytes(s_key)) != cohort.public(gone, "s"):
                raise SecAggAbort(f"the rebuilt mask key of {gone} does not match its public key")
            for name in masked_with:
                pad = prg.expand(pairwise_seed(s_key, cohort.public(name, "s"), self.session),
                                 len(total))
                total = total - pad if mask_sign(name, gone) > 0 else total + pad
        return total

    def blame(self, complaints: Mapping[str, tuple[list[str], bytes]]) -> dict[str, str]:
        """Step 3: {accused: why} from the complaints that came with masked inputs.

        A valid complaint (signed by its author with its key from step 1, naming only clients
        that delivered shares to it, and few enough that its author still met the threshold)
        takes the accused's shares out of its author's delivery, since they are not in its
        masks; the caller leaves the accused out of the round. An invalid one rejects its
        author (`rejected`), whose masks would not match the delivery. Who accused whom is kept
        for `convicted`."""
        cohort, blamed = self._cohort(), {}
        self.receivers = {name: [c for c, held in self.holders.items()
                                 if name in held and c != name] for name in self.holders}
        for complainer, (accused, signature) in sorted(complaints.items()):
            holders = self.holders.get(complainer, [])
            statement = complaint_statement(self.session, self.server_round, complainer, accused)
            if not verifies(cohort.public(complainer, "sig"), signature, statement):
                self.rejected[complainer] = "its complaint carries no valid signature"
            elif not set(accused) <= set(holders) - {complainer}:
                self.rejected[complainer] = "its complaint names clients that sent it no shares"
            elif len(holders) - len(accused) < cohort.threshold:
                self.rejected[complainer] = ("its complaint leaves it fewer shares than the "
                                             "threshold")
            else:
                self.holders[complainer] = [h for h in holders if h not in accused]
                self.partners[complainer] = [p for p in self.partners[complainer]
                                             if p not in accused]
                for name in accused:
                    self.accusers.setdefault(name, []).append(complainer)
        for name, accusers in sorted(self.accusers.items()):
            blamed[name] = (f"its shares to {', '.join(accusers)} do not open (signed "
                            f"complaint{'s' if len(accusers) > 1 else ''})")
        return blamed

    def convicted(self) -> list[str]:
        """The accused whose shares failed for most of the clients that received them: left
        out for the rest of the run. A minority of accusers (all of them could be colluders
        lying) leaves the accused out of this round only."""
        return [name for name, accusers in sorted(self.accusers.items())
                if 2 * len(accusers) > len(self.receivers.get(name, []))]

    def survivors(self, masked: Mapping[str, np.ndarray], at_least: int = 0) -> list[str]:
        """Step 3 -> consistency: the survivor set to announce, or SecAggAbort when fewer than
        the threshold (or `at_least`, the noise's survivors) sent a masked input."""
        survivors = sorted(masked)
        needed = max(self._cohort().threshold, at_least)
        if len(survivors) < needed:
            raise SecAggAbort(f"only {len(survivors)} masked inputs arrived; {needed} are needed")
        return survivors

    def routing(self, survivors: list[str]) -> Routing:
        """Consistency: who delivered shares to each survivor, for every survivor to check and
        sign (so all agree on the mask graph whose sum they reveal)."""
        return [(sender, name) for name in survivors for sender in self.holders.get(name, [])]

    def consistent(self, survivors: list[str], routing: Routing,
                   signatures: Mapping[str, bytes]) -> dict[str, bytes]:
        """Consistency -> step 4: the survivors' valid signatures over the survivor set and
        delivery, or SecAggAbort when too few signed (no honest client would reveal)."""
        cohort = self._cohort()
        statement = survivors_statement(self.session, self.server_round, survivors,
                                        routing_digest(routing))
        valid = {name: signature for name, signature in signatures.items()
                 if name in survivors and verifies(cohort.public(name, "sig"), signature,
                                                   statement)}
        for name in sorted(set(signatures) - set(valid)):
            self.rejected[name] = "its consistency signature does not verify"
        if len(valid) < cohort.signatures_needed():
            raise SecAggAbort(f"only {len(valid)} survivors signed the survivor set; "
                              f"{cohort.signatures_needed()} are needed")
        return valid

    def _collect(self, reveals: Mapping[str, list[Reveal]], survivors: set[str],
                 dropped: set[str]) -> tuple[dict[str, list], dict[str, list]]:
        """(self-mask seed shares of survivors, mask-key shares of the dropped), each at the
        index its revealer holds; a revealer with a malformed share, or one at another
        holder's index, is rejected and none of its shares count."""
        cohort = self._cohort()
        b_shares: dict[str, list] = {}
        s_shares: dict[str, list] = {}
        for revealer, items in sorted(reveals.items()):
            if revealer not in survivors:
                continue
            kept = []
            for item in items:
                if item.owner not in self.holders.get(revealer, []):
                    continue  # only shares the revealer could have received count
                if len(item.share) != shamir.SHARE_BYTES:
                    self.rejected[revealer] = f"a malformed share of {item.owner}"
                elif item.x != cohort.share_index(item.owner, revealer):
                    self.rejected[revealer] = f"a share of {item.owner} at another's index"
                else:
                    kept.append(item)
            if revealer in self.rejected:
                continue
            for item in kept:
                if item.kind == "b" and item.owner in survivors:
                    b_shares.setdefault(item.owner, []).append((item.x, item.share))
                elif item.kind == "s" and item.owner in dropped:
                    s_shares.setdefault(item.owner, []).append((item.x, item.share))
        return b_shares, s_shares

    def _rebuild(self, shares: dict[str, list], owner: str, what: str) -> bytes:
        threshold = self._cohort().threshold
        found = shares.get(owner, [])
        if len(found) < threshold:
            raise SecAggAbort(f"{len(found)} shares of {owner}'s {what} arrived; "
                              f"{threshold} are needed")
        found = list({x: (x, y) for x, y in found}.values())  # one share per index
        if len(found) < threshold:
            raise SecAggAbort(f"{len(found)} distinct shares of {owner}'s {what} arrived; "
                              f"{threshold} are needed")
        try:
            return shamir.combine(found, threshold)
        except shamir.ShamirError as error:
            raise SecAggAbort(f"cannot rebuild {owner}'s {what}: {error}") from None

    def _cohort(self) -> Cohort:
        if self.cohort is None:
            raise SecAggAbort("no cohort yet: step 1 has not completed")
        return self.cohort
