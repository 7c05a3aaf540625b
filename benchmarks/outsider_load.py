"""Outsiders against the Fleet proxy while a small federation runs on loopback: the run must
complete, and the SuperLink's memory (the RSS of its own process) stay bounded.

    python -m benchmarks.outsider_load [--quick] [--no-control]

A real `fedtune server` and `fedtune client` nodes (tests/deployment's loopback federation,
secure aggregation and DP-SGD as nodes require by default, the embedded MiniLM) connect from
127.0.0.1; the outsiders (benchmarks/outsiders.py) from 127.0.0.2 onwards, for a bounded time
and number of requests. Without `--no-control`, the same federation first runs alone, so the
figures compare with and without outsiders. Writes benchmarks/results/outsider_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.outsiders import Outsiders, Plan
from benchmarks.scale import tree_rss
from fedtune.common.config import RunConfig
from fedtune.server.fleet_limits import fleet_limits
from fedtune.server.metrics_log import read_rounds
from tests.deployment.test_deployment import PERMISSIVE, STRICT, Federation, wait_for

MIB = 2**20
PRIVATE = "[privacy]\ndp = true\nepsilon = 8.0\n[secagg]\nenabled = true\n"
ACCESS_LINE = re.compile(r'^(\S+) \[[^]]*\] "\S+ (\S+) [^"]*" (\d+) (\d+) \S+ \S+ (\S+)$')


@dataclass(frozen=True)
class Federated:
    """The federation the outsiders disturb."""

    model: str = "embedded"
    clients: int = 3
    rounds: int = 2
    private: bool = True  # secure aggregation and DP-SGD, the nodes' defaults


def measure(root: Path, federated: Federated, plan: Plan | None) -> dict:
    """Run the federation (with outsiders unless `plan` is None); its outcome and memory."""
    names = "abd"[:federated.clients]
    root.mkdir(parents=True)
    federation = Federation(root, federated.model, clients=federated.clients,
                            rounds=federated.rounds, timeout=300.0,
                            policy=STRICT if federated.private else PERMISSIVE,
                            extra=PRIVATE if federated.private else "")
    limits = fleet_limits(RunConfig.from_toml(federation.config))
    began = time.monotonic()
    try:
        server = federation.server(*names)
        for name in names:
            federation.client(name)
        wait_for(lambda: "Fleet API on" in federation.log("server.log"), 180, "the server")
        link = _pid_of("flower-superlink", str(federation.state / "superlink.db"))
        proxy = _pid_of("nginx", str((federation.state / "fleet-proxy").resolve()))
        memory = Sampler({"superlink": lambda: _rss(link), "nginx": lambda: tree_rss(proxy)})
        outsiders = None
        if plan is not None:
            outsiders = Outsiders(federation.port, federation.root / "certs" / "ca.pem",
                                  limits.body_bytes, limits.connections, plan)
            memory.mark("outsiders")
            asyncio.run(outsiders.run())
            memory.mark("outsiders gone")
        code = server.wait(timeout=1800)
        memory.stop()
    finally:
        federation.stop()
    rounds = read_rounds(federation.state / "run")
    return {
        "server_exit": code, "rounds": [r["round"] for r in rounds],
        "clients_per_round": [r["clients"] for r in rounds],
        "run_seconds": round(time.monotonic() - began, 1),
        "superlink_rss_mib": memory.figures("superlink"),
        "nginx_rss_mib": memory.figures("nginx"),
        "access_log": access_summary(federation.state / "fleet-proxy" / "access.log"),
        "outsiders": outsiders.tally.summary() if outsiders else None,
        "outsider_requests": outsiders.tally.started if outsiders else 0,
        "limits": {**asdict(limits), "body_bytes": limits.body_bytes, "burst": limits.burst},
    }


class Sampler:
    """Resident memory of named processes every half second, with marks for when the outsiders
    came and went."""

    def __init__(self, measures: dict[str, Callable[[], int]]) -> None:
        self.measures, self.marks = measures, {}
        self.samples: dict[str, list[tuple[float, int]]] = {
            name: [(0.0, measure())] for name, measure in measures.items()}
        self.start, self.done = time.monotonic(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.5):
            for name, measure in self.measures.items():
                rss = measure()
                if rss:
                    self.samples[name].append((time.monotonic() - self.start, rss))

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.start

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def figures(self, name: str) -> dict:
        """MiB: at the start, just before the outsiders, at the peak while they were there,
        the peak over the whole run, and at the end."""
        samples = self.samples[name]
        came, went = self.marks.get("outsiders"), self.marks.get("outsiders gone")
        before = [rss for t, rss in samples if came is not None and t <= came]
        during = [rss for t, rss in samples if came is not None and came <= t <= went]
        return {k: round(v / MIB, 1) if v else None for k, v in {
            "start": samples[0][1], "before_outsiders": before[-1] if before else None,
            "peak_with_outsiders": max(during) if during else None,
            "peak": max(rss for _, rss in samples), "end": samples[-1][1]}.items()}


def access_summary(path: Path) -> dict:
    """From the proxy's access log: statuses by source, how many outsider requests the
    SuperLink answered (an upstream status other than nginx's own 502 when `max_conns` are
    busy), and the largest request a node made."""
    statuses: dict[str, Counter] = {"nodes": Counter(), "outsiders": Counter()}
    forwarded, largest = Counter(), 0
    for line in path.read_text().splitlines():
        match = ACCESS_LINE.match(line)
        if match is None:
            continue
        source, _, status, length, upstream = match.groups()
        who = "nodes" if source == "127.0.0.1" else "outsiders"
        statuses[who][status] += 1
        if who == "outsiders" and upstream not in ("-", "502"):  # 502: nginx's, at max_conns
            forwarded[status] += 1
        if who == "nodes" and status == "200":
            largest = max(largest, int(length))
    return {"statuses": {k: dict(v) for k, v in statuses.items()},
            "outsider_requests_reaching_superlink": dict(forwarded),
            "largest_node_request_bytes": largest}


def _pid_of(program: str, argument: str) -> int:
    """The process whose command line names `program` and `argument` (nginx rewrites its own
    into one string)."""
    for entry in Path("/proc").iterdir():
        try:
            line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if program.encode() in line and argument.encode() in line:
            return int(entry.name)
    raise RuntimeError(f"no {program} process with {argument}")


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    kib = re.search(r"^VmRSS:\s+(\d+) kB", status, flags=re.MULTILINE)
    return int(kib.group(1)) * 1024 if kib else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="two plain nodes, one round, 20 s of outsiders from 4 addresses")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the run without outsiders")
    args = parser.parse_args()
    federated = (Federated(clients=2, rounds=1, private=False) if args.quick else Federated())
    plan = (Plan(addresses=4, seconds=20, requests=800) if args.quick else
            Plan(addresses=12, seconds=60, requests=4000))
    figures: dict = {"federation": asdict(federated), "plan": asdict(plan)}
    with tempfile.TemporaryDirectory(prefix="outsider-load-") as scratch:
        if not args.no_control:
            figures["alone"] = measure(Path(scratch) / "alone", federated, None)
            print({"alone": figures["alone"]["superlink_rss_mib"]}, flush=True)
        figures["with_outsiders"] = measure(Path(scratch) / "load", federated, plan)
    from benchmarks.record import save

    print(save("outsider_load", figures, quick=args.quick))


if __name__ == "__main__":
    main()
