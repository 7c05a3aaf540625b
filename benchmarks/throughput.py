"""Throughput: federated simulation against centralised LoRA training on the same data, model,
seed and passes, both measured in this one run as examples per second over the whole command
(start-up, training and the per-round evaluation included). Goal: federated / centralised >= 0.9.

    python -m benchmarks.throughput [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.fedtune_run import fedtune
from benchmarks.shared_data import SHARED_BANKING77


def timed_run(command: str, flags: list[str], out: Path) -> float:
    return fedtune(command, flags, out, check=True).seconds


def examples_trained(flags: list[str]) -> int:
    """Rows the clients train on per round, times rounds (every client trains every round)."""
    from fedtune.cli import FLAGS
    from fedtune.common.config import RunConfig, run_field
    from fedtune.common.settings import FLAG_TYPES
    from fedtune.common.task import cached_task

    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    values = {FLAGS[flag]: FLAG_TYPES[run_field(FLAGS[flag]).type](value)
              for flag, value in pairs.items()}
    config = RunConfig.from_mapping(values)
    task = cached_task(config)
    clients = config.federation.num_clients
    rows = sum(len(task.client_examples(config.partition, c, clients)[0]) for c in range(clients))
    return rows * config.federation.rounds * config.training.local_epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="built-in set, 3 clients, 1 round")
    args = parser.parse_args()
    if args.quick:
        flags = ["--data", "builtin", "--num-clients", "3", "--rounds", "1", "--max-length", "32",
                 "--batch-size", "16"]
    else:
        data = str(SHARED_BANKING77) if SHARED_BANKING77.is_dir() else "builtin"
        flags = ["--data", data, "--num-clients", "10", "--rounds", "2", "--max-length", "64",
                 "--batch-size", "32", "--lr", "0.003"]
    examples = examples_trained(flags)
    with tempfile.TemporaryDirectory() as scratch:
        federated = timed_run("simulate", flags, Path(scratch) / "federated")
        centralised = timed_run("centralized", flags, Path(scratch) / "centralised")
    figures = {"flags": flags, "examples_trained": examples,
               "federated_seconds": federated, "centralised_seconds": centralised,
               "federated_examples_per_s": examples / federated,
               "centralised_examples_per_s": examples / centralised,
               "ratio": centralised / federated, "goal_ratio": 0.9}
    print(figures, flush=True)
    from benchmarks.plots import bar_chart
    from benchmarks.record import save

    path = save("throughput", figures, quick=args.quick)
    bar_chart(path.with_suffix(".png"),
              {"federated": examples / federated, "centralised": examples / centralised},
              title="Training examples per second (whole run)")


if __name__ == "__main__":
    main()
