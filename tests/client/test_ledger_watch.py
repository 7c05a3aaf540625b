"""A node's log says each round its ledger recorded, the epsilon spent and where the ledger is."""

from __future__ import annotations

import json

from fedtune.client.ledger_watch import LedgerWatch


def write(path, rounds):
    path.write_text(json.dumps({"version": 1, "rounds": [
        {"run": "/srv/state/run", "client": "hospital-a", "round": r, "epsilon": e}
        for r, e in rounds]}))


def test_each_new_round_is_one_line_once(tmp_path):
    ledger = tmp_path / "ledger-abc.json"
    write(ledger, [(1, 2.5)])  # from an earlier run: not news
    watch = LedgerWatch(tmp_path, budget=8.0)
    assert watch.new_rounds() == []

    write(ledger, [(1, 2.5), (2, 3.25), (3, 3.9)])

    assert watch.new_rounds() == [
        f"fedtune: round {r} of run /srv/state/run: epsilon spent {e} of budget 8 (recorded "
        f"before it trained); ledger {ledger.resolve()}" for r, e in ((2, "3.250"), (3, "3.900"))]
    assert watch.new_rounds() == []


def test_a_new_or_unreadable_ledger_is_no_error(tmp_path):
    watch = LedgerWatch(tmp_path / "not-yet", budget=None)
    (tmp_path / "not-yet").mkdir()
    (tmp_path / "not-yet" / "ledger-x.json").write_text("{not json")
    assert watch.new_rounds() == []
    write(tmp_path / "not-yet" / "ledger-x.json", [(1, 1.0)])
    assert watch.new_rounds()[0].startswith("fedtune: round 1 of run /srv/state/run: epsilon "
                                            "spent 1.000 (recorded")
