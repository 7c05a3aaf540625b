"""The classification objective: (text, label) batches, cross-entropy, accuracy per label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from common.training import Batch, EvalStats


@dataclass(frozen=True)
class ClassifierCollator:
    """Tokenise a list of (text, label) with dynamic padding."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __call__(self, items: list[tuple[str, Any]]) -> Batch:
        texts, labels = zip(*items, strict=True) if items else ((), ())
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return dict(batch)


@dataclass(frozen=True)
class Classification:
    """Sequence classification into `num_labels` classes."""

    num_labels: int

    def collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> ClassifierCollator:
        return ClassifierCollator(tokenizer, max_length)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the batch's examples."""
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader,
                 device: torch.device) -> EvalStats:
        model.eval()
        loss_sum, correct = 0.0, 0
        seen = np.zeros(self.num_labels, dtype=np.int64)
        hits = np.zeros(self.num_labels, dtype=np.int64)
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            out = model(**batch)
            labels = batch["labels"]
            loss_sum += float(out.loss) * len(labels)
            right = (out.logits.argmax(dim=-1) == labels).cpu().numpy()
            correct += int(right.sum())
            np.add.at(seen, labels.cpu().numpy(), 1)
            np.add.at(hits, labels.cpu().numpy(), right.astype(np.int64))
        count = int(seen.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            per_label = np.where(seen > 0, hits / np.maximum(seen, 1), np.nan)
        return EvalStats(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1),
                         examples=count, per_label_accuracy=per_label.tolist())
