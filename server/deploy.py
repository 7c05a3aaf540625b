"""`fedtune server`: a real Flower SuperLink with TLS and node authentication, the operator's
nodes registered, and the federation run (the same ServerApp as in simulation) submitted to it.

Only the Fleet API faces the network: the SuperLink (Fleet, Control and Runtime APIs on one port)
listens on 127.0.0.1 and nginx publishes its Fleet routes alone on `--host:--port`
(`server/fleet_proxy.py`), so only the operator, on this machine, can start, stop or list runs
and register nodes. State lives in one directory: the SuperLink's database and logs, Flower's CLI
configuration, the proxy's files, and the run directory (`run/`) with checkpoints and metrics,
so a restarted server resumes (with the configuration it started with: `server/config_guard.py`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import certs
from common.app_bundle import APP_DIR, app_digest
from common.config import RunConfig
from common.console import filtered
from common.tool_path import stop_child, tool_env
from server.app import CONFIG_FILE_KEY, NODE_NAMES_KEY, refuse_audit
from server.config_guard import ConfigChangeError, check_restart
from server.fleet_limits import fleet_limits
from server.fleet_proxy import ProxyError, ProxySettings, nginx_binary, start_proxy
from server.node_registry import (
    RegistryError,
    control_client,
    key_bytes,
    key_names,
    node_names,
    sync_nodes,
    write_node_names,
)

RUN_DIR = "run"
NODE_NAMES_FILE = "node-names.json"  # {node id: name} the ServerApp names nodes by
FEDERATION = "fedtune"


class DeployError(RuntimeError):
    """The deployment cannot start as asked (files, ports, Flower's own tools)."""


START_ERRORS = (DeployError, ProxyError, RegistryError, ConfigChangeError)  # exit 2


@dataclass(frozen=True)
class ServerSettings:
    certs_dir: Path
    state_dir: Path
    config_file: Path
    nodes: list[Path]
    host: str = "0.0.0.0"
    port: int = 9200
    local_port: int = 0  # the SuperLink's own port on 127.0.0.1; 0: any free one
    accept_config_change: bool = False
    verbose: bool = False  # relay the run's DEBUG lines and warnings too


def serve(settings: ServerSettings) -> int:
    """Start the SuperLink and its Fleet proxy, make the registered node keys exactly the named
    ones, run the federation; return its exit code."""
    ca, cert, key = _check_inputs(settings)
    _guard_config(settings)
    limits = fleet_limits(RunConfig.from_toml(settings.config_file))  # the proxy's, from the run
    state = settings.state_dir
    (state / "flwr-home").mkdir(parents=True, exist_ok=True)
    env = tool_env({**os.environ, "FLWR_HOME": str((state / "flwr-home").resolve())})
    link_port = settings.local_port or _free_loopback_port()
    link_log = (state / "superlink.log").open("ab")
    superlink = subprocess.Popen(
        [_tool("flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
         "--ssl-keyfile", str(key), "--enable-supernode-auth",
         "--database", str(state / "superlink.db"), "--host", "127.0.0.1",
         "--port", str(link_port), "--disable-runtime-dependency-installation"],
        stdout=link_log, stderr=subprocess.STDOUT, env=env)
    proxy: subprocess.Popen | None = None
    try:
        _wait_for_port("127.0.0.1", link_port, superlink, "flower-superlink", "superlink.log")
        _write_cli_config(state / "flwr-home" / "config.toml", link_port, ca)
        client = control_client(f"127.0.0.1:{link_port}", ca)
        try:  # before the public port opens: a revoked key never gets a window
            synced = sync_nodes(client, settings.nodes)
            write_node_names(state / NODE_NAMES_FILE, node_names(client, settings.nodes))
        finally:
            client.close()
        proxy = start_proxy(ProxySettings(settings.host, settings.port, link_port, ca, cert, key,
                                          state, limits), state / "fleet-proxy.log")
        _wait_for_port(_probe_host(settings.host), settings.port, proxy, "nginx (Fleet proxy)",
                       "fleet-proxy.log")
        print(f"fedtune: SuperLink ready; Fleet API on {settings.host}:{settings.port} (TLS, "
              f"registered nodes only); Control and Runtime APIs on 127.0.0.1:{link_port}; "
              f"node keys: {len(synced.registered)} registered, {len(synced.kept)} kept, "
              f"{len(synced.unregistered)} unregistered; app sha256:{app_digest()}", flush=True)
        return _run(settings, env, link_port, ca)
    finally:
        for process in (proxy, superlink):
            if process is not None:
                stop_child(process, grace=20)


def _check_inputs(settings: ServerSettings) -> tuple[Path, Path, Path]:
    ca, cert, key = (settings.certs_dir / n for n in (certs.CA_CERT, certs.SERVER_CERT,
                                                       certs.SERVER_KEY))
    certs.check_certificate(ca)
    certs.check_certificate(cert)
    if not key.is_file():
        raise certs.CertError(f"server key {key} does not exist (make it with "
                              "`fedtune certs init`)")
    for public_key in settings.nodes:
        if not public_key.is_file():
            raise certs.CertError(f"node public key {public_key} does not exist")
        key_bytes(public_key)
    key_names(settings.nodes)  # one name per key, one key per name
    nginx_binary()
    return ca, cert, key


def _guard_config(settings: ServerSettings) -> None:
    """A restart must not change the run's configuration unless the operator says so."""
    config = RunConfig.from_toml(settings.config_file)  # a bad one fails here, not in Flower
    refuse_audit(config)
    run_dir = (settings.state_dir / RUN_DIR).resolve()
    changed = check_restart(run_dir, config.with_overrides({"output.dir": str(run_dir)}),
                            accept=settings.accept_config_change)
    if changed:
        print(f"fedtune: the run continues with the changed configuration ({', '.join(changed)}); "
              f"the replaced one is kept in {run_dir}", flush=True)


def _tool(name: str) -> str:
    """Flower's tool from this Python's environment first, as its children find theirs."""
    found = shutil.which(name, path=tool_env()["PATH"])
    if found is None:
        raise DeployError(f"`{name}` is not installed (it comes with flwr)")
    return found


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _probe_host(host: str) -> str:
    """Where this machine reaches a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _wait_for_port(host: str, port: int, process: subprocess.Popen, name: str, log: str,
                   timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"{name} exited with code {process.returncode}; see {log} in the "
                              "state directory")
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise DeployError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s")


def _write_cli_config(path: Path, port: int, ca: Path) -> None:
    """Flower's CLI configuration naming this SuperLink (the operator's side, over TLS)."""
    path.write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                    f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca.resolve()}"\n')


def _run(settings: ServerSettings, env: dict[str, str], link_port: int, ca: Path) -> int:
    run_dir = (settings.state_dir / RUN_DIR).resolve()
    names = (settings.state_dir / NODE_NAMES_FILE).resolve()
    overrides = (f"{CONFIG_FILE_KEY}='{settings.config_file.resolve()}' "
                 f"output.dir='{run_dir}' {NODE_NAMES_KEY}='{names}'")
    run = subprocess.Popen([_tool("flwr"), "run", str(APP_DIR), FEDERATION, "--stream",
                            "--run-config", overrides], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    assert run.stdout is not None
    for line in filtered(run.stdout, settings.verbose):  # the run's log, less its noise
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
    return run.wait() or _run_outcome(f"127.0.0.1:{link_port}", ca)


def _run_outcome(address: str, ca: Path) -> int:
    """0 when the run just submitted completed, else 1 with a line saying how it ended.

    `flwr run --stream` exits 0 even when the ServerApp failed (measured on Flower 1.41: a
    ServerApp exception, exit code 201 in its log, and still 0), so the run's status decides.
    """
    from flwr.proto.control_pb2 import ListRunsRequest

    client = control_client(address, ca)
    try:
        runs = list(client.ListRuns(ListRunsRequest()).run_dict.values())
    finally:
        client.close()
    if not runs:
        print("fedtune: error: the SuperLink lists no run", file=sys.stderr, flush=True)
        return 1
    last = max(runs, key=lambda run: run.pending_at)
    status = last.status
    if (status.status, status.sub_status) == ("finished", "completed"):
        return 0
    print(f"fedtune: error: run {last.run_id} ended {status.status}:{status.sub_status} "
          f"{status.details}".rstrip(), file=sys.stderr, flush=True)
    return 1
