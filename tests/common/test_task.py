"""A local round starts one way everywhere (`Task.start_round`) and trains as `train` says."""

from __future__ import annotations

import numpy as np
import torch

from fedtune.common.adapter import trainable_state
from fedtune.common.config import RunConfig
from fedtune.common.task import cached_task


def one_round(task, config, seed: int) -> tuple[dict[str, np.ndarray], int]:
    rows = task.client_examples(config.partition, 0, 2)[0]
    loader, optimizer = task.start_round(task.initial_adapter, rows, config.training,
                                         dropout_seed=seed, sampling_seed=seed)
    stats = task.train_plain(loader, optimizer, config.training)
    return trainable_state(task.model), stats.steps


def test_a_round_starts_from_the_given_state_and_repeats_with_its_seeds(tiny_model_dir,
                                                                        toy_data_dir):
    config = RunConfig.from_mapping({"model.name": str(tiny_model_dir),
                                     "data.path": str(toy_data_dir),
                                     "federation.num_clients": 2, "train.local_steps": 3,
                                     "train.batch_size": 4})
    task = cached_task(config)
    first, steps = one_round(task, config, seed=1)
    again, _ = one_round(task, config, seed=1)  # starts over from the initial adapter
    other, _ = one_round(task, config, seed=2)
    assert steps == 3
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    assert any(not np.array_equal(first[k], task.initial_adapter[k]) for k in first)


def test_evaluation_passes_are_the_runs_batch_not_the_cached_tasks(tiny_model_dir, toy_data_dir,
                                                                  monkeypatch):
    # the cached task keeps only what shapes data and model: the batch comes from the run
    from fedtune.server.evaluation import evaluate_centrally

    config = RunConfig.from_mapping({"model.name": str(tiny_model_dir),
                                     "data.path": str(toy_data_dir), "train.batch_size": 5})
    task = cached_task(config)
    sizes = []
    made = task.loader

    def loader(rows, *, batch_size, shuffle, **kwargs):
        sizes.append(batch_size)
        return made(rows, batch_size=batch_size, shuffle=shuffle, **kwargs)

    monkeypatch.setattr(task, "loader", loader)
    assert config.evaluation_batch == 5
    evaluate_centrally(task, task.initial_adapter, config.evaluation_batch)
    private = config.with_overrides({"privacy.dp": True, "train.batch_size": 512,
                                     "train.physical_batch": 16})
    assert private.evaluation_batch == 16  # a DP-SGD batch is a logical one: its chunks
    evaluate_centrally(task, task.initial_adapter, private.evaluation_batch)
    assert sizes == [5, 16]


def test_the_cached_task_builds_the_adapter_the_run_resolves(tiny_model_dir, toy_data_dir):
    # the cache key rebuilds the config from a few sections: FFA-LoRA's default must survive it
    from fedtune.common.task import build_task
    from fedtune.server.fleet_limits import adapter_sizes

    base = {"model.name": str(tiny_model_dir), "data.path": str(toy_data_dir)}
    for settings, frozen in (({"privacy.dp": True}, True), ({}, False),
                             ({"privacy.dp": True, "lora.freeze_a": False}, False)):
        config = RunConfig.from_mapping({**base, **settings})
        sent = cached_task(config).initial_adapter  # what a node trains and sends
        assert any("lora_A" in k for k in sent) is not frozen, settings
        assert any("lora_B" in k for k in sent)
        assert sorted(a.size for a in sent.values()) == sorted(adapter_sizes(config))
        assert sent.keys() == build_task(config).initial_adapter.keys()


def dropout_run(model_dir, data_dir) -> RunConfig:
    return RunConfig.from_mapping({"model.name": str(model_dir), "data.path": str(data_dir),
                                   "federation.num_clients": 2, "train.local_steps": 2,
                                   "train.batch_size": 4, "train.dropout": False})


def dropout_rates(model: torch.nn.Module) -> dict[str, float]:
    return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


def test_train_dropout_false_trains_with_every_dropout_layer_at_zero_and_true_restores_them(
        tiny_model_dir, toy_data_dir):
    config = dropout_run(tiny_model_dir, toy_data_dir)
    task = cached_task(config)
    built = dropout_rates(task.model)
    for part in ("encoder", "lora_dropout", "base_model.model.dropout"):  # the head reads this
        assert any(part in name and p > 0 for name, p in built.items()), part
    batch = next(iter(task.loader(task.data.test, batch_size=4, shuffle=False)))

    def two_training_passes():
        task.model.train()
        with torch.no_grad():
            return [task.model(**batch).logits for _ in range(2)]

    one_round(task, config, seed=1)
    assert set(dropout_rates(task.model).values()) == {0.0}
    first, second = two_training_passes()
    assert torch.equal(first, second)  # nothing dropped

    one_round(task, config.with_overrides({"train.dropout": True}), seed=1)
    assert dropout_rates(task.model) == built
    first, second = two_training_passes()
    assert not torch.equal(first, second)


def test_dropout_false_trains_as_rates_zeroed_when_the_model_was_built(tiny_model_dir,
                                                                       toy_data_dir, monkeypatch):
    # dp_levers.json's first train.dropout=false figures came from rates set to 0 at build
    import fedtune.common.task as task_module

    config = dropout_run(tiny_model_dir, toy_data_dir)
    task = cached_task(config)
    by_setting, _ = one_round(task, config, seed=3)

    monkeypatch.setattr(task_module, "set_dropout", lambda model, enabled: None)
    for module in task.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    zeroed, _ = one_round(task, config, seed=3)
    assert all(np.array_equal(by_setting[k], zeroed[k]) for k in by_setting)
