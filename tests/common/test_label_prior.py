"""`model.head_init = "label_names"`: the head starts as a zero-shot classifier over the label
names, the same in every process, and nothing else of the initial adapter moves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedtune.common import label_prior
from fedtune.common.config import ConfigError, RunConfig
from fedtune.common.data import DataError
from fedtune.common.label_prior import LOGIT_SCALE, named, readable
from fedtune.common.run_dir import migrated
from fedtune.common.task import build_task
from tests.conftest import write_jsonl

NAMES = ["card_arrival", "exchange rate", "lost or stolen phone"]


@pytest.fixture()
def named_data(tmp_path):
    rows = [{"text": f"{readable(NAMES[i % 3])}", "label": i % 3} for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", rows[:24])
    write_jsonl(tmp_path / "test.jsonl", rows[24:])
    (tmp_path / "labels.json").write_text(json.dumps(dict(enumerate(NAMES))))
    return tmp_path


def task_for(model_dir, data_dir, head_init: str, seed: int = 0, **settings):
    return build_task(RunConfig.from_mapping({
        "model.name": str(model_dir), "data.path": str(data_dir), "model.head_init": head_init,
        "seed": seed, **settings}))


def head(task) -> tuple[np.ndarray, np.ndarray]:
    weight = next(v for k, v in task.initial_adapter.items() if "classifier" in k
                  and k.endswith("weight"))
    bias = next(v for k, v in task.initial_adapter.items() if "classifier" in k
                and k.endswith("bias"))
    return weight, bias


def test_each_row_is_the_scaled_unit_reading_of_its_name_and_a_name_reads_as_its_label(
        tiny_model_dir, named_data):
    task = task_for(tiny_model_dir, named_data, "label_names")
    weight, bias = head(task)
    assert np.allclose(np.linalg.norm(weight, axis=1), LOGIT_SCALE, rtol=1e-5)
    assert not bias.any()
    # a text that is a label's name lies nearest that name: the untrained model answers it
    model, rows = task.model.eval(), task.data.test
    batch = task.tokenizer([readable(n) for n in NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    assert logits.argmax(-1).tolist() == [0, 1, 2]
    assert task.evaluate(rows, 8).accuracy == 1.0


def test_the_prior_is_the_same_in_every_process_and_moves_nothing_but_the_head(
        tiny_model_dir, named_data):
    prior, again = (task_for(tiny_model_dir, named_data, "label_names") for _ in range(2))
    plain = task_for(tiny_model_dir, named_data, "random")
    for key, value in prior.initial_adapter.items():
        assert np.array_equal(value, again.initial_adapter[key])
        head_weight = "classifier" in key and key.endswith("weight")  # (both biases are 0)
        assert np.array_equal(value, plain.initial_adapter[key]) != head_weight, key
    # the seed moves LoRA, not the names' rows
    other_seed = task_for(tiny_model_dir, named_data, "label_names", seed=1)
    assert np.array_equal(head(prior)[0], head(other_seed)[0])


def test_numbered_labels_start_random(tiny_model_dir, toy_data_dir):
    (toy_data_dir / "labels.json").unlink()  # labels 0, 1, 2 with no names
    prior = task_for(tiny_model_dir, toy_data_dir, "label_names")
    plain = task_for(tiny_model_dir, toy_data_dir, "random")
    assert prior.data.label_names == ["0", "1", "2"] and not named(prior.data.label_names)
    assert all(np.array_equal(v, plain.initial_adapter[k])
               for k, v in prior.initial_adapter.items())


def test_dp_sgd_starts_from_the_names_by_default_plain_training_at_random():
    plain, dp = RunConfig(), RunConfig.from_mapping({"privacy.dp": True})
    assert plain.head_init == "random" and dp.head_init == "label_names"
    assert dp.resolved().model.head_init == "label_names"  # written out for every node
    lm = RunConfig.from_mapping({"privacy.dp": True, "model.task": "causal-lm"})
    assert lm.head_init == "random"  # no head
    chosen = RunConfig.from_mapping({"privacy.dp": True, "model.head_init": "random"})
    assert chosen.head_init == "random"


def test_an_unknown_start_is_refused_and_a_saved_run_keeps_its_random_head(tmp_path):
    from fedtune.server.config_guard import changed_keys, restarted

    with pytest.raises(ConfigError, match=r"model\.head_init"):
        RunConfig.from_mapping({"model.head_init": "names"})
    # a DP-SGD run saved before the key existed started at random; resumed, it stays so
    before = RunConfig.from_mapping({"privacy.dp": True}).resolved().to_dict()
    del before["model"]["head_init"]
    saved = RunConfig.from_mapping(migrated(before))
    assert saved.head_init == "random"
    again = RunConfig.from_mapping({"privacy.dp": True})
    assert restarted(saved, again).head_init == "random" and not changed_keys(saved, again)


def test_names_read_a_few_at_a_time_and_a_long_one_in_a_capped_number_of_tokens(
        tiny_model_dir, named_data, monkeypatch):
    whole = head(task_for(tiny_model_dir, named_data, "label_names"))[0]
    monkeypatch.setattr(label_prior, "NAMES_PER_PASS", 2)
    assert np.allclose(head(task_for(tiny_model_dir, named_data, "label_names"))[0], whole,
                       atol=1e-5)
    names = json.loads((named_data / "labels.json").read_text())
    names["1"] = " ".join(["exchange rate"] * 2000)
    (named_data / "labels.json").write_text(json.dumps(names))
    # a run's max_length past the tiny model's 128 positions: the name is read in 64 tokens
    long = head(task_for(tiny_model_dir, named_data, "label_names",
                         **{"model.max_length": 512}))[0]
    assert np.isfinite(long).all() and np.allclose(np.linalg.norm(long, axis=1), LOGIT_SCALE)


def test_a_pooler_head_starts_at_random_and_cannot_be_asked_for_names():
    pooler = RunConfig.from_mapping({"privacy.dp": True, "model.pooling": "pooler"})
    assert pooler.head_init == "random"
    with pytest.raises(ConfigError, match=r"model\.head_init"):
        RunConfig.from_mapping({"model.pooling": "pooler", "model.head_init": "label_names"})


def test_a_label_name_that_is_no_text_is_a_data_error(tiny_model_dir, named_data):
    (named_data / "labels.json").write_text('{"0": "a", "1": "\\ud800", "2": "c"}')
    with pytest.raises(DataError, match=r"labels\.json"):
        task_for(tiny_model_dir, named_data, "label_names")


def test_a_deployed_node_never_reads_its_label_names(tiny_model_dir, named_data):
    from fedtune.client.node import Node, node_task
    from fedtune.client.policy import NodePolicy

    asked = RunConfig.from_mapping({"model.name": str(tiny_model_dir), "privacy.dp": True,
                                    "data.path": "/the/servers/path"}).resolved()
    assert asked.head_init == "label_names"
    node = Node(name="n", policy=NodePolicy(budget_epsilon=8.0), data_path=str(named_data))
    task = node_task(node, asked)
    plain = task_for(tiny_model_dir, named_data, "random")
    assert all(np.array_equal(v, plain.initial_adapter[k]) for k, v in head_entries(task))


def head_entries(task):
    return [(k, v) for k, v in task.initial_adapter.items() if "classifier" in k]
