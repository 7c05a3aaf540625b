"""The server's round loop: sample, train, aggregate, evaluate, record, checkpoint.

Flower's `Strategy.start` runs all rounds in one call; fedtune needs a checkpoint after every
round, a resume that starts mid-run, and multi-message rounds for secure aggregation, so the loop
is written here on top of the strategy's own configure/aggregate methods and Flower's `Grid`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune.common import record_keys as keys
from fedtune.common.adapter import load_trainable_state
from fedtune.common.adapter_state import from_record, to_record
from fedtune.common.config import CAUSAL_LM, RunConfig
from fedtune.common.run_dir import (
    ADAPTER_DIR,
    AUDIT_RELEASES_DIR,
    CONFIG_FILE,
    RunDirError,
    saved_config,
    write_config,
)
from fedtune.common.task import cached_task
from fedtune.server import progress as round_progress
from fedtune.server.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    check_fits,
    checkpoint_rounds,
    latest_checkpoint,
    save_checkpoint,
)
from fedtune.server.client_level_release import ServerSideNoise
from fedtune.server.evaluation import (
    evaluate_centrally,
    evaluation_refusals,
    sample_generations,
    summarise_client_evaluation,
    task_columns,
)
from fedtune.server.metrics_log import (
    METRICS_FILE,
    SAMPLES_FILE,
    append_round,
    keep_rounds_up_to,
    read_rounds,
    write_label_names,
)
from fedtune.server.replies import ReplyRejected, check_update
from fedtune.server.roster import Roster
from fedtune.server.secagg_exchange import secure_train_exchange
from fedtune.server.strategies.fedavg import SeededFedAvg
from fedtune.server.strategies.server_optimizer import server_optimizer
from fedtune.server.tensorboard_log import TensorBoardLog
from fedtune.server.train_outcome import TrainOutcome, refused, reported_epsilon, retire_refusing


def run_federation(grid: Grid, config: RunConfig, *, resume: bool = False,
                   simulated: bool = False,
                   node_names: Callable[[int], str | None] | None = None,
                   ask_names: bool = True,
                   display: round_progress.RoundProgress | None = None) -> list[dict[str, Any]]:
    """Run (or continue) the rounds of `config`; return the metrics rows of the whole run.

    `simulated`: the server's own randomness (client-level DP noise) follows `config.seed` so a
    simulation repeats; otherwise it comes from the operating system's entropy, since every
    client receives the seed."""
    config = config.resolved()  # what config.json and every node's request hold
    run_dir = Path(config.output.dir)
    prepare_run_dir(run_dir, config, resume=resume)
    task = cached_task(config, held_out_only=not simulated)  # a server's data need not train
    write_label_names(run_dir, task.data.label_names)
    roster = Roster(node_names, ask=ask_names)
    federation = config.federation
    client_level = config.privacy.client_level
    noise = ServerSideNoise(config, seeded=simulated) if client_level else None
    strategy = SeededFedAvg(
        roster, config.seed, fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate, min_train_nodes=1,
        min_evaluate_nodes=1 if federation.fraction_evaluate > 0 else 0,
        min_available_nodes=federation.wait_for,
        # under DP every update weighs the same: no node sends its row count
        weighted_by_key=keys.UNIT_WEIGHT if config.privacy.dp else keys.NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG)
    optimizer = server_optimizer(config.aggregation)

    arrays, done = dict(task.initial_adapter), 0
    no_evaluation: set[str] = set()  # nodes whose policy refused to share an evaluation
    if resume and (checkpoint := latest_checkpoint(run_dir)) is not None:
        check_fits(checkpoint, arrays, run_dir / CHECKPOINT_DIR)
        arrays, done = checkpoint.arrays, checkpoint.round
        strategy.load_state_dict(checkpoint.state["strategy"])
        optimizer.load_state_arrays(checkpoint.optimizer)
        if simulated:  # a virtual node's budget is the saved run's; a deployed node's may grow
            roster.retired.update(checkpoint.state["retired"])
        no_evaluation.update(checkpoint.state.get("no_evaluation", []))
        if noise is not None:  # a checkpoint from before the release log counted them
            noise.log.at_least(checkpoint.state.get("releases", 0))
    keep_rounds_up_to(run_dir, done)

    display = display or round_progress.RoundProgress()  # deployed: a line per round
    grid = display.watch(grid)
    board = TensorBoardLog(run_dir, done + 1) if config.output.tensorboard else None
    settings = ConfigRecord({keys.RUN_CONFIG: json.dumps(config.to_flat())})
    for server_round in range(done + 1, federation.rounds + 1):
        started = time.perf_counter()
        display.round_started(server_round, federation.rounds)
        roster.refresh(grid, federation.wait_for, federation.timeout)
        if not roster.active():
            log(WARNING, "No client is left to train (budgets spent or node policies "
                "refusing); the run stops after round %d", server_round - 1)
            break
        if config.secagg.enabled:
            outcome = secure_train_exchange(grid, strategy, server_round, to_record(arrays),
                                            settings, config)
        else:
            outcome = train_exchange(grid, strategy, server_round, arrays, settings, config)
        if outcome.arrays is not None:
            average = from_record(outcome.arrays)
            if noise is not None and not config.secagg.enabled:  # else the clients noised it
                average = noise.privatise(average, outcome.clients, server_round)  # accounted
            # the server optimiser sees only the (secure, noised) average: post-processing
            arrays = optimizer.step(arrays, average, server_round)
        eval_messages = [m for m in strategy.configure_evaluate(server_round, to_record(arrays),
                                                                settings, grid)
                         if roster.name_of(m.metadata.dst_node_id) not in no_evaluation]
        eval_replies = list(grid.send_and_receive(eval_messages, timeout=federation.timeout)
                            if eval_messages else [])
        declined = evaluation_refusals(eval_replies, roster)
        no_evaluation.update(declined)
        display.exchange("evaluating on the test split")
        central = evaluate_centrally(task, arrays, config.evaluation_batch)
        row = {
            "round": server_round,
            "accuracy": central.accuracy,
            "loss": central.loss,
            **task_columns(central),
            "clients": outcome.clients,
            **abandoned_column(outcome),
            "clients_failed": outcome.failures,
            "train_loss": _metric(outcome.metrics, keys.TRAIN_LOSS),
            "bytes_up": outcome.bytes_up,
            "bytes_down": outcome.bytes_down + _bytes(eval_messages),
            **_privacy_columns(outcome, noise),
            **summarise_client_evaluation(eval_replies, roster, eval_messages),
            **({"clients_evaluation_refused": declined} if declined else {}),
            "seconds": time.perf_counter() - started,
        }
        append_round(run_dir, row)
        if board is not None:
            board.write(row)
        if config.model.task == CAUSAL_LM:
            for sample in sample_generations(task):
                append_round(run_dir, {"round": server_round, **sample}, SAMPLES_FILE)
        state = {"strategy": strategy.state_dict(), "retired": sorted(roster.retired),
                 "no_evaluation": sorted(no_evaluation)}
        save_checkpoint(run_dir, Checkpoint(round=server_round, arrays=arrays, state=state,
                                            optimizer=optimizer.state_arrays()))
        display.round_done(row)

    if board is not None:
        board.close()
    load_trainable_state(task.model, arrays)
    task.model.save_pretrained(str(run_dir / ADAPTER_DIR))
    return read_rounds(run_dir)


def train_exchange(grid: Grid, strategy: SeededFedAvg, server_round: int,
                   global_state: dict[str, Any], settings: ConfigRecord,
                   config: RunConfig) -> TrainOutcome:
    """One plain training exchange: the global adapter out, each client's update back.

    A client that refuses (budget spent, or its node's policy) is retired from sampling; a
    malformed update is dropped with its reason (`clients_rejected`) and the round goes on.
    """
    messages = list(strategy.configure_train(server_round, to_record(global_state), settings,
                                             grid))
    replies = list(grid.send_and_receive(messages, timeout=config.federation.timeout))
    ok = [r for r in replies if not r.has_error()]
    refusing = [r for r in ok if refused(r)]
    exhausted, by_policy = retire_refusing(strategy.roster, refusing)
    names = strategy.roster.name_of
    updates, rejected = [], {}
    for reply in (r for r in ok if not refused(r)):
        try:
            check_update(reply, global_state, config)
            updates.append(reply)
        except ReplyRejected as error:
            rejected[names(reply.metadata.src_node_id)] = str(error)
            log(WARNING, "Update of %s rejected: %s", names(reply.metadata.src_node_id), error)
    new_arrays, metrics = strategy.aggregate_train(server_round, updates) if updates else (
        None, None)
    epsilon = {names(r.metadata.src_node_id): eps for r in [*refusing, *updates]
               if (eps := reported_epsilon(r)) is not None}  # a rejected reply's is untrusted
    return TrainOutcome(arrays=new_arrays, metrics=metrics, clients=len(updates),
                        failures=len(messages) - len(ok), bytes_up=_bytes(updates),
                        bytes_down=_bytes(messages), epsilon=dict(sorted(epsilon.items())),
                        exhausted=exhausted, refused=by_policy,
                        rejected=dict(sorted(rejected.items())))


def abandoned_column(outcome: TrainOutcome) -> dict[str, str]:
    """`round_abandoned`, saying why, for a round that aggregated no update (the global adapter
    stays as it was); nothing for a round that trained."""
    if outcome.arrays is not None:
        return {}
    why = [outcome.abandoned]  # the protocol's own reason, where it gave the round up
    if outcome.exhausted:
        why.append(f"budget spent: {', '.join(outcome.exhausted)}")
    if outcome.refused:
        why.append(f"refused by node policy: {', '.join(outcome.refused)}")
    if outcome.rejected:
        why.append(f"rejected: {', '.join(outcome.rejected)}")
    if outcome.failures and not outcome.abandoned:
        why.append(f"{outcome.failures} failed or did not answer")
    return {"round_abandoned": "; ".join(w for w in why if w) or "no client answered"}


def _privacy_columns(outcome: TrainOutcome, noise: ServerSideNoise | None) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    if outcome.epsilon:
        columns["epsilon"] = outcome.epsilon
        columns["epsilon_max"] = max(outcome.epsilon.values())
    if outcome.exhausted:
        columns["clients_exhausted"] = outcome.exhausted
    if outcome.refused:
        columns["clients_refused"] = outcome.refused
    if outcome.rejected:
        columns["clients_rejected"] = outcome.rejected
    if outcome.blamed:
        columns["clients_blamed"] = outcome.blamed
    if outcome.sum_refused:  # a client sent values out of bounds inside its masks
        columns["sums_refused"] = 1
    if noise is not None:
        columns["epsilon_client_level"] = noise.epsilon()
    return columns


def prepare_run_dir(run_dir: Path, config: RunConfig, *, resume: bool) -> None:
    """Refuse to start over an existing run; write `config` for a new one (a federation's is
    resolved, a pooled baseline's as given), and for a resumed one that an earlier release saved
    with its defaults unwritten, that configuration resolved (pinned at today's defaults)."""
    has_run = (run_dir / METRICS_FILE).exists() or bool(checkpoint_rounds(run_dir))
    if resume:
        saved = saved_config(run_dir)
        if saved is None:
            raise RunDirError(f"{run_dir} holds no fedtune run to resume (no {CONFIG_FILE})")
        if saved != (pinned := saved.resolved()):
            write_config(run_dir, pinned)
        return
    if has_run:
        raise RunDirError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                          f"or choose another --out")
    _clear_releases(run_dir / AUDIT_RELEASES_DIR)
    write_config(run_dir, config)


def _clear_releases(releases: Path) -> None:
    """A run stopped before its first round may have left canary releases (the audit's): a new
    run must never be audited on them, so they go, or the run does not start."""
    try:
        if releases.is_symlink():
            releases.unlink()
        elif releases.exists():
            shutil.rmtree(releases)
    except OSError as error:
        raise RunDirError(f"{releases} is left from an earlier run and cannot be removed: "
                          f"{error}") from None


def _bytes(messages: list[Message]) -> int:
    return sum(m.content[keys.ARRAYS].count_bytes() for m in messages
               if m.has_content() and keys.ARRAYS in m.content.array_records)


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    return float(metrics[key]) if metrics is not None and key in metrics else None

