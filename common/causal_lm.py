"""The causal-LM objective: (prompt, response) batches, loss on response tokens only,
held-out loss, perplexity and next-token accuracy, and greedy sample generations.

Each example's loss is the mean over its own response tokens, and the batch loss the mean over
examples: DP-SGD clips per example, so no example's gradient may depend on another's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedtune.common.training import Batch, EvalStats

IGNORE = -100  # label of prompt and padding positions


class TokenizerError(ValueError):
    """The tokenizer cannot end a response (it has no end-of-sequence token)."""


@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = tokenizer.sep_token_id
        if eos is None:
            raise TokenizerError("the tokenizer has neither an eos nor a sep token to end "
                                 "responses with")
        pad = tokenizer.pad_token_id
        return cls(bos=tokenizer.bos_token_id, eos=eos, pad=eos if pad is None else pad)


@dataclass(frozen=True)
class LMCollator:
    """Tokenise (prompt, response) pairs: [bos] prompt response eos, right-padded; the labels
    are the input ids on response tokens and IGNORE elsewhere."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    @cached_property
    def special(self) -> SpecialTokens:
        """Read once per collator, not once per example."""
        return SpecialTokens.of(self.tokenizer)

    def __call__(self, items: list[tuple[str, Any]]) -> Batch:
        special = self.special
        rows = [self.encode(prompt, str(response)) for prompt, response in items]
        width = max((len(ids) for ids, _ in rows), default=1)
        input_ids = torch.full((len(rows), width), special.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for row, (ids, label) in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            labels[row, :len(ids)] = torch.tensor(label)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(ids, labels) within max_length; a long prompt loses its start, keeping at least
        half of max_length for the response."""
        special = self.special
        head = self.prompt_ids(prompt)
        tail = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [special.eos]
        tail = tail[:max(self.max_length - len(head), self.max_length // 2)]
        room = self.max_length - len(tail)
        head = head[len(head) - room:] if room < len(head) else head
        return head + tail, [IGNORE] * len(head) + tail

    def prompt_ids(self, prompt: str) -> list[int]:
        special = self.special
        start = [] if special.bos is None else [special.bos]
        if not prompt:
            return start
        return start + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def per_example_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B,) mean next-token loss over each example's response tokens."""
    nll, mask, _ = _token_nll(model, batch)
    return nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _token_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets.clamp(min=0),
                          reduction="none") * mask
    right = (logits.argmax(dim=-1) == targets) & mask
    return nll, mask, right


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction of responses."""

    def collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> LMCollator:
        return LMCollator(tokenizer, max_length)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return per_example_loss(model, batch).mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader,
                 device: torch.device) -> EvalStats:
        """Token-weighted loss, perplexity and next-token accuracy over the response tokens."""
        model.eval()
        nll_sum, tokens, right_sum, examples = 0.0, 0, 0, 0
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            nll, mask, right = _token_nll(model, batch)
            nll_sum += float(nll.sum())
            tokens += int(mask.sum())
            right_sum += int(right.sum())
            examples += len(batch["labels"])
        loss = nll_sum / max(tokens, 1)
        return EvalStats(loss=loss, accuracy=right_sum / max(tokens, 1), examples=examples,
                         per_label_accuracy=[], perplexity=math.exp(min(loss, 50.0)))


@torch.no_grad()
def generate(model: torch.nn.Module, collator: LMCollator, prompt: str, *,
             max_new_tokens: int, device: torch.device) -> str:
    """Greedy continuation of `prompt`, decoded without special tokens."""
    model.eval()
    special = collator.special
    ids = collator.prompt_ids(prompt)[-collator.max_length:] or [special.eos]
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=special.eos, pad_token_id=special.pad)
    return collator.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def sample_prompt(prompt: str, response: str, words: int = 6) -> str:
    """What to generate from: the prompt, or for an unprompted text its first few words."""
    return prompt or " ".join(response.split()[:words])
