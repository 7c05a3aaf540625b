"""server/fleet_limits.py: the proxy's limits follow the run's real adapter and federation."""

from __future__ import annotations

import pytest

from fedtune.common.config import RunConfig
from fedtune.common.task import build_task
from fedtune.server.fleet_limits import FRAMING, NODES_PER_ADDRESS, adapter_sizes, fleet_limits


def config(model_dir, data_dir, **overrides) -> RunConfig:
    return RunConfig().with_overrides({"model.name": str(model_dir), "data.path": str(data_dir),
                                       **overrides})


@pytest.mark.parametrize("overrides", [{}, {"model.pooling": "pooler"}, {"lora.freeze_a": True},
                                       {"lora.r": 16}, {"privacy.dp": True},
                                       {"privacy.dp": True, "lora.freeze_a": False}])
def test_the_meta_model_has_the_arrays_a_classifier_node_sends(tiny_model_dir, toy_data_dir,
                                                                overrides):
    run = config(tiny_model_dir, toy_data_dir, **overrides)

    sizes = adapter_sizes(run)

    sent = build_task(run).initial_adapter  # what a node's reply carries
    assert sorted(sizes) == sorted(a.size for a in sent.values())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_meta_model_has_the_arrays_a_causal_lm_node_sends(tiny_gpt2_dir, tiny_llama_dir,
                                                               instruction_data_dir, family):
    directory = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[family]
    run = config(directory, instruction_data_dir, **{"model.task": "causal-lm"})

    sizes = adapter_sizes(run)

    assert sorted(sizes) == sorted(a.size for a in build_task(run).initial_adapter.values())


@pytest.mark.parametrize("secagg", [True, False])
def test_the_body_limit_holds_the_largest_array_at_twice_its_width_and_no_more(
        tiny_model_dir, toy_data_dir, secagg):
    run = config(tiny_model_dir, toy_data_dir, **{"secagg.enabled": secagg})
    arrays = [a.size for a in build_task(run).initial_adapter.values()]
    largest = sum(arrays) if secagg else max(arrays)  # one masked vector, or array by array

    limits = fleet_limits(run)

    assert limits.largest_object == 8 * largest
    assert 8 * largest + FRAMING <= limits.body_bytes < 8 * largest + FRAMING + 1024
    assert limits.body_bytes % 1024 == 0


def test_a_bigger_adapter_or_federation_raises_only_what_it_needs(tiny_model_dir, toy_data_dir):
    small = fleet_limits(config(tiny_model_dir, toy_data_dir))

    ranked = fleet_limits(config(tiny_model_dir, toy_data_dir, **{"lora.r": 32}))
    crowded = fleet_limits(config(tiny_model_dir, toy_data_dir,
                                  **{"federation.num_clients": 200, "secagg.enabled": True}))

    assert ranked.body_bytes > small.body_bytes and ranked.burst == small.burst
    assert crowded.upstream == 4 * 200 > small.upstream
    assert crowded.largest_object == 1024 * 200  # secure aggregation's per-member records
    assert small.burst == NODES_PER_ADDRESS * 2 * small.message_objects
    assert (small.rate, small.connections) == (crowded.rate, crowded.connections)


def test_flowers_chunks_cap_the_body_whatever_the_model(tiny_model_dir, toy_data_dir,
                                                        monkeypatch):
    import flwr.common.constant as flower

    monkeypatch.setattr(flower, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 4000)
    run = config(tiny_model_dir, toy_data_dir, **{"federation.num_clients": 3,
                                                  "secagg.enabled": True})
    values = sum(a.size for a in build_task(run).initial_adapter.values())

    limits = fleet_limits(run)

    assert 8 * values > 4000 and limits.largest_object == 4000
    assert limits.message_objects > len(adapter_sizes(run)) * 2  # the chunks are requests too
