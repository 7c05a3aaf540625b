"""A deployment that lets no one in: only the Fleet API faces the network, and a node runs only
the app it approved. Real `fedtune server` and `fedtune client` processes on loopback, started by
path from a virtual environment that is not on PATH (as an operator's service would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common.app_bundle import APP_DIR, app_digest
from fedtune.common.ports import free_local_port
from fedtune.server.metrics_log import read_rounds
from tests.deployment.test_deployment import Federation, wait_for

pytestmark = pytest.mark.slow
FEDTUNE = Path(sys.executable).parent / "fedtune"  # the venv's script, called by its path
OUTSIDER_COMMANDS = {
    "ls": ["ls"],
    "register": ["supernode", "register", "keys/hospital-c.pub"],
    "run": ["run", str(APP_DIR)],
    "stop": ["stop", "{run_id}"],
}


def unactivated_env(federation: Federation, home: str) -> dict[str, str]:
    """No venv on PATH: Flower's children must still find their tools (issue 15)."""
    env = federation.env(home)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return env


def start_by_path(federation: Federation, log: str, *args: object, home: str,
                  cwd: Path | None = None, command: list[str] | None = None) -> subprocess.Popen:
    handle = (federation.root / log).open("ab")
    proc = subprocess.Popen([*(command or [str(FEDTUNE)]), *map(str, args)], stdout=handle,
                            stderr=subprocess.STDOUT, env=unactivated_env(federation, home),
                            cwd=cwd, start_new_session=True)
    federation.procs.append(proc)
    return proc


def server_args(federation: Federation, *nodes: str) -> list[object]:
    keys = [a for n in nodes for a in ("--node", federation.root / "keys" / f"hospital-{n}.pub")]
    return ["server", "--certs", federation.root / "certs", "--state", federation.state,
            "--config", federation.config, "--port", federation.port, "--host", "127.0.0.1",
            *keys]


def client_args(federation: Federation, name: str) -> list[object]:
    return ["client", "--server", f"127.0.0.1:{federation.port}", "--root-cert",
            federation.root / "certs" / "ca.pem", "--node-key",
            federation.root / "keys" / f"hospital-{name}.key", "--data",
            federation.root / f"data-{name}", "--ledger", federation.root / f"ledger-{name}",
            "--port", free_local_port(), "--peers", federation.peers.directory, "--models",
            federation.model_dir, "--planning-rows", "40", *federation.policy]


def flwr(federation: Federation, home: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args],
                          cwd=federation.root, capture_output=True, text=True, timeout=120,
                          env=federation.env(home))


def outsider_home(federation: Federation) -> str:
    """A Flower configuration holding only the public CA certificate and the public port."""
    home = federation.root / "flwr-outsider"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "127.0.0.1:{federation.port}"\n'
        f'root-certificates = "{federation.root / "certs" / "ca.pem"}"\n')
    return "flwr-outsider"


def test_outsiders_control_nothing_and_the_registered_nodes_complete_the_run(tmp_path,
                                                                           tiny_model_dir):
    federation = Federation(tmp_path, tiny_model_dir, rounds=2)
    try:
        server = start_by_path(federation, "server.log", *server_args(federation, "a", "b"),
                               home="flwr-server")
        wait_for(lambda: "Fleet API on" in federation.log("server.log"), 120, "the server")
        for name in "ab":
            start_by_path(federation, f"client-{name}.log", *client_args(federation, name),
                          home=f"flwr-{name}")
        # The operator, on the server machine, reaches the Control API on loopback ...
        operator = os.path.relpath(federation.state / "flwr-home", federation.root)
        wait_for(lambda: '"run-id"' in flwr(federation, operator, "ls", "--format",
                                            "json").stdout, 120, "the run to be listed")
        listed = json.loads(flwr(federation, operator, "ls", "--format", "json").stdout)
        run_id = listed["runs"][0]["run-id"]
        # ... an outsider with the public CA certificate reaches none of it on the public port.
        outsider = outsider_home(federation)
        refused = {name: flwr(federation, outsider, *(a.format(run_id=run_id) for a in args))
                   for name, args in OUTSIDER_COMMANDS.items()}
        assert server.wait(timeout=600) == 0, federation.log("server.log")[-3000:]
    finally:
        federation.stop()
    for name, done in refused.items():
        assert done.returncode != 0, f"outsider's `flwr {name}` succeeded: {done.stdout}"
    assert len(listed["runs"]) == 1  # the outsider's `flwr run` added nothing
    rows = read_rounds(federation.state / "run")
    assert [r["round"] for r in rows] == [1, 2]  # `flwr stop` did not stop it
    assert sorted(rows[-1]["client_accuracy"]) == ["hospital-a", "hospital-b"]
    access = (federation.state / "fleet-proxy" / "access.log").read_text()
    control = [line.split() for line in access.splitlines() if "/v1/control/" in line]
    # answered by nginx itself (404, or 413 for `flwr run`'s bundle), never by the SuperLink
    assert control and all(w[6] in ("404", "413") and w[-1] == "-" for w in control)


def other_app(root: Path) -> Path:
    """The same fedtune with one changed line: a different app a server might submit."""
    copy = root / "other-app"
    for part in ("fedtune", "common", "client", "server", "simulations"):
        shutil.copytree(APP_DIR / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(APP_DIR / name, copy)
    with (copy / "client" / "app.py").open("a") as handle:
        handle.write("# not the app the hospitals approved\n")
    return copy


def test_a_node_refuses_an_app_other_than_the_approved_one_and_the_run_reports_it(
        tmp_path, tiny_model_dir):
    federation = Federation(tmp_path, tiny_model_dir, rounds=1, timeout=20.0)
    copy = other_app(tmp_path)
    approved, submitted = app_digest(), app_digest(copy)
    try:
        # the server runs (and submits) the changed copy; the nodes pin the app installed here
        server = start_by_path(federation, "server.log", "-m", "fedtune",
                               *server_args(federation, "a", "b"), home="flwr-server",
                               cwd=copy, command=[sys.executable])
        wait_for(lambda: "Fleet API on" in federation.log("server.log"), 120, "the server")
        for name in "ab":
            start_by_path(federation, f"client-{name}.log", *client_args(federation, name),
                          home=f"flwr-{name}")
        assert server.wait(timeout=400) == 1
    finally:
        federation.stop()
    server_log = federation.log("server.log")
    assert f"app sha256:{submitted}" in server_log and approved != submitted
    # nodes are named by their keys (no message needed): the round goes out, nobody answers
    assert "fedtune: error: round 1 was abandoned" in server_log
    for name in "ab":
        node_log = federation.log(f"client-{name}.log")
        assert f"fedtune: refused app sha256:{submitted}" in node_log
        assert f"runs only sha256:{approved}" in node_log
        assert "Start `flwr-clientapp` process" not in node_log  # the app never ran
    rows = read_rounds(federation.state / "run")
    assert [(r["round"], r["clients"]) for r in rows] == [(1, 0)] and "round_abandoned" in rows[0]


def test_a_restart_with_another_configuration_exits_2_naming_the_keys(tmp_path, tiny_model_dir):
    from fedtune.common.config import RunConfig

    federation = Federation(tmp_path, tiny_model_dir)
    run_dir = federation.state / "run"
    run_dir.mkdir(parents=True)
    started = RunConfig.from_toml(federation.config).with_overrides(
        {"output.dir": str(run_dir), "train.lr": 0.5, "federation.rounds": 9})
    (run_dir / "config.json").write_text(started.to_json())

    done = subprocess.run([str(FEDTUNE), *map(str, server_args(federation, "a"))],
                          capture_output=True, text=True, timeout=120,
                          env=unactivated_env(federation, "flwr-server"))

    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "train.lr (0.5 -> 0.01)" in done.stderr and "--accept-config-change" in done.stderr
    assert "federation.rounds" not in done.stderr
    assert not (federation.state / "superlink.log").exists()  # stopped before Flower started
