"""The deployment's lifecycle as operators and hospitals live it (issue 30), on one loopback
federation: a server with a held-out split alone, stopped with SIGTERM mid-run and started again,
a run extended past the nodes' budgets (an abandoned round) after a crash, a node that raises its
budget and is admitted again; on the side, an unregistered node, busy ports, and the server's
console."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fedtune.common.ports import check_free
from fedtune.common.process_tree import alive, descendants
from fedtune.server.checkpoint import checkpoint_rounds
from fedtune.server.metrics_log import read_rounds
from tests.conftest import write_jsonl
from tests.deployment.test_deployment import Federation, wait_for

pytestmark = pytest.mark.slow

DP = "[privacy]\ndp = true\nepsilon = 8.0\n"
# these nodes let one run take their whole budget (no per-run or per-round cap below it), so an
# extension meets the budget itself; the budget follows
BUDGET = ("--allow-no-secagg", "--max-epsilon-per-run", "100", "--max-epsilon-per-round", "100",
          "--budget-epsilon")


def held_out_only(federation: Federation) -> None:
    """The server's data directory: the held-out split and the labels, no training rows."""
    data = federation.root / "server-data"
    data.mkdir()
    rows = [{"text": f"{w} held {i}", "label": i % 3}
            for i, w in enumerate(["alpha", "bravo", "charlie"] * 10)]
    write_jsonl(data / "test.jsonl", rows)
    (data / "labels.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    text = federation.config.read_text()
    federation.config.write_text(re.sub(r'path = ".*"', f'path = "{data}"', text, count=1))


def set_rounds(federation: Federation, rounds: int) -> None:
    text = federation.config.read_text()
    federation.config.write_text(re.sub(r"rounds = \d+", f"rounds = {rounds}", text))


def rounds_done(federation: Federation) -> list[int]:
    metrics = federation.state / "run" / "metrics.jsonl"
    return [r["round"] for r in read_rounds(federation.state / "run")] if metrics.exists() else []


def run_cli(federation: Federation, *args: object, home: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *map(str, args)],
                          capture_output=True, text=True, timeout=180,
                          env=federation.env(home), cwd=federation.root)


def test_stop_restart_extend_past_the_budget_and_raise_it(tmp_path, tiny_model_dir):
    federation = Federation(tmp_path, tiny_model_dir, rounds=2, timeout=120.0, extra=DP)
    held_out_only(federation)
    try:
        _lifecycle(federation)
    finally:
        federation.stop()


def _lifecycle(federation: Federation) -> None:
    # 1. A held-out-only server directory; two nodes whose budget is the run's epsilon.
    server = federation.server("a", "b", log="server-1.log")
    node_a = federation.client("a", policy=(*BUDGET, "8"))
    federation.client("b", policy=(*BUDGET, "8"))
    wait_for(lambda: "SuperLink ready" in federation.log("server-1.log"), 120, "the server")
    unknown = federation.client("d", policy=(*BUDGET, "8", "--wait-server", "15"))
    _busy_ports_are_one_line(federation, node_a)
    assert unknown.wait(timeout=300) == 1  # refused, started again, then it gives up
    log_d = federation.log("client-d.log")
    assert "starting the SuperNode again" in log_d
    assert "the server does not know this node" in log_d and "hospital-d.pub" in log_d

    # 2. SIGTERM mid-run: every process of the federation goes, the port is free.
    wait_for(lambda: checkpoint_rounds(federation.state / "run") == [1], 400, "round 1")
    tree = [server.pid, *descendants(server.pid)]
    assert len(tree) >= 5  # fedtune, SuperLink, SuperExec, ServerApp, nginx, flwr run
    stopped_at = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    assert time.monotonic() - stopped_at < 30
    assert not [pid for pid in tree if alive(pid)]
    check_free("127.0.0.1", federation.port, "--port")  # nothing listens there any more
    assert "fedtune: stopped (SIGTERM); started again, the run resumes after round 1" in \
        federation.log("server-1.log")

    # 3. The same command resumes: round 2, within the budget (the run's epsilon).
    resumed = federation.server("a", "b", log="server-2.log")
    assert resumed.wait(timeout=600) == 0, federation.log("server-2.log")[-3000:]
    assert rounds_done(federation) == [1, 2]
    assert "run directory: " in federation.log("server-2.log")
    _console_is_one_line_per_event(federation.log("server-2.log"))
    assert re.search(r"fedtune: round 2 of run \S+: epsilon spent \d\.\d{3} of budget 8 "
                     r"\(recorded before it trained\); ledger \S+ledger-a\S*\.json",
                     federation.log("client-a.log"))

    # 4. Extended by a round. The first try crashes (SIGKILL to its process group: no chance
    #    to stop its SuperLink and ServerApp); the next start stops what it left first. Both
    #    budgets are spent: the round is abandoned, and that is no success.
    set_rounds(federation, 3)
    crashed = federation.server("a", "b", log="server-3-crashed.log")
    wait_for(lambda: "Successfully started run" in federation.log("server-3-crashed.log"), 300,
             "the run to start")
    tree = [crashed.pid, *descendants(crashed.pid)]
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait()
    assert [pid for pid in tree if alive(pid)]  # the SuperLink at least goes on
    extended = federation.server("a", "b", log="server-3.log")
    assert extended.wait(timeout=600) == 1, federation.log("server-3.log")[-3000:]
    assert not [pid for pid in tree if alive(pid)]
    assert "an earlier fedtune server left running" in federation.log("server-3.log")
    row = read_rounds(federation.state / "run")[-1]
    assert row["round"] == 3 and row["clients"] == 0
    assert row["round_abandoned"] == "budget spent: hospital-a, hospital-b"
    assert row["clients_exhausted"] == ["hospital-a", "hospital-b"]
    log_3 = federation.log("server-3.log")
    assert "round 3/3  abandoned (budget spent: hospital-a, hospital-b)" in log_3
    assert "fedtune: error: round 3 was abandoned" in log_3

    # 5. hospital-a's operator raises its budget; the run, extended again, admits it.
    node_a.send_signal(signal.SIGTERM)
    assert node_a.wait(timeout=60) == 0
    federation.client("a", policy=(*BUDGET, "16"), log="client-a-raised.log")
    set_rounds(federation, 4)
    again = federation.server("a", "b", log="server-4.log")
    assert again.wait(timeout=600) == 0, federation.log("server-4.log")[-3000:]
    row = read_rounds(federation.state / "run")[-1]
    assert row["round"] == 4 and row["clients"] == 1 and "round_abandoned" not in row
    assert row["clients_exhausted"] == ["hospital-b"]
    (ledger,) = (federation.root / "ledger-a").glob("ledger-*.json")
    spent = json.loads(ledger.read_text())
    assert [r["round"] for r in spent["rounds"]] == [1, 2, 4]
    assert 8 < spent["epsilon"] <= 16


def _busy_ports_are_one_line(federation: Federation, node_a: subprocess.Popen) -> None:
    """A second server on the same port (and state), a second node on a node's --port."""
    second = run_cli(federation, "server", "--certs", federation.root / "certs", "--state",
                     federation.root / "state-other", "--config", federation.config,
                     "--port", federation.port, "--host", "127.0.0.1", "--node",
                     federation.root / "keys" / "hospital-a.pub", home="flwr-second")
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"port {federation.port} on 127.0.0.1 is already in use by nginx" in second.stderr
    assert "--port" in second.stderr
    wait_for(lambda: "Uvicorn running on" in federation.log("client-a.log"), 300,
             "hospital-a's SuperNode")
    node_port = int(re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)",
                              federation.log("client-a.log"))[1])
    twin = run_cli(federation, "client", "--server", f"127.0.0.1:{federation.port}",
                   "--root-cert", federation.root / "certs" / "ca.pem", "--node-key",
                   federation.root / "keys" / "hospital-b.key", "--data",
                   federation.root / "data-b", "--ledger", federation.root / "ledger-twin",
                   "--port", node_port, "--peers", federation.peers.directory, *BUDGET, "8",
                   home="flwr-twin")
    assert twin.returncode == 2 and twin.stderr.count("\n") == 1, twin.stderr
    assert f"port {node_port} on 127.0.0.1 is already in use" in twin.stderr
    assert "choose another --port" in twin.stderr
    assert node_a.poll() is None


def _console_is_one_line_per_event(log: str) -> None:
    """A redirected server log: no colour codes, no empty records, each line once."""
    assert "\x1b[" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert not [x for x in lines if re.fullmatch(r"\s*(INFO|WARNING|DEBUG)\s*:\s*", x)]
    repeated = {x for x in lines if lines.count(x) > 1}
    assert not repeated, repeated
    assert sum(x.startswith("round 2/2") for x in lines) == 1
    waiting = [x for x in lines if "Waiting for clients" in x]
    assert len(waiting) == len(set(waiting)) <= 3


SECURE = DP + "[secagg]\nenabled = true\n"


def test_a_node_added_as_documented_trains_with_pinned_peers(tmp_path, tiny_model_dir):
    # docs/deployment.md, "Add a node": a consortium of three, then hospital-d
    federation = Federation(tmp_path, tiny_model_dir, clients=3, rounds=1, extra=SECURE,
                            policy=("--budget-epsilon", "24"))  # cap 12: room to extend
    keys = tmp_path / "keys"
    founders = [keys / f"hospital-{n}.pub" for n in "abc"]
    assert run_cli(federation, "certs", "consortium", federation.peers.directory, "--force",
                   *founders, home="flwr-operator").returncode == 0
    try:
        first = federation.server("a", "b", "c", log="server-1.log")
        nodes = [federation.client(n) for n in "abc"]
        assert first.wait(timeout=900) == 0, federation.log("server-1.log")[-3000:]
        # 2. the operator bundles every key again, the new one included
        bundled = run_cli(federation, "certs", "consortium", federation.peers.directory,
                          "--force", *founders, keys / "hospital-d.pub", home="flwr-operator")
        assert bundled.returncode == 0, bundled.stderr
        # 3. every existing node restarts with the new bundle
        for node in nodes:
            node.send_signal(signal.SIGTERM)
            assert node.wait(timeout=60) == 0
        for name in "abc":
            federation.client(name, log=f"client-{name}-2.log")
        # 4. the server's command gains hospital-d (here the run also waits for four nodes);
        # 5. the new node joins
        set_rounds(federation, 2)
        text = federation.config.read_text()
        federation.config.write_text(text.replace("num_clients = 3", "num_clients = 4"))
        federation.client("d")
        again = federation.start(
            "server-2.log", "server", "--certs", tmp_path / "certs", "--state", federation.state,
            "--config", federation.config, "--port", federation.port, "--host", "127.0.0.1",
            *[a for n in "abcd" for a in ("--node", keys / f"hospital-{n}.pub")],
            "--accept-config-change", home="flwr-server")
        assert again.wait(timeout=900) == 0, federation.log("server-2.log")[-3000:]
    finally:
        federation.stop()
    rows = read_rounds(federation.state / "run")
    assert [(r["round"], r["clients"]) for r in rows] == [(1, 3), (2, 4)]
    assert "round_abandoned" not in rows[-1]
    (ledger,) = (tmp_path / "ledger-d").glob("ledger-*.json")
    assert [r["round"] for r in json.loads(ledger.read_text())["rounds"]] == [2]
