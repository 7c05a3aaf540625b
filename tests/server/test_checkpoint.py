import numpy as np
import pytest

from fedtune.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_fits,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedtune.server.metrics_log import append_round, keep_rounds_up_to, read_rounds


def test_latest_checkpoint_round_trips_arrays_and_state(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for r in (1, 2, 10):
        save_checkpoint(tmp_path, Checkpoint(round=r, arrays=arrays, state={"rng": {"r": r}}))
    latest = latest_checkpoint(tmp_path)
    assert latest.round == 10 and latest.state == {"rng": {"r": 10}}
    np.testing.assert_array_equal(latest.arrays["w"], arrays["w"])
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_server_optimiser_moments_round_trip_and_an_older_checkpoint_has_none(tmp_path):
    arrays = {"w": np.ones(3, dtype=np.float32)}
    moments = {"m/w": np.full(3, 0.5, np.float32), "v/w": np.full(3, 0.25, np.float32)}
    save_checkpoint(tmp_path, Checkpoint(round=1, arrays=arrays, state={}, optimizer=moments))
    save_checkpoint(tmp_path / "older", Checkpoint(round=1, arrays=arrays, state={}))
    loaded = latest_checkpoint(tmp_path)
    assert sorted(loaded.optimizer) == ["m/w", "v/w"]
    np.testing.assert_array_equal(loaded.optimizer["v/w"], moments["v/w"])
    assert latest_checkpoint(tmp_path / "older").optimizer == {}


def test_no_checkpoint_means_none_and_a_torn_file_is_named(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    torn = tmp_path / "round-0001.pt"
    torn.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"round-0001\.pt is unreadable"):
        load_checkpoint(torn)


def test_metrics_rows_after_the_resumed_round_are_dropped(tmp_path):
    for r in (1, 2, 3):
        append_round(tmp_path, {"round": r, "accuracy": r / 10})
    keep_rounds_up_to(tmp_path, 2)
    assert [row["round"] for row in read_rounds(tmp_path)] == [1, 2]


def test_a_checkpoint_of_another_model_setup_is_refused_by_name(tmp_path):
    adapter = {"encoder.lora_A": np.zeros((4, 8), np.float32), "head": np.zeros(3, np.float32)}
    check_fits(Checkpoint(round=1, arrays=dict(adapter), state={}), adapter, tmp_path)
    renamed = {"bert.lora_A": adapter["encoder.lora_A"], "head": adapter["head"]}
    with pytest.raises(CheckpointError, match=r"model\.pooling changed.*missing \['encoder"):
        check_fits(Checkpoint(round=1, arrays=renamed, state={}), adapter, tmp_path)
    wider = {**adapter, "encoder.lora_A": np.zeros((8, 8), np.float32)}
    shape = r"tensor encoder\.lora_A has shape \(8, 8\), expected \(4, 8\)"
    with pytest.raises(CheckpointError, match=shape):
        check_fits(Checkpoint(round=1, arrays=wider, state={}), adapter, tmp_path)
