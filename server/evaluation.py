"""What the server learns of the global adapter: test accuracy (perplexity and sample generations
for a causal LM) and the clients' view of it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message

from common import record_keys as keys
from common.adapter import load_trainable_state
from common.causal_lm import generate, sample_prompt
from common.task import Task
from common.training import EvalStats
from server.roster import Roster


def evaluate_centrally(task: Task, arrays: dict[str, np.ndarray]) -> EvalStats:
    """Accuracy and loss of the global adapter on the held-out test split."""
    load_trainable_state(task.model, arrays)
    return task.evaluate(task.data.test)


def task_columns(central: EvalStats) -> dict[str, Any]:
    """The metrics row's task-specific columns: a classifier's per-label accuracy, a causal
    LM's perplexity."""
    if central.perplexity is not None:
        return {"perplexity": central.perplexity}
    return {"label_accuracy": central.per_label_accuracy, "macro_f1": central.macro_f1}


def sample_generations(task: Task, count: int = 3,
                       max_new_tokens: int = 32) -> list[dict[str, str]]:
    """Greedy generations of the model's current adapter for the first `count` test prompts."""
    collator = task.objective.collator(task.tokenizer, task.config.model.max_length)
    test = task.data.test
    samples = []
    for index in range(min(count, len(test))):
        prompt, reference = test.item(index)
        prompt = sample_prompt(prompt, str(reference))
        samples.append({"prompt": prompt, "reference": str(reference),
                        "generated": generate(task.model, collator, prompt,
                                              max_new_tokens=max_new_tokens, device=task.device)})
    return samples


def summarise_client_evaluation(replies: Iterable[Message], roster: Roster) -> dict[str, Any]:
    """Per-client accuracy and its mean (weighted by examples), worst client and spread."""
    per_client: dict[str, float] = {}
    weights: dict[str, int] = {}
    for reply in replies:
        if reply.has_error() or keys.METRICS not in reply.content.metric_records:
            continue  # failed, or a node whose policy does not share its evaluation
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
