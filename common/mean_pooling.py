"""A sequence classifier that reads the masked mean of the encoder's token states.

Sentence encoders such as the embedded MiniLM were trained to be read this way; Hugging Face's
`...ForSequenceClassification` reads BERT's pooler over the first token instead, which such a
model never trained (`benchmarks/feature_probe.py` measures the difference).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from fedtune.common.modeling_mean_pooling import classify, masked_mean

__all__ = ["MeanPoolingClassifier", "masked_mean"]


class MeanPoolingClassifier(nn.Module):
    """`encoder`'s masked mean of token states, dropout, then a fresh linear head.

    The head is named `classifier`, so PEFT's sequence-classification task trains it in full
    (modules_to_save) as it does Hugging Face's heads. Module names and the forward pass are
    those of the exported model (`common/modeling_mean_pooling.py`), so weights carry over.
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # PEFT reads the model type and name from here
        self.num_labels = num_labels
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        std = getattr(encoder.config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)  # Hugging Face's head initialisation
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        return classify(self, input_ids, attention_mask, token_type_ids, labels)
