"""Accuracy against epsilon at fedtune's defaults: `fedtune simulate` (IID, Dirichlet 0.5 and 0.1)
and pooled training (`fedtune centralized`; under DP-SGD one simulated client holding every row)
at epsilon 1, 2, 4, 8 (DP-SGD) and without DP, on banking77, sst2, medical_abstracts and
pubmedqa_pqal, several seeds per cell; mean and spread, the DP gap at epsilon 8, one plot with a
panel per data set.

    python -m benchmarks.privacy_utility [--rows 0] [--test-rows 0] [--only sst2,banking77]
        [--partitions iid,dirichlet-0.5] [--epsilons 8,none] [--seeds 0,1,2] [--max-length 0]
        [--jobs 1] [--cells sst2:iid/1,banking77:dirichlet-0.5/none] [--results NAME]
        [--config TOML] [--untrained]

Every run is the real command with only the data, the partition, the privacy target and the seed
set: every training setting is fedtune's default. `--rows`/`--test-rows` keep a seeded subsample (0
= all rows); the JSON states the sizes each figure was measured on, and a saved grid is completed,
never mixed with one measured on other sizes (nor replaced by one, unless `--replace`; `--results
NAME` keeps a grid on other sizes in a file of its own). Each cell is saved as soon as it is
measured, so an interrupted run resumes where it stopped. `--jobs 2` runs two cells at once (the
seconds recorded are then those of a shared machine). `--cells` names the cells to fill instead of
every data set x partition x epsilon, in the order they run, so a long DP-SGD cell and short ones
can share the two slots. A run that fails (or is stopped) adds nothing to its cell; the JSON's
`failed` lists this invocation's, with the error, so a cell that never finishes shows why.
`--config` adds a TOML's settings to every run (the grid records them): how figures of an earlier
default are measured again. `--untrained` runs nothing: it scores the model before any round on
each `--only` data set's test rows, its head from the label names (where DP-SGD starts) and at
random (where plain training starts, seed 0), the floor a curve is read against.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.fedtune_run import fedtune, last_round, lost_clients
from benchmarks.shared_data import SHARED, SPLITS, read_lines

NAME = "privacy_utility"
DATA_SETS = tuple(SPLITS)
PARTITIONS: dict[str, tuple[str, list[str]]] = {
    "pooled": ("centralized", []),
    "iid": ("simulate", []),
    "dirichlet-0.5": ("simulate", ["--partition", "dirichlet", "--alpha", "0.5"]),
    "dirichlet-0.1": ("simulate", ["--partition", "dirichlet", "--alpha", "0.1"]),
}
EPSILONS = ("1", "2", "4", "8", "none")
GAP_EPSILON = "8"
UNTRAINED_BATCH = 64  # test rows a pass when scoring the untrained model


def prepare(name: str, scratch: Path, rows: int, test_rows: int) -> tuple[Path, dict[str, int]]:
    """A data directory for `name` with a seeded subsample (0 = all) and the sizes it holds."""
    source, target = SHARED / name, scratch / name
    target.mkdir(parents=True)
    shutil.copy(source / "labels.json", target / "labels.json")
    sizes = {}
    for split, file, keep in (("train", SPLITS[name][0], rows),
                              ("test", SPLITS[name][1], test_rows)):
        lines = read_lines(source / file)
        random.Random(f"{name}-{split}").shuffle(lines)
        kept = lines[:keep] if keep else lines
        (target / f"{split}.jsonl").write_text("".join(kept), encoding="utf-8")
        sizes[f"{split}_rows"] = len(kept)
    return target, sizes


def flags_for(partition: str, epsilon: str, seed: int) -> tuple[str, list[str]]:
    """The command and flags of one cell. Pooled DP-SGD is one simulated client holding every
    row (`fedtune centralized` is the non-private baseline and refuses --dp)."""
    command, extra = PARTITIONS[partition]
    privacy = [] if epsilon == "none" else ["--dp", "--epsilon", epsilon]
    if partition == "pooled" and privacy:
        command, extra = "simulate", ["--num-clients", "1"]
    return command, [*extra, *privacy, "--seed", str(seed)]


def run(command: str, flags: list[str], out: Path) -> dict[str, Any]:
    """One real run; its last round's accuracy and macro-F1, the largest epsilon, the time."""
    done = fedtune(command, flags, out)
    if done.error:
        return {"error": done.error, "seconds": done.seconds}
    if lost := lost_clients(out):
        return {"error": f"clients lost, {lost}", "seconds": done.seconds}
    from benchmarks.record import today

    last = last_round(out)
    return {"accuracy": last["accuracy"], "macro_f1": last.get("macro_f1"),
            "epsilon_max": last.get("epsilon_max"), "seconds": done.seconds,
            "date": today()}  # the file's own date is its last invocation's


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over the seeds that finished."""
    done = [r for r in runs.values() if "accuracy" in r]
    summary: dict[str, Any] = {"seeds": len(done)}
    for key in ("accuracy", "macro_f1"):
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            summary[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "min": min(values), "max": max(values)}
    return summary


def dp_gaps(cells: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per partition: mean accuracy without DP minus at epsilon 8 (points), where both exist."""
    gaps = {}
    for partition in PARTITIONS:
        plain, private = (cells.get(f"{partition}/{e}", {}).get("summary", {}).get("accuracy")
                          for e in ("none", GAP_EPSILON))
        if plain and private:
            gaps[partition] = round(100 * (plain["mean"] - private["mean"]), 2)
    return gaps


def plot(path: Path, grid: dict[str, dict[str, Any]]) -> None:
    """A panel per data set: mean accuracy (error bar: min to max over seeds) against epsilon,
    and a dotted line over the DP-SGD columns at the untrained model's, its head from the label
    names (DP-SGD's start), where measured."""
    from benchmarks.plots import plt

    names = [n for n in grid  # a data set with a measured cell
             if any("accuracy" in c.get("summary", {}) for c in grid[n]["cells"].values())]
    figure, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.4),
                                squeeze=False)
    positions = {e: i for i, e in enumerate(EPSILONS)}
    for axis, name in zip(axes[0], names, strict=False):
        for partition in PARTITIONS:
            points = [(positions[e], cell["summary"]["accuracy"]) for e in EPSILONS
                      if (cell := grid[name]["cells"].get(f"{partition}/{e}"))
                      and "accuracy" in cell.get("summary", {})]
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [a["mean"] for _, a in points]
            spread = [[a["mean"] - a["min"] for _, a in points],
                      [a["max"] - a["mean"] for _, a in points]]
            axis.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=partition)
        if floor := grid[name].get("untrained", {}).get("label_names"):  # DP-SGD's start only
            axis.hlines(floor["accuracy"], positions["1"], positions[GAP_EPSILON],
                        linestyles=":", colors="grey", label="untrained, head from names")
        sizes = grid[name]["sizes"]
        axis.set_title(f"{name} ({sizes['train_rows']} train / {sizes['test_rows']} test)",
                       fontsize=9)
        axis.set_xticks(range(len(EPSILONS)), ["1", "2", "4", "8", "no DP"])
        axis.set_xlabel("epsilon (DP-SGD, per client)")
        axis.set_ylabel("test accuracy")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def untrained(data: Path, max_length: int) -> dict[str, Any]:
    """Test accuracy and macro-F1 of the model before any round, per start of its head: how much
    of a private run's score the label names gave before a row was read."""
    from fedtune.common.config import RunConfig
    from fedtune.common.task import build_task

    floor: dict[str, Any] = {}
    for head in ("label_names", "random"):
        model = {"head_init": head, **({"max_length": max_length} if max_length else {})}
        task = build_task(RunConfig.from_mapping({"data": {"path": str(data)},
                                                  "model": model}).resolved())
        stats = task.evaluate(task.data.test, UNTRAINED_BATCH)
        floor[head] = {"accuracy": stats.accuracy, "macro_f1": stats.macro_f1}
    return floor


def read_config(path: Path) -> str:
    """The settings file's text, as the grid records it, read as fedtune reads it before any
    run starts; exit 2 naming an unreadable or invalid one."""
    from fedtune.common.config import RunConfig
    from fedtune.common.errors import InputError

    try:
        RunConfig.from_toml(path)
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeError, InputError) as error:
        print(f"privacy_utility: --config {path}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DATA_SETS))
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--epsilons", default=",".join(EPSILONS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", type=int, default=0, help="training rows kept (0 = all)")
    parser.add_argument("--test-rows", type=int, default=0, help="test rows kept (0 = all)")
    parser.add_argument("--max-length", type=int, default=0,
                        help="tokens per example (0 = fedtune's default)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (each is its own process; its time is recorded)")
    parser.add_argument("--replace", action="store_true",
                        help="start a new grid when the saved one was measured on other sizes "
                             "(without it such a run is refused: the saved grid would be lost)")
    parser.add_argument("--results", default=NAME, metavar="NAME",
                        help="the grid's file, benchmarks/results/NAME.json (and .png): a grid "
                             "on other sizes kept beside the saved one")
    parser.add_argument("--config", type=Path, metavar="TOML",
                        help="settings every run adds (`fedtune ... --config TOML`), e.g. "
                             "benchmarks/head_at_random.toml; kept in the grid's shape, so a "
                             "grid is never completed with runs of other settings")
    parser.add_argument("--untrained", action="store_true",
                        help="run nothing; score the untrained model (head from the label names "
                             "and at random) on each --only data set's test rows")
    parser.add_argument("--cells", default="",
                        help="DATA:PARTITION/EPSILON,... to fill instead of --only x "
                             "--partitions x --epsilons, in this order")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs: must be at least 1, got {args.jobs}")
    if args.untrained and (args.config or args.cells):  # fedtune's model, --only's data sets
        parser.error("--untrained takes no --config or --cells: it scores the default model "
                     "on each --only data set")
    for flag, chosen, allowed in (("--only", args.only, DATA_SETS),
                                  ("--partitions", args.partitions, PARTITIONS),
                                  ("--epsilons", args.epsilons, EPSILONS)):
        unknown = set(chosen.split(",")) - set(allowed)
        if unknown:
            parser.error(f"{flag}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    try:
        args.cells = (parse_cells(args.cells) if args.cells else
                      [(name, partition, epsilon) for name in args.only.split(",")
                       for partition in args.partitions.split(",")
                       for epsilon in args.epsilons.split(",")])
    except ValueError as error:
        parser.error(f"--cells: {error}")
    return args


def parse_cells(text: str) -> list[tuple[str, str, str]]:
    """`sst2:iid/1,banking77:pooled/none` as (data set, partition, epsilon), checked."""
    cells = []
    for item in text.split(","):
        name, _, rest = item.partition(":")
        partition, _, epsilon = rest.partition("/")
        if name not in DATA_SETS or partition not in PARTITIONS or epsilon not in EPSILONS:
            raise ValueError(f"{item!r} is not DATA:PARTITION/EPSILON with DATA in "
                             f"{list(DATA_SETS)}, PARTITION in {list(PARTITIONS)}, EPSILON in "
                             f"{list(EPSILONS)}")
        cells.append((name, partition, epsilon))
    return cells


def measured(grid: dict[str, Any]) -> dict[str, Any]:
    """The grid with only the runs that finished: a cell laid out but not run, or a run that
    failed or was stopped (the console says which), leaves nothing in the JSON, and the next
    run of the benchmark measures it again."""
    kept = {name: {**entry, "cells": {key: {**cell, "runs": runs}
                                      for key, cell in entry["cells"].items()
                                      if (runs := _finished(cell["runs"]))}}
            for name, entry in grid.items()}
    return {name: entry for name, entry in kept.items() if entry["cells"] or "untrained" in entry}


def write(results: str, shape: dict[str, Any], grid: dict[str, Any],
          failed: list[dict[str, Any]]) -> None:
    """The grid's JSON (its finished runs) and its plot, as they stand now."""
    from benchmarks.record import save

    path = save(results, {"shape": shape, "grid": measured(grid), "failed": failed}, quick=False)
    plot(path.with_suffix(".png"), grid)


def _finished(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {seed: run for seed, run in runs.items() if "accuracy" in run}


def main() -> None:
    args = parse()
    from benchmarks.record import load

    shape = {"rows": args.rows, "test_rows": args.test_rows, "max_length": args.max_length}
    if args.config:
        shape["config"] = read_config(args.config)
    saved = load(args.results, quick=False)
    if saved and saved["shape"] != shape and not args.replace:
        print(f"privacy_utility: the saved grid was measured on {saved['shape']}, these flags "
              f"ask for {shape}; run with the same --rows, --test-rows and --max-length, or pass "
              f"--replace to start a new grid (the saved one is then lost)", file=sys.stderr)
        raise SystemExit(2)
    same = bool(saved) and saved["shape"] == shape
    grid: dict[str, dict[str, Any]] = saved["grid"] if same else {}
    if args.untrained:  # the last runs' failures stay listed
        measure_untrained(args, shape, grid, saved.get("failed", []) if same else [])
        return
    extra = ["--max-length", str(args.max_length)] if args.max_length else []
    extra += ["--config", str(args.config.resolve())] if args.config else []
    lock = threading.Lock()  # one writer of the grid, its JSON and its plot at a time
    failed: list[dict[str, Any]] = []  # this invocation's runs that did not finish

    def measure(name: str, data: Path, partition: str, epsilon: str, seed: int) -> None:
        command, flags = flags_for(partition, epsilon, seed)
        out = data.parent / f"{name}-{partition}-{epsilon}-{seed}"
        result = run(command, ["--data", str(data), *extra, *flags], out)
        with lock:
            entry = grid[name]
            cell = entry["cells"][f"{partition}/{epsilon}"]
            cell["runs"][str(seed)] = result
            if "error" in result:
                failed.append({"data": name, "cell": f"{partition}/{epsilon}", "seed": seed,
                               **result})
            cell["fedtune"] = " ".join([command, *flags[:-2]])
            cell["summary"] = summarise(cell["runs"])
            entry["dp_gap_points"] = dp_gaps(entry["cells"])
            print(name, partition, epsilon, seed, result, flush=True)
            write(args.results, shape, grid, failed)

    with tempfile.TemporaryDirectory() as scratch:
        todo = []  # the whole grid is laid out before any run starts: workers only fill it in
        prepared: dict[str, Path] = {}
        for name, partition, epsilon in dict.fromkeys(args.cells):  # a repeated cell runs once
            if name not in prepared:
                prepared[name], sizes = prepare(name, Path(scratch), args.rows, args.test_rows)
                grid.setdefault(name, {"sizes": sizes, "cells": {}})
            cell = grid[name]["cells"].setdefault(f"{partition}/{epsilon}", {"runs": {}})
            todo += [(name, prepared[name], partition, epsilon, seed)
                     for seed in (int(s) for s in args.seeds.split(","))
                     if "accuracy" not in cell["runs"].get(str(seed), {})]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(measure, *item) for item in todo]:
                future.result()  # a crash in the bookkeeping is not swallowed


def measure_untrained(args: argparse.Namespace, shape: dict[str, Any],
                      grid: dict[str, dict[str, Any]], failed: list[dict[str, Any]]) -> None:
    """`--untrained`: each --only data set's floor, saved beside its cells, drawn in its panel."""
    from benchmarks.record import today

    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only.split(","):
            data, sizes = prepare(name, Path(scratch), args.rows, args.test_rows)
            entry = grid.setdefault(name, {"sizes": sizes, "cells": {}})
            entry["untrained"] = {**untrained(data, args.max_length), "date": today()}
            print(name, "untrained", entry["untrained"], flush=True)
            write(args.results, shape, grid, failed)


if __name__ == "__main__":
    main()
