"""`fedtune client`: a real Flower SuperNode that trains on this machine's data directory.

Everything is checked before Flower starts (certificate, key, data, ledger directory, the local
port) so that a mistake is one clear line. The command owns its SuperNode: one that exits (the
server restarted, or turned it away) is started again with a back-off, so nodes may start
before the server has registered them; a stop request stops it and everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.client.ledger_watch import LedgerWatch
from fedtune.client.node import keyed_held_out
from fedtune.client.policy import NodePolicy, PolicyError
from fedtune.common import certs
from fedtune.common.app_bundle import app_digest, check_digest
from fedtune.common.canaries import RELEASES_ENV
from fedtune.common.config import CAUSAL_LM, CLASSIFICATION, DataConfig
from fedtune.common.console import filtered
from fedtune.common.consortium import pinned_digest
from fedtune.common.data import LABELS_FILE, DataError, load_data, training_records, training_rows
from fedtune.common.errors import InputError
from fedtune.common.ports import PortBusy, check_free
from fedtune.common.process_tree import (
    StopRequested,
    become_subreaper,
    ignore_signals,
    stop_on_signals,
    stop_tree,
)
from fedtune.common.secagg.signing import Signer, SigningError, read_peers
from fedtune.common.tool_path import tool_env


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


class NodeSetupError(InputError, ValueError):
    """The node's command line cannot start a node: a malformed --server, a ledger directory it
    cannot write, a value Flower's node config cannot carry."""


class ServerUnreachable(InputError, RuntimeError):
    """No server answered at the address within the start-up wait."""


def supernode_command(settings: ClientSettings) -> list[str]:
    """The `flower-supernode` command line for these settings, after checking every input."""
    host, sep, port = settings.server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NodeSetupError(f"--server must be HOST:PORT, got {settings.server!r}")
    certs.check_certificate(settings.root_cert)
    certs.check_private_key(settings.node_key)
    check_data(settings.data, settings.policy)
    check_peers(settings)
    settings.ledger.mkdir(parents=True, exist_ok=True)
    if not os.access(settings.ledger, os.W_OK):
        raise NodeSetupError(f"ledger directory {settings.ledger} is not writable")
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
    held = keyed_held_out(records, policy.test_fraction, policy.split_seed)
    if len(held) != len(rows):  # the split keys on the records the rows are read from, in order
        raise DataError(f"{path}: {len(rows)} rows read from {len(records)} records")
    training = int((~held).sum())
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
            raise NodeSetupError(f"node config value {value!r} may not hold quotes or "
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
    return [sys.executable, "-P", "-m", "fedtune.client.app_pin", *approve, "--", *supernode[1:]]


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
    """Run the SuperNode and keep it running: started again with a back-off whenever it exits
    (the server restarted, or turned it away); stopped with this command (SIGTERM, Ctrl-C).

    Flower's SuperNode retries a lost connection by itself, but exits when the server no longer
    knows it (401 after the server started a new state directory or revoked its key) and when
    its activation is refused (its key is not registered): then it is started again, and after
    `wait_server` seconds of refusals this command gives up (exit 1) saying what to do."""
    command = pinned_command(settings, supernode_command(settings))
    check_free("127.0.0.1", settings.port, "--port")
    print(f"fedtune: node policy: {_describe(settings.policy)}", flush=True)
    if not settings.policy.planning_rows:
        print("fedtune: no --planning-rows: DP-SGD rounds plan with the server's "
              "privacy.planning_rows, and are refused without one (the planning row count is "
              "public; this node's own row count is never used or sent)", flush=True)
    if settings.policy.share_evaluation and not settings.policy.evaluation_noise:
        print("fedtune: WARNING: share-evaluation with evaluation-noise 0: the server's "
              "evaluation questions are answered exactly and recorded in no ledger (the "
              "ledger's epsilon covers training only)", file=sys.stderr, flush=True)
    probe_server(settings)
    become_subreaper()
    watch = LedgerWatch(settings.ledger, settings.policy.budget_epsilon)
    with stop_on_signals():
        try:
            return _supervise(command, settings, watch)
        except StopRequested as requested:
            stop = requested
        finally:
            ignore_signals()
            stop_tree([], orphans=True)
    print(f"fedtune: stopped ({stop}); the SuperNode is stopped", file=sys.stderr, flush=True)
    return 130 if stop.signum == signal.SIGINT else 0


def _supervise(command: list[str], settings: ClientSettings, watch: LedgerWatch) -> int:
    delay, refused_since, refusals = RESTART_DELAY, 0.0, 0
    while True:
        started = time.monotonic()
        ended = _run_supernode(command, settings.verbose, watch,
                               node_env(settings.policy))
        if ended.port_busy:
            raise PortBusy(f"port {settings.port} on 127.0.0.1 is already in use (another node "
                           "on this machine?); choose another --port")
        if ended.refused:  # given up after `wait_server` seconds and a second refusal at least
            refused_since, refusals = refused_since or started, refusals + 1
            if refusals > 1 and time.monotonic() - refused_since >= settings.wait_server:
                print(f"fedtune: error: {unknown_node(settings)}", file=sys.stderr, flush=True)
                return 1
            why = ("refused this node's key (not registered yet, or this node's last session, "
                   "ended without a goodbye, counts for up to a minute)")
        else:
            refused_since, refusals = 0.0, 0
            if time.monotonic() - started > MAX_RESTART_DELAY:  # it ran: a fresh back-off
                delay = RESTART_DELAY
            why = ("no longer knows this node (401: a new server state directory, or its key "
                   "was revoked)" if ended.unauthorized
                   else f"ended the SuperNode (exit code {ended.code})")
        print(f"fedtune: {settings.server} {why}; starting the SuperNode again in "
              f"{delay:.0f}s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 2, MAX_RESTART_DELAY)


def unknown_node(settings: ClientSettings) -> str:
    """What to do when the server keeps refusing this node's key."""
    return (f"the server does not know this node: {settings.server} refused its key "
            f"{settings.node_key} for {settings.wait_server:.0f}s. Send "
            f"{settings.node_key.with_suffix('.pub').name} to the operator, who names it with "
            "`fedtune server --node` and restarts the server, then start this node again (a "
            "revoked key is never accepted again: make a new one with `fedtune certs node`)")


RESTART_DELAY, MAX_RESTART_DELAY = 2.0, 60.0  # seconds between SuperNode starts: doubling
# Flower's SuperNode output that tells how it ended
REFUSED = "Failed to activate SuperNode"  # the SuperLink turned its key away
UNAUTHORIZED = "401 Unauthorized"  # the SuperLink no longer knows its node id
PORT_BUSY = "error while attempting to bind on address"  # its local API's --port
RETRYING = "Connection attempt failed"  # the server is unreachable; it retries
CHAINED = ("During handling of the above exception", "The above exception was the direct")


@dataclass
class SupernodeEnd:
    """How one SuperNode process ended, read from its output."""

    code: int = 0
    refused: bool = False
    unauthorized: bool = False
    port_busy: bool = False


def _run_supernode(command: list[str], verbose: bool, watch: LedgerWatch,
                   env: dict[str, str]) -> SupernodeEnd:
    """Run the SuperNode until it exits, relaying its output; then stop what it left running
    (its SuperExec and ClientApps hold its output pipe open). It stays in this command's
    process group, so a signal to the group (a service manager's, a crashed supervisor's)
    reaches it too."""
    node = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    ended = SupernodeEnd()
    relay = threading.Thread(target=_relay, args=(node, verbose, ended, watch), daemon=True)
    relay.start()
    try:
        ended.code = node.wait()
    finally:
        stop_tree([node], orphans=True)
        relay.join(timeout=10)
    return ended


def _relay(node: subprocess.Popen, verbose: bool, ended: SupernodeEnd,
           watch: LedgerWatch) -> None:
    """Copy the SuperNode's output to ours (its DEBUG lines and library warnings only when
    `verbose`; colour codes only to a terminal), noting how it ends, and after each of its
    lines the rounds its ledger recorded."""
    assert node.stdout is not None
    plain, brief = not sys.stdout.isatty(), _Brief(verbose)
    for raw in node.stdout:
        text = raw.decode(errors="replace")
        ended.refused |= REFUSED in text
        ended.unauthorized |= UNAUTHORIZED in text
        ended.port_busy |= PORT_BUSY in text
        for line in filtered([raw], verbose, plain=plain):
            if (shown := brief.line(line.decode(errors="replace"))) is not None:
                _write(shown.encode())
        for line in watch.new_rounds():
            _write(line.encode())


class _Brief:
    """Unless --verbose: a traceback of the SuperNode (Flower ends it with one when the server
    turns it away) shortened to its last line, and a streak of "Connection attempt failed"
    retries (every few seconds while the server is down) shown once."""

    def __init__(self, verbose: bool) -> None:
        self.verbose, self.in_traceback, self.retrying = verbose, False, False

    def line(self, text: str) -> str | None:
        if self.verbose:
            return text
        if text.startswith("Traceback (most recent call last)"):
            self.in_traceback = True
            return None
        if self.in_traceback:
            if text[:1].isspace() or not text.strip() or text.startswith(CHAINED):
                return None
            self.in_traceback = False
            return f"SuperNode error: {text}"
        retry = RETRYING in text
        if retry and self.retrying:
            return None
        self.retrying = retry
        return f"{text.rstrip()} (and again until it connects)\n" if retry else text


_output = threading.Lock()


def _write(line: bytes) -> None:
    with _output:
        sys.stdout.buffer.write(line if line.endswith(b"\n") else line + b"\n")
        sys.stdout.flush()


def node_env(policy: NodePolicy) -> dict[str, str]:
    """The SuperNode's environment: offline for every hub unless the operator allows one, so a
    server can never make this node download what it names."""
    env = tool_env()
    env.pop(RELEASES_ENV, None)  # a simulation's audit directory is never a deployed node's
    if not policy.allow_hub:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _describe(policy: NodePolicy) -> str:
    """The policy as the node runs it, defaults spelled out (not their 0 or empty markers)."""
    shown = {**policy.to_node_config(),
             "planning-rows": policy.planning_rows or "the server's privacy.planning_rows",
             "max-epsilon-per-round": policy.max_epsilon_per_round or "half the budget",
             "max-epsilon-per-run": policy.max_epsilon_per_run or "half the budget",
             "accountant": policy.accountant or "the ledger's own (prv for a new one)",
             "peers": policy.peers or "none"}
    return ", ".join(f"{key}={value}" for key, value in shown.items())
