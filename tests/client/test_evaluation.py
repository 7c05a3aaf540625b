"""An evaluation answer is a query the server chooses: shared only where the node's policy says,
then noised and spent from the same ledger as its training rounds."""

from __future__ import annotations

import json

from fedtune.client import app as client_app
from fedtune.common import record_keys as keys
from tests.client.conftest import ledger_rounds, node_context, refusal_reason, request, run_config


def test_evaluation_is_shared_only_where_the_policy_says_so_and_then_spent_from_the_ledger(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = run_config(tiny_model_dir, toy_data_dir)
    ledger = tmp_path / "ledger"
    closed = node_context(tiny_model_dir, toy_data_dir, ledger, **{"budget-epsilon": 8.0})
    assert "share-evaluation" in refusal_reason(
        client_app.evaluate_global(request(config, "evaluate"), closed))
    assert ledger_rounds(ledger) == []
    shared = node_context(tiny_model_dir, toy_data_dir, ledger, **{
        "budget-epsilon": 8.0, "share-evaluation": True, "evaluation-noise": 5.0})
    answers = [client_app.evaluate_global(request(config, "evaluate"), shared)
               .content[keys.METRICS] for _ in range(4)]
    for metrics in answers:
        assert set(metrics) == {keys.NUM_EXAMPLES, keys.ACCURACY}  # no un-noised loss
        assert 0.0 <= float(metrics[keys.ACCURACY]) <= 1.0
    entries = ledger_rounds(ledger)
    assert [e["kind"] for e in entries] == ["evaluation"] * 4
    assert entries[1]["epsilon"] > entries[0]["epsilon"] > 0
    # the noise is the node's own: answers to one question differ. Two alone may not: an
    # untrained model's accuracy is often clipped to 0 in both, and two noised counts of about
    # 14 rows round to the same integer one time in twenty
    assert len({(float(a[keys.ACCURACY]), int(a[keys.NUM_EXAMPLES])) for a in answers}) > 1


def test_an_evaluation_past_the_budget_is_refused_with_what_was_spent(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = run_config(tiny_model_dir, toy_data_dir)
    context = node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger", **{
        "budget-epsilon": 0.5, "share-evaluation": True, "evaluation-noise": 2.0,
        "max-epsilon-per-round": 100.0})
    reply = client_app.evaluate_global(request(config, "evaluate"), context)
    assert reply.content[keys.CONFIG][keys.STATUS] == keys.BUDGET_EXHAUSTED
    assert json.dumps(dict(reply.content[keys.METRICS]))  # the ledger's total, nothing else


def test_an_answer_that_would_crowd_out_planned_training_is_refused_and_training_goes_on(
        tiny_model_dir, toy_data_dir, tmp_path):
    # a two-round run planned at the node's whole run cap: round 1's answer would leave round 2
    # above the cap, so the node declines to evaluate and still trains round 2
    config = run_config(tiny_model_dir, toy_data_dir, **{"federation.rounds": 2})
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **{
        "budget-epsilon": 16.0, "share-evaluation": True, "evaluation-noise": 5.0,
        "require-secagg": False})
    assert keys.ARRAYS in client_app.train(request(config), context).content.array_records
    assert "max-epsilon-per-run" in refusal_reason(
        client_app.evaluate_global(request(config, "evaluate"), context))
    second = client_app.train(request(config, **{keys.SERVER_ROUND: 2}), context)
    assert keys.ARRAYS in second.content.array_records
    assert [e["kind"] for e in ledger_rounds(ledger)] == ["dp-sgd", "dp-sgd"]
    # with room for it (a run cap above the run's epsilon) the answer is given and spent
    roomy = node_context(tiny_model_dir, toy_data_dir, tmp_path / "roomy", **{
        "budget-epsilon": 20.0, "share-evaluation": True, "evaluation-noise": 5.0,
        "require-secagg": False})
    client_app.train(request(config), roomy)
    assert keys.METRICS in client_app.evaluate_global(request(config, "evaluate"), roomy).content
    assert [e["kind"] for e in ledger_rounds(tmp_path / "roomy")] == ["dp-sgd", "evaluation"]


def test_an_answer_in_a_run_past_the_horizon_limit_plans_no_training(
        tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    # the run's training would be refused (max-run-steps), so the answer is costed alone and
    # no accountant calibrates noise over the server's 100,000 rounds
    from fedtune.client import dp_plan

    def no_search(*args, **kwargs):
        raise AssertionError("noise searched over a horizon past the node's limit")

    monkeypatch.setattr(dp_plan, "noise_for_target", no_search)
    config = run_config(tiny_model_dir, toy_data_dir, **{"federation.rounds": 100_000})
    context = node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger", **{
        "budget-epsilon": 8.0, "share-evaluation": True, "evaluation-noise": 5.0})
    reply = client_app.evaluate_global(request(config, "evaluate"), context)
    assert keys.METRICS in reply.content
    assert [e["kind"] for e in ledger_rounds(tmp_path / "ledger")] == ["evaluation"]


def test_a_noised_answer_scores_each_row_alone(tiny_model_dir, toy_data_dir, tmp_path,
                                               monkeypatch):
    # a crafted head can put a row's logit on the margin, and its batchmates' padding then
    # moves it across: scored alone, a row's prediction is its own, so one row moves the count
    # by one at most
    from fedtune.common.task import Task

    config = run_config(tiny_model_dir, toy_data_dir, **{"train.batch_size": 16})
    context = node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger", **{
        "budget-epsilon": 8.0, "share-evaluation": True, "evaluation-noise": 5.0})
    batches = []
    scoring = Task.evaluate

    def spy(task, rows, batch_size):
        batches.append(batch_size)
        return scoring(task, rows, batch_size)

    monkeypatch.setattr(Task, "evaluate", spy)
    client_app.evaluate_global(request(config, "evaluate"), context)
    assert batches == [1]
