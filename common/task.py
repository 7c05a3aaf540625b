"""The learning task of a run: data, tokenizer and LoRA model, built once per process and reused.

Flower's simulation runs many virtual clients in a few worker processes; caching the task per
worker keeps one model copy per process instead of one per client.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedtune.common.adapter import add_lora, load_trainable_state, trainable_state
from fedtune.common.canaries import Canaries, make_canaries, with_canaries
from fedtune.common.config import CAUSAL_LM, PartitionConfig, RunConfig, TrainConfig
from fedtune.common.data import Examples, LabelledData, load_data
from fedtune.common.label_prior import init_head_from_names, named
from fedtune.common.mean_pooling import MeanPoolingClassifier
from fedtune.common.model import load_causal_lm, load_classifier, load_tokenizer, pick_device
from fedtune.common.objective import Objective, objective_for
from fedtune.common.partition import local_split, partition
from fedtune.common.training import (
    EvalStats,
    TrainStats,
    adamw,
    make_loader,
    set_dropout,
    train_local,
)


@dataclass
class Task:
    config: RunConfig
    data: LabelledData
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel
    device: torch.device
    objective: Objective
    initial_adapter: dict[str, np.ndarray]  # the seeded initialisation, kept before any training
    _shares: dict[tuple[PartitionConfig, int], list[np.ndarray]] = field(
        default_factory=dict, repr=False)
    _canaries: Canaries | None = field(default=None, repr=False)

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
        train = self.data.train.subset(train_idx)
        if self.config.audit.enabled:
            train = with_canaries(train, self.canaries(), partition_id)
        return train, self.data.train.subset(held_idx)

    def canaries(self) -> Canaries:
        """The audit's canaries (config.audit), made once."""
        if self._canaries is None:
            self._canaries = make_canaries(self.config.audit, self.config.seed,
                                           self.config.model.task, self.data.num_labels)
        return self._canaries

    def loader(self, rows: Examples, *, batch_size: int, shuffle: bool,
               seed: int = 0) -> DataLoader:
        """Batches of `rows` tokenised for this task's objective."""
        collate = self.objective.collator(self.tokenizer, self.config.model.max_length)
        return make_loader(rows, collate, batch_size=batch_size,
                           shuffle=shuffle and len(rows) > 0, seed=seed)

    def start_round(self, state: dict[str, np.ndarray], rows: Examples, train: TrainConfig, *,
                    dropout_seed: int, sampling_seed: int,
                    ) -> tuple[DataLoader, torch.optim.Optimizer]:
        """Load `state`, set the dropout `train` asks for, and return the round's shuffled
        batches and a fresh AdamW: the one way a local round starts, on a node, in the defaults
        sweep and in the benchmarks."""
        load_trainable_state(self.model, state)
        set_dropout(self.model, train.dropout)
        torch.manual_seed(dropout_seed)  # the dropout layers' masks
        loader = self.loader(rows, batch_size=train.batch_size, shuffle=True, seed=sampling_seed)
        return loader, adamw(self.model, train.lr, train.weight_decay, train.head_lr)

    def train_plain(self, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    train: TrainConfig, proximal_mu: float = 0.0) -> TrainStats:
        """One round of non-private local training as `train` sets it."""
        return train_local(self.model, loader, optimizer, loss_fn=self.objective.loss,
                           epochs=train.local_epochs, max_steps=train.local_steps,
                           max_grad_norm=train.max_grad_norm, device=self.device,
                           proximal_mu=proximal_mu)

    def evaluate(self, rows: Examples, batch_size: int) -> EvalStats:
        """Score the model's current adapter on `rows`, `batch_size` rows a pass (the run's:
        this task's own config holds only what shapes data and model)."""
        loader = self.loader(rows, batch_size=batch_size, shuffle=False)
        return self.objective.evaluate(self.model, loader, self.device)


def build_task(config: RunConfig, *, held_out_only: bool = False) -> Task:
    """Load data and model; the LoRA (and head) initialisation follows `config.seed`.
    `held_out_only`: the data may be a test split alone (a deployed server's)."""
    task = config.model.task
    data = load_data(config.data, config.seed, task, held_out_only=held_out_only)
    tokenizer = load_tokenizer(config.model.name)
    device = pick_device()
    model = build_model(config, data.num_labels, label_names=data.label_names,
                        tokenizer=tokenizer)
    if not getattr(model.get_base_model(), "is_quantized", False):
        model = model.to(device)  # (a quantised base is placed as it loads)
    return Task(config=config, data=data, tokenizer=tokenizer, model=model, device=device,
                objective=objective_for(task, data.num_labels),
                initial_adapter=trainable_state(model))


def build_model(config: RunConfig, num_labels: int, *, label_names: list[str] | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None) -> PeftModel:
    """The run's base model with LoRA (and a classifier's head of `num_labels`), initialised from
    `config.seed`: every process that builds it draws the same initial adapter. With the names
    and tokenizer, a head_init of "label_names" starts the head from the names."""
    torch.manual_seed(config.seed)
    if config.model.task == CAUSAL_LM:
        base = load_causal_lm(config.model)
    else:
        base = load_classifier(config.model.name, num_labels, config.model.pooling)
        if (config.head_init == "label_names" and isinstance(base, MeanPoolingClassifier)
                and label_names and tokenizer is not None and named(label_names)):
            init_head_from_names(base, tokenizer, label_names, config.model.max_length)
    return add_lora(base, config.adapter, config.model.task)


def cached_task(config: RunConfig, *, held_out_only: bool = False) -> Task:
    """The process-wide task for this configuration (one model per worker process)."""
    return _cached_task(_task_key(config), held_out_only)


@lru_cache(maxsize=1)
def _cached_task(key: str, held_out_only: bool = False) -> Task:
    return build_task(RunConfig.from_mapping(json.loads(key)), held_out_only=held_out_only)


def _task_key(config: RunConfig) -> str:
    # Only what shapes data and model; a run that changes lr or rounds reuses the same task.
    keep = ("seed", "model", "data")
    shape = {k: v for k, v in config.to_dict().items() if k in keep}
    shape["lora"] = dataclasses.asdict(config.adapter)  # resolved: the key rebuilds the config
    shape["model"] = {**shape["model"], "head_init": config.head_init}  # resolved, as lora
    if config.audit.enabled:  # the canaries join the clients' training rows
        shape["audit"] = dataclasses.asdict(config.audit)
        shape["federation"] = {"num_clients": config.federation.num_clients}
    return json.dumps(shape, sort_keys=True)
