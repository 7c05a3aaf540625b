"""`fedtune simulate --task causal-lm` on tiny GPT-2 and Llama: perplexity falls with and without
DP-SGD and secure aggregation; samples, adapter and resume."""

from __future__ import annotations

import itertools
import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.metrics_log import SAMPLES_FILE, read_rounds
from tests.simulations.test_cli import fedtune


def simulate(model_dir, data_dir, out, *extra):
    done = fedtune("simulate", "--task", "causal-lm", "--model", model_dir, "--data", data_dir,
                   "--num-clients", 3, "--batch-size", 8, "--lr", 0.02, "--max-length", 48,
                   "--out", out, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_rounds(out)


@pytest.fixture(scope="module")
def gpt2_run(tiny_gpt2_dir, instruction_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    return out, simulate(tiny_gpt2_dir, instruction_data_dir, out, "--rounds", 3)


@pytest.mark.slow
def test_perplexity_falls_round_by_round_and_samples_are_written(gpt2_run, tiny_gpt2_dir):
    out, rows = gpt2_run
    perplexity = [r["perplexity"] for r in rows]
    assert all(b < a for a, b in itertools.pairwise(perplexity)), perplexity
    assert all("label_accuracy" not in r and 0 <= r["accuracy"] <= 1 for r in rows)
    samples = read_rounds(out, SAMPLES_FILE)
    assert [s["round"] for s in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(s["prompt"].endswith("### Response:\n") and s["reference"] for s in samples)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert model.peft_config["default"].task_type == "CAUSAL_LM"


@pytest.mark.slow
def test_resume_continues_to_the_same_result(gpt2_run, tiny_gpt2_dir, instruction_data_dir,
                                             tmp_path):
    _, straight = gpt2_run
    out = tmp_path / "run"
    simulate(tiny_gpt2_dir, instruction_data_dir, out, "--rounds", 2)
    done = fedtune("simulate", "--resume", out, "--rounds", 3)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = read_rounds(out)
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert [r["perplexity"] for r in resumed] == pytest.approx(
        [r["perplexity"] for r in straight], rel=1e-5)
    assert len(read_rounds(out, SAMPLES_FILE)) == 9


@pytest.mark.slow
@pytest.mark.parametrize("architecture, flags", [
    ("llama", ["--dp", "--epsilon", "50"]),
    ("gpt2", ["--dp", "--epsilon", "50", "--secagg"]),
    ("llama", ["--secagg"]),
])
def test_private_and_secure_runs_still_learn(architecture, flags, tiny_gpt2_dir, tiny_llama_dir,
                                             instruction_data_dir, tmp_path):
    model_dir = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[architecture]
    out = tmp_path / "run"
    rows = simulate(model_dir, instruction_data_dir, out, "--rounds", 3, *flags)
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]
    assert all(r["clients"] == 3 for r in rows)
    if "--dp" in flags:
        assert sorted(rows[-1]["epsilon"]) == ["client-0", "client-1", "client-2"]
        assert 0 < rows[-1]["epsilon_max"] <= 50
        assert len(list((out / "ledgers").glob("ledger-*.json"))) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["task"] == "causal-lm"


def test_the_builtin_classification_set_is_refused_for_a_causal_lm(tiny_gpt2_dir, tmp_path):
    done = fedtune("simulate", "--task", "causal-lm", "--model", tiny_gpt2_dir,
                   "--out", tmp_path / "run")
    assert done.returncode == 2 and "built-in data set is for classification" in done.stderr
