"""Start-up: what a run's first round costs beyond the second, cold and warm, where it goes, and
the whole federated job against `fedtune centralized` on the same data and passes.

    python -m benchmarks.startup [--quick]

Cold: the first run after the kernel's page cache was dropped (as root on Linux; where that is
not allowed the figures say so), as after a reboot or a fresh install. Warm: the same command
again at once. Each is `fedtune simulate` with no arguments (the embedded model and data); the
round times are the run's own (`seconds` in metrics.jsonl). The pieces a Ray worker pays before
its first client are timed apart in a fresh process: importing the ClientApp, building the task
(model and data), one client's first local round and its second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.fedtune_run import fedtune
from benchmarks.record import save
from fedtune.server.metrics_log import read_rounds

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
PIECES = """
import json, time
started = time.perf_counter()
import fedtune.client.app, fedtune.client.local_round  # a worker's first train imports both
imported = time.perf_counter()
from fedtune.common.config import RunConfig
from fedtune.common.task import cached_task
config = RunConfig()
task = cached_task(config)
built = time.perf_counter()
rows = task.client_examples(config.partition, 0, config.federation.num_clients)[0]
laps = []
for _ in range(2):
    lap = time.perf_counter()
    loader, optimizer = task.start_round(task.initial_adapter, rows, config.training,
                                         dropout_seed=0, sampling_seed=0)
    task.train_plain(loader, optimizer, config.training)
    laps.append(time.perf_counter() - lap)
print(json.dumps({"import_client_app_s": imported - started, "build_task_s": built - imported,
                  "first_local_round_s": laps[0], "second_local_round_s": laps[1]}))
"""


def drop_page_cache() -> bool:
    """Drop the kernel's page cache; False where this process may not."""
    try:
        subprocess.run(["sync"], check=True)
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def timed(command: str, out: Path, *flags: str) -> dict:
    wall = fedtune(command, flags, out, check=True).seconds
    rounds = [row["seconds"] for row in read_rounds(out)]
    return {"wall_s": round(wall, 1), "round_s": [round(s, 1) for s in rounds],
            "first_over_second": round(rounds[0] / rounds[1], 2) if len(rounds) > 1 else None}


def pieces() -> dict:
    done = subprocess.run([sys.executable, "-c", PIECES], check=True, capture_output=True,
                          text=True)
    return {k: round(v, 2) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds, no cold run")
    args = parser.parse_args()
    flags = ("--rounds", "2") if args.quick else ()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dropped = False if args.quick else drop_page_cache()
        cold = None if args.quick else timed("simulate", root / "cold", *flags)
        warm = timed("simulate", root / "warm", *flags)
        central = timed("centralized", root / "central", *flags)
        parts = pieces()
    figures = {"cold": cold, "page_cache_dropped": dropped, "warm": warm,
               "centralized": central, "worker_pieces": parts,
               "federated_over_centralized_wall": round(warm["wall_s"] / central["wall_s"], 2)}
    print(json.dumps(figures, indent=2))
    print(save("startup", figures, quick=args.quick))


if __name__ == "__main__":
    main()
