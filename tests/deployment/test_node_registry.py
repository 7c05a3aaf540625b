"""server/node_registry.py against a real SuperLink: `--node` is the registry."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from fedtune.common import certs
from fedtune.common.ports import free_local_port
from fedtune.common.tool_path import tool_env
from fedtune.server.node_registry import (
    RegistryError,
    control_client,
    key_bytes,
    listed_keys,
    sync_nodes,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def superlink(tmp_path):
    made = certs.init(tmp_path / "certs", ["localhost"])
    port = free_local_port()
    env = tool_env({**os.environ, "FLWR_HOME": str(tmp_path / "home")})
    proc = subprocess.Popen(
        ["flower-superlink", "--ssl-ca-certfile", str(made.ca_cert), "--ssl-certfile",
         str(made.server_cert), "--ssl-keyfile", str(made.server_key), "--enable-supernode-auth",
         "--host", "127.0.0.1", "--port", str(port), "--isolation", "process"],
        stdout=(tmp_path / "superlink.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "no SuperLink"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    client = control_client(f"127.0.0.1:{port}", made.ca_cert)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


def keys(tmp_path, *names):
    return [certs.node_key(tmp_path / "keys", n)[1] for n in names]


def registered(client) -> set[bytes]:
    return {k for k, (_, status) in listed_keys(client).items() if status != "unregistered"}


def test_keys_no_longer_named_are_unregistered_and_named_ones_kept(superlink, tmp_path):
    a, b, c = keys(tmp_path, "a", "b", "c")
    first = sync_nodes(superlink, [a, b, c])

    second = sync_nodes(superlink, [a, b])

    assert sorted(first.registered) == sorted(map(str, [a, b, c]))
    assert sorted(second.kept) == sorted(map(str, [a, b])) and len(second.unregistered) == 1
    assert registered(superlink) == {key_bytes(a), key_bytes(b)}


def test_a_revoked_key_cannot_come_back_and_says_so(superlink, tmp_path):
    a, b = keys(tmp_path, "a", "b")
    sync_nodes(superlink, [a, b])
    sync_nodes(superlink, [a])

    with pytest.raises(RegistryError, match=r"b\.pub was unregistered earlier.*new key"):
        sync_nodes(superlink, [a, b])

    assert registered(superlink) == {key_bytes(a)}


def test_a_registration_the_superlink_refuses_is_an_error(superlink, tmp_path):
    [a] = keys(tmp_path, "a")
    sync_nodes(superlink, [a])

    class Refusing:  # Flower's client, except that registering fails (as a 412 would)
        def __getattr__(self, name):
            return getattr(superlink, name)

        def RegisterNode(self, request):
            raise RuntimeError("Client error '412 Precondition Failed'")

    [b] = keys(tmp_path, "b")
    with pytest.raises(RegistryError, match=r"registering .*b\.pub failed: .*412"):
        sync_nodes(Refusing(), [a, b])


def test_a_drawn_superlink_port_taken_before_the_superlink_binds_it_is_drawn_again(
        tmp_path, monkeypatch, capsys):
    from fedtune.common import ports
    from fedtune.server import deploy

    made = certs.init(tmp_path / "certs", ["localhost"])
    env = tool_env({**os.environ, "FLWR_HOME": str(tmp_path / "home")})
    files = (made.ca_cert, made.server_cert, made.server_key)
    drawn, chosen = deploy._Federation(), deploy._Federation()
    with socket.socket() as taken:  # the race: someone binds the drawn port first
        taken.bind(("127.0.0.1", free_local_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        draws = iter([busy])
        monkeypatch.setattr(ports, "free_local_port", lambda: next(draws, None) or
                            free_local_port())
        settings = deploy.ServerSettings(tmp_path / "certs", tmp_path, tmp_path / "run.toml", [])
        try:
            port = deploy._start_superlink(settings, env, drawn, *files)
            assert port != busy and len(drawn.processes) == 2
            assert ports.listens(drawn.processes[-1].pid, port)
            assert f"port {busy} was taken" in capsys.readouterr().out

            operators = deploy.ServerSettings(tmp_path / "certs", tmp_path,
                                              tmp_path / "run.toml", [], local_port=busy)
            with pytest.raises(deploy.DeployError, match=f"port {busy} on 127.0.0.1 is already "
                               "in use by "):
                deploy._start_superlink(operators, env, chosen, *files)
            assert len(chosen.processes) == 1  # the operator's port is never drawn again
            assert "drawing another" not in capsys.readouterr().out
        finally:
            for federation in (drawn, chosen):
                federation.stop()
