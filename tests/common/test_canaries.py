"""Audit canaries: deterministic per seed, drawn from their own stream, only in audited runs."""

from __future__ import annotations

import random

import numpy as np
import torch

from fedtune.common.canaries import SECRET_PREFIX, make_canaries, with_canaries
from fedtune.common.config import CAUSAL_LM, CLASSIFICATION, AuditConfig, RunConfig
from fedtune.common.data import Examples
from fedtune.common.task import cached_task

TRAIN = Examples(texts=[f"the quick brown fox number {i} jumps" for i in range(30)],
                 labels=np.arange(30, dtype=np.int64) % 3)


def canaries(seed=0, **settings):
    return make_canaries(AuditConfig(enabled=True, **settings), seed, CLASSIFICATION, 3)


def test_the_same_seed_gives_the_same_canaries_and_draw_and_another_seed_does_not():
    a, b, c = canaries(0, canaries=200), canaries(0, canaries=200), canaries(1, canaries=200)
    assert a.rows.texts == b.rows.texts and np.array_equal(a.included, b.included)
    assert a.rows.texts != c.rows.texts and not np.array_equal(a.included, c.included)
    assert 60 < a.included.sum() < 140  # about half
    assert set(a.rows.labels.tolist()) == {0, 1, 2}
    words = [t.split() for t in a.rows.texts]  # a made-up word, repeated: no meaning but its label
    assert all(len(w) == 8 and len(set(w)) == 1 and len(w[0]) == 6 for w in words)
    assert len({w[0] for w in words}) == 200
    assert not set(a.rows.texts) & set(TRAIN.texts)


def test_the_inclusion_draw_depends_on_the_seed_only_and_touches_no_global_generator():
    states = (np.random.get_state()[1].copy(), torch.get_rng_state().clone(), random.getstate())
    short, long = canaries(3, canaries=100, length=2), canaries(3, canaries=100, length=12)
    assert np.array_equal(short.included, long.included)  # content is another child stream
    assert np.array_equal(np.random.get_state()[1], states[0])
    assert torch.equal(torch.get_rng_state(), states[1]) and random.getstate() == states[2]


def test_included_canaries_join_their_holders_rows_only():
    made = canaries(0, canaries=100, clients=3)
    assert made.holder.tolist()[:6] == [0, 1, 2, 0, 1, 2]
    joined = [with_canaries(TRAIN, made, client) for client in range(4)]
    for client, rows in enumerate(joined[:3]):
        expect = np.flatnonzero(made.included & (made.holder == client))
        assert rows.texts[:30] == TRAIN.texts and len(rows) == 30 + len(expect)
        assert rows.texts[30:] == [made.rows.texts[i] for i in expect]
    assert joined[3] is TRAIN  # a client without canaries keeps its rows as they are


def test_causal_lm_canaries_are_secrets_with_fresh_references():
    made = make_canaries(AuditConfig(enabled=True, canaries=50, references=30, length=6), 0,
                         CAUSAL_LM, 0)
    assert all(r.startswith(SECRET_PREFIX) and len(r.split()) == 4 + 6
               for r in made.rows.responses)
    assert len(made.references) == 30 and not set(made.references) & set(made.rows.responses)


def test_only_an_audited_task_adds_canaries(tiny_model_dir, toy_data_dir):
    base = RunConfig.from_mapping({"model.name": str(tiny_model_dir),
                                   "data.path": str(toy_data_dir),
                                   "federation.num_clients": 3})
    audited = base.with_overrides({"audit.enabled": True, "audit.canaries": 40,
                                   "audit.clients": 2})
    plain_task, audit_task = cached_task(base), cached_task(audited)
    draw = audit_task.canaries()
    for client in range(3):
        plain = plain_task.client_examples(base.partition, client, 3)
        rows, held_out = audit_task.client_examples(audited.partition, client, 3)
        added = int((draw.included & (draw.holder == client)).sum())
        assert rows.texts[:len(plain[0])] == plain[0].texts and held_out.texts == plain[1].texts
        assert len(rows) == len(plain[0]) + added and (added > 0) == (client < 2)
