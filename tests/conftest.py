"""Shared fixtures: offline hub, a tiny random BERT saved as a local model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

@pytest.fixture()
def message_identity():
    """Hand-built Messages need the identity Flower sets inside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with hidden size 32 and the MiniLM tokenizer, loadable by path."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.common.model import resolve_model_path

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)  # no head, like the MiniLM
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture()
def toy_data_dir(tmp_path: Path) -> Path:
    """A learnable 3-class data set: the label is spelled out in the text."""
    words = ["alpha", "bravo", "charlie"]
    rows = [{"text": f"{words[i % 3]} item {i}", "label": i % 3, "domain": f"d{i % 4}"}
            for i in range(90)]
    directory = tmp_path / "toy"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", rows[:72])
    write_jsonl(directory / "test.jsonl", rows[72:])
    (directory / "labels.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    return directory


FRUIT_COLOURS = {"banana": "yellow", "cherry": "red", "lime": "green", "plum": "purple",
                 "orange": "orange", "lemon": "yellow", "kiwi": "green", "grape": "purple",
                 "apple": "red", "mango": "orange", "pear": "green", "berry": "blue"}


def instruction_rows(count: int, offset: int = 0) -> list[dict]:
    """Learnable instruction data: the colour of a fruit, always in the same phrasing."""
    fruits = sorted(FRUIT_COLOURS)
    rows = []
    for i in range(offset, offset + count):
        fruit = fruits[i % len(fruits)]
        rows.append({"instruction": "name the colour of the fruit", "input": fruit,
                     "output": f"the {fruit} is {FRUIT_COLOURS[fruit]}", "site": f"s{i % 3}"})
    return rows


@pytest.fixture(scope="session")
def instruction_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("instructions")
    write_jsonl(directory / "train.jsonl", instruction_rows(96))
    write_jsonl(directory / "test.jsonl", instruction_rows(24, offset=96))
    return directory


def word_tokenizer():
    """A word-level tokenizer over the instruction data and prompt template, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fedtune.common.config import DEFAULT_PROMPT

    pre = pre_tokenizers.Whitespace()
    text = " ".join([DEFAULT_PROMPT, *(" ".join(r.values()) for r in instruction_rows(12))])
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def save_tiny_causal_lm(kind: str, directory: Path) -> Path:
    """A 2-layer GPT-2 or Llama with hidden size 32 and the word tokenizer, loadable by path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    if kind == "gpt2":
        # No dropout, so that a batch and its examples one by one give the same gradients.
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2,
                                             max_position_embeddings=128, **ids))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm("llama", tmp_path_factory.mktemp("tiny-llama"))
