import contextlib
import secrets

import numpy as np
import pytest

from fedtune.common.secagg import channel, prg, ring, shamir
from fedtune.common.secagg.graph import default_neighbours, neighbours


def test_any_t_shares_rebuild_the_secret_and_fewer_cannot():
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, shares=7, threshold=4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        chosen = [shares[i] for i in rng.choice(7, size=4, replace=False)]
        assert shamir.combine(chosen, 4) == secret
    with pytest.raises(shamir.ShamirError, match="cannot rebuild"):
        shamir.combine(shares[:3], 4)
    # t-1 shares with a forged t-th give some other value, never the secret
    forged = (8, secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big"))
    with contextlib.suppress(shamir.ShamirError):  # or a value outside 32 bytes, refused
        assert shamir.combine([*shares[:3], forged], 4) != secret


def test_shares_of_two_secrets_look_alike():
    # each share is uniform in the field whatever the secret: same distribution of top bits
    a = [int.from_bytes(shamir.split(bytes(32), 3, 2)[0][1], "big") >> 500 for _ in range(300)]
    b = [int.from_bytes(shamir.split(b"\xff" * 32, 3, 2)[0][1], "big") >> 500 for _ in range(300)]
    assert abs(np.mean(a) - np.mean(b)) < 0.15 * 2**20


def test_ring_sum_within_the_quantisation_bound_and_unbiased():
    rng = np.random.default_rng(1)
    encoding = ring.Encoding(10, 12.0)
    vectors = [np.clip(rng.normal(scale=3.0, size=1000), -12, 12) for _ in range(10)]
    total = sum((encoding.encode(v, rng) for v in vectors), start=ring.zeros(1000))
    error = encoding.decode(total) - np.sum(vectors, axis=0)
    assert np.abs(error).max() <= encoding.error_bound()
    # stochastic rounding: a value between two ring steps averages to itself
    step = 1.0 / encoding.scale
    repeated = encoding.decode(encoding.encode(np.full(20_000, 0.3 * step), rng))
    assert abs(repeated.mean() - 0.3 * step) < 0.02 * step


def test_the_full_cohort_at_the_bound_cannot_overflow():
    rng = np.random.default_rng(2)
    for clients, bound in [(3, 1.0), (1000, 4.5), (20_000, 1.0)]:
        encoding = ring.Encoding(clients, bound)
        for sign in (1.0, -1.0):
            one = encoding.encode(np.full(4, sign * bound), rng)
            total = ring.zeros(4)
            for _ in range(clients):
                total = total + one
            np.testing.assert_allclose(encoding.decode(total), sign * bound * clients,
                                       atol=encoding.error_bound())


def test_masked_upload_is_the_size_of_float32():
    encoding = ring.Encoding(50, 1.0)
    assert encoding.encode(np.zeros(1000), np.random.default_rng(0)).nbytes == 4 * 1000


def test_ring_refuses_values_beyond_the_bound_nan_and_foreign_vectors():
    encoding = ring.Encoding(10, 2.0)
    rng = np.random.default_rng(0)
    with pytest.raises(ring.RingError, match="exceeds"):
        encoding.encode(np.array([2.01]), rng)
    with pytest.raises(ring.RingError, match="NaN"):
        encoding.encode(np.array([np.nan]), rng)
    with pytest.raises(ring.RingError, match="uint32"):
        encoding.decode(np.zeros(3, np.int64))
    with pytest.raises(ring.RingError, match="no precision"):
        ring.Encoding(10**9, 10.0)


def test_masks_are_deterministic_per_seed_and_unrelated_across_seeds():
    seed = secrets.token_bytes(32)
    assert np.array_equal(prg.expand(seed, 100), prg.expand(seed, 100))
    other = prg.expand(secrets.token_bytes(32), 100)
    assert np.mean(prg.expand(seed, 100) == other) < 0.05
    assert np.array_equal(prg.expand(seed, 200)[:100], prg.expand(seed, 100))


def test_both_ends_derive_one_key_and_purposes_are_separated():
    a, b = channel.new_private_key(), channel.new_private_key()
    ab = channel.shared_key(a, channel.public_bytes(b), channel.MASK_PURPOSE, b"s1")
    ba = channel.shared_key(b, channel.public_bytes(a), channel.MASK_PURPOSE, b"s1")
    assert ab == ba
    assert ab != channel.shared_key(a, channel.public_bytes(b), channel.SHARE_PURPOSE, b"s1")
    assert ab != channel.shared_key(a, channel.public_bytes(b), channel.MASK_PURPOSE, b"s2")


def test_tampered_or_rebound_ciphertexts_fail_authentication():
    key = secrets.token_bytes(32)
    sealed = channel.seal(key, b"share", b"round 1|a|b")
    assert channel.open_sealed(key, sealed, b"round 1|a|b") == b"share"
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for ciphertext, bound in [(flipped, b"round 1|a|b"), (sealed, b"round 2|a|b"),
                              (sealed, b"round 1|a|c"), (sealed[:20], b"round 1|a|b")]:
        with pytest.raises(channel.ChannelError):
            channel.open_sealed(key, ciphertext, bound)


@pytest.mark.parametrize(("n", "k"), [(5, 4), (40, 8), (100, 14)])
def test_graph_is_symmetric_and_k_regular(n, k):
    names = [f"c{i:03d}" for i in range(n)]
    graph = neighbours(names, k, seed=7)
    assert all(len(peers) == k and name not in peers for name, peers in graph.items())
    assert all(name in graph[peer] for name, peers in graph.items() for peer in peers)
    assert default_neighbours(10) == 9 and default_neighbours(1000) < 40
