"""Shared fixtures: offline hub, a tiny random BERT saved as a local model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with hidden size 32 and the MiniLM tokenizer, loadable by path."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from common.model import resolve_model_path

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
