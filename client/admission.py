"""Whether this node answers a request: decided from the request and the node's own settings
(its policy, its ledger's history of public events) only, never from its rows.

A refusal names each broken rule with the server's values. Because nothing here reads a row or
the row count, no sequence of requests (however many are refused, however many admitted) tells
the server anything about the data; once admitted, a round answers with a release of the same
shape whatever the data (`client/local_round.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.client.dp_plan import DPRoundPlan, plan_round, round_schedule
from fedtune.client.ledger import Ledger
from fedtune.client.node import Node
from fedtune.client.policy import (
    BUDGET,
    LABELS_JSON,
    MAX_ADAPTER_VALUE,
    MAX_LENGTH,
    MAX_LORA_RANK,
    MAX_PHYSICAL_BATCH,
    MAX_RUN_STEPS,
    MAX_STEPS,
    MIN_NOISE,
    MODELS,
    PLANNING_ROWS,
    REQUIRE_DP,
    REQUIRE_SECAGG,
    ROUND_CAP,
    RUN_CAP,
    TASK,
    NodePolicy,
)
from fedtune.client.request import Request
from fedtune.common.adapter_state import fit_problem
from fedtune.common.client_dp import client_level_plan
from fedtune.common.config import CLASSIFICATION, RunConfig
from fedtune.common.privacy import GaussianEvent, PrivacyError, default_delta, epsilon_spent

if TYPE_CHECKING:
    from fedtune.common.task import Task

ADAPTER = "adapter"  # the received adapter does not fit this node's model or limits


@dataclass(frozen=True)
class Admission:
    """An admitted round: its DP-SGD plan and ledger (None without sample-level DP)."""

    plan: DPRoundPlan | None = None
    ledger: Ledger | None = None


@dataclass(frozen=True)
class Refused:
    """The rules a request breaks; `spent` set when the budget, not a rule, refuses it."""

    rules: list[str]
    spent: float | None = None


def admit(request: Request, *, secure: bool, answered: bool = False,
          trains: bool = True) -> Admission | Refused:
    """Check everything a train request asks before any row is read. `answered`: the node
    already released this very request (a restarted server asking again), so it costs
    nothing more and only its rules are checked, not the budget. `trains`: the message
    carries the adapter to train (secure aggregation's step 1 carries none yet)."""
    config, policy, node = request.config, request.node.policy, request.node
    broken = request_violations(policy, config, node, secure=secure)
    if any(rule.startswith((MODELS, TASK, LABELS_JSON)) for rule in broken):
        return Refused(broken)  # the model is not one this node loads: nothing more to check
    broken += model_violations(policy, config, request.task)
    if trains:
        broken += adapter_violations(policy, request.task, request.adapter)
    if not config.privacy.sample_level:
        return Refused(broken) if broken else Admission()
    return _dp_admission(request, answered, broken)


def request_violations(policy: NodePolicy, config: RunConfig, node: Node, *,
                       secure: bool) -> list[str]:
    """Rules the server's request breaks, read from the request alone.

    `secure` is whether this message is a step of secure aggregation, whatever the run
    configuration claims."""
    broken = []
    model, train = config.model, config.training
    if node.task is not None and model.task != node.task:
        broken.append(f"{TASK}: this node's data is for {node.task}, the server asked "
                      f"{model.task}")
    if model.task == CLASSIFICATION and not node.declares_labels:
        broken.append(f"{LABELS_JSON}: this node trains a classifier only over the label set its "
                      "labels.json declares")
    if model.name not in policy.models:
        broken.append(f"{MODELS}: this node loads only {', '.join(policy.models)}, the server "
                      f"asked {model.name!r}")
    privacy = config.privacy
    if policy.require_dp and not privacy.sample_level:
        asked = "privacy.dp = false" if not privacy.dp else f"privacy.level = {privacy.level!r}"
        broken.append(f"{REQUIRE_DP}: this node trains only with sample-level DP-SGD, the "
                      f"server asked {asked}")
    if privacy.client_level and (horizon := horizon_violation(policy, config, 1)):
        broken.append(horizon)  # each round is one release: no accountant for such a horizon
    elif privacy.client_level and (z := client_level_plan(config)[0].noise_multiplier) < \
            policy.min_noise_multiplier:
        broken.append(f"{MIN_NOISE}: the client-level noise multiplier {z:.3g} is below this "
                      f"node's floor, {policy.min_noise_multiplier:g}")
    if policy.require_secagg and not secure:
        broken.append(f"{REQUIRE_SECAGG}: this node sends updates only through secure "
                      "aggregation, the server asked for a plain update")
    limits = ((MAX_LENGTH, "model.max_length", model.max_length, policy.max_length),
              (MAX_PHYSICAL_BATCH, "train.physical_batch", train.physical_batch,
               policy.max_physical_batch),
              # a plain step is one forward pass of the whole batch (DP-SGD's goes in chunks)
              *([(MAX_PHYSICAL_BATCH, "train.batch_size", train.batch_size,
                  policy.max_physical_batch)] if not privacy.sample_level else []),
              (MAX_STEPS, "train.local_steps", train.local_steps, policy.max_steps),
              (MAX_LORA_RANK, "lora.r", config.lora.r, policy.max_lora_rank))
    broken += [f"{rule}: the server asked {name} = {asked}, above this node's {limit}"
               for rule, name, asked, limit in limits if asked > limit]
    return broken


def horizon_violation(policy: NodePolicy, config: RunConfig, steps_per_round: int) -> str:
    """The `max-run-steps` rule ("" when kept): an accountant's time and memory grow with the
    steps it composes, so a run's whole horizon is bounded before any accountant sees it."""
    rounds = config.federation.rounds
    if steps_per_round * rounds <= policy.max_run_steps:
        return ""
    return (f"{MAX_RUN_STEPS}: the run plans {steps_per_round} steps a round over "
            f"federation.rounds = {rounds}, {steps_per_round * rounds} in all, above this "
            f"node's {policy.max_run_steps}")


def model_violations(policy: NodePolicy, config: RunConfig, task: Task) -> list[str]:
    """What the request asks beyond the loaded model (the tokens its positions take)."""
    positions = token_capacity(task.model.get_base_model())
    if positions is not None and config.model.max_length > positions:
        return [f"{MAX_LENGTH}: the server asked model.max_length = {config.model.max_length}, "
                f"above the model's {positions} positions"]
    return []


def token_capacity(model: Any) -> int | None:
    """How many tokens one row may hold on `model` (None: the model states no limit). A
    position table with a padding index (RoBERTa's family) numbers a row's tokens from that
    index + 1, so its first slots never hold a token: a row one token longer than the rest
    fails on its own, a failure only some rows would cause."""
    base = model.config
    positions = getattr(base, "max_position_embeddings", None) or getattr(base, "n_positions",
                                                                        None)
    if not isinstance(positions, int):
        return None
    for name, module in model.named_modules():
        padding = getattr(module, "padding_idx", None)
        if name.endswith("position_embeddings") and isinstance(padding, int):
            return min(positions, module.num_embeddings) - padding - 1
    return positions


ADAPTER_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

def adapter_violations(policy: NodePolicy, task: Task,
                       adapter: dict[str, np.ndarray]) -> list[str]:
    """What keeps the received adapter from this node's model and limits: names, shapes, float
    values that are finite and within `max-adapter-value`."""
    expected = {name: tuple(p.shape) for name, p in task.model.named_parameters()
                if p.requires_grad}
    if problem := fit_problem(expected, adapter):
        return [f"{ADAPTER}: {problem}"]
    for name, value in adapter.items():
        if value.dtype not in ADAPTER_DTYPES:  # float128 too would fail only after spending
            return [f"{ADAPTER}: tensor {name} is {value.dtype}, not float16, float32 or "
                    "float64"]
        if not np.isfinite(value).all():
            return [f"{ADAPTER}: tensor {name} holds NaN or infinite values"]
        largest = float(np.abs(value).max(initial=0.0))
        if largest > policy.max_adapter_value:
            return [f"{MAX_ADAPTER_VALUE}: tensor {name} holds {largest:.3g}, above this node's "
                    f"{policy.max_adapter_value:g}"]
    return []


def planning(request: Request) -> tuple[int | None, float]:
    """(planning rows, delta) of this node's DP-SGD: a deployed node's from its policy (or the
    server's planning rows), never from its data; a simulated node plans with its own row
    count (the researcher is both sides) unless the run sets one."""
    config, node = request.config, request.node
    if node.simulated:
        rows = len(request.rows[0])
        return config.privacy.planning_rows or rows, simulated_delta(config, request.records())
    return node.policy.planning_rows or config.privacy.planning_rows or None, node.policy.delta


def simulated_delta(config: RunConfig, records: int) -> float:
    """A simulated node's delta: the run's, or the default for its record count."""
    return config.privacy.delta or default_delta(records)


def _dp_admission(request: Request, answered: bool, broken: list[str]) -> Admission | Refused:
    """Add the DP-SGD plan's broken rules to `broken` (every rule is named at once), then the
    budget."""
    config, policy = request.config, request.node.policy
    planning_rows, delta = planning(request)
    if planning_rows is None:
        return Refused([*broken, f"{PLANNING_ROWS}: this node plans DP-SGD only for a public "
                        "row count: the server sent no privacy.planning_rows and the node's "
                        "policy sets none"])
    if horizon := horizon_violation(policy, config, round_schedule(config, planning_rows)[1]):
        return Refused([*broken, horizon])
    try:
        ledger = request.ledger(delta)
        plan = plan_round(config, planning_rows, delta, ledger.accountant, request.state())
    except PrivacyError as error:
        return Refused([*broken, f"privacy.epsilon: {error}"])
    if answered:
        return Refused(broken) if broken else Admission(None, ledger)
    broken = broken + plan_violations(policy, plan, ledger, config, request.server_round,
                                      request.run)
    if broken:
        return Refused(broken)
    if ledger.epsilon_after(plan.event) > policy.budget():
        return Refused([f"{BUDGET}: exhausted"], spent=ledger.spent())
    return Admission(plan, ledger)


def plan_violations(policy: NodePolicy, plan: DPRoundPlan, ledger: Ledger, config: RunConfig,
                    server_round: int, run: str) -> list[str]:
    """Rules this round's DP-SGD plan breaks: the noise floor, the steps, and the caps on one
    round and on one run (all computed from public values)."""
    event, broken = plan.event, []
    if event.noise_multiplier < policy.min_noise_multiplier:
        broken.append(f"{MIN_NOISE}: this round's noise multiplier {event.noise_multiplier:.3g} "
                      f"is below this node's floor, {policy.min_noise_multiplier:g}")
    if event.steps > policy.max_steps:
        broken.append(f"{MAX_STEPS}: the round asks {event.steps} steps, above this node's "
                      f"{policy.max_steps}")
    if broken:  # no epsilon for such a plan: an accountant's memory grows as the noise shrinks
        return broken
    one_round = epsilon_spent([event], plan.delta, ledger.accountant)
    if one_round > policy.round_cap():
        broken.append(f"{ROUND_CAP}: one round of this plan costs epsilon {one_round:.3g}, above "
                      f"this node's {policy.round_cap():g}")
    remaining = max(1, config.federation.rounds - server_round + 1)
    planned = run_cost(ledger, run, [event] * remaining, plan.delta)
    if above_cap(planned, policy.run_cap()):
        broken.append(f"{RUN_CAP}: this run plans epsilon {planned:.3g} over its rounds, above "
                      f"this node's {policy.run_cap():g}")
    return broken


def run_cost(ledger: Ledger, run: str, more: list[GaussianEvent], delta: float) -> float:
    """Epsilon of what `run` recorded in `ledger` so far plus `more` events: what the per-run
    cap is held to (a training plan's rounds, or an evaluation answer and the rounds after it)."""
    earlier = [entry.event for entry in ledger.entries if entry.run == run]
    return epsilon_spent(earlier + more, delta, ledger.accountant)


def above_cap(cost: float, cap: float) -> bool:
    """Above the cap, not merely at it within rounding (a plan calibrated to the cap)."""
    return cost > cap and not math.isclose(cost, cap)
