"""How large one client's update is, per value, against secure aggregation's clip `secagg.bound`:
one round of local training with the defaults on client 0 of a data set (`--dp`: DP-SGD at
epsilon 8, its defaults, planned for the run's 5 rounds).

    python -m benchmarks.update_size [--data ../shared/data/banking77] [--clients 10] [--dp]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fedtune.client.dp_plan import plan_round
from fedtune.client.dp_sgd import train_private
from fedtune.common.adapter import trainable_state
from fedtune.common.config import RunConfig
from fedtune.common.task import cached_task
from fedtune.common.training import HEAD_MARKER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/banking77")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dp", action="store_true", help="DP-SGD (sample level, epsilon 8)")
    args = parser.parse_args()
    config = RunConfig().with_overrides({"data.path": args.data, "privacy.dp": args.dp,
                                         "federation.num_clients": args.clients})
    task, train = cached_task(config), config.training
    rows = task.client_examples(config.partition, 0, args.clients)[0]
    start = task.initial_adapter
    loader, optimizer = task.start_round(start, rows, train, dropout_seed=config.seed,
                                         sampling_seed=config.seed)
    if args.dp:
        plan = plan_round(config, len(rows))
        stats = train_private(task.model, loader, optimizer, plan, loss_fn=task.objective.loss,
                              device=task.device, physical_batch=train.physical_batch,
                              noise_generator=torch.Generator().manual_seed(config.seed))
    else:
        stats = task.train_plain(loader, optimizer, train)
    end = trainable_state(task.model)
    change = {key: np.abs(end[key] - start[key]).ravel() for key in end}
    every = np.concatenate(list(change.values()))
    head = np.concatenate([v for k, v in change.items() if HEAD_MARKER in k])
    bound = config.secagg.bound
    print(json.dumps({"data": args.data, "dp": args.dp, "rows": len(rows), "steps": stats.steps,
                      "max_change": round(float(every.max()), 4),
                      "max_head_change": round(float(head.max()), 4),
                      "p999_change": round(float(np.quantile(every, 0.999)), 4),
                      "secagg_bound": bound, "share_clipped": float((every > bound).mean())}))


if __name__ == "__main__":
    main()
