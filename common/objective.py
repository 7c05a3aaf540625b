"""What a task learns and how it is scored; the one switch between classification and causal LM."""

from __future__ import annotations

from typing import Protocol

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedtune.common.causal_lm import CausalLM
from fedtune.common.classifier import Classification
from fedtune.common.config import CAUSAL_LM
from fedtune.common.training import Batch, Collate, EvalStats


class Objective(Protocol):
    def collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Collate:
        """Turns a list of dataset items into one padded batch."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The batch loss: the mean over examples of each example's own loss."""

    def evaluate(self, model: torch.nn.Module, loader: DataLoader,
                 device: torch.device) -> EvalStats:
        """Loss and accuracy (and perplexity for an LM) over a loader."""


def objective_for(task: str, num_labels: int) -> Objective:
    return CausalLM() if task == CAUSAL_LM else Classification(num_labels)
