"""`fedtune server`: a real Flower SuperLink with TLS and node authentication, the operator's
nodes registered, and the federation run (the same ServerApp as in simulation) submitted to it.

State lives in one directory: the SuperLink's database and logs, Flower's CLI configuration,
and the run directory (`run/`) with checkpoints and metrics, so a restarted server resumes.
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
from common.config import RunConfig
from server.app import CONFIG_FILE_KEY

APP_DIR = Path(__file__).resolve().parents[1]  # holds pyproject.toml: the Flower app
RUN_DIR = "run"
FEDERATION = "fedtune"


class DeployError(RuntimeError):
    """The deployment cannot start as asked (files, ports, Flower's own tools)."""


@dataclass(frozen=True)
class ServerSettings:
    certs_dir: Path
    state_dir: Path
    config_file: Path
    nodes: list[Path]
    host: str = "0.0.0.0"
    port: int = 9200


def serve(settings: ServerSettings) -> int:
    """Start the SuperLink, register the nodes, run the federation; return its exit code."""
    ca, cert, key = _check_inputs(settings)
    state = settings.state_dir
    (state / "flwr-home").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str((state / "flwr-home").resolve())}
    link_log = (state / "superlink.log").open("ab")
    superlink = subprocess.Popen(
        [_tool("flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
         "--ssl-keyfile", str(key), "--enable-supernode-auth",
         "--database", str(state / "superlink.db"), "--host", settings.host,
         "--port", str(settings.port), "--disable-runtime-dependency-installation"],
        stdout=link_log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_port(settings.port, superlink)
        _write_cli_config(state / "flwr-home" / "config.toml", settings.port, ca)
        for public_key in settings.nodes:
            _register(public_key, env)
        print(f"fedtune: SuperLink ready on {settings.host}:{settings.port} with TLS; "
              f"{len(settings.nodes)} node keys registered", flush=True)
        return _run(settings, env)
    finally:
        superlink.terminate()
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            superlink.kill()


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
    RunConfig.from_toml(settings.config_file)  # a bad configuration fails here, not in Flower
    return ca, cert, key


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise DeployError(f"`{name}` is not installed (it comes with flwr)")
    return found


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {process.returncode}; see "
                              "superlink.log in the state directory")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise DeployError(f"flower-superlink did not listen on port {port} within {timeout:.0f}s")


def _write_cli_config(path: Path, port: int, ca: Path) -> None:
    """Flower's CLI configuration naming this SuperLink (the operator's side, over TLS)."""
    path.write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                    f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca.resolve()}"\n')


def _register(public_key: Path, env: dict[str, str]) -> None:
    done = subprocess.run([_tool("flwr"), "supernode", "register", str(public_key), FEDERATION],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0 and "already" not in (done.stdout + done.stderr).lower():
        raise DeployError(f"registering {public_key} failed: {(done.stdout + done.stderr)[-500:]}")


def _run(settings: ServerSettings, env: dict[str, str]) -> int:
    run_dir = (settings.state_dir / RUN_DIR).resolve()
    overrides = (f"{CONFIG_FILE_KEY}='{settings.config_file.resolve()}' "
                 f"output.dir='{run_dir}'")
    done = subprocess.run([_tool("flwr"), "run", str(APP_DIR), FEDERATION, "--stream",
                           "--run-config", overrides], env=env)
    return done.returncode
