"""Secure aggregation's cost: crypto seconds per client and at the server, bytes per client
(against the plain float32 upload), for 5 to 1,000 clients and two vector sizes (the embedded
MiniLM's adapter, and 1M values); and accuracy with and without `--secagg` on banking77.

    python -m benchmarks.secagg_cost [--quick] [--skip-accuracy]

The protocol rounds run in process (every client's steps timed on its own); the accuracy pair
runs `fedtune simulate` twice with one seed, so the two differ only by the masked encoding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.fedtune_run import fedtune, last_round
from fedtune.client.secagg import SecAggClient
from fedtune.common.secagg import ring
from fedtune.server.secagg import SecAggServer

SIGNATURE_BYTES = 64  # Ed25519
ACCURACY_FLAGS = ["--num-clients", "10", "--rounds", "3", "--max-length", "64",
                  "--batch-size", "32", "--lr", "0.003", "--seed", "0"]


class Clock:
    """Seconds and bytes sent, per client and at the server."""

    def __init__(self, names: list[str]) -> None:
        self.client = dict.fromkeys(names, 0.0)
        self.sent = dict.fromkeys(names, 0)
        self.server = 0.0

    def run(self, name: str | None, call, *args):
        started = time.perf_counter()
        result = call(*args)
        elapsed = time.perf_counter() - started
        if name is None:
            self.server += elapsed
        else:
            self.client[name] += elapsed
        return result


def one_round(clients: int, length: int) -> dict[str, float]:
    """Every step of one round, the consistency round included; checks the sum is exact."""
    rng = np.random.default_rng(0)
    server = SecAggServer(server_round=1)
    names = [f"client-{i:04d}" for i in range(clients)]
    parties = {n: SecAggClient(n, server.session, 1) for n in names}
    clock = Clock(names)
    keys = {n: clock.run(n, parties[n].signed_keys) for n in names}
    for n in names:
        clock.sent[n] += sum(len(k) for k in keys[n])
    cohort = clock.run(None, server.make_cohort, keys)
    sealed = {n: clock.run(n, parties[n].share_secrets, cohort) for n in names}
    for n in names:
        clock.sent[n] += sum(len(c) for c in sealed[n].values())
    inbox = clock.run(None, server.route, sealed)
    encoding = ring.Encoding(clients, 1.0)
    vectors = {n: np.clip(rng.normal(scale=0.05, size=length), -1, 1) for n in names}
    for n in names:
        clock.run(n, parties[n].check_shares, inbox[n])
    masked = {n: clock.run(n, parties[n].mask, inbox[n], vectors[n], encoding, rng)
              for n in names}
    for n in names:
        clock.sent[n] += masked[n].nbytes
    survivors = clock.run(None, server.survivors, masked)
    routing = clock.run(None, server.routing, survivors)
    signatures = {n: clock.run(n, parties[n].sign_survivors, survivors, routing) for n in names}
    signed = clock.run(None, server.consistent, survivors, routing, signatures)
    reveals = {n: clock.run(n, parties[n].reveal, survivors, routing, signed) for n in names}
    for n in names:
        clock.sent[n] += SIGNATURE_BYTES + sum(len(r.share) + 16 for r in reveals[n])
    total = clock.run(None, server.unmask, masked, reveals)
    error = np.abs(encoding.decode(total) - np.sum(list(vectors.values()), axis=0)).max()
    assert error <= encoding.error_bound(), error
    sent = float(np.mean(list(clock.sent.values())))
    return {"clients": clients, "length": length, "neighbours": cohort.neighbours,
            "threshold": cohort.threshold,
            "client_crypto_seconds": float(np.mean(list(clock.client.values()))),
            "client_crypto_seconds_max": float(max(clock.client.values())),
            "server_crypto_seconds": clock.server,
            "bytes_up_per_client": sent, "plain_bytes_up_per_client": 4.0 * length,
            "bytes_ratio": sent / (4.0 * length), "max_abs_error": float(error)}


def adapter_length() -> int:
    from fedtune.common.config import RunConfig
    from fedtune.common.task import build_task

    task = build_task(RunConfig())
    return sum(v.size for v in task.initial_adapter.values()) + 3


def accuracy_pair(data: str, quick: bool) -> dict[str, object]:
    """Final accuracy of one seeded simulation without and with secure aggregation."""
    flags = ["--num-clients", "3", "--rounds", "1"] if quick else ACCURACY_FLAGS
    result: dict[str, object] = {"data": data, "flags": flags}
    with tempfile.TemporaryDirectory() as scratch:
        for label, extra in (("plain", []), ("secagg", ["--secagg"])):
            out = Path(scratch) / label
            seconds = fedtune("simulate", ["--data", data, *flags, *extra], out, check=True).seconds
            last = last_round(out)
            result[label] = {"accuracy": last["accuracy"], "seconds": seconds,
                             "bytes_up_last_round": last["bytes_up"]}
    result["accuracy_difference"] = abs(result["secagg"]["accuracy"]  # type: ignore[index]
                                        - result["plain"]["accuracy"])  # type: ignore[index]
    return result


def kept_accuracy(previous: dict[str, object]) -> object:
    """The accuracy pair on disk, with the date it was measured (the file's date when the pair
    has none of its own): a crypto-only re-run must not pass an old pair off as today's."""
    accuracy = previous.get("accuracy")
    if isinstance(accuracy, dict) and "date" not in accuracy:
        accuracy = {**accuracy, "date": str(previous.get("date", "unknown"))[:10]}
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 clients, small vectors, "
                        "the built-in data")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="only the protocol's cost (keeps the accuracy pair on disk)")
    args = parser.parse_args()
    lengths = {"minilm_adapter": (adapter_length(), (5, 10, 20, 50, 100, 1000)),
               "one_million": (1_000_000, (5, 10, 50, 100))}
    if args.quick:
        lengths = {"small": (1000, (5,))}
    rows = []
    for label, (length, sizes) in lengths.items():
        for clients in sizes:
            row = {"vector": label, **one_round(clients, length)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    from benchmarks.plots import line_chart
    from benchmarks.record import load, save, today
    from benchmarks.shared_data import SHARED_BANKING77

    previous = load("secagg_cost", quick=args.quick) or {}
    data = "builtin" if args.quick or not SHARED_BANKING77.is_dir() else str(SHARED_BANKING77)
    accuracy = kept_accuracy(previous) if args.skip_accuracy else {
        **accuracy_pair(data, args.quick), "date": today()}
    path = save("secagg_cost", {"rounds": rows, "accuracy": accuracy,
                                "goal_bytes_ratio": 1.05, "goal_accuracy_difference": 0.005},
                quick=args.quick)
    series = {label: ([r["clients"] for r in rows if r["vector"] == label],
                      [r["client_crypto_seconds"] for r in rows if r["vector"] == label])
              for label in lengths}
    line_chart(path.with_suffix(".png"), series, xlabel="clients",
               ylabel="client crypto seconds per round", title="Secure aggregation cost")
    print(json.dumps({"accuracy": accuracy}))


if __name__ == "__main__":
    main()
