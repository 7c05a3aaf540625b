"""The ClientApp: identify, train the received adapter locally, evaluate it on held-out rows."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import Node, node_examples, node_task
from common import record_keys as keys
from common.adapter import from_record, load_trainable_state, to_record, trainable_state
from common.config import RunConfig
from common.training import adamw, evaluate, make_loader, train_local

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Answer with this node's stable name, which the server uses to sample reproducibly."""
    node = Node.from_node_config(context.node_config)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: node.name})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, server_round = _round_settings(msg)
    node = Node.from_node_config(context.node_config)
    task = node_task(node, config)
    train_rows, _ = node_examples(node, task, config)
    load_trainable_state(task.model, from_record(msg.content[keys.ARRAYS]))

    seed = _round_seed(config.seed, server_round, node.name)
    torch.manual_seed(seed)  # LoRA dropout
    loader = make_loader(train_rows, task.tokenizer, max_length=config.model.max_length,
                         batch_size=config.train.batch_size, shuffle=True, seed=seed)
    optimizer = adamw(task.model, config.train.lr, config.train.weight_decay)
    stats = train_local(task.model, loader, optimizer, epochs=config.train.local_epochs,
                        max_steps=config.train.local_steps,
                        max_grad_norm=config.train.max_grad_norm, device=task.device)

    metrics = MetricRecord({keys.NUM_EXAMPLES: len(train_rows), keys.TRAIN_LOSS: stats.loss,
                            keys.STEPS: stats.steps})
    content = RecordDict({keys.ARRAYS: to_record(trainable_state(task.model)),
                          keys.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    config, _ = _round_settings(msg)
    node = Node.from_node_config(context.node_config)
    task = node_task(node, config)
    _, held_out = node_examples(node, task, config)
    load_trainable_state(task.model, from_record(msg.content[keys.ARRAYS]))
    loader = make_loader(held_out, task.tokenizer, max_length=config.model.max_length,
                         batch_size=max(config.train.batch_size, 32), shuffle=False)
    stats = evaluate(task.model, loader, num_labels=task.data.num_labels, device=task.device)
    metrics = MetricRecord({keys.NUM_EXAMPLES: stats.examples, keys.EVAL_LOSS: stats.loss,
                            keys.ACCURACY: stats.accuracy})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def _round_settings(msg: Message) -> tuple[RunConfig, int]:
    settings = msg.content[keys.CONFIG]
    config = RunConfig.from_mapping(json.loads(str(settings[keys.RUN_CONFIG])))
    return config, int(settings[keys.SERVER_ROUND])


def _round_seed(seed: int, server_round: int, name: str) -> int:
    """A seed per (run, round, client) that does not depend on which worker runs the client."""
    name_code = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return int(np.random.SeedSequence([seed, server_round, name_code]).generate_state(1)[0])
