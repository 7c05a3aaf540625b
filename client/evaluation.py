"""The node's answer to the server's evaluation of its held-out rows.

The server chooses the adapter, so it chooses the question: an evaluation answer is a query on
the node's data like any other. A deployed node answers only where its policy shares evaluation,
and then with Gaussian noise on each count it sends (correct answers, rows), spent from the same
ledger as its training rounds and held to the same caps. A simulated node answers exactly: the
researcher is both sides.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
from flwr.app import Message, RecordDict

from fedtune.client.admission import (
    Refused,
    above_cap,
    adapter_violations,
    horizon_violation,
    model_violations,
    planning,
    request_violations,
    run_cost,
)
from fedtune.client.dp_plan import plan_round, round_schedule
from fedtune.client.ledger import Ledger
from fedtune.client.policy import BUDGET, ROUND_CAP, RUN_CAP, SHARE_EVALUATION, NodePolicy
from fedtune.client.replies import evaluation_metrics
from fedtune.client.request import Request
from fedtune.common import record_keys as keys
from fedtune.common.config import CAUSAL_LM
from fedtune.common.privacy import GaussianEvent, PrivacyError, epsilon_spent


def evaluation_event(policy: NodePolicy) -> GaussianEvent | None:
    """The Gaussian mechanism one noised answer is, None where the node answers exactly: one
    row changes each of the two counts (correct answers, rows) by at most 1, an L2 sensitivity
    of sqrt 2."""
    if policy.evaluation_noise <= 0:
        return None
    return GaussianEvent(policy.evaluation_noise / math.sqrt(2), 1.0, 1)


def admit_evaluation(request: Request) -> Refused | None:
    """The rules an evaluation request breaks (its model, sizes and adapter), and the budget."""
    policy, config = request.node.policy, request.config
    if not policy.share_evaluation:
        return Refused([f"{SHARE_EVALUATION}: this node does not share evaluations of its "
                        "held-out rows"])
    broken = [rule for rule in request_violations(policy, config, request.node, secure=True)
              if not rule.startswith(("require-dp", "require-secagg"))]
    broken = broken or model_violations(policy, config, request.task) + \
        adapter_violations(policy, request.task, request.adapter)
    if broken:
        return Refused(broken)
    event = evaluation_event(policy)
    if event is None:
        return None
    if config.model.task == CAUSAL_LM:  # its accuracy counts tokens: one row moves it by many
        return Refused([f"{SHARE_EVALUATION}: noised evaluation answers cover classification; "
                        "this node answers a causal LM's only with evaluation-noise = 0"])
    ledger = request.ledger(policy.delta)
    one = epsilon_spent([event], policy.delta, ledger.accountant)
    if one > policy.round_cap():
        return Refused([f"{ROUND_CAP}: one evaluation answer costs epsilon {one:.3g}, above "
                        f"this node's {policy.round_cap():g}"])
    if ledger.epsilon_after(event) > policy.budget():
        return Refused([f"{BUDGET}: exhausted"], spent=ledger.spent())
    with_training = _run_with_answer(request, ledger, event)
    if above_cap(with_training, policy.run_cap()):
        return Refused([f"{RUN_CAP}: this answer and the run's planned training would cost "
                        f"epsilon {with_training:.3g}, above this node's {policy.run_cap():g} "
                        "(training goes on; a run cap above the run's epsilon leaves room for "
                        "evaluation answers)"])
    return None


def _run_with_answer(request: Request, ledger: Ledger, event: GaussianEvent) -> float:
    """What this run would cost with this answer: what it spent so far, the answer, and every
    training round still planned after this one. Training comes first: the run cap is shared,
    and an answer that would crowd out a planned round is refused instead."""
    config, delta = request.config, request.node.policy.delta
    more = [event]
    remaining = config.federation.rounds - request.server_round
    planning_rows = planning(request)[0]
    # a plan with no noise reaching the run's epsilon, or past `max-run-steps`, is refused when
    # asked: it costs nothing
    with contextlib.suppress(PrivacyError):
        if config.privacy.sample_level and remaining > 0 and planning_rows and not \
                horizon_violation(request.node.policy, config,
                                  round_schedule(config, planning_rows)[1]):
            plan = plan_round(config, planning_rows, delta, ledger.accountant,
                              request.state())
            more += [plan.event] * remaining
    return run_cost(ledger, request.run, more, delta)


def answer(request: Request) -> Message:
    """Accuracy on the held-out rows: exact in simulation; noised and recorded on a deployed
    node (the ledger entry is written before the rows are read)."""
    from fedtune.common.adapter import load_trainable_state  # torch: only where it evaluates

    policy = request.node.policy
    event = evaluation_event(policy)
    rng = np.random.default_rng()  # the operating system's entropy: the server cannot replay it
    if event is not None:
        ledger = request.ledger(policy.delta)
        ledger.spend(request.run, request.node.name, request.server_round, event,
                     policy.budget(), kind="evaluation")
    task = request.task
    load_trainable_state(task.model, request.adapter)
    # a noised answer scores one row a pass: a row's logits then never depend on which rows
    # share its batch (padding moves them in the last bits, enough to flip a prediction a
    # crafted head puts on the margin), so one row changes the count by one at most
    stats = task.evaluate(request.rows[1], 1 if event is not None else
                          request.config.evaluation_batch)
    if event is None:
        metrics = evaluation_metrics(stats.examples, stats.loss, stats.accuracy)
    else:
        sigma = policy.evaluation_noise
        right = round(stats.accuracy * stats.examples) + rng.normal(0.0, sigma)
        count = stats.examples + rng.normal(0.0, sigma)
        accuracy = min(1.0, max(0.0, right / max(count, 1.0)))
        metrics = evaluation_metrics(max(0, round(count)), None, accuracy)
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=request.msg)
