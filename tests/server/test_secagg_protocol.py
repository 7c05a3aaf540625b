"""The secure aggregation protocol driven in process: clients and server as in a round."""

from __future__ import annotations

import numpy as np
import pytest

from client.secagg import SecAggClient, SecAggViolation
from common.secagg import channel, ring
from common.secagg.protocol import average_from_sum, to_vector
from server.secagg import SecAggAbort, SecAggServer


def names(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


class Round:
    """Every message of one round; the server object only sees what a real server would."""

    def __init__(self, n: int, *, threshold: int = 0, neighbours: int = 0) -> None:
        self.server = SecAggServer(server_round=1, threshold_setting=threshold,
                                   neighbours_setting=neighbours)
        self.clients = {name: SecAggClient(name, self.server.session, 1) for name in names(n)}
        self.seen: list[object] = []  # everything that reaches the server

    def run(self, vectors: dict[str, np.ndarray], *, drop_before_shares=(),
            drop_before_masking=(), drop_before_reveal=()) -> np.ndarray:
        keys = {n: c.public_keys() for n, c in self.clients.items()}
        cohort = self.server.make_cohort(keys)
        sealed = {n: c.share_secrets(cohort) for n, c in self.clients.items()
                  if n not in drop_before_shares}
        self.seen.append(sealed)
        inbox = self.server.route(sealed)
        masked = {}
        for name, received in inbox.items():
            if name in drop_before_masking:
                continue
            masked[name] = self.clients[name].mask(received, vectors[name])
            self.server.check_masked(name, masked[name], len(vectors[name]))
        self.seen.append(masked)
        survivors, dropped = self.server.reveal_lists(masked)
        reveals = {name: self.clients[name].reveal(survivors, dropped) for name in survivors
                   if name not in drop_before_reveal}
        self.seen.append(reveals)
        return ring.decode(self.server.unmask(masked, reveals))


def random_vectors(n: int, length: int = 257, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(scale=2.0, size=length) for name in names(n)}


@pytest.mark.parametrize(("n", "k"), [(3, 0), (5, 0), (10, 0), (40, 8)])
def test_the_unmasked_sum_equals_the_plain_sum(n, k):
    vectors = random_vectors(n)
    total = Round(n, neighbours=k).run(vectors)
    np.testing.assert_allclose(total, np.sum(list(vectors.values()), axis=0), rtol=0,
                               atol=ring.error_bound(n))


def test_weighted_fedavg_of_a_real_adapter_matches_plain_fedavg(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from common.adapter import add_lora, trainable_state
    from common.config import LoraSettings

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    adapter = trainable_state(add_lora(base, LoraSettings(r=4), "classification"))
    rng = np.random.default_rng(3)
    states = {name: {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(v.dtype)
                     for k, v in adapter.items()} for name in names(4)}
    weights = {name: float(w) for name, w in zip(names(4), [10, 25, 7, 58], strict=True)}
    losses = {name: 0.5 + i for i, name in enumerate(names(4))}
    total = Round(4).run({n: to_vector(states[n], weights[n], (weights[n], losses[n] * weights[n]))
                          for n in names(4)})
    secure, sums = average_from_sum(total, adapter)
    for key in adapter:
        plain = sum(weights[n] * states[n][key] for n in names(4)) / sum(weights.values())
        np.testing.assert_allclose(secure[key], plain, atol=1e-5)
    # the server learns the clients' example count and loss only as totals
    assert sums["examples"] == pytest.approx(sum(weights.values()), abs=1e-5)
    assert sums["loss-sum"] == pytest.approx(sum(losses[n] * weights[n] for n in names(4)),
                                             abs=1e-5)


@pytest.mark.parametrize("dropouts", [1, 2, 3])
def test_dropouts_up_to_n_minus_t_recover(dropouts):
    n = 7  # complete graph: 6 neighbours each, threshold 4, so 3 may drop
    vectors = random_vectors(n)
    gone = names(n)[:dropouts]
    total = Round(n).run(vectors, drop_before_masking=gone)
    kept = [v for name, v in vectors.items() if name not in gone]
    np.testing.assert_allclose(total, np.sum(kept, axis=0), atol=ring.error_bound(n))


def test_one_dropout_too_many_abandons_the_round():
    with pytest.raises(SecAggAbort, match="threshold"):
        Round(7).run(random_vectors(7), drop_before_masking=names(7)[:4])


def test_too_few_reveals_abandon_the_round():
    with pytest.raises(SecAggAbort, match="shares of"):
        Round(7).run(random_vectors(7), drop_before_reveal=names(7)[:4])


def test_dropping_before_sharing_leaves_the_others_summed():
    vectors = random_vectors(6)
    total = Round(6).run(vectors, drop_before_shares=["client-05"])
    np.testing.assert_allclose(total, np.sum([vectors[n] for n in names(5)], axis=0),
                               atol=ring.error_bound(6))


def test_the_server_never_holds_a_plain_update():
    vectors = {name: np.full(64, 1.5) for name in names(4)}  # identical, easy to spot
    plain = ring.encode(vectors["client-00"], 4)
    round_ = Round(4)
    round_.run(vectors)
    masked = round_.seen[1]
    for received in masked.values():
        assert np.mean(received == plain) < 0.05
        # masked words look uniform in the ring: about half have the top bit set
        assert 0.3 < np.mean(received >> np.uint64(63)) < 0.7
    # two different inputs give masked vectors with the same distribution
    other = Round(4)
    other.run({name: np.full(64, -300.0) for name in names(4)})
    a = np.concatenate(list(masked.values())).astype(np.float64)
    b = np.concatenate(list(other.seen[1].values())).astype(np.float64)
    assert abs(a.mean() - b.mean()) < 0.1 * 2.0**64


def test_a_client_asked_for_both_shares_of_a_peer_refuses():
    round_ = Round(4)
    keys = {n: c.public_keys() for n, c in round_.clients.items()}
    cohort = round_.server.make_cohort(keys)
    inbox = round_.server.route({n: c.share_secrets(cohort) for n, c in round_.clients.items()})
    client = round_.clients["client-00"]
    client.mask(inbox["client-00"], np.zeros(8))
    with pytest.raises(SecAggViolation, match="both shares"):
        client.reveal(["client-00", "client-01", "client-02"], ["client-01"])
    client.reveal(names(4), [])
    with pytest.raises(SecAggViolation, match="out of order"):  # a second request, later
        client.reveal(["client-00", "client-02", "client-03"], ["client-01"])


def test_tampered_shares_fail_authentication_at_the_recipient():
    round_ = Round(4)
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    inbox = round_.server.route({n: c.share_secrets(cohort) for n, c in round_.clients.items()})
    tampered = dict(inbox["client-00"])
    tampered["client-01"] = tampered["client-01"][:-1] + bytes([tampered["client-01"][-1] ^ 1])
    client = round_.clients["client-00"]
    client.mask(tampered, np.zeros(8))
    with pytest.raises(channel.ChannelError, match="authentication"):
        client.reveal(names(4), [])


def test_a_share_redirected_to_another_recipient_fails():
    round_ = Round(4)
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    inbox = round_.server.route({n: c.share_secrets(cohort) for n, c in round_.clients.items()})
    swapped = dict(inbox["client-00"])
    swapped["client-01"] = inbox["client-02"]["client-01"]  # meant for client-02
    round_.clients["client-00"].mask(swapped, np.zeros(8))
    with pytest.raises(channel.ChannelError):
        round_.clients["client-00"].reveal(names(4), [])


def test_out_of_order_and_substituted_keys_are_refused():
    round_ = Round(4)
    client = round_.clients["client-00"]
    with pytest.raises(SecAggViolation, match="out of order"):
        client.mask({}, np.zeros(8))
    keys = {n: c.public_keys() for n, c in round_.clients.items()}
    keys["client-00"] = round_.clients["client-01"].public_keys()
    with pytest.raises(SecAggViolation, match="changed this client's public keys"):
        client.share_secrets(round_.server.make_cohort(keys))


def test_bad_vectors_are_refused_by_the_server_with_a_reason():
    round_ = Round(4)
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    round_.server.route({n: c.share_secrets(cohort) for n, c in round_.clients.items()})
    with pytest.raises(ValueError, match="expected"):
        round_.server.check_masked("client-00", np.zeros(5, np.uint64), 8)
    with pytest.raises(ValueError, match="ring"):
        round_.server.check_masked("client-00", np.zeros(8, np.float32), 8)
    with pytest.raises(ValueError, match="not in this round"):
        round_.server.check_masked("stranger", np.zeros(8, np.uint64), 8)


def test_unknown_senders_and_non_neighbours_are_not_routed():
    round_ = Round(40, neighbours=4)
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    sealed = {n: c.share_secrets(cohort) for n, c in round_.clients.items()}
    sealed["stranger"] = {"client-00": b"x" * 40}
    far = next(n for n in names(40) if n not in cohort.graph()["client-00"] and n != "client-00")
    sealed["client-00"] = {**sealed["client-00"], far: b"y" * 40}
    inbox = round_.server.route(sealed)
    assert "stranger" not in inbox and "stranger" not in inbox["client-00"]
    assert "client-00" not in inbox[far]


def test_client_state_survives_serialisation_between_messages():
    round_ = Round(3)
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    for name, client in list(round_.clients.items()):
        client.share_secrets(cohort)
        round_.clients[name] = SecAggClient.from_bytes(client.to_bytes())
    assert all(c.step == "shares" and c.cohort == cohort for c in round_.clients.values())


def test_a_server_cannot_steer_the_reveal_with_repeated_or_foreign_names():
    round_ = Round(3)
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    inbox = round_.server.route({n: c.share_secrets(cohort) for n, c in round_.clients.items()})
    client = round_.clients["client-00"]
    client.mask(inbox["client-00"], np.zeros(8))
    # three "survivors" that are one client, so that the others' mask keys may be asked for
    with pytest.raises(SecAggViolation, match="twice"):
        client.reveal(["client-00"] * 3, ["client-01", "client-02"])
    with pytest.raises(SecAggViolation, match="outside this round's cohort"):
        client.reveal(["client-00", "sybil-1", "sybil-2"], ["client-01", "client-02"])
    with pytest.raises(SecAggViolation, match="min-cohort"):
        client.reveal(["client-00", "client-01"], ["client-02"])


def test_a_threshold_that_is_not_a_majority_of_the_holders_is_refused():
    round_ = Round(5, threshold=2)  # 5 holders each: 2 of them could rebuild a secret
    cohort = round_.server.make_cohort({n: c.public_keys() for n, c in round_.clients.items()})
    with pytest.raises(SecAggViolation, match="majority"):
        round_.clients["client-00"].share_secrets(cohort)


@pytest.mark.parametrize("bad", [bytes(32), b"\x01" + bytes(31), b"short"])
def test_degenerate_public_keys_are_left_out_of_the_cohort_not_the_round(bad):
    round_ = Round(4)
    keys = {n: c.public_keys() for n, c in round_.clients.items()}
    keys["client-03"] = (bad, keys["client-03"][1])
    cohort = round_.server.make_cohort(keys)
    assert "client-03" not in cohort.names and "client-03" in round_.server.rejected
    for name in cohort.names:  # the others share and mask as usual
        round_.clients[name].share_secrets(cohort)
