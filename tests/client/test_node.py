"""What a deployed node is: its rows split by its own key, row by row."""

from __future__ import annotations

import numpy as np

from fedtune.client.node import keyed_held_out


def rows(count: int, start: int = 0) -> list[dict]:
    return [{"text": f"row {i}", "label": i % 3} for i in range(start, start + count)]


def test_adding_a_row_moves_no_other_row_between_training_and_held_out():
    # Prepare: a data set and its neighbour with one more row
    base, grown = rows(500), rows(501)
    # Execute
    held, held_grown = keyed_held_out(base, 0.2, key=7), keyed_held_out(grown, 0.2, key=7)
    # Assert: the first 500 rows keep their sides; about a fifth is held out
    np.testing.assert_array_equal(held, held_grown[:500])
    assert 0.14 < held.mean() < 0.26
    assert not np.array_equal(held, keyed_held_out(base, 0.2, key=8))  # the key decides
    assert not keyed_held_out(base, 0.0, key=7).any()


def test_the_split_keys_on_the_stored_record_not_on_what_the_servers_template_makes_of_it(
        tmp_path):
    # a server cycling prompt templates must not move training rows into the held-out set it
    # may ask about (the reviewer's probe: three templates, three held-out sets)
    from fedtune.client.node import Node, node_examples
    from fedtune.client.policy import NodePolicy
    from fedtune.common.config import RunConfig
    from tests.conftest import instruction_rows, write_jsonl

    records = [{**row, "id": f"r{i}"} for i, row in enumerate(instruction_rows(60))]
    write_jsonl(tmp_path / "train.jsonl", records)
    node = Node(name="n", policy=NodePolicy(test_fraction=0.3, budget_epsilon=8.0),
                data_path=str(tmp_path))
    held_ids = []
    for template in ("{instruction}\n{input}\n", "Q: {input} ({instruction}) A:",
                     "{input}{instruction}"):
        config = RunConfig().with_overrides({"model.task": "causal-lm",
                                             "data.prompt_template": template})
        train, held = node_examples(node, None, config)
        assert len(train) + len(held) == 60 and 0 < len(held) < 60
        held_ids.append(held.fields["id"])
    assert held_ids[0] == held_ids[1] == held_ids[2]
