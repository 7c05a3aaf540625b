"""The learning task of a run: data, tokenizer and LoRA model, built once per process and reused.

Flower's simulation runs many virtual clients in a few worker processes; caching the task per
worker keeps one model copy per process instead of one per client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from common.adapter import add_lora, trainable_state
from common.config import PartitionConfig, RunConfig
from common.data import Examples, LabelledData, load_data
from common.model import load_classifier, load_tokenizer, pick_device
from common.partition import local_split, partition


@dataclass
class Task:
    config: RunConfig
    data: LabelledData
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel
    device: torch.device
    initial_adapter: dict[str, np.ndarray]  # the seeded initialisation, kept before any training
    _shares: dict[tuple[PartitionConfig, int], list[np.ndarray]] = field(
        default_factory=dict, repr=False)

    def client_examples(self, scheme: PartitionConfig, partition_id: int,
                        num_partitions: int) -> tuple[Examples, Examples]:
        """(train, held-out) rows of one simulated client; each partitioning is computed once."""
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
        key = (scheme, num_partitions)
        if key not in self._shares:
            self._shares[key] = partition(self.data.train, scheme, num_partitions,
                                          self.config.seed)
        seed = int(np.random.SeedSequence([self.config.seed, partition_id]).generate_state(1)[0])
        train_idx, held_idx = local_split(self._shares[key][partition_id],
                                          scheme.local_test_fraction, seed)
        return self.data.train.subset(train_idx), self.data.train.subset(held_idx)


def build_task(config: RunConfig) -> Task:
    """Load data and model; the LoRA and head initialisation follow `config.seed`."""
    data = load_data(config.data, config.seed)
    tokenizer = load_tokenizer(config.model.name)
    torch.manual_seed(config.seed)
    base = load_classifier(config.model.name, data.num_labels)
    device = pick_device()
    model = add_lora(base, config.lora).to(device)
    return Task(config=config, data=data, tokenizer=tokenizer, model=model, device=device,
                initial_adapter=trainable_state(model))


def cached_task(config: RunConfig) -> Task:
    """The process-wide task for this configuration (one model per worker process)."""
    return _cached_task(_task_key(config))


@lru_cache(maxsize=1)
def _cached_task(key: str) -> Task:
    return build_task(RunConfig.from_mapping(json.loads(key)))


def _task_key(config: RunConfig) -> str:
    # Only what shapes data and model; a run that changes lr or rounds reuses the same task.
    keep = ("seed", "model", "data", "lora")
    return json.dumps({k: v for k, v in config.to_dict().items() if k in keep}, sort_keys=True)
