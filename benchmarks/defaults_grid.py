"""A grid of `benchmarks.defaults_sweep` runs on the full data sets, several at once, each line
saved as it finishes: how the training defaults were chosen (see docs/utility.md).

    python -m benchmarks.defaults_grid --grid plain --data-root /tmp/grid-data --jobs 8 \\
        --out benchmarks/results/defaults_grid.jsonl

`--prepare --data-root DIR --out /dev/null` writes the data sets the way `benchmarks.utility`
reads them (banking77 as is, medical_abstracts' re-split, sst2's seeded 8,000-row subsample with
validation as test) and exits, so the grid can run on a machine that has no ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import chain, zip_longest
from pathlib import Path

from benchmarks.utility import prepare

DIRICHLET = ['partition.scheme="dirichlet"', "partition.alpha=0.5"]
FEDAVG = ['federation.strategy="fedavg"']


def _plain() -> list[tuple[str, str, list[str]]]:
    """(data, mode, --set items): banking77, centralised against federated variants."""
    runs = [("banking77", "central", []), ("banking77", "central", ["train.batch_size=16"]),
            ("banking77", "fed", []), ("banking77", "fed", FEDAVG),
            ("banking77", "fed", DIRICHLET)]
    for batch in (8, 16):
        for lr in (2e-3, 5e-3):
            sets = [f"train.batch_size={batch}", f"train.lr={lr}"]
            runs += [("banking77", "fed", sets), ("banking77", "fed", sets + DIRICHLET)]
    for head in (3e-2,):
        runs.append(("banking77", "fed", ["train.batch_size=8", f"train.head_lr={head}"]))
    runs += [("banking77", "fed", ["train.local_epochs=2"]),
             ("banking77", "fed", ["train.batch_size=8", "federation.server_momentum=0.5"]),
             ("banking77", "fed", ["train.batch_size=8", *FEDAVG])]
    for data in ("sst2", "medical_abstracts"):
        runs += [(data, "central", []), (data, "fed", []), (data, "fed", ["train.batch_size=8"])]
    return runs


def _dp() -> list[tuple[str, str, list[str]]]:
    """DP-SGD at epsilon 8 on the three data sets: batch, learning rates, clip, FFA-LoRA."""
    dp = ["privacy.dp=true", "privacy.epsilon=8.0"]
    runs = [(data, "fed", dp) for data in ("sst2", "banking77", "medical_abstracts")]
    for data in ("sst2", "banking77", "medical_abstracts"):
        for batch in (128, 512, 1024):
            runs.append((data, "fed", [*dp, f"train.batch_size={batch}"]))
        for lr, head in ((2e-2, 5e-2), (5e-3, 5e-2), (2e-2, 1e-2), (1e-3, 2e-3)):
            runs.append((data, "fed", [*dp, f"train.lr={lr}", f"train.head_lr={head}"]))
        runs += [(data, "fed", [*dp, "train.max_grad_norm=0.1"]),
                 (data, "fed", [*dp, "lora.freeze_a=true", "lora.r=4"]),
                 (data, "fed", [*dp, "train.local_epochs=4"]),
                 (data, "fed", [*dp, "train.local_epochs=1"])]
    return runs


def _dp_follow_up() -> list[tuple[str, str, list[str]]]:
    """After `dp`: larger learning rates combined with FFA-LoRA, more epochs, smaller batches
    for the small medical clients, and the non-private references with batch 8."""
    dp = ["privacy.dp=true", "privacy.epsilon=8.0"]
    fast = [*dp, "train.lr=0.02", "train.head_lr=0.05"]
    ffa = ["lora.freeze_a=true", "lora.r=4"]
    return [("sst2", "fed", ["train.batch_size=8"]),
            ("sst2", "fed", [*fast, *ffa]),
            ("sst2", "fed", [*fast, "train.local_epochs=4"]),
            ("sst2", "fed", [*dp, "train.lr=0.05", "train.head_lr=0.1"]),
            ("sst2", "fed", [*fast, "train.batch_size=512"]),
            ("medical_abstracts", "fed", fast),
            ("medical_abstracts", "fed", [*fast, "train.batch_size=64"]),
            ("medical_abstracts", "fed", [*fast, *ffa, "train.batch_size=128"]),
            ("medical_abstracts", "fed", ["train.batch_size=8"]),
            ("banking77", "fed", fast),
            ("banking77", "fed", ["train.batch_size=8", 'federation.strategy="fedavg"']),
            ("sst2", "fed", [*fast, *ffa, "train.local_epochs=4"])]


GRIDS = {"plain": _plain, "dp": _dp, "dp-follow-up": _dp_follow_up}


def run_one(data_root: Path, data: str, mode: str, sets: list[str], model: str,
            timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.defaults_sweep", "--data", str(data_root / data),
               "--rows", "1000000", "--test-rows", "1000000", "--mode", mode]
    for item in sets + ([f'model.name="{model}"'] if model else []):
        command += ["--set", item]
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"data": data, "mode": mode, "set": sets, "error": f"timeout {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"data": data, "mode": mode, "set": sets, "error": tail,
                "seconds": round(time.time() - started)}
    return {"data": data, **json.loads(lines[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), action="append", default=[])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--prepare", action="store_true", help="write the data sets and exit")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default="", help="model.name for every run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.prepare:
        args.data_root.mkdir(parents=True, exist_ok=True)
        for name in ("banking77", "sst2", "medical_abstracts"):
            source = prepare(name, args.data_root)
            if source != str(args.data_root / name):  # banking77 is read in place: copy it
                for file in Path(source).glob("*.json*"):
                    (args.data_root / name / file.name).write_bytes(file.read_bytes())
        return
    # The grids interleaved, each in its own order of importance, so a cut-short run covers all.
    lists = [GRIDS[grid]() for grid in args.grid]
    runs = [run for run in chain.from_iterable(zip_longest(*lists)) if run is not None]
    with ThreadPoolExecutor(args.jobs) as pool, args.out.open("a") as out:
        futures = [pool.submit(run_one, args.data_root, *run, args.model, args.timeout)
                   for run in runs]
        for future in as_completed(futures):
            out.write(json.dumps(future.result()) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
