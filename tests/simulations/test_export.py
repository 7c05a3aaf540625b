"""`fedtune export`: a run's model as a directory transformers alone loads, scoring as the run
did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.export_fidelity import label_with_transformers_only
from fedtune.common.adapter import load_trainable_state, trainable_state
from fedtune.common.config import RunConfig
from fedtune.common.modeling_mean_pooling import MeanPoolingForSequenceClassification
from fedtune.common.task import build_model
from fedtune.server.checkpoint import Checkpoint, save_checkpoint
from fedtune.server.federation import ADAPTER_DIR, CONFIG_FILE
from fedtune.server.metrics_log import append_round, read_rounds, write_label_names
from fedtune.simulations.export import READING_FILE, ExportError, export_run, read_run_config
from tests.simulations.test_cli import fedtune

TEXTS = ["alpha item 3", "a much longer sentence about charlie and bravo"]


def make_run(run_dir: Path, model_dir: Path, data_dir: Path, *, saved: str = "checkpoint",
             **settings: object) -> torch.nn.Module:
    """A run directory as a finished run leaves it, with a random 'trained' adapter; no Flower."""
    config = RunConfig.from_mapping({"model.name": str(model_dir), "data.path": str(data_dir),
                                     "model.max_length": 32, "output.dir": str(run_dir),
                                     **settings})
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    model = build_model(config, 3)
    generator = np.random.default_rng(0)
    load_trainable_state(model, {name: value + generator.normal(0, 0.5, value.shape).astype(
        value.dtype) for name, value in trainable_state(model).items()})
    if saved == "checkpoint":
        save_checkpoint(run_dir, Checkpoint(round=1, arrays=trainable_state(model), state={}))
    else:
        model.save_pretrained(run_dir / ADAPTER_DIR)
    write_label_names(run_dir, ["a", "b", "c"])
    append_round(run_dir, {"round": 1, "accuracy": 0.5})
    return model.eval()


def logits(model: torch.nn.Module, tokenizer, texts=TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(("pooling", "saved", "extra"), [
    ("mean", "checkpoint", {}),
    ("mean", "adapter", {}),  # fedtune centralized keeps no checkpoints
    ("pooler", "checkpoint", {}),
    ("mean", "checkpoint", {"lora.freeze_a": True}),  # A is redrawn from the run's seed
    ("mean", "checkpoint", {"privacy.dp": True}),  # FFA-LoRA by default under DP-SGD
])
def test_the_exported_model_gives_the_runs_logits_under_the_datas_label_names(
        tiny_model_dir, toy_data_dir, tmp_path, pooling, saved, extra):
    # Prepare
    run = make_run(tmp_path / "run", tiny_model_dir, toy_data_dir, saved=saved,
                   **{"model.pooling": pooling, **extra})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    # Execute
    out = export_run(tmp_path / "run", tmp_path / "out")

    # Assert
    if pooling == "mean":
        exported = MeanPoolingForSequenceClassification.from_pretrained(out)
        assert (out / "modeling_mean_pooling.py").is_file()
    else:  # Hugging Face's own head: a standard directory, no code shipped
        exported = AutoModelForSequenceClassification.from_pretrained(out)
        assert not (out / "modeling_mean_pooling.py").exists()
    torch.testing.assert_close(logits(exported.eval(), tokenizer), logits(run, tokenizer))
    assert exported.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert exported.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert AutoTokenizer.from_pretrained(out, config=exported.config).model_max_length == 32
    reading = json.loads((out / READING_FILE).read_text())
    assert reading["text_field"] == "text" and reading["run_accuracy"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left


def test_an_occupied_output_or_a_run_without_weights_is_refused(tiny_model_dir, toy_data_dir,
                                                                tmp_path):
    make_run(tmp_path / "run", tiny_model_dir, toy_data_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_run(tmp_path / "run", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / CONFIG_FILE).write_text((tmp_path / "run" / CONFIG_FILE).read_text())
    with pytest.raises(ExportError, match="neither a checkpoint nor an adapter/"):
        export_run(empty, tmp_path / "out")
    with pytest.raises(ExportError, match="holds no fedtune run"):
        export_run(tmp_path / "taken", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_saved_before_model_pooling_exports_with_the_pooler_it_trained(tmp_path):
    saved = RunConfig().to_dict()
    del saved["model"]["pooling"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    assert read_run_config(tmp_path).model.pooling == "pooler"


@pytest.mark.slow
def test_simulate_export_and_a_transformers_pipeline_scores_what_the_run_reported(
        tiny_model_dir, toy_data_dir, tmp_path):
    # Prepare: a federation of 3 clients on the toy data
    run = tmp_path / "run"
    done = fedtune("simulate", "--model", tiny_model_dir, "--data", toy_data_dir,
                   "--num-clients", 3, "--rounds", 2, "--lr", 0.01, "--max-length", 32,
                   "--out", run)
    assert done.returncode == 0, done.stderr[-3000:]
    reported = read_rounds(run)[-1]["accuracy"]

    # Execute: export, then label the test split in a Python that never imports fedtune
    exported = fedtune("export", run, tmp_path / "out")
    assert exported.returncode == 0, exported.stderr[-3000:]
    result = label_with_transformers_only(tmp_path / "out", toy_data_dir / "test.jsonl",
                                          toy_data_dir / "labels.json", tmp_path)

    # Assert: label names, the run's accuracy, and no fedtune module in that process
    assert set(result["labels"]) <= {"a", "b", "c"}
    assert result["accuracy"] == pytest.approx(reported, abs=0.01)
    assert result["refused"] and result["ours"] == []

    # and `fedtune predict` on a JSONL file names the same labels, from the run or the export
    answers = {}
    for source in (run, tmp_path / "out"):
        predicted = fedtune("predict", source, "--input", toy_data_dir / "test.jsonl",
                            "--output", tmp_path / f"{source.name}.jsonl")
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        lines = (tmp_path / f"{source.name}.jsonl").read_text().splitlines()
        answers[source.name] = [json.loads(line) for line in lines]
    assert [a["label"] for a in answers["run"]] == result["labels"]
    assert [a["label"] for a in answers["out"]] == result["labels"]
    assert all(0 < a["score"] <= 1 for a in answers["out"])
