import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune.common.client_dp import clip_update, update_norm
from fedtune.common.privacy import (
    GaussianEvent,
    PrivacyError,
    default_delta,
    dp_sgd_schedule,
    epsilon_spent,
    noise_for_target,
)

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def independent_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """The RDP bound computed directly from Mironov's analysis, outside any accountant."""
    rdp = compute_rdp(q=rate, noise_multiplier=noise, steps=steps, orders=ORDERS)
    return get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0]


def test_round_by_round_history_equals_one_composition():
    rounds = [GaussianEvent(1.1, 0.05, 20)] * 5
    assert epsilon_spent(rounds, 1e-5, "rdp") == pytest.approx(
        independent_epsilon(1.1, 0.05, 100, 1e-5), rel=1e-9)


def test_mixed_history_is_the_sum_of_its_rdp_curves():
    events = [GaussianEvent(1.0, 0.1, 10), GaussianEvent(2.0, 0.2, 7)]
    rdp = sum(compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier,
                          steps=e.steps, orders=ORDERS) for e in events)
    expected = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-4)[0]
    assert epsilon_spent(events, 1e-4, "rdp") == pytest.approx(expected, rel=1e-9)


def test_empty_history_spends_nothing_and_no_noise_spends_everything():
    assert epsilon_spent([], 1e-5, "prv") == 0.0
    assert math.isinf(epsilon_spent([GaussianEvent(0.0, 0.1, 3)], 1e-5, "prv"))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_for_target_lands_at_or_just_under_the_target(target, accountant):
    rate, steps, delta = 0.1, 50, 1e-4
    noise = noise_for_target(target, delta, rate, steps, accountant)
    spent = epsilon_spent([GaussianEvent(noise, rate, steps)], delta, accountant)
    assert target - 0.05 <= spent <= target
    # and a little less noise would overshoot: the search found the edge, not a safe guess
    assert epsilon_spent([GaussianEvent(noise * 0.97, rate, steps)], delta, accountant) > target


class DictMemo(dict):
    """A NoiseMemo held in memory, as a node's disk holds it."""

    def recall_noise(self, question):
        return self.get(question)

    def keep_noise(self, question, noise):
        self[question] = noise


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_remembered_noise_is_used_only_while_the_accountant_confirms_it(accountant,
                                                                          monkeypatch):
    from fedtune.common import privacy

    question = (8.0, 1e-4, 0.1, 50, accountant)
    memo = DictMemo()
    searched = noise_for_target(*question, memo)
    (key,) = memo
    searches = []
    real_search = privacy._searched_noise
    monkeypatch.setattr(privacy, "_searched_noise", lambda *a: searches.append(a) or
                        real_search(*a))
    assert noise_for_target(*question, memo) == searched and searches == []  # no search
    # too little noise, more than a search gives, none that is a noise, or one so small the
    # accountant would need gigabytes: searched again, and the memo corrected
    for tampered in (0.5 * searched, 2 * searched, 0.05, 0.0, -1.0, math.nan, math.inf, "1.0",
                     True):
        memo[key] = tampered
        assert noise_for_target(*question, memo) == searched
        assert memo[key] == searched
    assert len(searches) == 9


def test_an_unreachable_target_is_a_privacy_error():
    with pytest.raises(PrivacyError, match="epsilon 1e-09"):
        noise_for_target(1e-9, 1e-5, 1.0, 10_000, "rdp")


@pytest.mark.parametrize("history", [
    [(1.78, 0.5, 40)], [(0.87, 0.045, 440)], [(0.7, 0.005, 15_600)], [(0.5, 1.0, 1000)],
    [(13.8, 1.0, 20_000)], [(1.78, 0.5, 40), (3.5, 1.0, 1)], [(0.6, 0.01, 3)],
])
def test_the_quick_grid_bound_is_never_under_opacus_own(history):
    # the quick bound decides when Opacus' exact domain is not computed: it must never be lower
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    from fedtune.common.privacy import PRV_EPS_ERROR, _domain_bound

    delta_error = 1e-5 / 1000
    exact = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(rate, noise) for noise, rate, _ in history],
        [steps for _, _, steps in history], PRV_EPS_ERROR, delta_error)
    assert _domain_bound(history, delta_error) >= exact


def test_a_history_past_prvs_grid_limit_is_counted_by_rdp_without_building_the_grid(
        monkeypatch):
    # noise at a node's floor (0.5), sample rate 1, a round of max-steps (1000): PRV's grid would
    # hold about 5e7 points, gigabytes, on a server's word; RDP's bound is valid and cheap
    from opacus.accountants.prv import PRVAccountant

    from fedtune.common import privacy

    def no_grid(*args, **kwargs):
        raise AssertionError("a PRV grid past MAX_PRV_POINTS was built")

    monkeypatch.setattr(PRVAccountant, "_get_dprv", no_grid)
    event = GaussianEvent(0.5, 1.0, 1000)
    assert privacy.prv_grid_points([(0.5, 1.0, 1000)], 1e-5) > privacy.MAX_PRV_POINTS
    assert epsilon_spent([event], 1e-5, "prv") == epsilon_spent([event], 1e-5, "rdp")
    # the noise search's probes too: a target of 100 at sample rate 1 over 20,000 steps
    noise = noise_for_target(100.0, 1e-5, 1.0, 20_000, "prv")
    assert epsilon_spent([GaussianEvent(noise, 1.0, 20_000)], 1e-5, "prv") <= 100.0


def test_a_target_inside_a_step_of_epsilon_ends_the_search_at_the_step(monkeypatch):
    # where PRV takes over from RDP at the grid limit, epsilon drops by a step: a target inside
    # it is never reached within the tolerance, and the search stops at the step's noise
    from fedtune.common import privacy

    calls = []

    def stepped(steps, delta, accountant):
        calls.append(steps)
        (((noise, _), _),) = steps
        return 50.0 if noise < 3.0 else 40.0

    monkeypatch.setattr(privacy, "_epsilon", stepped)
    noise = privacy._searched_noise.__wrapped__(45.0, 1e-5, 1.0, 20_000, "prv")
    assert 3.0 <= noise <= 3.0 * (1 + 1e-4)
    assert len(calls) < 60


def test_an_accountant_that_answers_nan_is_never_read_as_free(monkeypatch):
    from opacus.accountants.rdp import RDPAccountant

    from fedtune.common import privacy

    monkeypatch.setattr(RDPAccountant, "get_epsilon", lambda self, delta: math.nan)
    privacy._epsilon.cache_clear()
    assert epsilon_spent([GaussianEvent(1.234, 0.1, 7)], 1e-5, "rdp") == math.inf
    privacy._epsilon.cache_clear()


def test_the_search_agrees_with_opacus_own_within_its_tolerance():
    from opacus.accountants.utils import get_noise_multiplier

    for target, rate, steps, delta in ((8.0, 0.5, 40, 2.5e-4), (2.0, 0.045, 440, 1.9e-5)):
        ours = noise_for_target(target, delta, rate, steps, "prv")
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                      sample_rate=rate, steps=steps, accountant="prv",
                                      epsilon_tolerance=0.01)
        assert ours == pytest.approx(theirs, rel=0.01)


def test_schedule_and_default_delta():
    assert dp_sgd_schedule(100, 32, local_epochs=2, local_steps=0) == (0.25, 8)
    assert dp_sgd_schedule(100, 32, local_epochs=2, local_steps=5) == (0.25, 5)
    assert default_delta(400) == pytest.approx(1 / 4000)


def test_client_update_is_clipped_to_the_bound_and_small_updates_kept():
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(5, np.float32)}
    big = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    clipped = clip_update(base, big, 0.5)
    assert update_norm(base, clipped) == pytest.approx(0.5, rel=1e-5)
    direction = np.concatenate([(big[k] - base[k]).ravel() for k in base])
    kept = np.concatenate([(clipped[k] - base[k]).ravel() for k in base])
    assert np.allclose(kept / np.linalg.norm(kept), direction / np.linalg.norm(direction),
                       atol=1e-5)
    small = {k: v + 1e-4 for k, v in base.items()}
    assert all(np.allclose(clip_update(base, small, 0.5)[k], small[k]) for k in base)


def test_a_nearly_free_history_never_reports_a_negative_epsilon():
    # PRV's numerical error once wrote -2.6e-3 into a ledger for noise multiplier 1000
    assert epsilon_spent([GaussianEvent(1000.0, 1.0, 1)], 1e-2, "prv") == 0.0  # raw: -4e-5


def test_one_noise_draw_serves_the_server_and_the_clients_shares():
    import numpy as np

    from fedtune.common.client_dp import mean_noise_std, noise_share_std, with_gaussian_noise
    from fedtune.common.privacy import GaussianEvent

    event = GaussianEvent(2.0, 1.0, 1)
    assert mean_noise_std(event, 0.1, 4) == pytest.approx(0.05)  # z C / m on the mean
    assert noise_share_std(event, 0.1, 4) == pytest.approx(0.1)  # z C / sqrt(h) per share
    # h honest shares sum to the variance of one central draw on the sum: (z C)^2
    assert 4 * noise_share_std(event, 0.1, 4) ** 2 == pytest.approx((2.0 * 0.1) ** 2)
    state = {"a": np.zeros((200, 50), np.float32), "b": np.ones(3, np.float64)}
    noised = with_gaussian_noise(state, 0.5, np.random.default_rng(0))
    assert noised["a"].dtype == np.float32 and noised["b"].dtype == np.float64
    assert np.std(noised["a"]) == pytest.approx(0.5, rel=0.05)
