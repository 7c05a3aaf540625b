"""Causal LM on tiny GPT-2 and Llama: response-only loss, adapter-only exchange, per-example
clipping under DP-SGD, instruction data and its configuration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.client.dp_sgd import GRAD_SAMPLE_MODE
from fedtune.client.ledger import fingerprint
from fedtune.common.adapter import add_lora, load_trainable_state, trainable_state
from fedtune.common.causal_lm import IGNORE, CausalLM, LMCollator, per_example_loss
from fedtune.common.config import ConfigError, DataConfig, LoraSettings, RunConfig
from fedtune.common.data import DataError, Examples, load_data
from fedtune.common.training import make_loader
from tests.conftest import instruction_rows, write_jsonl

ARCHITECTURES = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}


@pytest.fixture(params=sorted(ARCHITECTURES))
def lm(request, tiny_gpt2_dir, tiny_llama_dir):
    """(architecture, LoRA model, collator) for each supported causal-LM family."""
    directory = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[request.param]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(directory)
    model = add_lora(base, LoraSettings(r=4, lora_dropout=0.0), "causal-lm")
    return request.param, model, LMCollator(AutoTokenizer.from_pretrained(directory), 48)


def rows(count: int = 8) -> Examples:
    data = instruction_rows(count)
    prompts = [DataConfig().prompt_template.format(instruction=r["instruction"], input=r["input"])
               for r in data]
    return Examples(texts=prompts, labels=np.zeros(count, dtype=np.int64),
                    responses=[r["output"] for r in data])


def test_labels_cover_the_response_and_its_end_only(lm):
    _, _, collator = lm
    examples = rows(2)
    batch = collator([examples.item(0), examples.item(1)])
    tokenizer = collator.tokenizer
    for row in range(2):
        prompt, response = examples.item(row)
        prompt_len = len(collator.prompt_ids(prompt))
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        labels = batch["labels"][row].tolist()
        assert labels[:prompt_len] == [IGNORE] * prompt_len
        kept = [t for t in labels if t != IGNORE]
        assert kept == [*response_ids, tokenizer.eos_token_id]
        length = int(batch["attention_mask"][row].sum())
        assert labels[length:] == [IGNORE] * (len(labels) - length)  # padding is ignored


def test_a_long_prompt_is_cut_from_the_start_and_the_response_kept():
    collator = LMCollator(_tokenizer_of_fixture(), 16)
    prompt = "name the colour of the fruit " * 10
    ids, labels = collator.encode(prompt, "the apple is red")
    assert len(ids) == 16
    assert [t for t in labels if t != IGNORE][-1] == collator.tokenizer.eos_token_id
    assert sum(t != IGNORE for t in labels) == 5  # four words and the end token


def _tokenizer_of_fixture():
    from tests.conftest import word_tokenizer

    return word_tokenizer()


def test_loss_is_the_response_tokens_mean_and_ignores_batch_companions(lm):
    _, model, collator = lm
    examples = rows(4)
    model.eval()
    batch = collator([examples.item(i) for i in range(4)])
    together = per_example_loss(model, batch)
    for i in range(4):
        alone = collator([examples.item(i)])
        assert float(per_example_loss(model, alone)[0]) == pytest.approx(
            float(together[i]), rel=1e-4)  # padding and other rows change nothing
        logits = model(input_ids=alone["input_ids"]).logits[0, :-1]
        targets = alone["labels"][0, 1:]
        keep = targets != IGNORE
        by_hand = F.cross_entropy(logits[keep], targets[keep])
        assert float(together[i]) == pytest.approx(float(by_hand), rel=1e-4)


def test_only_lora_matrices_travel_and_the_base_stays_frozen(lm):
    architecture, model, collator = lm
    state = trainable_state(model)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in state} == set(
        ARCHITECTURES[architecture])
    total = sum(p.numel() for p in model.parameters())
    assert sum(v.size for v in state.values()) < total / 10
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    examples = rows(4)
    for _ in range(2):  # lora_B starts at zero, so lora_A moves from the second step
        optimizer.zero_grad()
        CausalLM().loss(model, collator([examples.item(i) for i in range(4)])).backward()
        optimizer.step()
    moved = trainable_state(model)
    assert all(not np.array_equal(moved[k], state[k]) for k in state)
    assert all(torch.equal(frozen[k], p) for k, p in model.named_parameters() if k in frozen)
    load_trainable_state(model, state)
    assert all(np.array_equal(trainable_state(model)[k], state[k]) for k in state)


def test_dp_sgd_clips_each_example_on_the_lora_layers(lm):
    """With no noise, Opacus' step is the mean of per-example gradients clipped by hand."""
    _, model, collator = lm
    examples, clip = rows(6), 0.05
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # lora_B is zero at init; give every adapter matrix a gradient
        for name, p in params.items():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(len(examples)):
        model.zero_grad()
        per_example_loss(model, collator([examples.item(i)])).sum().backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        assert norm > clip  # clipping really happens
        for k, p in params.items():
            expected[k] += p.grad * (clip / norm) / len(examples)
    model.zero_grad()
    loader = make_loader(examples, collator, batch_size=len(examples), shuffle=False)
    optimizer = torch.optim.SGD(list(params.values()), lr=1.0)
    model.train()
    private, private_optimizer, private_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=GRAD_SAMPLE_MODE)
    try:
        batch = next(iter(private_loader))
        CausalLM().loss(private, batch).backward()
        private_optimizer.pre_step()  # clip and average, without the parameter update
        for k, p in params.items():
            torch.testing.assert_close(p.grad, expected[k], rtol=1e-3, atol=1e-7)
    finally:
        private._close()


def test_instruction_and_text_rows_become_prompt_and_response(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": "say hi", "input": "", "output": "hi", "site": "a"},
        {"instruction": "add", "input": "1 2", "output": "3", "site": "b"},
        {"text": "plain text row", "site": "a"}])
    data = load_data(DataConfig(path=str(tmp_path), test_fraction=0.34), seed=0,
                     task="causal-lm")
    both = Examples.concat([data.train, data.test])
    pairs = sorted(both.item(i) for i in range(len(both)))
    template = DataConfig().prompt_template
    assert pairs == sorted([(template.format(instruction="say hi", input=""), "hi"),
                            (template.format(instruction="add", input="1 2"), "3"),
                            ("", "plain text row")])
    assert data.label_names == [] and sorted(data.train.fields["site"] + data.test.fields[
        "site"]) == ["a", "a", "b"]


@pytest.mark.parametrize("row, problem", [
    ({"instruction": "x", "output": 3}, "must be text"),
    ({"prompt": "x"}, "needs a text field 'text'"),
])
def test_a_malformed_row_is_named(tmp_path, row, problem):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError, match=f"row 2.*{problem}"):
        load_data(DataConfig(path=str(tmp_path)), seed=0, task="causal-lm")


@pytest.mark.parametrize("values, field", [
    ({"model.task": "causal-lm", "partition.scheme": "dirichlet"}, "partition.scheme"),
    ({"model.quantize": "4bit"}, "model.quantize"),
    ({"model.task": "causal-lm", "model.quantize": "2bit"}, "model.quantize"),
    ({"model.task": "seq2seq"}, "model.task"),
    ({"data.prompt_template": "{question} ->"}, "data.prompt_template"),
    ({"data.prompt_template": "no instruction here"}, "data.prompt_template"),
])
def test_bad_causal_lm_settings_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunConfig.from_mapping(values)


def test_the_ledger_tells_responses_apart():
    data = rows(4)
    other = Examples(texts=data.texts, labels=data.labels,
                     responses=[*data.responses[:3], "something else"])
    assert fingerprint(data) != fingerprint(other)
    assert fingerprint(data) == fingerprint(data.subset([3, 2, 1, 0]))
    assert json.dumps(list(data.item(0)))  # rows serialise as [prompt, response]
