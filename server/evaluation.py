"""What the server learns of the global adapter: test accuracy and the clients' view of it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message

from common import record_keys as keys
from common.adapter import load_trainable_state
from common.task import Task
from common.training import EvalStats, evaluate, make_loader
from server.roster import Roster


def evaluate_centrally(task: Task, arrays: dict[str, np.ndarray]) -> EvalStats:
    """Accuracy and loss of the global adapter on the held-out test split."""
    load_trainable_state(task.model, arrays)
    config = task.config
    loader = make_loader(task.data.test, task.tokenizer, max_length=config.model.max_length,
                         batch_size=max(config.train.batch_size, 32), shuffle=False)
    return evaluate(task.model, loader, num_labels=task.data.num_labels, device=task.device)


def summarise_client_evaluation(replies: Iterable[Message], roster: Roster) -> dict[str, Any]:
    """Per-client accuracy and its mean (weighted by examples), worst client and spread."""
    per_client: dict[str, float] = {}
    weights: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = reply.content[keys.METRICS]
        if int(metrics[keys.NUM_EXAMPLES]) == 0:
            continue
        name = roster.name_of(reply.metadata.src_node_id)
        per_client[name] = float(metrics[keys.ACCURACY])
        weights[name] = int(metrics[keys.NUM_EXAMPLES])
    if not per_client:
        return {}
    accuracy = np.array([per_client[n] for n in sorted(per_client)])
    weight = np.array([weights[n] for n in sorted(per_client)])
    return {
        "client_accuracy": dict(sorted(per_client.items())),
        "client_accuracy_mean": float(np.average(accuracy, weights=weight)),
        "client_accuracy_worst": float(accuracy.min()),
        "client_accuracy_std": float(accuracy.std()),
    }
