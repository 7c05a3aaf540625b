"""The classification objective: (text, label) batches, cross-entropy, accuracy per label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedtune.common.training import Batch, EvalStats


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
        loss_sum = 0.0
        confusion = np.zeros((self.num_labels, self.num_labels), dtype=np.int64)  # truth, guess
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            out = model(**batch)
            labels = batch["labels"]
            loss_sum += float(out.loss) * len(labels)
            np.add.at(confusion, (labels.cpu().numpy(), out.logits.argmax(dim=-1).cpu().numpy()),
                      1)
        count = int(confusion.sum())
        hits, seen, guessed = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_label = np.where(seen > 0, hits / np.maximum(seen, 1), np.nan)
        involved = (seen + guessed) > 0
        f1 = 2 * hits[involved] / (seen[involved] + guessed[involved])
        return EvalStats(loss=loss_sum / max(count, 1), accuracy=int(hits.sum()) / max(count, 1),
                         examples=count, per_label_accuracy=per_label.tolist(),
                         macro_f1=float(f1.mean()) if f1.size else 0.0)
