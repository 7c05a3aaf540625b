"""The one-run privacy audit of a finished simulation or baseline: score every canary's
membership from the trained adapter, bound epsilon from below, write `audit.json`.

Scores, trained adapter minus initial adapter: classification, the log-probability of the
canary's random label; causal LM, minus the mean loss of its secret (and, from the trained
adapter, the secret's exposure among fresh reference secrets). The trained adapter is where the
run's claim covers a canary most closely: without DP and under DP-SGD, the last release of the
client holding it (the mechanism its ledger accounts; the global model only averages it with
others); under client-level DP, whose noise the server adds, the final global adapter.
Reported epsilon: sample-level DP, the largest ledger epsilon of the clients holding canaries;
client-level DP, the run's client-level epsilon (a row's inclusion changes one client's data,
so it bounds a row's leakage too, loosely); no DP, none (infinite).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.client.admission import simulated_delta
from fedtune.client.ledger import Ledger
from fedtune.client.node import Node, data_set_identity
from fedtune.common.adapter import load_trainable_state
from fedtune.common.atomic_file import write_atomic
from fedtune.common.canaries import (
    Canaries,
    canary_holders,
    kept_release,
    releases_directory,
)
from fedtune.common.causal_lm import per_example_loss
from fedtune.common.client_dp import client_level_plan
from fedtune.common.config import CAUSAL_LM, RunConfig
from fedtune.common.data import Examples
from fedtune.common.one_run_audit import best_guess, detectable_ceiling, tpr_at_fpr
from fedtune.common.privacy import default_delta
from fedtune.common.run_dir import AUDIT_FILE
from fedtune.common.task import Task, cached_task
from fedtune.server.checkpoint import latest_checkpoint
from fedtune.server.metrics_log import read_rounds

LOW_FPR = 0.01
# Without DP nothing fixes delta; 2 m delta is what the bound gives away, so the audit measures
# at the usual 1e-5 unless a DP run on these clients would use less (docs/audit.md).
NO_DP_DELTA = 1e-5


def audit_run(config: RunConfig, *, centralized: bool) -> dict[str, Any]:
    """Audit the finished run of `config` and write RUN_DIR/audit.json; return what it holds."""
    run_dir = Path(config.output.dir)
    task = cached_task(config)
    canaries = task.canaries()
    causal = config.model.task == CAUSAL_LM
    scores, bits = np.zeros(len(canaries.included)), np.zeros(len(canaries.included))
    releases = _releases(config, run_dir, centralized)
    for mine in _vantages(task, run_dir, canaries, releases, centralized):
        scores[mine] = membership_scores(task, canaries.rows.subset(mine))
        if causal:
            bits[mine] = exposure_bits(task, scores[mine], canaries.references)
    change = scores - initial_scores(task, canaries.rows)
    reported, delta, meaning = reported_privacy(config, task, run_dir)
    audit = config.audit
    tried = best_guess(change, canaries.included, delta, audit.confidence)
    best = max(tried, key=lambda g: g.epsilon)
    ceiling = detectable_ceiling(len(scores), delta, audit.confidence)
    goal = 1.0 if reported is None else reported  # what this audit should be able to see
    body: dict[str, Any] = {
        "epsilon_lower_bound": best.epsilon,
        "epsilon_reported": reported,
        "delta": delta,
        "confidence": audit.confidence,
        "canaries": audit.canaries,
        "canaries_included": int(canaries.included.sum()),
        "canary_clients": [f"client-{c}" for c in range(audit.clients)],
        "guesses": best.guesses, "guesses_right": best.right,
        "guesses_tried": [{"in": g.positives, "out": g.negatives, "right": g.right,
                           "epsilon": g.epsilon} for g in tried],
        "tpr_at_1pct_fpr": tpr_at_fpr(change, canaries.included, LOW_FPR),
        "score": ("minus the secret's loss" if causal
                  else "log-probability of the canary's random label")
        + ", trained adapter minus initial adapter",
        "vantage": _vantage_words(releases, centralized),
        "meaning": meaning,
        "defect": reported is not None and best.epsilon > reported,
        "epsilon_detectable_max": ceiling,
        "underpowered": ceiling < goal,
    }
    if causal:
        body.update(exposure(bits, canaries.included, len(canaries.references)))
    write_atomic(run_dir / AUDIT_FILE, (json.dumps(body, indent=2) + "\n").encode())
    return body


@torch.no_grad()
def membership_scores(task: Task, rows: Examples) -> np.ndarray:
    """(m,) higher = more likely trained on: the label's log-probability, or minus the LM loss."""
    task.model.eval()
    loader = task.loader(rows, batch_size=max(task.config.training.batch_size, 32), shuffle=False)
    scores = []
    for batch in loader:
        batch = {key: value.to(task.device) for key, value in batch.items()}
        if task.config.model.task == CAUSAL_LM:
            scores.append(-per_example_loss(task.model, batch))
            continue
        logits = task.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits.float()
        scores.append(torch.log_softmax(logits, dim=-1).gather(
            1, batch["labels"][:, None])[:, 0])
    return torch.cat(scores).cpu().numpy().astype(np.float64)


def initial_scores(task: Task, rows: Examples) -> np.ndarray:
    """The scores of the run's initial adapter (its seed's LoRA and head): subtracted from the
    final ones, each canary is judged by what training changed, not by how its random label
    happened to suit the model before training."""
    trained = {name: p for name, p in task.model.named_parameters() if p.requires_grad}
    final = {name: p.detach().clone() for name, p in trained.items()}
    try:
        load_trainable_state(task.model, task.initial_adapter)
        return membership_scores(task, rows)
    finally:  # put back as it was, unchecked: a diverged (NaN) adapter stays what it was
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(final[name])


def exposure_bits(task: Task, scores: np.ndarray, references: list[str]) -> np.ndarray:
    """Carlini et al.'s exposure of each secret under the adapter in place: -log2 of the share
    of random secrets at least as likely, estimated with the reference secrets (so at most
    log2(references + 1))."""
    refs = Examples(texts=[""] * len(references), labels=np.zeros(len(references), np.int64),
                    responses=list(references))
    ref_scores = np.sort(membership_scores(task, refs))
    at_least = len(ref_scores) - np.searchsorted(ref_scores, scores, side="left")
    return -np.log2((1 + at_least) / (len(ref_scores) + 1))


def exposure(bits: np.ndarray, included: np.ndarray, references: int) -> dict[str, float]:
    """The secrets' exposure, summarised for audit.json."""
    return {"exposure_included_mean": float(bits[included].mean()) if included.any() else 0.0,
            "exposure_excluded_mean": float(bits[~included].mean()) if (~included).any()
            else 0.0,
            "exposure_max": float(bits.max()),
            "exposure_cap": math.log2(references + 1)}


def _releases(config: RunConfig, run_dir: Path,
              centralized: bool) -> list[dict[str, np.ndarray]] | None:
    """Each canary client's last release, where the audit scores there (no DP, DP-SGD) and
    every client holding a canary kept one; else None: the final global (or trained) adapter."""
    if centralized or config.privacy.client_level:
        return None
    directory = releases_directory(run_dir)
    kept = [kept_release(directory, c) for c in range(canary_holders(config.audit))]
    return None if any(release is None for release in kept) else kept


def _vantages(task: Task, run_dir: Path, canaries: Canaries,
              releases: list[dict[str, np.ndarray]] | None,
              centralized: bool) -> Iterator[np.ndarray]:
    """Put in place each adapter the canaries are scored with; yield the canaries it scores."""
    if releases is None:
        checkpoint = None if centralized else latest_checkpoint(run_dir)
        if checkpoint is not None:  # the simulation's final global adapter
            load_trainable_state(task.model, checkpoint.arrays)
        yield np.arange(len(canaries.included))
        return
    for client, release in enumerate(releases):
        mine = np.flatnonzero(canaries.holder == client)
        if len(mine):  # more canary clients than canaries leaves some with none
            load_trainable_state(task.model, release)
            yield mine


def _vantage_words(releases: list | None, centralized: bool) -> str:
    if centralized:
        return "the trained model"
    if releases is None:
        return "the final global adapter"
    return "the last release of the client holding each canary"


def reported_privacy(config: RunConfig, task: Task,
                     run_dir: Path) -> tuple[float | None, float, str]:
    """(epsilon the run claims for a canary, its delta, what the comparison means)."""
    privacy, clients = config.privacy, config.federation.num_clients
    holders = range(config.audit.clients)
    rows = [task.client_examples(config.partition, c, clients)[0] for c in holders]
    if privacy.client_level:
        history = read_rounds(run_dir)
        epsilon = max((r.get("epsilon_client_level", 0.0) for r in history), default=0.0)
        return epsilon, client_level_plan(config)[1], (
            "client-level DP: a canary changes one client's data, so the client-level epsilon "
            "bounds its leakage too (loosely: it covers a whole client's rows)")
    if privacy.sample_level:
        spent = [_ledger(config, c, r) for c, r in zip(holders, rows, strict=True)]
        return max(e for e, _ in spent), max(d for _, d in spent), (
            "sample-level DP: the largest ledger epsilon of the clients holding canaries")
    delta = privacy.delta or min(NO_DP_DELTA, max(default_delta(len(r)) for r in rows))
    return None, delta, ("no DP: nothing is claimed; the bound is the scored adapter's "
                         "leakage (see vantage), measured at "
                         f"--delta, else at the smaller of {NO_DP_DELTA:g} and the delta a DP "
                         "run would use")


def _ledger(config: RunConfig, client: int, rows: Examples) -> tuple[float, float]:
    """(epsilon spent, delta) of a simulated client's ledger."""
    node = Node.from_node_config({"partition-id": client,
                                  "num-partitions": config.federation.num_clients}, config)
    fingerprint, records = data_set_identity(node, rows)
    ledger = Ledger.open(node.ledger_directory(config), fingerprint, records,
                         simulated_delta(config, records), config.privacy.accountant)
    return ledger.spent(), ledger.delta
