"""The ClientApp: identify, train the received adapter locally, evaluate it on held-out rows;
with secure aggregation, the four protocol steps (`client/secagg.py`) around training."""

from __future__ import annotations

import hashlib
import json
import secrets
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.dp_sgd import DPRoundPlan, plan_round, train_private
from client.ledger import Ledger, LedgerError, fingerprint
from client.node import Node, node_examples, node_task
from client.secagg import SecAggClient, SecAggViolation
from common import record_keys as keys
from common.adapter import from_record, load_trainable_state, to_record, trainable_state
from common.client_dp import clip_update
from common.config import RunConfig
from common.data import Examples
from common.secagg.protocol import to_vector
from common.secagg.records import (
    cohort_from_record,
    keys_to_record,
    reveals_to_record,
    sealed_from_record,
    sealed_to_record,
)
from common.training import adamw, train_local

app = ClientApp()
SECAGG_STATE = "secagg"  # this node's protocol secrets, kept in its own Context between steps


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Answer with this node's stable name, which the server uses to sample reproducibly."""
    node = Node.from_node_config(context.node_config)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: node.name})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter on this node's rows; under DP-SGD, only within its budget."""
    config, server_round = _round_settings(msg)
    node = Node.from_node_config(context.node_config)
    if (spent := _budget_refusal(config, node)) is not None:
        return _refuse(msg, spent)
    global_state = from_record(msg.content[keys.ARRAYS])
    state, metrics = _local_update(config, server_round, node, global_state)
    content = RecordDict({keys.ARRAYS: to_record(state), keys.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Step 1: fresh key pairs and self-mask seed for this round; the public keys go out."""
    config, server_round = _round_settings(msg)
    node = Node.from_node_config(context.node_config)
    if (spent := _budget_refusal(config, node)) is not None:
        return _refuse(msg, spent)
    session = msg.content[keys.CONFIG][keys.SECAGG_SESSION]
    client = SecAggClient(node.name, bytes(session), server_round)
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: keys_to_record(*client.public_keys())}),
                   reply_to=msg)


@app.train("secagg_shares")
def secagg_shares(msg: Message, context: Context) -> Message:
    """Step 2: Shamir shares of this client's secrets, each encrypted for its holder."""
    client = _resume(msg, context)
    sealed = client.share_secrets(cohort_from_record(msg.content[keys.CONFIG]))
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: ConfigRecord(sealed_to_record(sealed, "to"))}),
                   reply_to=msg)


@app.train("secagg_masked")
def secagg_masked(msg: Message, context: Context) -> Message:
    """Step 3: train, then send the weighted update masked."""
    client = _resume(msg, context)
    config, server_round = _round_settings(msg)
    received = sealed_from_record(msg.content[keys.CONFIG], "from")
    node = Node.from_node_config(context.node_config)
    global_state = from_record(msg.content[keys.ARRAYS])
    state, metrics = _local_update(config, server_round, node, global_state)
    client_level = config.privacy.dp and config.privacy.level == "client"
    weight = float(metrics[keys.UNIT_WEIGHT if client_level else keys.NUM_EXAMPLES])
    masked = client.mask(received, to_vector(state, weight))
    _keep(context, client)
    content = RecordDict({keys.ARRAYS: ArrayRecord({keys.MASKED: Array(masked)}),
                          keys.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Step 4: the shares the server may have, never both of one client."""
    client = _resume(msg, context)
    settings = msg.content[keys.CONFIG]
    reveals = client.reveal(list(settings.get("survivors", [])), list(settings.get("dropped", [])))
    _keep(context, client)
    return Message(RecordDict({keys.CONFIG: reveals_to_record(reveals)}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    config, _ = _round_settings(msg)
    node = Node.from_node_config(context.node_config)
    task = node_task(node, config)
    _, held_out = node_examples(node, task, config)
    load_trainable_state(task.model, from_record(msg.content[keys.ARRAYS]))
    stats = task.evaluate(held_out)
    metrics = MetricRecord({keys.NUM_EXAMPLES: stats.examples, keys.EVAL_LOSS: stats.loss,
                            keys.ACCURACY: stats.accuracy})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def _local_update(config: RunConfig, server_round: int, node: Node,
                  global_state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                 MetricRecord]:
    """Local training from the global adapter: plain, DP-SGD (ledger first), or clipped."""
    task = node_task(node, config)
    rows, _ = node_examples(node, task, config)
    load_trainable_state(task.model, global_state)
    # Simulations repeat from their seed; a deployed node draws batches and noise from secret
    # randomness, since a server that knew them could subtract the noise.
    seed = (_round_seed(config.seed, server_round, node.name) if node.simulated
            else secrets.randbits(63))
    torch.manual_seed(seed)  # LoRA dropout
    loader = task.loader(rows, batch_size=config.train.batch_size, shuffle=True, seed=seed)
    optimizer = adamw(task.model, config.train.lr, config.train.weight_decay)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(rows), keys.UNIT_WEIGHT: 1})
    privacy = config.privacy
    if privacy.dp and privacy.level == "sample":
        plan, ledger = _ledger(config, node, rows)
        if ledger.epsilon_after(plan.event) > node.budget(config):
            raise LedgerError("privacy budget exhausted since the round began; not training")
        stats = train_private(task.model, loader, optimizer, plan, loss_fn=task.objective.loss,
                              device=task.device,
                              noise_generator=torch.Generator(task.device).manual_seed(seed))
        # The update is released only after the ledger has recorded what it spends.
        metrics[keys.EPSILON] = ledger.record(config.output.dir, node.name, server_round,
                                              plan.event).epsilon
    else:
        stats = train_local(task.model, loader, optimizer, loss_fn=task.objective.loss,
                            epochs=config.train.local_epochs,
                            max_steps=config.train.local_steps,
                            max_grad_norm=config.train.max_grad_norm, device=task.device)
    state = trainable_state(task.model)
    if privacy.dp and privacy.level == "client":
        state = clip_update(global_state, state, privacy.clip_norm)
    metrics[keys.TRAIN_LOSS] = stats.loss
    metrics[keys.STEPS] = stats.steps
    return state, metrics


def _ledger(config: RunConfig, node: Node, rows: Examples) -> tuple[DPRoundPlan, Ledger]:
    plan = plan_round(config, len(rows))
    ledger = Ledger.open(node.ledger_directory(config), fingerprint(rows), len(rows),
                         plan.delta, config.privacy.accountant)
    return plan, ledger


def _budget_refusal(config: RunConfig, node: Node) -> float | None:
    """Epsilon spent when one more round would pass this node's budget, else None."""
    if not (config.privacy.dp and config.privacy.level == "sample"):
        return None
    rows, _ = node_examples(node, node_task(node, config), config)
    plan, ledger = _ledger(config, node, rows)
    return ledger.spent() if ledger.epsilon_after(plan.event) > node.budget(config) else None


def _refuse(msg: Message, spent: float) -> Message:
    """The 'budget exhausted' answer: what was spent so far, and no update."""
    log(WARNING, "Privacy budget exhausted (epsilon spent %.3f): refusing round", spent)
    metrics = MetricRecord({keys.EPSILON: spent})
    status = ConfigRecord({keys.STATUS: keys.BUDGET_EXHAUSTED})
    return Message(RecordDict({keys.METRICS: metrics, keys.CONFIG: status}), reply_to=msg)


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
    return client


def _round_settings(msg: Message) -> tuple[RunConfig, int]:
    settings = msg.content[keys.CONFIG]
    config = RunConfig.from_mapping(json.loads(str(settings[keys.RUN_CONFIG])))
    return config, int(settings[keys.SERVER_ROUND])


def _round_seed(seed: int, server_round: int, name: str) -> int:
    """A seed per (run, round, client) that does not depend on which worker runs the client."""
    name_code = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return int(np.random.SeedSequence([seed, server_round, name_code]).generate_state(1)[0])
