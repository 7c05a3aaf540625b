"""`fedtune server`: a real Flower SuperLink with TLS and node authentication, the operator's
nodes registered, and the federation run (the same ServerApp as in simulation) submitted to it.

Only the Fleet API faces the network: the SuperLink (Fleet, Control and Runtime APIs on one port)
listens on 127.0.0.1 and nginx publishes its Fleet routes alone on `--host:--port`
(`server/fleet_proxy.py`), so only the operator, on this machine, can start, stop or list runs
and register nodes. State lives in one directory: the SuperLink's database and logs, Flower's CLI
configuration, the proxy's files, and the run directory (`run/`) with checkpoints and metrics,
so a restarted server resumes (with the configuration it started with: `server/config_guard.py`).
The command owns what it starts: one server per state directory (a lock), a stop request stops
every process of the federation, and a start first stops what a killed predecessor left.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.common import certs, ports
from fedtune.common.app_bundle import APP_DIR, app_digest
from fedtune.common.config import RunConfig
from fedtune.common.console import filtered
from fedtune.common.data import load_data
from fedtune.common.errors import InputError
from fedtune.common.process_tree import (
    StopRequested,
    alive,
    become_subreaper,
    descendants,
    ignore_signals,
    mentioning,
    stop_on_signals,
    stop_pids,
    stop_tree,
)
from fedtune.common.run_dir import METRICS_FILE, saved_config
from fedtune.common.tool_path import tool_env
from fedtune.server.app import CONFIG_FILE_KEY, NODE_NAMES_KEY, refuse_audit
from fedtune.server.checkpoint import checkpoint_rounds
from fedtune.server.config_guard import check_restart, continued, kept_from_the_run
from fedtune.server.fleet_limits import fleet_limits
from fedtune.server.fleet_proxy import ProxySettings, nginx_binary, start_proxy
from fedtune.server.metrics_log import read_rounds
from fedtune.server.node_registry import (
    control_client,
    key_bytes,
    key_names,
    node_names,
    sync_nodes,
    write_node_names,
)
from fedtune.server.run_summary import shortfall, summary_line
from fedtune.server.stale_nodes import end_stale_sessions

RUN_DIR = "run"
NODE_NAMES_FILE = "node-names.json"  # {node id: name} the ServerApp names nodes by
FEDERATION = "fedtune"
LOCK_FILE = "server.lock"  # held by the running `fedtune server` of a state directory
CHILDREN = ("flower-superlink", "nginx", "flwr run")  # what it starts, naming the state directory


class DeployError(InputError, RuntimeError):
    """The deployment cannot start as asked (files, ports, Flower's own tools)."""




@dataclass(frozen=True)
class ServerSettings:
    certs_dir: Path
    state_dir: Path
    config_file: Path
    nodes: list[Path]
    host: str = "0.0.0.0"
    port: int = 9200
    local_port: int = 0  # the SuperLink's own port on 127.0.0.1; 0: ports.free_local_port
    accept_config_change: bool = False
    verbose: bool = False  # relay the run's DEBUG lines and warnings too


def serve(settings: ServerSettings) -> int:
    """Start the SuperLink and its Fleet proxy, make the registered node keys exactly the named
    ones, run the federation; return its exit code.

    This process owns everything it starts: SIGTERM or SIGINT stops the run in the SuperLink,
    then the SuperLink, the ServerApp and nginx (`common/process_tree.py`); the run resumes
    from its last checkpoint when the server is started again."""
    ca, cert, key = _check_inputs(settings)
    lock = _lock_state(settings.state_dir)
    try:
        _stop_leftovers(settings.state_dir)  # before the guard may rewrite the run's config
        config = _guard_config(settings)
        _check_data(config)
        ports.check_free(settings.host, settings.port, "--port")
        if settings.local_port:
            ports.check_free("127.0.0.1", settings.local_port, "--local-port")
        become_subreaper()
        federation = _Federation()
        with stop_on_signals():
            try:
                return _start_and_run(settings, config, federation, ca, cert, key)
            except StopRequested as requested:
                stop = requested
            finally:
                ignore_signals()  # a second Ctrl-C must not cut the clean-up short
                federation.stop()
        return _stopped(stop, settings.state_dir / RUN_DIR)
    finally:
        os.close(lock)


def _lock_state(state: Path) -> int:
    """Hold the state directory for this server's lifetime: a second server on it is an error
    (the lock is released however this process ends, even killed)."""
    state.mkdir(parents=True, exist_ok=True)
    lock = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise DeployError(f"another fedtune server is running on {state}; stop it first") \
            from None
    return lock


def _stop_leftovers(state: Path) -> None:
    """Stop what a killed server (SIGKILL, the OOM killer) left running on this state
    directory: its SuperLink (with the ServerApp below it), nginx and `flwr run` would go on
    with the run, and hold its port. The lock says no live server owns them."""
    found = mentioning(str(state.resolve()) + os.sep, CHILDREN)  # not a sibling state-2
    pids = [pid for root in found for pid in (root, *descendants(root))]
    if pids:
        stop_pids(pids)
        left = [pid for pid in pids if alive(pid)]
        if left:  # a SuperLink left on this database would fight the new one for it
            raise DeployError(f"processes {', '.join(map(str, left))} of an earlier fedtune "
                              f"server on {state} did not stop; stop them and start again")
        print(f"fedtune: stopped {len(found)} processes an earlier fedtune server left running "
              f"on {state} (pids {', '.join(map(str, found))})", file=sys.stderr, flush=True)


class _Federation:
    """The processes `fedtune server` started, and the SuperLink's address once it listens."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.control: tuple[str, Path] | None = None  # (address, CA) of the Control API

    def start(self, process: subprocess.Popen) -> subprocess.Popen:
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop the SuperLink's unfinished runs (so nodes get no more of their messages), then
        every process of the federation."""
        if self.control is not None and any(p.poll() is None for p in self.processes):
            _stop_runs(*self.control)
        stop_tree(self.processes, orphans=True)


def _start_and_run(settings: ServerSettings, config: RunConfig, federation: _Federation,
                   ca: Path, cert: Path, key: Path) -> int:
    limits = fleet_limits(config)  # the proxy's, from the run
    state = settings.state_dir
    (state / "flwr-home").mkdir(parents=True, exist_ok=True)
    env = tool_env({**os.environ, "FLWR_HOME": str((state / "flwr-home").resolve())})
    end_stale_sessions(state / "superlink.db")  # no SuperLink runs: no node is online
    link_port = _start_superlink(settings, env, federation, ca, cert, key)
    federation.control = (f"127.0.0.1:{link_port}", ca)
    _write_cli_config(state / "flwr-home" / "config.toml", link_port, ca)
    client = control_client(f"127.0.0.1:{link_port}", ca)
    try:  # before the public port opens: a revoked key never gets a window
        synced = sync_nodes(client, settings.nodes)
        write_node_names(state / NODE_NAMES_FILE, node_names(client, settings.nodes))
    finally:
        client.close()
    proxy = federation.start(start_proxy(
        ProxySettings(settings.host, settings.port, link_port, ca, cert, key, state, limits),
        state / "fleet-proxy.log"))
    _wait_listening(proxy, _probe_host(settings.host), settings.port, "nginx (Fleet proxy)",
                    state / "fleet-proxy.log")
    print(f"fedtune: SuperLink ready; Fleet API on {settings.host}:{settings.port} (TLS, "
          f"registered nodes only); Control and Runtime APIs on 127.0.0.1:{link_port}; "
          f"node keys: {len(synced.registered)} registered, {len(synced.kept)} kept, "
          f"{len(synced.unregistered)} unregistered; app sha256:{app_digest()}", flush=True)
    code = _run(settings, env, link_port, ca, federation)
    return _finished(code, state / RUN_DIR, config.federation.rounds)


def _start_superlink(settings: ServerSettings, env: dict[str, str], federation: _Federation,
                     ca: Path, cert: Path, key: Path) -> int:
    """Start Flower's SuperLink on 127.0.0.1 and return its port once it listens there. A port
    fedtune drew that another process bound first (a race no check closes: the SuperLink's log
    says its port was in use) is drawn again, twice at most; the operator's `--local-port`
    never is."""
    log_path, attempt = settings.state_dir / "superlink.log", 0
    while True:
        attempt += 1
        port = settings.local_port or ports.free_local_port()
        start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:  # the child keeps its own copy
            superlink = federation.start(subprocess.Popen(
                [_tool("flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile",
                 str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth", "--database",
                 str((settings.state_dir / "superlink.db").resolve()), "--host", "127.0.0.1",
                 "--port", str(port), "--disable-runtime-dependency-installation"],
                stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0))
        try:
            _wait_listening(superlink, "127.0.0.1", port, "flower-superlink", log_path)
            return port
        except DeployError:
            if superlink.poll() is None or not _port_was_in_use(log_path, start):
                raise  # its own error
            if settings.local_port or attempt == 3:
                holder = (ports.why_busy("127.0.0.1", port, "--local-port")
                          or f"port {port} on 127.0.0.1 was in use")
                tries = "" if settings.local_port else f" (each of {attempt} drawn ports)"
                raise DeployError(f"flower-superlink could not bind: {holder}{tries}") from None
            print(f"fedtune: port {port} was taken before the SuperLink bound it; drawing "
                  "another", flush=True)


def _port_was_in_use(log: Path, start: int) -> bool:
    """Whether the SuperLink's lines after `start` say its port was in use (Flower's own check
    or its HTTP server's bind), not some other failure."""
    with log.open("rb") as lines:
        lines.seek(start)
        return b"already in use" in lines.read()


def _stopped(stop: StopRequested, run_dir: Path) -> int:
    """One line for a stop the operator asked for; 0 for SIGTERM (a service manager's stop),
    130 for SIGINT (Ctrl-C)."""
    done = checkpoint_rounds(run_dir.resolve())
    resume = (f"started again, the run resumes after round {done[-1]}" if done
              else "no round was completed yet")
    print(f"fedtune: stopped ({stop}); {resume}", file=sys.stderr, flush=True)
    return 130 if stop.signum == signal.SIGINT else 0


def _finished(code: int, run_dir: Path, rounds: int) -> int:
    """The summary line of a run that ended; exit 1 when its last round trained nothing."""
    rows = read_rounds(run_dir.resolve()) if (run_dir / METRICS_FILE).exists() else []
    if rows:
        print(summary_line(run_dir, rows), flush=True)
    if code == 0 and (problem := shortfall(rows, rounds)) is not None:
        print(f"fedtune: error: {problem}", file=sys.stderr, flush=True)
        return 1
    return code


def _stop_runs(address: str, ca: Path) -> None:
    """Ask the SuperLink to stop every run not finished yet; best effort, it is going down."""
    from flwr.proto.control_pb2 import ListRunsRequest, StopRunRequest

    try:
        client = control_client(address, ca)
        try:
            for run in client.ListRuns(ListRunsRequest()).run_dict.values():
                if run.status.status != "finished":
                    client.StopRun(StopRunRequest(run_id=run.run_id))
        finally:
            client.close()
    except Exception:  # the processes are stopped next, whatever happens here
        pass


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


def _guard_config(settings: ServerSettings) -> RunConfig:
    """A restart must not change the run's configuration unless the operator says so; returns
    the configuration the run goes on with (the proxy is sized from it, its data read)."""
    config = RunConfig.from_toml(settings.config_file)  # a bad one fails here, not in Flower
    refuse_audit(config)
    run_dir = (settings.state_dir / RUN_DIR).resolve()
    saved = saved_config(run_dir)
    if saved is None:
        return config
    changed = check_restart(run_dir, config.with_overrides({"output.dir": str(run_dir)}),
                            accept=settings.accept_config_change)
    if changed:
        print(f"fedtune: the run continues with the changed configuration ({', '.join(changed)}); "
              f"the replaced one is kept in {run_dir}", flush=True)
    for key, (value, default) in kept_from_the_run(saved, config).items():
        print(f"fedtune: the run keeps {key} = {value!r}, which the TOML leaves to its default "
              f"({default!r}); to change it, write it in the TOML and pass "
              "--accept-config-change", flush=True)
    if (rounds := config.federation.rounds) != saved.federation.rounds:
        print(f"fedtune: the run now ends after round {rounds}, the TOML's federation.rounds "
              f"(its saved configuration says {saved.federation.rounds})", flush=True)
    return continued(run_dir, config)


def _check_data(config: RunConfig) -> None:
    """The server's data (its held-out split and labels; a training split is not needed) read
    once before anything starts, so a problem is one line (DataError), not a failed run."""
    load_data(config.data, config.seed, config.model.task, held_out_only=True)


def _tool(name: str) -> str:
    """Flower's tool from this Python's environment first, as its children find theirs."""
    found = shutil.which(name, path=tool_env()["PATH"])
    if found is None:
        raise DeployError(f"`{name}` is not installed (it comes with flwr)")
    return found


def _probe_host(host: str) -> str:
    """Where this machine reaches a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _wait_listening(process: subprocess.Popen, host: str, port: int, name: str, log: Path,
                    timeout: float = 60) -> None:
    """Wait until `process` itself listens on `port` (not another process that held the port
    already); its exit or a timeout is a DeployError quoting its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"{name} exited with code {process.returncode}: "
                              f"{_last_line(log)}")
        if _listening(process.pid, host, port):
            return
        time.sleep(0.25)
    raise DeployError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s; see {log}")


def _listening(pid: int, host: str, port: int) -> bool:
    if ports.inspectable():
        return ports.listens(pid, port)
    try:  # no /proc: whoever answers is taken for it
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _last_line(log: Path) -> str:
    """The last line of a child's log (its error), and where the rest is."""
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    return f"{lines[-1].strip()} (in {log})" if lines else f"see {log}"


def _write_cli_config(path: Path, port: int, ca: Path) -> None:
    """Flower's CLI configuration naming this SuperLink (the operator's side, over TLS)."""
    path.write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                    f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca.resolve()}"\n')


def _run(settings: ServerSettings, env: dict[str, str], link_port: int, ca: Path,
         federation: _Federation) -> int:
    run_dir = (settings.state_dir / RUN_DIR).resolve()
    names = (settings.state_dir / NODE_NAMES_FILE).resolve()
    overrides = (f"{CONFIG_FILE_KEY}='{settings.config_file.resolve()}' "
                 f"output.dir='{run_dir}' {NODE_NAMES_KEY}='{names}'")
    run = federation.start(subprocess.Popen(
        [_tool("flwr"), "run", str(APP_DIR), FEDERATION, "--stream", "--run-config", overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0))
    assert run.stdout is not None
    plain = not sys.stdout.isatty()
    for line in filtered(run.stdout, settings.verbose, plain=plain):  # the run's log, less noise
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
