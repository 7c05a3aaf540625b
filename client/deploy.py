"""`fedtune client`: a real Flower SuperNode that trains on this machine's data directory.

Everything is checked before Flower starts (certificate, key, data, ledger directory) so that a
mistake is one clear line. A SuperNode the SuperLink turns away at start-up gives up; `join`
starts it again with a back-off, so nodes may start before the server has registered them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.node import keyed_held_out
from client.policy import NodePolicy, PolicyError
from common import certs
from common.app_bundle import app_digest, check_digest
from common.config import CAUSAL_LM, CLASSIFICATION, DataConfig
from common.console import keep_line
from common.consortium import pinned_digest
from common.data import LABELS_FILE, DataError, load_data, training_records, training_rows
from common.secagg.signing import Signer, SigningError, read_peers
from common.tool_path import stop_child, tool_env


@dataclass(frozen=True)
class ClientSettings:
    server: str  # HOST:PORT of the SuperLink
    root_cert: Path
    node_key: Path
    data: Path
    ledger: Path
    name: str
    policy: NodePolicy  # this node's rules, whatever the server asks
    port: int = 9094  # this node's local API (one per SuperNode on a machine)
    wait_server: float = 120.0  # seconds to wait for the server at start-up
    app_digests: tuple[str, ...] = ()  # FAB digests this node runs; empty: its own fedtune's
    verbose: bool = False  # relay the SuperNode's DEBUG lines and warnings too


class ServerUnreachable(RuntimeError):
    """No server answered at the address within the start-up wait."""


def supernode_command(settings: ClientSettings) -> list[str]:
    """The `flower-supernode` command line for these settings, after checking every input."""
    host, sep, port = settings.server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise certs.CertError(f"--server must be HOST:PORT, got {settings.server!r}")
    certs.check_certificate(settings.root_cert)
    certs.check_private_key(settings.node_key)
    check_data(settings.data, settings.policy)
    check_peers(settings)
    settings.ledger.mkdir(parents=True, exist_ok=True)
    if not os.access(settings.ledger, os.W_OK):
        raise certs.CertError(f"ledger directory {settings.ledger} is not writable")
    values = {"data-path": str(settings.data.resolve()),
              "ledger-dir": str(settings.ledger.resolve()), "name": settings.name,
              "node-key": str(settings.node_key.resolve()),
              **settings.policy.to_node_config()}
    if settings.policy.peers:  # read by the ClientApp, whatever its working directory
        values["peers"] = str(Path(settings.policy.peers).resolve())
    node_config = [f"{key}={_toml_value(value)}" for key, value in values.items()]
    tool = shutil.which("flower-supernode", path=str(Path(sys.executable).parent)) or \
        shutil.which("flower-supernode") or "flower-supernode"
    return [tool, "--superlink", settings.server, "--root-certificates",
            str(settings.root_cert), "--auth-supernode-private-key", str(settings.node_key),
            "--port", str(settings.port), "--node-config", " ".join(node_config)]


UNPINNED = ("fedtune: WARNING: --allow-unpinned-peers: this node takes part in secure "
            "aggregation without its consortium's keys pinned. Signing keys then come through "
            "the server, which can make up members of a cohort and subtract their inputs from "
            "the sum to learn this node's update. Client-level DP rounds are refused.")


def check_peers(settings: ClientSettings) -> None:
    """A node pins its consortium's keys (`--peers DIR`, from `fedtune certs consortium`), and
    the bundle must hold its own key under its name (else every cohort would be refused);
    without them it starts only where its operator waived pinning, and says so loudly."""
    if not settings.policy.peers:
        if settings.policy.require_peers:
            raise certs.CertError(
                "peers: give --peers DIR, the consortium's node keys (made by the operator with "
                "`fedtune certs consortium`), so that no server can make up members of a "
                "secure-aggregation cohort; or waive it with --allow-unpinned-peers")
        print(UNPINNED, file=sys.stderr, flush=True)
        return
    try:
        pinned = read_peers(settings.policy.peers)
        own = Signer.from_file(settings.node_key).public()
    except SigningError as error:
        raise certs.CertError(f"peers: {error}") from None
    if pinned.get(settings.name) != own:
        raise certs.CertError(f"peers: {settings.policy.peers} has no {settings.name}.pub "
                              f"matching this node's key {settings.node_key}")
    print(f"fedtune: pinned peers: {len(pinned)} node keys, bundle sha256:"
          f"{pinned_digest(settings.policy.peers)} (compare it with the operator's)", flush=True)


def check_data(path: Path, policy: NodePolicy) -> int:
    """Read the node's data once at start-up, so that a problem is a local error now (DataError
    names it), never a data-dependent failure a server could provoke later: every row readable
    for the node's task with its own fields, at least two training rows after its own split,
    and its fixed delta below n^-1.1 for its n rows. Returns n."""
    records = training_records(path)
    declared = (path / LABELS_FILE).is_file()
    data = DataConfig(path=str(path), text_field=policy.text_field,
                      label_field=policy.label_field)
    if declared:  # a classification node: every label in its label set
        load_data(data, seed=0)
    rows = training_rows(data, CLASSIFICATION if declared else CAUSAL_LM)
    training = int((~keyed_held_out(rows, policy.test_fraction, policy.split_seed)).sum())
    if training < 2:
        raise DataError(f"{path}: {training} training rows after holding out test-fraction "
                        f"{policy.test_fraction:g}; at least 2 are needed")
    if policy.require_dp and policy.delta > len(records) ** -1.1:
        raise PolicyError(f"node policy `delta` {policy.delta:g} is not below n^-1.1 = "
                          f"{len(records) ** -1.1:.3g} for this node's {len(records)} rows: give "
                          "a smaller --delta")
    return len(records)


def resolve_policy(policy_file: Path | None, flags: dict[str, object]) -> NodePolicy:
    """The node's policy: the strict defaults, then its policy file, then the flags given."""
    values = NodePolicy.read_file(policy_file) if policy_file is not None else {}
    values.update({key: value for key, value in flags.items() if value is not None})
    return NodePolicy.from_mapping(values)


def _toml_value(value: object) -> str:
    """A node-config value as Flower parses it (TOML): quoted strings, lowercase booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if '"' in value or "\\" in value:
            raise certs.CertError(f"node config value {value!r} may not hold quotes or "
                                  "backslashes")
        return f'"{value}"'
    return repr(value)


def pinned_command(settings: ClientSettings, supernode: list[str]) -> list[str]:
    """The SuperNode command run through `client/app_pin.py`, which refuses any app but the
    approved ones. Without --app-digest the node approves the app of the fedtune installed on
    it: the code its operator installed is the code it runs."""
    digests = [check_digest(d) for d in settings.app_digests] or [app_digest()]
    approve = [a for d in digests for a in ("--approve", d)]
    # -P: the working directory must not shadow the installed packages
    return [sys.executable, "-P", "-m", "client.app_pin", *approve, "--", *supernode[1:]]


REFUSED = "Failed to activate SuperNode"  # Flower's message when the SuperLink turns it away


def probe_server(settings: ClientSettings) -> None:
    """Wait for the server to answer, then check its certificate against our root certificate."""
    host, _, port = settings.server.rpartition(":")
    context = ssl.create_default_context(cafile=str(settings.root_cert))
    deadline = time.monotonic() + settings.wait_server
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as error:
            raise certs.CertError(f"the server at {settings.server} presents a certificate that "
                                  f"{settings.root_cert} does not vouch for "
                                  f"({error.verify_message})") from None
        except OSError as error:
            if time.monotonic() > deadline:
                raise ServerUnreachable(f"server {settings.server} unreachable for "
                                        f"{settings.wait_server:.0f}s ({error})") from None
            time.sleep(2)


def join(settings: ClientSettings) -> int:
    """Run the SuperNode; while the SuperLink refuses it (not registered yet, or restarting),
    start it again with a back-off. Flower's own SuperNode retries a lost connection but gives
    up, without exiting, when activation is refused."""
    command = pinned_command(settings, supernode_command(settings))
    print(f"fedtune: node policy: {_describe(settings.policy)}", flush=True)
    if not settings.policy.planning_rows:
        print("fedtune: no --planning-rows: DP-SGD rounds plan with the server's "
              "privacy.planning_rows, and are refused without one (the planning row count is "
              "public; this node's own row count is never used or sent)", flush=True)
    probe_server(settings)
    delay = 2.0
    while True:
        # same process group as this wrapper: stopping the wrapper's group stops the node
        node = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=node_env(settings.policy))
        signal.signal(signal.SIGTERM, lambda *_, node=node: stop_child(node))
        refused = _relay_until_refused(node, settings.verbose)
        if not refused:
            return node.wait()
        stop_child(node)
        print(f"fedtune: {settings.server} refused this node (not registered yet?); retrying "
              f"in {delay:.0f}s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 2, 60.0)


def node_env(policy: NodePolicy) -> dict[str, str]:
    """The SuperNode's environment: offline for every hub unless the operator allows one, so a
    server can never make this node download what it names."""
    env = tool_env()
    if not policy.allow_hub:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _describe(policy: NodePolicy) -> str:
    return ", ".join(f"{key}={value}" for key, value in policy.to_node_config().items())


def _relay_until_refused(node: subprocess.Popen, verbose: bool = False) -> bool:
    """Copy the SuperNode's output to ours (its DEBUG lines and library warnings only when
    `verbose`); True as soon as it reports a refused activation."""
    assert node.stdout is not None
    for raw in node.stdout:
        if keep_line(raw.decode(errors="replace"), verbose):
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
        if REFUSED.encode() in raw:
            return True
    return False
