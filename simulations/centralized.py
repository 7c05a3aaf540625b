"""The centralised baseline: one LoRA model trained on the union of all clients' training rows.

Same data, model, seed and passes as the federation: R rounds x E local epochs become R x E epochs,
evaluated on the same test split after every E epochs, written as one metrics row per "round".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedtune.common.adapter import trainable_state
from fedtune.common.config import RunConfig
from fedtune.common.data import Examples
from fedtune.common.run_dir import ADAPTER_DIR
from fedtune.common.task import Task, cached_task
from fedtune.server import progress
from fedtune.server.evaluation import evaluate_centrally, task_columns
from fedtune.server.federation import prepare_run_dir
from fedtune.server.metrics_log import append_round, read_rounds, write_label_names
from fedtune.server.tensorboard_log import TensorBoardLog


def pooled_training_rows(task: Task, config: RunConfig) -> Examples:
    """Every row some client trains on (client held-out rows excluded, as in the federation)."""
    clients = config.federation.num_clients
    parts = [task.client_examples(config.partition, c, clients)[0] for c in range(clients)]
    return Examples.concat(parts)


def train_centralized(config: RunConfig) -> list[dict[str, Any]]:
    run_dir = Path(config.output.dir)
    prepare_run_dir(run_dir, config, resume=False)
    task = cached_task(config)
    write_label_names(run_dir, task.data.label_names)
    rows = pooled_training_rows(task, config)
    train = config.pooled_training  # the clients' defaults, at pooled training's batch size
    loader, optimizer = task.start_round(task.initial_adapter, rows, train,
                                         dropout_seed=config.seed, sampling_seed=config.seed)
    board = TensorBoardLog(run_dir, 1) if config.output.tensorboard else None
    with progress.shown(progress.RoundProgress()) as display:
        for block in range(1, config.federation.rounds + 1):
            display.round_started(block, config.federation.rounds)
            display.exchange(f"training {train.local_epochs} epoch(s) on every row")
            started = time.perf_counter()
            stats = task.train_plain(loader, optimizer, train)
            display.exchange("evaluating on the test split")
            central = evaluate_centrally(task, trainable_state(task.model), train.batch_size)
            row = {"round": block, "accuracy": central.accuracy, "loss": central.loss,
                   **task_columns(central), "train_loss": stats.loss,
                   "examples": stats.examples, "seconds": time.perf_counter() - started}
            append_round(run_dir, row)
            if board is not None:
                board.write(row)
            display.round_done(row)
    if board is not None:
        board.close()
    task.model.save_pretrained(str(run_dir / ADAPTER_DIR))
    return read_rounds(run_dir)
