import json
import multiprocessing
import os
import time

import numpy as np
import pytest

from fedtune.client.ledger import BudgetExhausted, Ledger, LedgerError, fingerprint
from fedtune.common.data import Examples
from fedtune.common.privacy import GaussianEvent
from tests.common.test_privacy import independent_epsilon

ROUND = GaussianEvent(noise_multiplier=1.2, sample_rate=0.1, steps=10)


def rows(n: int = 50, start: int = 0) -> Examples:
    return Examples(texts=[f"record {i}" for i in range(start, start + n)],
                    labels=np.arange(n) % 3)


def open_ledger(directory, data: Examples | None = None) -> Ledger:
    data = data or rows()
    return Ledger.open(directory, fingerprint(data), len(data), 1e-3, "rdp")


def test_epsilon_equals_an_independent_accountant_over_the_same_history(tmp_path):
    ledger = open_ledger(tmp_path)
    for server_round in (1, 2, 3):
        entry = ledger.record("run-a", "client-0", server_round, ROUND)
        assert entry.epsilon == pytest.approx(
            independent_epsilon(1.2, 0.1, 10 * server_round, 1e-3), rel=1e-9)
    stored = json.loads(ledger.path.read_text())
    assert stored["epsilon"] == pytest.approx(ledger.spent())
    assert [r["round"] for r in stored["rounds"]] == [1, 2, 3]


def test_a_restarted_node_continues_its_ledger(tmp_path):
    first = open_ledger(tmp_path)
    first.record("run-a", "client-0", 1, ROUND)
    restarted = open_ledger(tmp_path)  # a new process reads the file again
    assert restarted.spent() == pytest.approx(first.spent())
    assert restarted.epsilon_after(ROUND) > restarted.spent() > 0
    restarted.record("run-b", "hospital-a", 1, ROUND)  # same data, another run: one budget
    assert len(open_ledger(tmp_path).entries) == 2


def test_a_crash_between_write_and_rename_keeps_the_previous_ledger(tmp_path, monkeypatch):
    ledger = open_ledger(tmp_path)
    ledger.record("run-a", "client-0", 1, ROUND)
    before = ledger.path.read_bytes()

    def crash(*_args):
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        ledger.record("run-a", "client-0", 2, ROUND)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [ledger.path.name]  # no temp file left
    assert len(open_ledger(tmp_path).entries) == 1


@pytest.mark.parametrize("damage", ["{ not json", '{"version": 99}',
                                    '{"version": 1, "fingerprint": "%s", "delta": 0.001}'])
def test_a_corrupt_ledger_refuses_to_train_and_is_left_as_it_is(tmp_path, damage):
    path = open_ledger(tmp_path).path
    body = damage % fingerprint(rows()) if "%s" in damage else damage
    path.write_text(body)
    with pytest.raises(LedgerError, match="refusing to train"):
        open_ledger(tmp_path)
    assert path.read_text() == body


def test_a_ledger_for_other_data_is_refused_and_one_read_at_another_delta_keeps_its_history(
        tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.record("run-a", "client-0", 1, ROUND)
    other = rows(50, start=1000)
    moved = tmp_path / f"ledger-{fingerprint(other)[:32]}.json"
    ledger.path.rename(moved)
    with pytest.raises(LedgerError, match="other data"):
        open_ledger(tmp_path, other)
    moved.rename(ledger.path)
    stricter = Ledger.open(tmp_path, fingerprint(rows()), 50, 1e-7, "rdp")
    assert len(stricter.entries) == 1 and stricter.spent() > ledger.spent()


def test_fingerprint_ignores_row_order_but_not_content():
    data = rows()
    shuffled = data.subset(np.random.default_rng(0).permutation(len(data)))
    assert fingerprint(shuffled) == fingerprint(data)
    assert fingerprint(rows(49)) != fingerprint(data)
    relabelled = Examples(texts=data.texts, labels=(data.labels + 1) % 3)
    assert fingerprint(relabelled) != fingerprint(data)


def test_a_ledger_kept_with_another_accountant_is_refused(tmp_path):
    open_ledger(tmp_path).record("run-a", "client-0", 1, ROUND)
    with pytest.raises(LedgerError, match="'rdp' accountant, this node asks 'prv'"):
        Ledger.open(tmp_path, fingerprint(rows()), 50, 1e-3, "prv")


def test_spend_refuses_a_round_past_the_budget_and_records_nothing(tmp_path):
    ledger = open_ledger(tmp_path)
    first = ledger.spend("run-a", "client-0", 1, ROUND, budget=100.0)
    budget = (first.epsilon + ledger.epsilon_after(ROUND)) / 2  # one round fits, two do not
    with pytest.raises(BudgetExhausted) as refused:
        open_ledger(tmp_path).spend("run-b", "client-0", 1, ROUND, budget=budget)
    assert refused.value.spent == pytest.approx(first.epsilon)
    assert len(open_ledger(tmp_path).entries) == 1


def test_spend_reads_the_file_again_so_a_stale_view_cannot_pass_the_budget(tmp_path):
    early, late = open_ledger(tmp_path), open_ledger(tmp_path)  # two runs open the same ledger
    early.spend("run-a", "client-0", 1, ROUND, budget=100.0)
    budget = (early.spent() + early.epsilon_after(ROUND)) / 2  # room for one round, not two
    with pytest.raises(BudgetExhausted):
        late.spend("run-b", "client-0", 1, ROUND, budget=budget)  # late saw an empty ledger
    assert [e.run for e in open_ledger(tmp_path).entries] == ["run-a"]


def _spend_many(directory: str, run: str, count: int, start: float) -> None:
    while time.time() < start:  # every process begins at once
        time.sleep(0.001)
    ledger = open_ledger(directory)
    for server_round in range(1, count + 1):
        ledger.spend(run, "client-0", server_round, ROUND, budget=1e9)


def test_processes_spending_from_one_ledger_at_once_lose_nothing(tmp_path):
    count, start = 15, time.time() + 1.0
    context = multiprocessing.get_context("spawn")  # separate interpreters, as real nodes
    workers = [context.Process(target=_spend_many, args=(str(tmp_path), f"run-{i}", count, start))
               for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    entries = open_ledger(tmp_path).entries
    assert sorted((e.run, e.round) for e in entries) == sorted(
        (f"run-{i}", r) for i in range(3) for r in range(1, count + 1))
    assert entries[-1].epsilon == pytest.approx(
        independent_epsilon(1.2, 0.1, 10 * 3 * count, 1e-3), rel=1e-9)
