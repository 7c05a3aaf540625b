import numpy as np
import pytest

from fedtune.common.partition import PartitionError, dirichlet, iid, local_split, natural


def _covers_each_row_once(parts, n):
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_covers_every_row_once_and_follows_the_seed():
    a = iid(103, 7, np.random.default_rng(1))
    b = iid(103, 7, np.random.default_rng(1))
    c = iid(103, 7, np.random.default_rng(2))
    assert _covers_each_row_once(a, 103)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert max(map(len, a)) - min(map(len, a)) <= 1


def test_dirichlet_covers_every_row_once_and_follows_the_seed():
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    a = dirichlet(labels, 10, 0.5, np.random.default_rng(3))
    b = dirichlet(labels, 10, 0.5, np.random.default_rng(3))
    assert _covers_each_row_once(a, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _mean_label_skew(parts, labels, num_labels):
    """Mean total-variation distance between each client's label mix and the global mix."""
    overall = np.bincount(labels, minlength=num_labels) / len(labels)
    mixes = [np.bincount(labels[p], minlength=num_labels) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]))


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = np.random.default_rng(0).integers(0, 10, size=3000)
    skews = [np.mean([_mean_label_skew(dirichlet(labels, 10, alpha, np.random.default_rng(s)),
                                       labels, 10) for s in range(3)])
             for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_natural_groups_stay_together_and_cover_every_row():
    values = ["b", "a", "c", "a", "b", "c", "d"]
    parts = natural(values, 2)
    assert _covers_each_row_once(parts, 7)
    clients_of_group: dict[str, set[int]] = {}
    for client, part in enumerate(parts):
        for i in part:
            clients_of_group.setdefault(values[i], set()).add(client)
    assert all(len(clients) == 1 for clients in clients_of_group.values())
    assert len(clients_of_group) == 4


def test_too_many_clients_is_refused():
    with pytest.raises(PartitionError, match="cannot give each of 20 clients"):
        iid(10, 20, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="3 groups but 5 clients"):
        natural(["a", "b", "c"], 5)


def test_local_split_keeps_a_training_row_and_covers_the_share():
    share = np.arange(10, 20)
    train, held = local_split(share, 0.3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert np.array_equal(np.sort(np.concatenate([train, held])), share)
    train, held = local_split(np.array([5]), 0.5, seed=0)
    assert list(train) == [5] and len(held) == 0
