"""A sequence classifier that reads the masked mean of an encoder's token states, as Hugging Face
custom code: `fedtune export` copies this file into the exported model directory, whose
`config.json` names it in `auto_map`, so `transformers` alone loads the model with
`trust_remote_code=True`:

    from transformers import pipeline
    classify = pipeline("text-classification", model="exported-dir", trust_remote_code=True)

Self-contained on purpose (torch and transformers only): it runs where fedtune is not installed.
fedtune trains the same module (`common/mean_pooling.py`), so the weights keep their names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean over its real tokens: padding never enters the features."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)


def classify(model: nn.Module, input_ids: torch.Tensor | None,
             attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
             labels: torch.Tensor | None) -> SequenceClassifierOutput:
    """`model.classifier(dropout(masked mean of model.encoder's token states))`, and the
    cross-entropy against `labels` when given: the one forward pass of both classes."""
    if input_ids is None:
        raise ValueError(f"{type(model).__name__} needs input_ids")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    hidden = model.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           **extra).last_hidden_state  # (B, T, H)
    logits = model.classifier(model.dropout(masked_mean(hidden, attention_mask)))
    loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
    return SequenceClassifierOutput(loss=loss, logits=logits)


class MeanPoolingConfig(PretrainedConfig):
    """The encoder's own configuration (`encoder`, a dict with its `model_type`) plus the
    classification settings (`id2label`, ...). Its own model type, so that loading it without
    this code fails instead of silently reading the first token with a standard head."""

    model_type = "fedtune-mean-pooling"

    def __init__(self, encoder: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.encoder = dict(encoder or {})
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        settings = dict(self.encoder)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """The encoder, dropout, then a linear head over the masked mean of its token states."""

    config_class = MeanPoolingConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MeanPoolingConfig) -> None:
        super().__init__(config)
        encoder_config = config.encoder_config()
        self.encoder = AutoModel.from_config(encoder_config)
        self.dropout = nn.Dropout(getattr(encoder_config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every weight comes from the checkpoint; only a head built from scratch is drawn.
        if module is getattr(self, "classifier", None):
            module.weight.data.normal_(std=getattr(self.config, "initializer_range", 0.02))
            module.bias.data.zero_()

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        return classify(self, input_ids, attention_mask, token_type_ids, labels)
