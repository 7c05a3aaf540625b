"""The DP-SGD defaults spend at most the target by the end of the planned rounds, by the ledger
(Opacus' PRV accountant) and by a second accountant, Google's dp-accounting (PLD and RDP)."""

import dp_accounting
import pytest

from fedtune.client.dp_plan import plan_round
from fedtune.client.ledger import FORMER_DEFAULT_ACCOUNTANT, Ledger, fingerprint
from fedtune.common.config import RunConfig
from tests.client.test_ledger import ROUND, rows


def google_epsilon(noise: float, rate: float, steps: int, delta: float, kind: str) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps by dp-accounting's `kind` accountant."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    if kind == "pld":
        accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    else:
        accountant = dp_accounting.rdp.RdpAccountant()
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize(("records", "epsilon", "rounds"), [(480, 8.0, 5), (800, 3.0, 5),
                                                           (180, 1.0, 3)])
def test_default_dp_sgd_plan_ends_at_or_under_the_target_by_two_accountants(
        tmp_path, records, epsilon, rounds):
    # Prepare: the defaults only (expected batch, epochs, accountant), as `--dp --epsilon E`
    config = RunConfig.from_mapping({"privacy.dp": True, "privacy.epsilon": epsilon,
                                     "federation.rounds": rounds})
    data = rows(records)
    ledger = Ledger.open(tmp_path, fingerprint(data), records, 1 / (10 * records),
                         config.privacy.accountant)
    plan = plan_round(config, records, ledger.delta, ledger.accountant)
    # Execute: every planned round recorded, as the clients do
    for server_round in range(1, rounds + 1):
        last = ledger.spend("run", "client-0", server_round, plan.event, budget=epsilon)
    # Assert
    event, delta = plan.event, ledger.delta
    assert ledger.accountant == "prv"
    assert last.epsilon <= epsilon
    total_steps = event.steps * rounds
    pld = google_epsilon(event.noise_multiplier, event.sample_rate, total_steps, delta, "pld")
    assert pld <= epsilon * 1.005  # PLD's own discretisation error, well under the 1% tolerance
    rdp = google_epsilon(event.noise_multiplier, event.sample_rate, total_steps, delta, "rdp")
    assert rdp > pld  # the looser bound: PRV/PLD calibration allows less noise than RDP would


def test_the_default_accountant_keeps_an_existing_ledgers_own_and_gives_a_new_one_prv(tmp_path):
    # Prepare: a ledger kept with RDP, and one written before ledgers named their accountant
    kept = rows(50)
    Ledger.open(tmp_path, fingerprint(kept), 50, 1e-3, "rdp").record("old", "c", 1, ROUND)
    legacy = rows(50, start=500)
    old = Ledger.open(tmp_path, fingerprint(legacy), 50, 1e-3, "rdp")
    old.record("old", "c", 1, ROUND)
    body = old.path.read_text().replace('"accountant": "rdp",', "")
    old.path.write_text(body)
    # Execute
    continued = Ledger.open(tmp_path, fingerprint(kept), 50, 1e-3, "")
    unnamed = Ledger.open(tmp_path, fingerprint(legacy), 50, 1e-3, "")
    fresh = Ledger.open(tmp_path, fingerprint(rows(50, start=900)), 50, 1e-3, "")
    # Assert
    assert '"accountant"' not in body and FORMER_DEFAULT_ACCOUNTANT == "rdp"
    assert continued.accountant == unnamed.accountant == "rdp"
    assert continued.spent() == pytest.approx(old.spent())
    assert fresh.accountant == "prv"
    continued.record("new", "c", 2, ROUND)  # goes on under its own accountant, no refusal
    assert len(Ledger.open(tmp_path, fingerprint(kept), 50, 1e-3, "").entries) == 2
