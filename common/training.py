"""Local training and evaluation of a classifier on tokenised text (clients and baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from common.data import Examples


class TextDataset(Dataset):
    """(text, label) pairs; tokenisation happens per batch so padding fits the longest row."""

    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.examples.texts[index], int(self.examples.labels[index])


@dataclass(frozen=True)
class Collator:
    """Tokenise a list of (text, label) with dynamic padding."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __call__(self, items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*items, strict=True) if items else ((), ())
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return dict(batch)


def make_loader(examples: Examples, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TextDataset(examples), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=Collator(tokenizer, max_length))


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps taken
    examples: int  # examples seen, counting repeats across epochs
    steps: int


def train_local(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                epochs: int, max_steps: int, max_grad_norm: float,
                device: torch.device) -> TrainStats:
    """Run `epochs` passes, or exactly `max_steps` steps when > 0 (cycling the loader)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss, examples, steps = 0.0, 0, 0
    epoch = 0
    while (steps < max_steps) if max_steps > 0 else (epoch < epochs):
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
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
    accuracy: float
    examples: int
    per_label_accuracy: list[float]  # NaN for labels absent from the split


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, *, num_labels: int,
             device: torch.device) -> EvalStats:
    model.eval()
    loss_sum, correct = 0.0, 0
    seen = np.zeros(num_labels, dtype=np.int64)
    hits = np.zeros(num_labels, dtype=np.int64)
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        out = model(**batch)
        labels = batch["labels"]
        loss_sum += float(out.loss) * len(labels)
        predicted = out.logits.argmax(dim=-1)
        right = (predicted == labels).cpu().numpy()
        correct += int(right.sum())
        np.add.at(seen, labels.cpu().numpy(), 1)
        np.add.at(hits, labels.cpu().numpy(), right.astype(np.int64))
    count = int(seen.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        per_label = np.where(seen > 0, hits / np.maximum(seen, 1), np.nan)
    return EvalStats(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1),
                     examples=count, per_label_accuracy=per_label.tolist())


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
