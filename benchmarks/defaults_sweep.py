"""Choose training defaults fast: FedAvg plus the server step, or the centralised baseline, in one
process (no Ray), on a seeded subsample of a data set.

    python -m benchmarks.defaults_sweep --mode fed --rows 1500 --set train.lr=0.002 \\
        --set 'federation.strategy="fedavgm"'

Clients are the same partitions `fedtune simulate` builds (`Task.client_examples`), trained one
after another with the same local training (`train_local`, or DP-SGD through `train_private`);
the average is weighted by rows (every client once under DP, as the server does) and then
stepped by `federation.strategy`'s server optimiser.
No ledger, secure aggregation or client evaluation: it measures learning, not the system. Prints
one JSON line: accuracy after every round, the last macro-F1, the mean DP-SGD noise multiplier
and the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from fedtune.client.dp_plan import plan_round
from fedtune.client.dp_sgd import train_private
from fedtune.common.adapter import load_trainable_state, trainable_state
from fedtune.common.config import RunConfig
from fedtune.common.data import Examples
from fedtune.common.task import Task, cached_task
from fedtune.server.strategies.server_optimizer import server_optimizer


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/banking77")
    parser.add_argument("--rows", type=int, default=2000, help="training rows kept (seeded)")
    parser.add_argument("--test-rows", type=int, default=800, help="test rows kept (seeded)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=("fed", "central"), default="fed")
    parser.add_argument("--max-length", type=int, default=0,
                        help="tokens per example (0 = the configuration's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a dotted configuration key and its JSON value (repeat)")
    return parser.parse_args()


def subsample(task: Task, rows: int, test_rows: int) -> None:
    rng = np.random.default_rng(0)
    train, test = task.data.train, task.data.test
    task.data = dataclasses.replace(task.data,
                                    train=train.subset(rng.permutation(len(train))[:rows]),
                                    test=test.subset(rng.permutation(len(test))[:test_rows]))


def main() -> None:
    args = parse()
    torch.set_num_threads(1)  # a shared machine: one core per experiment
    overrides = {"data.path": args.data, "federation.num_clients": args.clients,
                 "federation.rounds": args.rounds}
    if args.max_length:
        overrides["model.max_length"] = args.max_length
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    config = RunConfig().with_overrides(overrides)
    task = cached_task(config)
    subsample(task, args.rows, args.test_rows)
    train = config.pooled_training if args.mode == "central" else config.training
    started, scores, noise = time.time(), [], []
    parts = [task.client_examples(config.partition, c, args.clients)[0]
             for c in range(args.clients)]
    if args.mode == "central":
        loader, optimizer = task.start_round(task.initial_adapter, Examples.concat(parts),
                                             train, dropout_seed=0, sampling_seed=0)
        for _ in range(args.rounds):  # one optimizer across the passes, like pooled training
            task.train_plain(loader, optimizer, train)
            stats = task.evaluate(task.data.test, min(train.batch_size, train.physical_batch))
            scores.append((stats.accuracy, stats.macro_f1))
    else:
        state, step = dict(task.initial_adapter), server_optimizer(config.aggregation)
        for server_round in range(1, args.rounds + 1):
            sums: dict[str, np.ndarray] = {}
            for client, rows in enumerate(parts):
                seed = server_round * 100 + client
                loader, optimizer = task.start_round(state, rows, train, dropout_seed=seed,
                                                     sampling_seed=seed)
                if config.privacy.sample_level:
                    plan = plan_round(config, len(rows))
                    noise.append(plan.event.noise_multiplier)
                    train_private(task.model, loader, optimizer, plan,
                                  loss_fn=task.objective.loss, device=task.device,
                                  noise_generator=torch.Generator().manual_seed(
                                      server_round * 1000 + client),
                                  physical_batch=train.physical_batch)
                else:
                    task.train_plain(loader, optimizer, train, config.federation.proximal_weight)
                weight = 1 if config.privacy.dp else len(rows)  # as the server weighs
                for key, value in trainable_state(task.model).items():
                    sums[key] = sums.get(key, 0) + value * weight  # float32, as measured
            total = sum(1 if config.privacy.dp else len(rows) for rows in parts)
            average = {k: (v / total).astype(np.float32) for k, v in sums.items()}
            state = step.step(state, average, server_round)
            load_trainable_state(task.model, state)
            stats = task.evaluate(task.data.test, min(train.batch_size, train.physical_batch))
            scores.append((stats.accuracy, stats.macro_f1))
    hits = sum(1 for a in stats.per_label_accuracy if a > 0)  # labels predicted right at least once
    print(json.dumps({"mode": args.mode, "set": args.set, "rows": args.rows,
                      "rounds": args.rounds, "accuracy": [round(a, 3) for a, _ in scores],
                      "macro_f1": round(scores[-1][1], 3), "labels_hit": hits,
                      "noise_multiplier": round(float(np.mean(noise)), 3) if noise else None,
                      "seconds": round(time.time() - started), "device": str(task.device)}),
          flush=True)


if __name__ == "__main__":
    main()
