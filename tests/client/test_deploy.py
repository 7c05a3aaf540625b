"""`fedtune client`'s own lines: the policy as it runs, and the SuperNode's output kept short."""

from __future__ import annotations

from fedtune.client.deploy import _Brief, _describe
from fedtune.client.policy import NodePolicy

TRACEBACK = """Traceback (most recent call last):
  File "flwr/supernode/start_client_internal.py", line 188, in send
    http_response.raise_for_status()
During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "httpx/_models.py", line 829, in raise_for_status
httpx.HTTPStatusError: Client error '401 Unauthorized' for url 'https://h:9200/v1/fleet/x'
INFO:     Shutting down
""".splitlines(keepends=True)


def test_the_printed_policy_spells_out_its_defaults():
    shown = _describe(NodePolicy(budget_epsilon=8))
    assert "max-epsilon-per-run=half the budget" in shown and "delta=1e-05" in shown
    assert "planning-rows=0," not in shown and "accountant=," not in shown
    assert "budget-epsilon=8" in shown and "peers=none" in shown


def test_a_supernode_traceback_is_its_last_line_unless_verbose():
    brief = _Brief(verbose=False)
    shown = [x for x in (brief.line(line) for line in TRACEBACK) if x is not None]
    assert shown == ["SuperNode error: httpx.HTTPStatusError: Client error '401 Unauthorized' "
                     "for url 'https://h:9200/v1/fleet/x'\n", "INFO:     Shutting down\n"]
    verbose = _Brief(verbose=True)
    assert [verbose.line(line) for line in TRACEBACK] == TRACEBACK


def test_a_streak_of_connection_retries_is_shown_once():
    brief = _Brief(verbose=False)
    retry = "WARNING :   Connection attempt failed, retrying in 0.4 seconds\n"
    lines = [retry, retry.replace("0.4", "2.1"), "INFO :      SuperNode ID: 7\n", retry]
    assert [brief.line(x) for x in lines] == [
        "WARNING :   Connection attempt failed, retrying in 0.4 seconds (and again until it "
        "connects)\n", None, "INFO :      SuperNode ID: 7\n",
        "WARNING :   Connection attempt failed, retrying in 0.4 seconds (and again until it "
        "connects)\n"]
