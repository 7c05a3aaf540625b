"""The mean-pooling classifier as Hugging Face custom code: self-contained, and the same model as
the one fedtune trains."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fedtune.common import modeling_mean_pooling
from fedtune.common.model import load_classifier
from fedtune.common.modeling_mean_pooling import (
    MeanPoolingConfig,
    MeanPoolingForSequenceClassification,
)


def test_the_shipped_file_imports_only_torch_and_transformers():
    tree = ast.parse(Path(modeling_mean_pooling.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "typing", "torch", "transformers"}, imported


def test_the_trained_modules_weights_load_by_name_and_give_the_same_logits(tiny_model_dir,
                                                                          tmp_path):
    # Prepare: a trained-looking mean-pooling classifier
    torch.manual_seed(0)
    trained = load_classifier(str(tiny_model_dir), 3, "mean").eval()
    with torch.no_grad():
        trained.classifier.weight.add_(1.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["short", "a much longer sentence than the first"], padding=True,
                      return_tensors="pt")
    config = MeanPoolingConfig(encoder=trained.encoder.config.to_dict(), num_labels=3,
                               id2label={0: "a", 1: "b", 2: "c"})

    # Execute: the same weights in the shipped class, saved and loaded back
    shipped = MeanPoolingForSequenceClassification(config)
    shipped.load_state_dict(trained.state_dict(), strict=True)
    shipped.save_pretrained(tmp_path)
    reloaded = MeanPoolingForSequenceClassification.from_pretrained(tmp_path).eval()

    # Assert
    with torch.no_grad():
        expected = trained(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected)
    assert reloaded.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert reloaded.config.model_type == "fedtune-mean-pooling"
