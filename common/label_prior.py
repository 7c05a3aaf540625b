"""A classifier's head started from its label names (`model.head_init = "label_names"`).

Each label's row of the head is the frozen encoder's reading of the label's own name, scaled:
before any training the model answers by how close a text's mean-pooled states lie to each
name (a zero-shot classifier). Under DP-SGD the head then starts from what the names say
rather than from noise, and every private step refines a prior instead of building one. The
names are the data directory's `labels.json`, a schema the server and every node already
share; no training row is read, so the prior costs no privacy budget.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from transformers import PreTrainedTokenizerBase

from fedtune.common.mean_pooling import MeanPoolingClassifier, masked_mean

# logit = LOGIT_SCALE x |h| x cos(h, name): on 600 training rows each of banking77, sst2 and
# medical_abstracts the untrained head's cross-entropy is lowest between 2 and 5 (a scratch
# script of 2026-12-07, not kept; docs/utility.md says how the scale was chosen)
LOGIT_SCALE = 4.0
# A name is read in at most NAME_TOKENS tokens, NAMES_PER_PASS names a pass: thousands of labels
# or a name of a page cost time, not memory (one pass, padded to the run's max_length, did)
NAME_TOKENS, NAMES_PER_PASS = 64, 128


def named(label_names: list[str]) -> bool:
    """Whether the data named its labels (a labels.json) rather than numbering them 0..K-1."""
    return label_names != [str(i) for i in range(len(label_names))]


def readable(name: str) -> str:
    """A label name as words: `card_arrival` -> `card arrival`."""
    return " ".join(name.replace("_", " ").split())


@torch.no_grad()
def init_head_from_names(model: MeanPoolingClassifier, tokenizer: PreTrainedTokenizerBase,
                         label_names: list[str], max_length: int) -> None:
    """Set the head's rows to LOGIT_SCALE x each name's unit mean-pooled encoding; bias 0."""
    if len(label_names) != model.classifier.out_features:
        raise ValueError(f"{len(label_names)} label names for a head of "
                         f"{model.classifier.out_features} outputs")
    was_training = model.training
    model.eval()  # no dropout: every process must compute the same rows
    texts = [readable(n) for n in label_names]
    rows = [_read(model, tokenizer, texts[i:i + NAMES_PER_PASS], min(max_length, NAME_TOKENS))
            for i in range(0, len(texts), NAMES_PER_PASS)]
    model.classifier.weight.copy_(LOGIT_SCALE * functional.normalize(torch.cat(rows), dim=-1))
    model.classifier.bias.zero_()
    model.train(was_training)


def _read(model: MeanPoolingClassifier, tokenizer: PreTrainedTokenizerBase, texts: list[str],
          max_length: int) -> torch.Tensor:
    """The encoder's masked mean of each text's token states, float32."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(model.classifier.weight.device)
    states = model.encoder(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state
    return masked_mean(states, batch["attention_mask"]).float()
