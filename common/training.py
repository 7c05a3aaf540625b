"""Local training on tokenised text, shared by clients and the centralised baseline.

What is learned and how it is scored (batches, loss, evaluation) belongs to the task's objective
(`common/objective.py`); this module only runs the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedtune.common.data import Examples

Batch = dict[str, torch.Tensor]
Collate = Callable[[list[tuple[str, Any]]], Batch]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class TextDataset(Dataset):
    """(text, label) or (prompt, response) pairs; tokenised per batch so padding fits the batch."""

    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return self.examples.item(index)


def make_loader(examples: Examples, collate: Collate, *, batch_size: int, shuffle: bool,
                seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TextDataset(examples), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=collate)


def set_dropout(model: torch.nn.Module, enabled: bool) -> None:
    """Every `torch.nn.Dropout` of `model` at the rate it was built with, or at 0 (`train.dropout
    = false`). A cached model trains many rounds, so the built rate is kept to return to."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            if not hasattr(module, "built_p"):
                module.built_p = module.p
            module.p = module.built_p if enabled else 0.0


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps taken
    examples: int  # examples seen, counting repeats across epochs
    steps: int


def train_local(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                loss_fn: LossFn, epochs: int, max_steps: int, max_grad_norm: float,
                device: torch.device, proximal_mu: float = 0.0) -> TrainStats:
    """Run `epochs` passes, or exactly `max_steps` steps when > 0 (cycling the loader).

    `proximal_mu` > 0 adds FedProx's (mu/2)||w - w_0||^2 (Li et al. 2020, arXiv:1812.06127),
    w_0 being the trainable values the round started from."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    total_loss, examples, steps = 0.0, 0, 0
    epoch = 0
    while (steps < max_steps) if max_steps > 0 else (epoch < epochs):
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            if anchor:
                proximal = sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchor, strict=True))
                (loss + 0.5 * proximal_mu * proximal).backward()
            else:
                loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            total_loss += float(loss.detach())
            examples += len(batch["labels"])
            steps += 1
            if 0 < max_steps <= steps:
                break
        epoch += 1
    return TrainStats(loss=total_loss / max(steps, 1), examples=examples, steps=steps)


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float  # classification: of labels; causal LM: of next response tokens
    examples: int
    per_label_accuracy: list[float]  # NaN for labels absent from the split; empty for an LM
    perplexity: float | None = None  # causal LM only: exp of the mean response-token loss
    macro_f1: float | None = None  # classification only: F1 averaged over the labels seen


HEAD_MARKER = "modules_to_save"  # PEFT's name for the fully trained copy of the head


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of the fresh head (PEFT's fully trained copy of it)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and HEAD_MARKER in n]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float,
          head_lr: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; the fresh head at `head_lr` when > 0 (it starts
    from random values, the LoRA update from zero, so they suit different step sizes)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = head_parameters(model)
    if not head_lr or not head:
        return torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    rest = [p for n, p in named if HEAD_MARKER not in n]
    return torch.optim.AdamW([{"params": rest}, {"params": head, "lr": head_lr}], lr=lr,
                             weight_decay=weight_decay)
