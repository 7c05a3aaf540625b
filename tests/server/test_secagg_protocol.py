"""The secure aggregation protocol driven in process: clients and server as in a round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedtune.client import secagg as secagg_client
from fedtune.client.secagg import SecAggClient, SecAggViolation
from fedtune.common.secagg import ring
from fedtune.common.secagg.protocol import routing_problem
from fedtune.common.secagg.summation import ImpossibleSum, Summation
from fedtune.server.secagg import SecAggAbort, SecAggServer


def names(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


class Round:
    """Every message of one round; the server object only sees what a real server would."""

    def __init__(self, n: int, *, threshold: int = 0, neighbours: int = 0,
                 bound: float = 0.0) -> None:
        self.server = SecAggServer(server_round=1, threshold_setting=threshold,
                                   neighbours_setting=neighbours)
        self.clients = {name: SecAggClient(name, self.server.session, 1) for name in names(n)}
        self.encoding = ring.Encoding(n, bound or BOUND)
        self.seen: list[object] = []  # everything that reaches the server

    def keys(self) -> dict[str, tuple[bytes, bytes, bytes, bytes]]:
        return {n: c.signed_keys() for n, c in self.clients.items()}

    def cohort(self):
        return self.server.make_cohort(self.keys())

    def run(self, vectors: dict[str, np.ndarray], *, drop_before_shares=(),
            drop_before_masking=(), drop_before_reveal=()) -> np.ndarray:
        cohort = self.server.make_cohort(self.keys())
        sealed = {n: c.share_secrets(cohort) for n, c in self.clients.items()
                  if n not in drop_before_shares}
        self.seen.append(sealed)
        inbox = self.server.route(sealed)
        masked = {}
        for name, received in inbox.items():
            if name in drop_before_masking:
                continue
            masked[name] = self.clients[name].mask(received, vectors[name], self.encoding, RNG)
            self.server.check_masked(name, masked[name], len(vectors[name]))
        self.seen.append(masked)
        _, reveals = self.reveals(masked, skip=drop_before_reveal)
        self.seen.append(reveals)
        return self.encoding.decode(self.server.unmask(masked, reveals))

    def reveals(self, masked: dict[str, np.ndarray], *, skip=()) -> tuple[list[str], dict]:
        """The consistency round and step 4: (survivors, each survivor's reveal but `skip`'s)."""
        survivors = self.server.survivors(masked)
        routing = self.server.routing(survivors)
        signed = self.server.consistent(survivors, routing, {
            name: self.clients[name].sign_survivors(survivors, routing) for name in survivors})
        return survivors, {name: self.clients[name].reveal(survivors, routing, signed)
                           for name in survivors if name not in skip}


BOUND = 16.0  # the vectors below stay within 8 standard deviations
RNG = np.random.default_rng(7)
WORDS = 4096  # words per vector where a test reads the masks' statistics


def mask_zeros(client: SecAggClient, received: dict[str, bytes]) -> np.ndarray:
    return client.mask(received, np.zeros(8), ring.Encoding(client.cohort_size(), 1.0), RNG)


def random_vectors(n: int, length: int = 257, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(scale=2.0, size=length) for name in names(n)}


@pytest.mark.parametrize(("n", "k"), [(3, 0), (5, 0), (10, 0), (40, 0), (40, 20)])
def test_the_unmasked_sum_equals_the_plain_sum(n, k):
    vectors = random_vectors(n)
    total = Round(n, neighbours=k).run(vectors)
    np.testing.assert_allclose(total, np.sum(list(vectors.values()), axis=0), rtol=0,
                               atol=ring.Encoding(n, BOUND).error_bound())


def test_weighted_fedavg_of_a_real_adapter_matches_plain_fedavg(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from fedtune.common.adapter import add_lora, trainable_state
    from fedtune.common.config import LoraSettings

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    adapter = trainable_state(add_lora(base, LoraSettings(r=4), "classification"))
    rng = np.random.default_rng(3)
    states = {name: {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(v.dtype)
                     for k, v in adapter.items()} for name in names(4)}
    examples = dict(zip(names(4), [10, 25, 7, 58], strict=True))
    losses = {name: 0.5 + i for i, name in enumerate(names(4))}
    summation = Summation(4, bound=1.0, max_examples=1000)
    total = Round(4, bound=summation.encoding.bound).run({n: summation.to_vector(
        {k: states[n][k] - adapter[k] for k in adapter}, examples[n], losses[n])
        for n in names(4)})
    change, sums = summation.average(total, adapter, summed=4)
    for key in adapter:
        plain = sum(examples[n] * states[n][key] for n in names(4)) / sum(examples.values())
        np.testing.assert_allclose(adapter[key] + change[key], plain, atol=1e-5)
    # the server learns the clients' example count and loss only as totals
    assert sums["examples"] == pytest.approx(sum(examples.values()), abs=1e-3)
    assert sums["loss-sum"] == pytest.approx(sum(losses[n] * examples[n] for n in names(4)),
                                             abs=1e-2)


@pytest.mark.parametrize("dropouts", [1, 2])
def test_dropouts_up_to_n_minus_t_recover(dropouts):
    n = 7  # complete graph: 6 neighbours each, threshold 5 (over 2/3), so 2 may drop
    vectors = random_vectors(n)
    gone = names(n)[:dropouts]
    total = Round(n).run(vectors, drop_before_masking=gone)
    kept = [v for name, v in vectors.items() if name not in gone]
    np.testing.assert_allclose(total, np.sum(kept, axis=0),
                               atol=ring.Encoding(n, BOUND).error_bound())


def test_one_dropout_too_many_abandons_the_round():
    with pytest.raises(SecAggAbort, match="only 4 masked inputs arrived; 5 are needed"):
        Round(7).run(random_vectors(7), drop_before_masking=names(7)[:3])


def test_too_few_reveals_abandon_the_round():
    with pytest.raises(SecAggAbort, match="shares of"):
        Round(7).run(random_vectors(7), drop_before_reveal=names(7)[:3])


def test_dropping_before_sharing_leaves_the_others_summed():
    vectors = random_vectors(7)
    total = Round(7).run(vectors, drop_before_shares=["client-06"])
    np.testing.assert_allclose(total, np.sum([vectors[n] for n in names(6)], axis=0),
                               atol=ring.Encoding(7, BOUND).error_bound())


def test_the_server_never_holds_a_plain_update():
    # the masks are fresh randomness each run: 4,096 words keep every bound below more than six
    # standard deviations from its expected value (64 words failed about one run in 200)
    vectors = {name: np.full(WORDS, 1.5) for name in names(4)}  # identical, easy to spot
    plain = ring.Encoding(4, BOUND).encode(vectors["client-00"], RNG)
    round_ = Round(4)
    round_.run(vectors)
    masked = round_.seen[1]
    for received in masked.values():
        assert np.mean(received == plain) < 0.05
        # masked words look uniform in the ring: about half have the top bit set
        assert 0.45 < np.mean(received >> np.uint32(31)) < 0.55
    # two different inputs give masked vectors with the same distribution
    other = Round(4)
    other.run({name: np.full(WORDS, -BOUND) for name in names(4)})
    a = np.concatenate(list(masked.values())).astype(np.float64)
    b = np.concatenate(list(other.seen[1].values())).astype(np.float64)
    assert abs(a.mean() - b.mean()) < 0.02 * 2.0**32


def masked_round(n: int, *, tamper=None) -> tuple[Round, list[str]]:
    """A round with every client masked (zeros); `tamper(inbox)` may alter the deliveries."""
    round_ = Round(n)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    if tamper is not None:
        tamper(inbox)
    masked = {m: mask_zeros(c, inbox[m]) for m, c in round_.clients.items()}
    return round_, round_.server.survivors(masked)


def signed_round(n: int) -> tuple[Round, list[str], list, dict[str, bytes]]:
    round_, survivors = masked_round(n)
    routing = round_.server.routing(survivors)
    signed = round_.server.consistent(survivors, routing, {
        m: c.sign_survivors(survivors, routing) for m, c in round_.clients.items()})
    return round_, survivors, routing, signed


def test_a_client_reveals_once_and_only_for_the_set_it_signed():
    round_, survivors, routing, signed = signed_round(4)
    client = round_.clients["client-00"]
    with pytest.raises(SecAggViolation, match="differs from the one this client signed"):
        client.reveal(survivors[:3], routing, signed)
    with pytest.raises(SecAggViolation, match="differs from the one this client signed"):
        client.reveal(survivors, routing[1:], signed)
    reveals = client.reveal(survivors, routing, signed)
    assert {r.kind for r in reveals} == {"b"} and len(reveals) == 4
    with pytest.raises(SecAggViolation, match="out of order"):  # a second request, later
        client.reveal(survivors, routing, signed)


def test_a_client_signs_one_survivor_set_per_round():
    round_, survivors = masked_round(4)
    client = round_.clients["client-00"]
    client.sign_survivors(survivors, round_.server.routing(survivors))
    with pytest.raises(SecAggViolation, match="out of order"):
        client.sign_survivors(survivors[:3], round_.server.routing(survivors[:3]))


def test_different_survivor_sets_sent_to_different_clients_get_no_reveal():
    round_, _ = masked_round(6)  # over two thirds of 6 is 5 signatures
    everyone, without_last = names(6), names(6)[:5]
    told = {**dict.fromkeys(names(6)[:3], everyone), **dict.fromkeys(names(6)[3:5],
                                                                     without_last)}
    routes = {tuple(s): round_.server.routing(s) for s in (everyone, without_last)}
    signatures = {m: round_.clients[m].sign_survivors(told[m], routes[tuple(told[m])])
                  for m in told}
    for name, survivors in told.items():  # every signature forwarded: none adds up
        with pytest.raises(SecAggViolation, match="signed this survivor set"):
            round_.clients[name].reveal(survivors, routes[tuple(survivors)], signatures)
    with pytest.raises(SecAggAbort, match="signed the survivor set"):
        round_.server.consistent(everyone, routes[tuple(everyone)], signatures)


def test_one_colluder_signing_twice_cannot_complete_two_survivor_sets():
    # the review's attack: with a majority quorum, a colluder signing both of two sets let
    # each reach it; over two thirds, two sets need more than a third of the cohort twice
    round_, _ = masked_round(5)
    s1, s2 = names(5)[:4], names(5)[1:]  # client-01..03 in both; client-03 colludes
    routes = {tuple(s): round_.server.routing(s) for s in (s1, s2)}
    signatures = {"client-00": round_.clients["client-00"].sign_survivors(s1, routes[tuple(s1)]),
                  "client-01": round_.clients["client-01"].sign_survivors(s1, routes[tuple(s1)]),
                  "client-04": round_.clients["client-04"].sign_survivors(s2, routes[tuple(s2)])}
    colluder = round_.clients["client-03"]
    colluder.sign_survivors(s1, routes[tuple(s1)])
    both = dict(colluder.__dict__)
    first = colluder.signer.sign(colluder._statement())
    colluder.__dict__.update(both, step="masked")
    second = colluder.sign_survivors(s2, routes[tuple(s2)])
    for survivors, name, extra in ((s1, "client-00", first), (s2, "client-04", second)):
        with pytest.raises(SecAggViolation, match="signed this survivor set"):
            round_.clients[name].reveal(survivors, routes[tuple(survivors)],
                                        {**signatures, "client-03": extra})


def test_forged_consistency_signatures_do_not_count():
    round_, survivors = masked_round(4)
    routing = round_.server.routing(survivors)
    signatures = {m: round_.clients[m].sign_survivors(survivors, routing) for m in names(4)[:2]}
    forged = {**signatures, "client-02": b"\0" * 64, "client-03": signatures["client-00"]}
    with pytest.raises(SecAggViolation, match="only 2 survivors signed"):
        round_.clients["client-00"].reveal(survivors, routing, forged)


def test_dropped_clients_follow_from_the_signed_set_never_from_the_server():
    round_ = Round(7)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    masked = {m: mask_zeros(round_.clients[m], inbox[m]) for m in names(7)[:6]}
    survivors = round_.server.survivors(masked)
    routing = round_.server.routing(survivors)
    signed = round_.server.consistent(survivors, routing, {
        m: round_.clients[m].sign_survivors(survivors, routing) for m in survivors})
    reveals = round_.clients["client-00"].reveal(survivors, routing, signed)
    kinds = {r.owner: r.kind for r in reveals}
    assert kinds == {**dict.fromkeys(survivors, "b"), "client-06": "s"}


def test_a_survivor_graph_that_falls_apart_gets_no_signature():
    # the review's attack on sparse graphs: "drop" the clients on either side of a short arc
    # of the ring graph so that the arc's masks cancel alone and the server learns its sum
    n = 100
    round_ = Round(n)
    cohort = round_.cohort()
    order = [cohort.names[i] for i in np.random.default_rng(cohort.graph_seed).permutation(n)]
    half = cohort.neighbours // 2
    arc, cut = order[:11], {*order[11:11 + half], *order[n - half:]}
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    for name in arc:
        mask_zeros(round_.clients[name], inbox[name])
    survivors = sorted(set(cohort.names) - cut)  # 80 of 100: enough signers and survivors
    routing = round_.server.routing(survivors)
    assert "fall apart" in routing_problem(routing, survivors)
    with pytest.raises(SecAggViolation, match="fall apart"):
        round_.clients[arc[0]].sign_survivors(survivors, routing)


def test_a_withheld_delivery_is_refused_before_training():
    # the review's isolation attack: deliver a client only its own and a few shares
    round_ = Round(10)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    target = round_.clients["client-00"]
    few = {m: inbox["client-00"][m] for m in sorted(inbox["client-00"])[:7]}  # 7 of 10: t
    target.check_shares(few)  # enough for the threshold alone
    with pytest.raises(SecAggViolation, match="7 of 10 share holders"):
        target.check_shares(few, min_delivered=0.8)
    # and a delivery announced differently from what the client received is not signed
    mask_zeros(target, few)
    survivors = names(10)
    with pytest.raises(SecAggViolation, match="not what it received"):
        target.sign_survivors(survivors, round_.server.routing(survivors))


def flipped(ciphertext: bytes) -> bytes:
    return ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])


def test_shares_that_do_not_open_are_named_and_too_many_refused_before_training():
    round_ = Round(4)  # 4 holders each, threshold 3: one share may fail to open
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    delivery = inbox["client-00"]
    tampered = {**delivery, "client-01": flipped(delivery["client-01"])}
    assert round_.clients["client-00"].check_shares(tampered) == ["client-01"]
    swapped = {**delivery, "client-01": inbox["client-02"]["client-01"]}  # misrouted
    assert round_.clients["client-00"].check_shares(swapped) == ["client-01"]
    two = {**tampered, "client-02": flipped(delivery["client-02"])}
    with pytest.raises(SecAggViolation, match=r"2 do not open: \['client-01', 'client-02'\]"):
        round_.clients["client-00"].check_shares(two)
    own = {**delivery, "client-00": flipped(delivery["client-00"])}
    with pytest.raises(SecAggViolation, match="client-00 do not open"):
        round_.clients["client-00"].check_shares(own)


def test_a_share_sealed_for_another_holder_does_not_open_as_this_ones():
    round_ = Round(4)
    cohort = round_.cohort()
    sender = round_.clients["client-01"]
    sealed = sender.share_secrets(cohort)
    inbox = round_.server.route({"client-01": sealed, **{
        m: c.share_secrets(cohort) for m, c in round_.clients.items() if m != "client-01"}})
    plaintext = secagg_client.channel.open_sealed(
        sender._share_key(cohort, "client-00"), inbox["client-00"]["client-01"],
        sender._context("client-01", "client-00"))
    wrong_x = (9).to_bytes(4, "big") + plaintext[4:]  # well sealed, but another holder's index
    inbox["client-00"]["client-01"] = secagg_client.channel.seal(
        sender._share_key(cohort, "client-00"), wrong_x, sender._context("client-01", "client-00"))
    assert round_.clients["client-00"].check_shares(inbox["client-00"]) == ["client-01"]


def masked_with_complaints(round_: Round, sealed: dict, vectors: dict) -> tuple[dict, dict]:
    """Step 3 for every client: (masked inputs, the complaints they came with, as parsed)."""
    from fedtune.common.secagg.records import complaint_from_record

    inbox = round_.server.route(sealed)
    masked, complaints = {}, {}
    for name, client in round_.clients.items():
        client.check_shares(inbox[name], min_delivered=0.8)
        masked[name] = client.mask(inbox[name], vectors[name], round_.encoding, RNG)
        if (complaint := client.complaint()) is not None:
            complaints[name] = complaint_from_record(ConfigRecord(complaint))
    return masked, complaints


def test_a_neighbour_whose_shares_do_not_open_is_blamed_and_the_round_completes_without_it():
    n = 7  # 7 holders each, threshold 5
    round_ = Round(n)
    cohort = round_.cohort()
    sealed = {m: c.share_secrets(cohort) for m, c in round_.clients.items()}
    sealed["client-03"]["client-00"] = flipped(sealed["client-03"]["client-00"])
    vectors = random_vectors(n)
    masked, complaints = masked_with_complaints(round_, sealed, vectors)
    assert list(complaints) == ["client-00"] and complaints["client-00"][0] == ["client-03"]
    blamed = round_.server.blame(complaints)
    assert blamed == {"client-03": "its shares to client-00 do not open (signed complaint)"}
    assert round_.server.convicted() == []  # one accuser of six: this round only
    del masked["client-03"]  # left out of the round (the exchange does this)
    survivors, reveals = round_.reveals(masked)
    total = round_.encoding.decode(round_.server.unmask(masked, reveals))
    np.testing.assert_allclose(total, sum(vectors[m] for m in survivors),
                               atol=round_.encoding.error_bound())


def test_a_client_whose_shares_open_for_no_one_is_retired_and_the_round_completes():
    n = 7
    round_ = Round(n)
    cohort = round_.cohort()
    sealed = {m: c.share_secrets(cohort) for m, c in round_.clients.items()}
    for holder in sealed["client-03"]:
        if holder != "client-03":
            sealed["client-03"][holder] = flipped(sealed["client-03"][holder])
    vectors = random_vectors(n)
    masked, complaints = masked_with_complaints(round_, sealed, vectors)
    assert set(round_.server.blame(complaints)) == {"client-03"}
    assert round_.server.convicted() == ["client-03"]
    del masked["client-03"]  # no one can rebuild its mask key, and no one needs to
    survivors, reveals = round_.reveals(masked)
    total = round_.encoding.decode(round_.server.unmask(masked, reveals))
    np.testing.assert_allclose(total, sum(vectors[m] for m in survivors),
                               atol=round_.encoding.error_bound())


def signed_complaints(round_: Round, accusers: list[str], accused: str) -> dict:
    complaints = {}
    for name in accusers:
        client = round_.clients[name]
        client.accused = [accused]
        record = client.complaint()
        complaints[name] = (record["accused"], record["complaint"])
    return complaints


def test_a_minority_of_accusers_leaves_the_accused_out_of_the_round_only_a_majority_for_good():
    # a lying client (or a third of the cohort, colluding) cannot retire an honest one; a client
    # whose shares fail for most of the clients that received them is retired
    round_ = Round(7)  # every client's shares reach its 6 neighbours
    cohort = round_.cohort()
    round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    liars = signed_complaints(round_, ["client-01", "client-02", "client-04"], "client-03")
    assert set(round_.server.blame(liars)) == {"client-03"}  # left out of this round
    assert round_.server.convicted() == []  # 3 of its 6 receivers: not most
    round_ = Round(7)
    cohort = round_.cohort()
    round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    many = signed_complaints(round_, ["client-00", "client-01", "client-02", "client-04"],
                             "client-03")
    assert "client-00, client-01, client-02, client-04" in round_.server.blame(many)["client-03"]
    assert round_.server.convicted() == ["client-03"]


def test_a_revealer_claiming_another_holders_index_is_rejected_and_the_sum_still_opens():
    n = 5
    round_ = Round(n)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    vectors = random_vectors(n)
    masked = {m: c.mask(inbox[m], vectors[m], round_.encoding, RNG)
              for m, c in round_.clients.items()}
    _, reveals = round_.reveals(masked)
    # client-04 repeats its shares at every other holder's index, to overwrite theirs
    forged = [dataclasses.replace(item, x=x) for item in reveals["client-04"]
              for x in range(1, n + 1)]
    reveals["client-04"] = forged
    total = round_.encoding.decode(round_.server.unmask(masked, reveals))
    assert "another's index" in round_.server.rejected["client-04"]
    np.testing.assert_allclose(total, sum(vectors.values()), atol=round_.encoding.error_bound())


def test_a_complaint_that_is_forged_or_names_strangers_rejects_its_author():
    round_ = Round(7)
    cohort = round_.cohort()
    round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    client = round_.clients["client-01"]
    client.accused = ["client-02"]
    accused, signature = client.complaint()["accused"], client.complaint()["complaint"]
    assert round_.server.blame({"client-04": (accused, signature)}) == {}  # not its signature
    assert "no valid signature" in round_.server.rejected["client-04"]
    client.accused = ["client-02", "client-03", "client-04"]  # 4 left of 7: below t = 5
    record = client.complaint()
    assert round_.server.blame({"client-01": (record["accused"], record["complaint"])}) == {}
    assert "fewer shares than the threshold" in round_.server.rejected["client-01"]
    client.accused = ["stranger"]
    record = client.complaint()
    assert round_.server.blame({"client-01": (record["accused"], record["complaint"])}) == {}
    assert "sent it no shares" in round_.server.rejected["client-01"]


def test_masking_a_checked_delivery_decrypts_each_share_once(monkeypatch):
    round_ = Round(4)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    target, delivery = round_.clients["client-00"], inbox["client-00"]
    opened = []
    real_open = secagg_client.channel.open_sealed
    monkeypatch.setattr(secagg_client.channel, "open_sealed",
                        lambda *args: opened.append(1) or real_open(*args))
    target.check_shares(delivery)
    mask_zeros(target, delivery)
    assert len(opened) == len(delivery)
    with pytest.raises(SecAggViolation, match="out of order"):  # the same pads never twice
        mask_zeros(target, delivery)


def test_masking_a_delivery_other_than_the_checked_one_checks_it():
    round_ = Round(4)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    target, delivery = round_.clients["client-00"], inbox["client-00"]
    target.check_shares(delivery)
    too_few = {m: delivery[m] for m in sorted(delivery)[:2]}
    with pytest.raises(SecAggViolation, match="are needed"):
        mask_zeros(target, too_few)
    delivery["client-01"] = flipped(delivery["client-01"])  # changed in place after the check
    mask_zeros(target, delivery)
    assert target.accused == ["client-01"] and "client-01" not in target.partners


def test_the_graph_is_the_cohorts_not_the_servers():
    round_ = Round(40)
    cohort = round_.cohort()
    client = round_.clients["client-00"]
    with pytest.raises(SecAggViolation, match="seed"):
        client.share_secrets(dataclasses.replace(cohort, graph_seed=cohort.graph_seed + 1))
    with pytest.raises(SecAggViolation, match="neighbours is fewer"):
        client.share_secrets(dataclasses.replace(cohort, neighbours=2, threshold=3))


class Rogue(ring.Encoding):
    """A malicious client's encoding: whatever ring values it likes, inside its masks."""

    def __init__(self, honest: ring.Encoding, values: np.ndarray) -> None:
        super().__init__(honest.clients, honest.bound)
        object.__setattr__(self, "values", values)

    def encode(self, values, rng):
        return self.values


def malicious_round(rogue: np.ndarray, summation: Summation,
                    honest: dict[str, np.ndarray]) -> np.ndarray:
    """The decoded sum of the honest clients' vectors and `rogue` ring values from client-03,
    all through the protocol's masks."""
    round_ = Round(4, bound=summation.encoding.bound)
    cohort = round_.cohort()
    inbox = round_.server.route({m: c.share_secrets(cohort) for m, c in round_.clients.items()})
    masked = {m: round_.clients[m].mask(inbox[m], honest[m], summation.encoding, RNG)
              for m in names(3)}
    masked["client-03"] = round_.clients["client-03"].mask(
        inbox["client-03"], np.zeros(len(rogue)), Rogue(summation.encoding, rogue), RNG)
    _, reveals = round_.reveals(masked)
    return summation.encoding.decode(round_.server.unmask(masked, reveals))


def ring_values(summation: Summation, values: np.ndarray) -> np.ndarray:
    """Real values as ring elements, unchecked: nothing stops a malicious client's."""
    scaled = np.round(np.asarray(values) * summation.encoding.scale).astype(np.int64)
    return (scaled % 2**32).astype(ring.DTYPE)


LENGTH = 64  # adapter values; the vector adds weight, example share and loss share
ATTACKS = {  # what client-03 puts inside its masks, in real units (before the ring)
    # the construction: the weight cancelled to 1e-4 and values near the ring's largest
    # (3.97 for 4 clients), so that the average would move by about 3e4 per value
    "tiny-weight-huge-values": lambda h: np.r_[np.full(LENGTH, 3.0), -h + 1e-4, -h, 0.0],
    "negative-weight": lambda h: np.r_[np.full(LENGTH, 0.5), -1.0, -1.0, 0.0],
    "huge-values": lambda h: np.r_[np.full(LENGTH, -3.5), 1.0, 1.0, 0.0],
    "wrapped-values": lambda h: np.r_[np.full(LENGTH, 4.0e3), 1.0, 1.0, 0.0],  # mod 2^32
    # in range per value, beyond the bound for its weight, and a norm far past any honest one
    "full-weight-at-the-edge": lambda h: np.r_[np.full(LENGTH, 1.0), 1.0, 1.0, 0.0],
    "norm-at-the-edge": lambda h: np.r_[np.full(LENGTH, 0.9 / LENGTH**0.5), 1.0, 1.0, 0.0],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_malicious_client_leaves_the_average_within_the_bound_or_the_round_dropped(attack):
    # three honest clients of 2,000 examples (weight 0.02 each) and one malicious one
    summation = Summation(4, bound=1.0, max_examples=100_000, norm=1.0)
    rng = np.random.default_rng(5)
    changes = {m: {"a": rng.normal(scale=0.01, size=LENGTH)} for m in names(3)}
    honest = {m: summation.to_vector(changes[m], 2_000, 0.0) for m in names(3)}
    like = {"a": np.zeros(LENGTH)}
    honest_weight = 3 * 0.02
    total = malicious_round(ring_values(summation, ATTACKS[attack](honest_weight)), summation,
                            honest)
    try:
        change, _ = summation.average(total, like, summed=4)
    except ImpossibleSum as error:
        assert "impossible for honest ones" in str(error)
        return
    # what passes is within the documented bound: each value within `bound`, the change's L2
    # norm within `norm`
    assert np.abs(change["a"]).max() <= summation.bound
    assert np.linalg.norm(change["a"]) <= summation.norm + 1e-12
    assert attack not in {"tiny-weight-huge-values", "negative-weight", "huge-values"}


def test_the_honest_clients_alone_pass_the_check_unchanged():
    summation = Summation(4, bound=1.0, max_examples=100_000, norm=1.0)
    rng = np.random.default_rng(5)
    changes = {m: {"a": rng.normal(scale=0.01, size=LENGTH)} for m in names(3)}
    honest = {m: summation.to_vector(changes[m], 2_000, 0.0) for m in names(3)}
    zero = ring_values(summation, np.r_[np.zeros(LENGTH), 1e-5, 1e-5, 0.0])  # one example
    total = malicious_round(zero, summation, honest)
    change, _ = summation.average(total, {"a": np.zeros(LENGTH)}, summed=4)
    plain = sum(0.02 * changes[m]["a"] for m in names(3)) / (0.06 + 1e-5)
    np.testing.assert_allclose(change["a"], plain, atol=1e-5)


def test_out_of_order_and_substituted_keys_are_refused():
    round_ = Round(4)
    client = round_.clients["client-00"]
    with pytest.raises(SecAggViolation, match="out of order"):
        client.mask({}, np.zeros(8), ring.Encoding(4, 1.0), RNG)
    cohort = round_.cohort()
    other = round_.clients["client-01"].public_keys()
    swapped = dataclasses.replace(cohort, c_public=[other[0], *cohort.c_public[1:]])
    with pytest.raises(SecAggViolation, match="changed this client's public keys"):
        client.share_secrets(swapped)


def test_keys_without_a_valid_signature_are_refused_by_clients_and_server():
    round_ = Round(4)
    keys = round_.keys()
    c, s_, sig, _ = keys["client-03"]
    forged = round_.clients["client-02"].signed_keys()[3]  # a signature over other keys
    cohort = round_.cohort()
    position = cohort.names.index("client-03")
    bad = dataclasses.replace(cohort, key_signatures=[
        forged if i == position else x for i, x in enumerate(cohort.key_signatures)])
    with pytest.raises(SecAggViolation, match="client-03 carry no valid signature"):
        round_.clients["client-00"].share_secrets(bad)
    server = SecAggServer(server_round=1, session=round_.server.session)
    left = server.make_cohort({**keys, "client-03": (c, s_, sig, forged)})
    assert "client-03" not in left.names and "signature" in server.rejected["client-03"]


def test_pinned_peers_refuse_a_cohort_with_a_key_the_node_does_not_know():
    round_ = Round(4)
    cohort = round_.cohort()
    pinned = {name: round_.clients[name].signed_keys()[2] for name in names(4)}
    round_.clients["client-00"].share_secrets(cohort, pinned)
    impostor = SecAggClient("client-03", round_.server.session, 1)  # the server's own keys
    keys = {**round_.keys(), "client-03": impostor.signed_keys()}
    other = SecAggServer(server_round=1, session=round_.server.session)
    with pytest.raises(SecAggViolation, match="peers: the signing key of client-03 is not"):
        round_.clients["client-01"].share_secrets(other.make_cohort(keys), pinned)


def test_bad_vectors_are_refused_by_the_server_with_a_reason():
    round_ = Round(4)
    cohort = round_.cohort()
    round_.server.route({n: c.share_secrets(cohort) for n, c in round_.clients.items()})
    with pytest.raises(ValueError, match="expected"):
        round_.server.check_masked("client-00", ring.zeros(5), 8)
    with pytest.raises(ValueError, match="ring"):
        round_.server.check_masked("client-00", np.zeros(8, np.float32), 8)
    with pytest.raises(ValueError, match="not in this round"):
        round_.server.check_masked("stranger", ring.zeros(8), 8)


def test_unknown_senders_and_non_neighbours_are_not_routed():
    round_ = Round(40)
    cohort = round_.cohort()
    sealed = {n: c.share_secrets(cohort) for n, c in round_.clients.items()}
    sealed["stranger"] = {"client-00": b"x" * 40}
    far = next(n for n in names(40) if n not in cohort.graph()["client-00"] and n != "client-00")
    sealed["client-00"] = {**sealed["client-00"], far: b"y" * 40}
    inbox = round_.server.route(sealed)
    assert "stranger" not in inbox and "stranger" not in inbox["client-00"]
    assert "client-00" not in inbox[far]


def test_client_state_survives_serialisation_between_messages():
    round_ = Round(3)
    cohort = round_.cohort()
    for name, client in list(round_.clients.items()):
        client.share_secrets(cohort)
        round_.clients[name] = SecAggClient.from_bytes(client.to_bytes())
    assert all(c.step == "shares" and c.cohort == cohort for c in round_.clients.values())


def test_a_server_cannot_steer_the_reveal_with_repeated_or_foreign_names():
    round_, _ = masked_round(3)
    client = round_.clients["client-00"]
    # three "survivors" that are one client, so that the others' mask keys may be asked for
    with pytest.raises(SecAggViolation, match="twice"):
        client.sign_survivors(["client-00"] * 3, [])
    with pytest.raises(SecAggViolation, match="outside this round's cohort"):
        client.sign_survivors(["client-00", "sybil-1", "sybil-2"], [])
    with pytest.raises(SecAggViolation, match="min-cohort"):
        client.sign_survivors(["client-00", "client-01"], [])
    with pytest.raises(SecAggViolation, match="listed as dropped"):
        client.sign_survivors(["client-01", "client-02"], [], min_survivors=2)


def test_a_threshold_of_two_thirds_or_less_of_the_holders_is_refused():
    round_ = Round(6, threshold=4)  # 6 holders: 4 is two thirds, a majority but not enough
    cohort = round_.cohort()
    with pytest.raises(SecAggViolation, match="over two thirds"):
        round_.clients["client-00"].share_secrets(cohort)


@pytest.mark.parametrize("bad", [bytes(32), b"\x01" + bytes(31), b"short"])
def test_degenerate_public_keys_are_left_out_of_the_cohort_not_the_round(bad):
    round_ = Round(4)
    keys = round_.keys()
    keys["client-03"] = (bad, *keys["client-03"][1:])
    cohort = round_.server.make_cohort(keys)
    assert "client-03" not in cohort.names and "client-03" in round_.server.rejected
    for name in cohort.names:  # the others share and mask as usual
        round_.clients[name].share_secrets(cohort)


def test_a_third_of_the_cohort_withholding_its_noise_leaves_the_accounted_noise_in_the_sum():
    # 15 clients, 3 drop out (the tolerated fifth), 5 of the 12 survivors collude with the
    # server and leave their noise shares out: the 7 honest shares still add up to z C
    from fedtune.common.config import RunConfig
    from fedtune.common.secagg.plan import summation_for

    z, clip, n, length = 1.1, 0.5, 15, 20_000
    config = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client",
                                     "privacy.clip_norm": clip, "privacy.noise_multiplier": z,
                                     "federation.num_clients": n, "secagg.enabled": True})
    summation = summation_for(config, n)
    rng = np.random.default_rng(11)
    dropped, colluders = names(n)[:3], names(n)[3:8]
    vectors = {}
    for name in names(n):
        share = 0.0 if name in colluders else rng.normal(0.0, summation.noise_std, size=length)
        vectors[name] = summation.to_vector({"a": np.zeros(length) + share}, 1, 0.0)
    round_ = Round(n, bound=summation.encoding.bound)
    round_.encoding = summation.encoding
    total = round_.run(vectors, drop_before_masking=dropped)
    assert total[-3] == pytest.approx(n - len(dropped))  # 12 summed: all the noise needs
    released = total[:-3]
    assert released.std() >= 0.98 * z * clip  # what the accountant assumes (std error 0.5%)
    assert released.std() == pytest.approx(z * clip, rel=0.02)


def test_a_cohort_too_small_for_a_secure_sum_says_how_many_sent_keys():
    with pytest.raises(SecAggAbort, match=r"^1 client sent usable keys; a secure sum needs 3"):
        Round(1).cohort()
    with pytest.raises(SecAggAbort, match=r"^no client sent usable keys"):
        SecAggServer(server_round=1).make_cohort({})
    with pytest.raises(SecAggAbort, match=r"^4 clients with 3 neighbours each cannot meet "
                                          r"threshold 5 \(secagg.threshold\)"):
        Round(4, threshold=5).cohort()
