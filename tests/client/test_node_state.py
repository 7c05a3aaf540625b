"""A deployed node's calibrated noise, kept on its disk between message processes: used only
while the accountant confirms it, bounded, and never needed."""

from __future__ import annotations

import json

from fedtune.client import app as client_app
from fedtune.client.node_state import NOISE_FILE, NOISE_KEPT, NodeState
from fedtune.common import privacy
from tests.client.conftest import ledger_rounds, node_context, request, run_config
from tests.client.test_local_round import PLAIN_DP


def test_kept_noise_is_bounded_and_an_unreadable_file_is_no_noise(tmp_path):
    state = NodeState(tmp_path / "rounds")
    assert state.recall_noise("q") is None  # nothing kept yet
    for i in range(NOISE_KEPT + 5):
        state.keep_noise(f"q{i}", 1.0 + i)
    assert state.recall_noise("q0") is None and state.recall_noise(f"q{NOISE_KEPT + 4}") == \
        NOISE_KEPT + 5.0
    assert len(json.loads((tmp_path / "rounds" / NOISE_FILE).read_text())) == NOISE_KEPT
    (tmp_path / "rounds" / NOISE_FILE).write_text("{not json")
    assert state.recall_noise("q1") is None
    (tmp_path / "rounds" / NOISE_FILE).write_text('{"q": "1.5", "r": [2]}')
    assert state.recall_noise("q") is None and state.recall_noise("r") is None


def test_a_later_message_plans_with_the_noise_its_node_calibrated(tiny_model_dir, toy_data_dir,
                                                                  tmp_path, monkeypatch):
    config = run_config(tiny_model_dir, toy_data_dir, **{"federation.rounds": 2,
                                                          "train.local_steps": 1})
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **PLAIN_DP)
    client_app.train(request(config), context)
    assert (ledger / "rounds" / NOISE_FILE).exists()

    def no_search(*question):
        raise AssertionError(f"searched again for {question}")

    monkeypatch.setattr(privacy, "_searched_noise", no_search)  # as a new process: no cache
    client_app.train(request(config, **{"server-round": 2}), context)
    assert [r["round"] for r in ledger_rounds(ledger)] == [1, 2]


def test_a_kept_release_reads_back_as_kept_and_as_earlier_releases_wrote_it(tmp_path):
    import io

    import numpy as np

    from fedtune.client.node_state import Release

    state = NodeState(tmp_path / "rounds")
    release = Release({"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2))}, 40, 0.5)
    state.keep_release("k", release)
    back = state.release("k")
    assert back.examples == 40 and back.loss == 0.5 and sorted(back.arrays) == ["a", "b"]
    assert all(np.array_equal(back.arrays[n], release.arrays[n]) for n in release.arrays)
    buffer = io.BytesIO()  # the file layout a node upgraded mid-run may already hold
    meta = {"names": ["a", "b"], "examples": 40, "loss": 0.5}
    np.savez(buffer, __meta__=np.array(json.dumps(meta)), **release.arrays)
    assert state._path("release", "k").read_bytes() == buffer.getvalue()


def test_a_round_asked_again_with_its_defaults_written_out_gets_the_kept_release(
        tiny_model_dir, toy_data_dir, tmp_path):
    import numpy as np

    from fedtune.common import record_keys as keys
    from fedtune.common.adapter_state import from_record

    config = run_config(tiny_model_dir, toy_data_dir, **{"federation.rounds": 2,
                                                          "train.local_steps": 1})
    assert config.to_flat() != config.resolved().to_flat()  # zeros, as an earlier server sent
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **PLAIN_DP)
    first = client_app.train(request(config), context)
    again = client_app.train(request(config.resolved()), context)  # the upgraded server

    assert [r["round"] for r in ledger_rounds(ledger)] == [1]  # nothing spent twice
    sent, resent = (from_record(reply.content[keys.ARRAYS]) for reply in (first, again))
    assert sorted(sent) == sorted(resent)
    assert all(np.array_equal(sent[name], resent[name]) for name in sent)
