"""The ClientApp: identify, train the received adapter locally, evaluate it on held-out rows;
with secure aggregation, the four protocol steps (`client/secagg.py`) around training.

Every message is untrusted: before a handler reads data it checks the request against this
node's policy (`client/policy.py`), which also decides what each reply may carry.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.dp_sgd import DPRoundPlan, plan_round, train_private
from client.ledger import Ledger
from client.node import Node, data_set_identity, node_examples, node_task
from client.policy import (
    SHARE_EVALUATION,
    budget_refusal,
    cohort_violations,
    disclosed_epsilon,
    dp_violations,
    evaluation_metrics,
    refusal,
    request_violations,
    train_metrics,
)
from client.randomness import round_seeds
from client.secagg import SecAggClient, SecAggViolation, peer_violations
from common import console
from common import record_keys as keys
from common.adapter import from_record, load_trainable_state, to_record, trainable_state
from common.client_dp import clip_update
from common.config import CLASSIFICATION, RunConfig
from common.data import Examples
from common.secagg.plan import summation_for
from common.secagg.records import (
    cohort_from_record,
    keys_to_record,
    reveals_to_record,
    routing_from_record,
    sealed_from_record,
    sealed_to_record,
    signatures_from_record,
)
from common.secagg.signing import Signer, read_peers
from common.secagg.summation import Summation

app = ClientApp()
console.quiet_worker()  # a no-op outside a non-verbose simulation's Ray workers
SECAGG_STATE = "secagg"  # this node's protocol secrets, kept in its own Context between steps


class NodeFailure(RuntimeError):
    """What the server is told when a deployed node fails: no detail, since an exception's text
    can hold the node's data (a row's field, a label, a count)."""


Handler = Callable[[Message, Context], Message]


def contained(handler: Handler) -> Handler:
    """On a deployed node, log a handler's error on the node and send the server only that it
    failed; protocol refusals (SecAggViolation) name no data and pass as they are. Simulated
    nodes keep the full error: the researcher is both sides."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SecAggViolation:
            raise
        except Exception as error:
            if "data-path" not in context.node_config:
                raise
            log(ERROR, "%s failed on this node: %r", handler.__name__, error)
            raise NodeFailure(f"{handler.__name__} failed on this node; the node's log has "
                              "the details") from None

    return guarded


@dataclass(frozen=True)
class LocalUpdate:
    """One round's result on this node, before the policy decides what of it is sent."""

    state: dict[str, np.ndarray]
    examples: int
    loss: float
    epsilon: float | None  # the ledger's total after this round (sample-level DP)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Answer with this node's stable name, which the server uses to sample reproducibly."""
    node = Node.from_node_config(context.node_config)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: node.name})}),
                   reply_to=msg)


@app.train()
@contained
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter on this node's rows, if its policy allows a plain update."""
    config, server_round = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    if (refused := _gate(msg, config, node, secure=False)) is not None:
        return refused
    update = _local_update(config, server_round, node, from_record(msg.content[keys.ARRAYS]))
    metrics = train_metrics(examples=update.examples, loss=update.loss, dp=config.privacy.dp,
                            secure=False, epsilon=update.epsilon)
    return Message(RecordDict({keys.ARRAYS: to_record(update.state), keys.METRICS: metrics}),
                   reply_to=msg)


@app.train("secagg_keys")
@contained
def secagg_keys(msg: Message, context: Context) -> Message:
    """Step 1: fresh key pairs and self-mask seed for this round; the public keys go out."""
    config, server_round = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    if (refused := _gate(msg, config, node, secure=True)) is not None:
        return refused
    if broken := peer_violations(node, config):  # pinned consortium keys, unless waived
        return refusal(msg, broken)
    session = bytes(msg.content[keys.CONFIG][keys.SECAGG_SESSION])
    if SECAGG_STATE in context.state:
        previous = SecAggClient.from_bytes(bytes(context.state[SECAGG_STATE]["state"]))
        if (previous.session, previous.round) == (session, server_round):
            raise SecAggViolation("a second step 1 in this round: keys are never replaced")
    signer = Signer.from_file(node.node_key) if node.policy.peers else None
    client = SecAggClient(node.name, session, server_round, signer)
    client.config_digest = _config_digest(msg)  # the round's configuration, pinned
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: keys_to_record(client.signed_keys())}),
                   reply_to=msg)


@app.train("secagg_shares")
@contained
def secagg_shares(msg: Message, context: Context) -> Message:
    """Step 2: Shamir shares of this client's secrets, each encrypted for its holder, if the
    cohort and threshold meet this node's policy."""
    client = _resume(msg, context)
    config, _ = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    cohort = cohort_from_record(msg.content[keys.CONFIG])
    pinned = read_peers(node.policy.peers) if node.policy.peers else None
    if broken := (cohort_violations(node.policy, len(cohort.names), cohort.threshold)
                  + client.pin_violations(cohort, pinned)):
        return refusal(msg, broken)
    sealed = client.share_secrets(cohort, pinned)
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: ConfigRecord(sealed_to_record(sealed, "to"))}),
                   reply_to=msg)


@app.train("secagg_masked")
@contained
def secagg_masked(msg: Message, context: Context) -> Message:
    """Step 3: train, then send the change masked, with the example count and loss inside the
    masked vector so the server learns only their totals; under client-level DP the change
    carries this client's share of the noise, so no sum the server sees is un-noised."""
    client = _resume(msg, context)
    client.expect("shares")  # a replayed or repeated step 3 is refused before any training
    config, server_round = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    if (refused := _gate(msg, config, node, secure=True)) is not None:
        return refused  # step 3 carries its own run config: checked again, never assumed
    received = sealed_from_record(msg.content[keys.CONFIG], "from")
    # too few or bad shares: refused before training too
    client.check_shares(received, min_delivered=1 - node.policy.max_dropout)
    global_state = from_record(msg.content[keys.ARRAYS])
    update = _local_update(config, server_round, node, global_state)
    summation = summation_for(config, client.cohort_size())
    seeds = round_seeds(config.seed if node.simulated else None, server_round, node.name)
    change = _noised_change(update.state, global_state, summation, seeds.noise)
    vector = summation.to_vector(change, update.examples, 0.0 if config.privacy.dp else update.loss)
    masked = client.mask(received, vector, summation.encoding,
                         np.random.default_rng(seeds.rounding))
    _keep(context, client)
    epsilon = disclosed_epsilon(node.policy, update.epsilon, secure=True)
    metrics = train_metrics(examples=update.examples, loss=update.loss, dp=config.privacy.dp,
                            secure=True, epsilon=epsilon)
    content = RecordDict({keys.ARRAYS: ArrayRecord({keys.MASKED: Array(masked)}),
                          keys.METRICS: metrics})
    if (complaint := client.complaint()) is not None:  # neighbours whose shares did not open
        content[keys.CONFIG] = ConfigRecord(complaint)
    return Message(content, reply_to=msg)


@app.train("secagg_consistency")
@contained
def secagg_consistency(msg: Message, context: Context) -> Message:
    """Consistency round: sign the announced survivor set, once; no share leaves unless a
    majority of the cohort signed the same set."""
    client = _resume(msg, context)
    config, _ = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    settings = msg.content[keys.CONFIG]
    signature = client.sign_survivors(list(settings.get("survivors", [])),
                                      routing_from_record(settings),
                                      min_survivors=_fewest(node, config, client))
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({"signature": signature})}),
                   reply_to=msg)


@app.train("secagg_unmask")
@contained
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Step 4: the shares the server may have, never both of one client, and none unless the
    survivor set is the one this client signed, enough others signed it, and enough clients
    are summed."""
    client = _resume(msg, context)
    config, _ = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    settings = msg.content[keys.CONFIG]
    reveals = client.reveal(list(settings.get("survivors", [])), routing_from_record(settings),
                            signatures_from_record(settings),
                            min_survivors=_fewest(node, config, client))
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: reveals_to_record(reveals)}), reply_to=msg)


def _fewest(node: Node, config: RunConfig, client: SecAggClient) -> int:
    """The fewest survivors this client reveals for: its policy's min-cohort, and under
    client-level DP the survivors its noise share was sized for."""
    return max(node.policy.min_cohort, summation_for(config, client.cohort_size()).survivors)


@app.evaluate()
@contained
def evaluate_global(msg: Message, context: Context) -> Message:
    """Held-out loss and accuracy of the global adapter, where this node's policy shares them."""
    config, _ = _round_settings(msg)
    node = Node.from_node_config(context.node_config, config)
    if not node.policy.share_evaluation:
        return refusal(msg, [f"{SHARE_EVALUATION}: this node does not share evaluations of its "
                             "held-out rows"])
    task = node_task(node, config)
    _, held_out = node_examples(node, task, config)
    load_trainable_state(task.model, from_record(msg.content[keys.ARRAYS]))
    stats = task.evaluate(held_out)
    metrics = evaluation_metrics(stats.examples, stats.loss, stats.accuracy)
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def _gate(msg: Message, config: RunConfig, node: Node, *, secure: bool) -> Message | None:
    """The refusal to send when this node's policy forbids the request (naming every rule it
    breaks) or one more round would pass its budget; None when the round may go on."""
    broken = request_violations(node.policy, config, secure=secure,
                                declared_labels=node.declares_labels)
    unreadable = config.model.task == CLASSIFICATION and not node.declares_labels
    if not config.privacy.sample_level or unreadable:  # no plan to check, or no rows to read
        return refusal(msg, broken) if broken else None
    rows, _ = node_examples(node, node_task(node, config), config)
    plan, ledger = _spending(config, node, rows)
    broken += dp_violations(node.policy, noise_multiplier=plan.event.noise_multiplier,
                            delta=plan.delta, max_delta=ledger.delta,
                            server_delta=config.privacy.delta)
    if broken:
        return refusal(msg, broken)
    if ledger.epsilon_after(plan.event) > node.policy.budget():
        return budget_refusal(msg, disclosed_epsilon(node.policy, ledger.spent(), secure=secure))
    return None


def _local_update(config: RunConfig, server_round: int, node: Node,
                  global_state: dict[str, np.ndarray]) -> LocalUpdate:
    """Local training from the global adapter: plain, DP-SGD (recorded first), or clipped."""
    task = node_task(node, config)
    rows, _ = node_examples(node, task, config)
    seeds = round_seeds(config.seed if node.simulated else None, server_round, node.name)
    loader, optimizer = task.start_round(global_state, rows, config.training,
                                         dropout_seed=seeds.dropout, sampling_seed=seeds.sampling)
    epsilon = None
    if config.privacy.sample_level:
        plan, ledger = _spending(config, node, rows)
        # Recorded before training, under the ledger's lock: no round trains unaccounted, and
        # a concurrent run over the same data set that took the budget stops this one here.
        epsilon = ledger.spend(config.output.dir, node.name, server_round, plan.event,
                               node.policy.budget()).epsilon
        noise = torch.Generator(task.device).manual_seed(seeds.noise)
        stats = train_private(task.model, loader, optimizer, plan, loss_fn=task.objective.loss,
                              device=task.device, noise_generator=noise,
                              physical_batch=config.training.physical_batch)
    else:
        stats = task.train_plain(loader, optimizer, config.training,
                                 config.federation.proximal_weight)
    state = trainable_state(task.model)
    if config.privacy.client_level:
        state = clip_update(global_state, state, config.privacy.clip_norm)
    return LocalUpdate(state=state, examples=len(rows), loss=stats.loss, epsilon=epsilon)


def _spending(config: RunConfig, node: Node, rows: Examples) -> tuple[DPRoundPlan, Ledger]:
    """This round's DP-SGD plan and the ledger of the data set it spends from."""
    data_fingerprint, records = data_set_identity(node, rows)
    node_delta = node.policy.delta_for(records)
    ledger = Ledger.open(node.ledger_directory(config), data_fingerprint, records, node_delta,
                         node.policy.accountant)
    return plan_round(config, len(rows), node_delta, ledger.accountant), ledger


def _noised_change(state: dict[str, np.ndarray], global_state: dict[str, np.ndarray],
                   summation: Summation, seed: int) -> dict[str, np.ndarray]:
    """This client's change of the adapter, plus its share of the Gaussian noise when the
    summation carries one (client-level DP under secure aggregation)."""
    change = {k: state[k].astype(np.float64) - global_state[k] for k in global_state}
    if summation.noise_std > 0:
        rng = np.random.default_rng(seed)
        change = {k: v + rng.normal(0.0, summation.noise_std, size=v.shape)
                  for k, v in change.items()}
    return change


def _keep(context: Context, client: SecAggClient) -> None:
    context.state[SECAGG_STATE] = ConfigRecord({"state": client.to_bytes()})


def _resume(msg: Message, context: Context) -> SecAggClient:
    """This node's protocol state for the round the message belongs to, or a refusal."""
    if SECAGG_STATE not in context.state:
        raise SecAggViolation("no secure-aggregation round in progress on this node")
    client = SecAggClient.from_bytes(bytes(context.state[SECAGG_STATE]["state"]))
    settings = msg.content[keys.CONFIG]
    if (bytes(settings[keys.SECAGG_SESSION]) != client.session
            or int(settings[keys.SERVER_ROUND]) != client.round):
        raise SecAggViolation("message belongs to another round (stale or replayed)")
    if _config_digest(msg) != client.config_digest:
        raise SecAggViolation("the run configuration changed within the round (the noise and "
                              "the survivors it needs are fixed at step 1)")
    return client


def _config_digest(msg: Message) -> str:
    return hashlib.sha256(str(msg.content[keys.CONFIG][keys.RUN_CONFIG]).encode()).hexdigest()


def _round_settings(msg: Message) -> tuple[RunConfig, int]:
    settings = msg.content[keys.CONFIG]
    config = RunConfig.from_mapping(json.loads(str(settings[keys.RUN_CONFIG])))
    return config, int(settings[keys.SERVER_ROUND])
