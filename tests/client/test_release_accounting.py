"""The ledger's epsilon covers everything the server receives, under the documented relation
(one row of the node's training file added or removed; its row count private): recomputed here
by Google's dp-accounting (PLD) from public values alone, the requests the server sent and the
node's published policy, never from the rows."""

from __future__ import annotations

import math

import dp_accounting

from fedtune.client import app as client_app
from fedtune.client.dp_plan import plan_round
from fedtune.common import record_keys as keys
from tests.client.conftest import ledger_rounds, node_context, request, run_config

POLICY = {"budget-epsilon": 20.0, "require-secagg": False, "share-evaluation": True,
          "evaluation-noise": 4.0, "delta": 1e-5, "planning-rows": 60,
          "max-epsilon-per-round": 20.0, "max-epsilon-per-run": 20.0}


def test_a_ledger_recomputed_by_pld_from_what_the_server_sees_is_at_or_below_its_own(
        tiny_model_dir, toy_data_dir, tmp_path):
    # Prepare: a node, and a server asking two training rounds and one evaluation
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **POLICY)
    config = run_config(tiny_model_dir, toy_data_dir, **{"federation.rounds": 2,
                                                         "privacy.epsilon": 4.0,
                                                         "train.local_steps": 2})
    # Execute
    replies = []
    for server_round in (1, 2):
        replies.append(client_app.train(request(config, **{keys.SERVER_ROUND: server_round}),
                                        context))
    client_app.evaluate_global(request(config, "evaluate"), context)
    # Assert: the server's own recomputation from the request and the published policy
    plan = plan_round(config, POLICY["planning-rows"], POLICY["delta"], "prv")
    event = plan.event
    training = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(event.sample_rate,
                                            dp_accounting.GaussianDpEvent(event.noise_multiplier)),
        event.steps * 2)
    answer = dp_accounting.GaussianDpEvent(POLICY["evaluation-noise"] / math.sqrt(2))
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld = accountant.compose(training).compose(answer).get_epsilon(POLICY["delta"])
    entries = ledger_rounds(ledger)
    assert [e["kind"] for e in entries] == ["dp-sgd", "dp-sgd", "evaluation"]
    assert [e["noise_multiplier"] for e in entries[:2]] == [event.noise_multiplier] * 2
    assert pld <= entries[-1]["epsilon"] * 1.005  # PLD's discretisation error, well under 1%
    assert pld > 0.9 * entries[-1]["epsilon"]  # the same mechanism, not a looser bound
    # what the replies said is the ledger's own total
    assert replies[1].content[keys.METRICS][keys.EPSILON] == entries[1]["epsilon"]
