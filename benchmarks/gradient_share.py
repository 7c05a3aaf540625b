"""How one example's gradient splits between the classification head and the LoRA matrices at the
DP-SGD defaults: DP-SGD clips the whole per-example gradient to one norm, so the part with the
smaller share gets the smaller signal under the same noise (docs/utility.md).

    python -m benchmarks.gradient_share --data DIR [--data DIR ...] [--examples 32]

Median L2 norms over the first examples of client 0 of 5 (IID), with the run's initial adapter,
one example at a time; the model is in training mode, as DP-SGD runs it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.record import save
from fedtune.common.config import RunConfig
from fedtune.common.task import Task, build_task

NAME = "gradient_share"
CLIENTS = 5


def norms(task: Task, examples: int) -> dict[str, float]:
    """Median per-example gradient norm of the head, of LoRA, and the head's share of the
    squared norm."""
    rows = task.client_examples(task.config.partition, 0, CLIENTS)[0]
    model, named = task.model, [(n, p) for n, p in task.model.named_parameters()
                                if p.requires_grad]
    model.train()
    collate = task.objective.collator(task.tokenizer, task.config.model.max_length)
    head, lora = [], []
    for index in range(min(examples, len(rows))):
        batch = collate([rows.item(index)])
        model.zero_grad(set_to_none=True)
        task.objective.loss(model, batch).backward()
        head.append(_norm(p for n, p in named if "classifier" in n))
        lora.append(_norm(p for n, p in named if "lora_" in n))
    h, low = statistics.median(head), statistics.median(lora)
    return {"head": round(h, 4), "lora": round(low, 4),
            "head_share_of_squared_norm": round(h * h / (h * h + low * low), 4),
            "head_values": sum(p.numel() for n, p in named if "classifier" in n),
            "lora_values": sum(p.numel() for n, p in named if "lora_" in n)}


def _norm(params: Any) -> float:
    return float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a data directory")
    parser.add_argument("--examples", type=int, default=32)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    for data in args.data:
        config = RunConfig().with_overrides({"data.path": data, "privacy.dp": True,
                                             "federation.num_clients": CLIENTS})
        figures[Path(data).name] = norms(build_task(config), args.examples)
        print(Path(data).name, figures[Path(data).name], flush=True)
    print(save(NAME, {"examples": args.examples, "norms": figures}, quick=False))


if __name__ == "__main__":
    main()
