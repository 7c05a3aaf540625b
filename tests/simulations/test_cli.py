"""The `fedtune` command as a user runs it: real processes, Flower's simulation engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedtune.common.config import PLAIN_STRATEGY, PLAIN_TRAINING
from fedtune.server.checkpoint import latest_checkpoint
from fedtune.server.metrics_log import read_rounds
from tests.conftest import write_jsonl

REQUIRED = {"round", "accuracy", "loss", "clients", "seconds", "bytes_up", "bytes_down",
            "client_accuracy_mean", "client_accuracy_worst", "client_accuracy_std"}


def fedtune(*args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "fedtune", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_simulate_writes_metrics_checkpoints_and_a_peft_adapter(tiny_model_dir, toy_data_dir,
                                                                  tmp_path):
    out = tmp_path / "run"
    done = fedtune("simulate", "--model", tiny_model_dir, "--data", toy_data_dir,
                   "--num-clients", 3, "--rounds", 2, "--batch-size", 8, "--lr", 0.01,
                   "--tensorboard", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    history = read_rounds(out)
    assert [r["round"] for r in history] == [1, 2]
    assert all(set(r) >= REQUIRED for r in history)
    assert all(r["clients"] == 3 and r["bytes_up"] > 0 for r in history)
    assert sorted(history[-1]["client_accuracy"]) == ["client-0", "client-1", "client-2"]
    assert latest_checkpoint(out).round == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["federation"]["rounds"] == 2
    # every default written out as the run used it: a later release's defaults cannot move it
    assert saved["train"]["head_lr"] == PLAIN_TRAINING["head_lr"] != 0
    assert saved["federation"]["strategy"] == PLAIN_STRATEGY and saved["lora"]["freeze_a"] is False
    assert (out / "adapter" / "adapter_config.json").exists()
    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    accuracy = board.Scalars("round/accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["accuracy"] for r in history])
    assert [e.step for e in board.Histograms("clients/accuracy")] == [1, 2]
    assert "labels/accuracy" in board.Tags()["histograms"]
    # the data's own label names (toy labels.json: a, b, c) in TensorBoard and the report
    assert any(tag.startswith("labels/worst") for tag in board.Tags()["tensors"])
    assert fedtune("report", out).returncode == 0
    summary = (out / "report.md").read_text()
    assert re.search(r"Worst labels: [abc] \(\d\.\d{3}\), [abc] \(", summary), summary


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tiny_model_dir, toy_data_dir, tmp_path):
    common = ("--model", tiny_model_dir, "--data", toy_data_dir, "--num-clients", 4,
              "--fraction-train", 0.5, "--batch-size", 8, "--lr", 0.01, "--seed", 3)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert fedtune("simulate", *common, "--rounds", 3, "--out", whole).returncode == 0
    assert fedtune("simulate", *common, "--rounds", 1, "--out", split).returncode == 0
    resumed = fedtune("simulate", "--resume", split, "--rounds", 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = read_rounds(whole), read_rounds(split)
    assert [r["round"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["client_accuracy"].keys() == y["client_accuracy"].keys()  # same clients
        assert x["accuracy"] == pytest.approx(y["accuracy"], abs=1e-9)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    end_a, end_b = latest_checkpoint(whole), latest_checkpoint(split)
    for key, value in end_a.arrays.items():
        np.testing.assert_allclose(end_b.arrays[key], value, rtol=1e-5, atol=1e-6)


def _bad_rows(directory: Path) -> Path:
    write_jsonl(directory / "train.jsonl", [{"text": "x", "label": 0}, {"text": "y"}])
    return directory


def _labels_out_of_range(directory: Path) -> Path:
    write_jsonl(directory / "train.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 9}])
    (directory / "labels.json").write_text('{"0": "a", "1": "b"}')
    return directory


def _bad_config(directory: Path) -> Path:
    path = directory / "bad.toml"
    path.write_text("[train]\nlr = 'fast'\n")
    return path


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda d: ["--data", d / "missing"], "does not exist"),
    (lambda d: ["--data", _bad_rows(d)], "must be an integer"),
    (lambda d: ["--data", _labels_out_of_range(d)], "label 9 is out of range"),
    (lambda d: ["--num-clients", 500], "cannot give each of 500 clients"),
    (lambda d: ["--partition", "dirichlet", "--alpha", 0], "`partition.alpha` must be > 0"),
    (lambda d: ["--model", "no-such-org/no-such-model"], "could not be loaded"),
    (lambda d: ["--config", _bad_config(d)], "`train.lr` must be of type float"),
    (lambda d: ["--config", d / "absent.toml"], "does not exist"),
    (lambda d: ["--strategy", "krum"], "`federation.strategy` must be empty or one of fedavg"),
])
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, make_args, message):
    done = fedtune("simulate", *make_args(tmp_path), "--out", tmp_path / "run")
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    done = fedtune("simulate", "--out", run_dir)
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path):
    done = fedtune("simulate", "--resume", tmp_path)
    assert done.returncode == 2 and "no fedtune run to resume" in done.stderr


def test_a_run_saved_before_model_pooling_resumes_with_the_pooler_it_trained(tmp_path):
    from fedtune.cli import build_parser, resolve_config
    from fedtune.common.config import RunConfig

    saved = RunConfig().to_dict()
    del saved["model"]["pooling"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    args = build_parser().parse_args(["simulate", "--resume", str(tmp_path)])
    assert resolve_config(args).model.pooling == "pooler"
    assert RunConfig().model.pooling == "mean"  # a new run reads the mean
