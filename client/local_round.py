"""An admitted round on this node: train from the global adapter and produce what it releases.

Once admitted, a round answers with a release of the same shape whatever the rows: DP-SGD
neutralises an example whose gradient is not finite (`client/dp_sgd.py`), sizes are bounded by
the node's policy, and should training still fail after the ledger recorded the round, the node
releases what the mechanism gives when every example contributes nothing (noise only) rather
than an error that would say "some row did this". A deployed node remembers each release
(`client/node_state.py`): the same request asked again gets the same answer at no new cost.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from logging import ERROR, INFO

import numpy as np
import torch
from flwr.common.logger import log

from fedtune.client.admission import Admission
from fedtune.client.dp_sgd import train_private
from fedtune.client.ledger import Ledger, LedgerEntry
from fedtune.client.node_state import Release, release_key
from fedtune.client.request import Request
from fedtune.common.adapter import trainable_state
from fedtune.common.canaries import RELEASES_ENV, canary_holders, keep_release
from fedtune.common.client_dp import clip_update
from fedtune.common.data import Examples
from fedtune.common.training import TrainStats


class RoundFailure(RuntimeError):
    """Training failed after admission and no data-independent answer could be made."""


def recall(request: Request, kind: str) -> Release | None:
    """What a deployed node released for this very request before (the same run, round,
    adapter and configuration: a server that restarted mid-round), if anything."""
    store = request.state()
    if store is None:
        return None
    kept = store.release(_key(request, kind))
    if kept is not None:
        log(INFO, "Round %s of run %s was answered before: sending the same release, nothing "
            "more spent", request.server_round, request.run)
    return kept


def remember(request: Request, kind: str, make: Callable[[], Release]) -> Release:
    """Make this request's release and, on a deployed node, record it before it leaves."""
    release = make()
    store = request.state()
    if store is not None:
        store.keep_release(_key(request, kind), release)
    return release


def _key(request: Request, kind: str) -> str:
    """The configuration as this node resolves it, canonical: a server that asks the same round
    again, its defaults written out after an upgrade or its keys reordered, gets the same
    release (and spends nothing more). A node upgraded mid-round to a release that adds a
    setting keys the round anew: it trains again and spends again (charged, never free)."""
    return release_key(request.run, request.server_round, request.adapter,
                       request.config.resolved().to_json(), kind)


def train_round(request: Request, admission: Admission) -> Release:
    """Local training from the global adapter: plain, DP-SGD (recorded first), or clipped for
    client-level DP. Returns the trained adapter state."""
    config, task = request.config, request.task
    rows = request.rows[0]
    if admission.plan is not None:
        assert admission.ledger is not None
        entry = _spend(request, admission.ledger, admission)
        stats = _private(request, admission, rows)
        log(INFO, "Trained round %s of run %s under DP-SGD: epsilon %.3f spent in all (ledger "
            "%s)", request.server_round, request.run, entry.epsilon, admission.ledger.path)
    else:
        loader, optimizer = task.start_round(request.adapter, rows, _plain_training(request),
                                             dropout_seed=request.seeds.dropout,
                                             sampling_seed=request.seeds.sampling)
        stats = task.train_plain(loader, optimizer, _plain_training(request),
                                 config.aggregation.proximal_weight)
    state = trainable_state(task.model)
    if config.privacy.client_level:
        if not all(np.isfinite(v).all() for v in state.values()):
            state = dict(request.adapter)  # a client's contribution stays within the clip norm
        state = clip_update(request.adapter, state, config.privacy.clip_norm)
    elif not all(np.isfinite(v).all() for v in state.values()):
        raise RoundFailure("local training produced non-finite values")
    else:
        _keep_for_audit(request, state)
    return Release(state, len(rows), stats.loss)


def _keep_for_audit(request: Request, state: dict[str, np.ndarray]) -> None:
    """A simulated client holding the audit's canaries keeps its release where `fedtune
    simulate` told its workers (RELEASES_ENV): the audit scores them there, in the mechanism its
    ledger accounts (docs/audit.md). A deployed node holds no canaries and writes nothing,
    whatever the run config says: only its own environment could name a directory."""
    config, node, directory = request.config, request.node, os.environ.get(RELEASES_ENV)
    if (directory and node.simulated and config.audit.enabled
            and node.partition_id < canary_holders(config.audit)):
        keep_release(directory, node.partition_id, request.server_round, state)


def _spend(request: Request, ledger: Ledger, admission: Admission) -> LedgerEntry:
    """Record the round before it trains, under the ledger's lock: no round trains
    unaccounted, and a concurrent run that took the budget stops this one here."""
    assert admission.plan is not None
    return ledger.spend(request.run, request.node.name, request.server_round,
                        admission.plan.event, request.node.policy.budget())


def _private(request: Request, admission: Admission, rows: Examples) -> TrainStats:
    """DP-SGD on `rows`; if it fails anyway, the same steps with no rows (noise only)."""
    try:
        return _dp_sgd(request, admission, rows)
    except Exception as error:
        log(ERROR, "DP-SGD failed on this node (%r); releasing the noise-only update the "
            "mechanism gives when no example contributes", error)
        empty = Examples(texts=[], labels=np.zeros(0, dtype=np.int64),
                         responses=None if rows.responses is None else [])
        try:
            return _dp_sgd(request, admission, empty)
        except Exception as second:
            raise RoundFailure(f"noise-only release failed too: {second!r}") from None


def _dp_sgd(request: Request, admission: Admission, rows: Examples) -> TrainStats:
    assert admission.plan is not None
    task, config, seeds = request.task, request.config, request.seeds
    loader, optimizer = task.start_round(request.adapter, rows, config.training,
                                         dropout_seed=seeds.dropout,
                                         sampling_seed=seeds.sampling)
    noise = torch.Generator(task.device).manual_seed(seeds.noise)
    return train_private(task.model, loader, optimizer, admission.plan,
                         loss_fn=task.objective.loss, device=task.device,
                         noise_generator=noise, physical_batch=config.training.physical_batch)


def _plain_training(request: Request):
    """The run's training settings, with the steps bounded by the node's `max-steps`."""
    train, policy = request.config.training, request.node.policy
    rows = len(request.rows[0])
    batches = -(-rows // train.batch_size) if rows else 0
    steps = train.local_steps or train.local_epochs * batches
    if steps > policy.max_steps:
        return dataclasses.replace(train, local_steps=policy.max_steps)
    return train if rows else dataclasses.replace(train, local_steps=0, local_epochs=0)
