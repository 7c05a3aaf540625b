"""What the server learns of the global adapter: test accuracy (perplexity and sample generations
for a causal LM) and the clients' view of it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from fedtune.common import record_keys as keys
from fedtune.common.adapter import load_trainable_state
from fedtune.common.causal_lm import generate, sample_prompt
from fedtune.common.console import printable
from fedtune.common.task import Task
from fedtune.common.training import EvalStats
from fedtune.server.replies import MAX_EXAMPLES
from fedtune.server.roster import Roster, answering_node
from fedtune.server.train_outcome import refusal_status


def evaluate_centrally(task: Task, arrays: dict[str, np.ndarray], batch_size: int) -> EvalStats:
    """Accuracy and loss of the global adapter on the held-out test split."""
    load_trainable_state(task.model, arrays)
    return task.evaluate(task.data.test, batch_size)


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


def evaluation_refusals(replies: Iterable[Message], roster: Roster) -> dict[str, str]:
    """{name: rules} of the nodes whose policy refused to evaluate (`share-evaluation` off, the
    default of a deployed node): logged and recorded once, then they are not asked again."""
    declined = {}
    for reply in replies:
        if refusal_status(reply) == keys.POLICY_REFUSED:
            name = roster.name_of(reply.metadata.src_node_id)
            declined[name] = printable(reply.content[keys.CONFIG].get(keys.REASON, ""))
            log(INFO, "%s does not share evaluations (its node policy); it is not asked again",
                name)
    return dict(sorted(declined.items()))


def summarise_client_evaluation(replies: Iterable[Message], roster: Roster,
                                sent: Sequence[Message] = ()) -> dict[str, Any]:
    """Per-client accuracy and its mean (weighted by examples), worst client and spread;
    `sent`, the requests, names the node of an error the SuperLink wrote in its place."""
    per_client: dict[str, float] = {}
    weights: dict[str, int] = {}
    sent = list(sent)
    for reply in replies:
        name = roster.name_of(answering_node(reply, sent))
        if reply.has_error():  # a deployed node's error is one fixed line, naming no data
            log(WARNING, "Evaluation of %s failed: %s", name, printable(reply.error.reason))
            continue
        if keys.METRICS not in reply.content.metric_records:
            continue  # a node whose policy does not share its evaluation
        result = _client_result(reply.content[keys.METRICS])
        if result is None:
            log(WARNING, "Evaluation of %s left out: malformed metrics %s", name,
                dict(reply.content[keys.METRICS]))
        elif result[1] > 0:
            per_client[name], weights[name] = result
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


def _client_result(metrics: Any) -> tuple[float, int] | None:
    """(accuracy, examples) of a client's evaluation, None when malformed: an untrusted reply
    is left out of the summary, never allowed to stop the round."""
    accuracy, examples = metrics.get(keys.ACCURACY), metrics.get(keys.NUM_EXAMPLES)
    if not _finite(examples) or examples != int(examples) or not 0 <= examples <= MAX_EXAMPLES:
        return None
    if examples == 0:
        return 0.0, 0  # nothing held out: its accuracy is not read
    if not _finite(accuracy) or not 0 <= accuracy <= 1:
        return None
    return float(accuracy), int(examples)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value)
