"""`fedtune simulate --task causal-lm` on tiny GPT-2 and Llama: perplexity falls with and without
DP-SGD and secure aggregation; samples, adapter and resume."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.server.metrics_log import SAMPLES_FILE, read_rounds
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


# A causal LM exported by `fedtune export`, used with transformers only (fedtune never imported):
# sequences as training built them (bos, the prompt template of fedtune.json, the response, eos):
# the perplexity of the responses, and greedy continuations of the prompts.
GENERATE_SCRIPT = """
import json, math, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, test, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(out).eval()
tokenizer = AutoTokenizer.from_pretrained(out)
template = json.load(open(out + "/fedtune.json"))["prompt_template"]
def encode(text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]
nll, tokens = 0.0, 0
for row in map(json.loads, open(test)):
    head = [tokenizer.bos_token_id] + encode(template.format(instruction=row["instruction"],
                                                             input=row["input"]))
    ids = torch.tensor([head + encode(row["output"]) + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(head) - 1:-1]
    nll += float(torch.nn.functional.cross_entropy(logits, ids[0, len(head):], reduction="sum"))
    tokens += ids.shape[1] - len(head)
texts = []
for prompt in prompts:
    ids = [tokenizer.bos_token_id] + encode(prompt)
    out_ids = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    texts.append(tokenizer.decode(out_ids[0, len(ids):], skip_special_tokens=True).strip())
ours = [m for m in sys.modules if m.split(".")[0] in ("common", "server", "simulations")]
print("\\nRESULT", json.dumps({"perplexity": math.exp(nll / tokens), "texts": texts,
                               "ours": ours}))
"""


@pytest.mark.slow
def test_an_exported_causal_lm_scores_and_generates_what_the_run_did(gpt2_run,
                                                                     instruction_data_dir,
                                                                     tmp_path):
    # Prepare: the run's reported perplexity and its own greedy samples of its last round
    out, rows = gpt2_run
    samples = [s for s in read_rounds(out, SAMPLES_FILE) if s["round"] == rows[-1]["round"]]
    prompts = [s["prompt"] for s in samples]

    # Execute: export; use it with transformers alone, and with `fedtune predict`
    assert fedtune("export", out, tmp_path / "model").returncode == 0
    script = tmp_path / "use.py"
    script.write_text(GENERATE_SCRIPT)
    used = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "model"),
                           str(instruction_data_dir / "test.jsonl"), json.dumps(prompts)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "HOME": os.environ.get("HOME", "/tmp")})
    assert used.returncode == 0, used.stderr[-3000:]
    result = json.loads(used.stdout.split("\nRESULT ")[-1])
    predicted = fedtune("predict", tmp_path / "model", "--input",
                        instruction_data_dir / "test.jsonl", "--max-new-tokens", 32)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    answers = [json.loads(line) for line in predicted.stdout.splitlines()]

    # Assert
    assert result["ours"] == []
    assert result["perplexity"] == pytest.approx(rows[-1]["perplexity"], rel=1e-4)
    assert result["texts"] == [s["generated"] for s in samples]
    assert len(answers) == 24
    assert [a["generated"] for a in answers[:len(samples)]] == [s["generated"] for s in samples]
