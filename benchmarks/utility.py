"""Utility on real data with fedtune's defaults: centralised non-private, federated IID and
Dirichlet(0.5, 0.1), DP-SGD at epsilon 8/3/1 on IID and Dirichlet(0.5) clients, and secure
aggregation, on banking77, medical_abstracts and sst2 (validation as test): final accuracy,
macro-F1, worst-client accuracy and wall time per run.

    python -m benchmarks.utility [--quick] [--only banking77,sst2] [--settings dp-eps1,secagg]

The data stay in ../shared/data; a run reads a temporary directory that names their splits the
way fedtune expects (medical_abstracts' derived re-split; a seeded subsample of sst2's train).
Each cell is saved as soon as it is measured, into the grid already on disk, so an interrupted or
partial run (`--only`, `--settings`) keeps and completes what earlier runs measured.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from benchmarks.fedtune_run import fedtune
from benchmarks.shared_data import SHARED, SPLITS, read_lines
from fedtune.server.metrics_log import read_rounds

# Only the shape of the federation is set: every training setting is fedtune's default.
COMMON = ["--num-clients", "10", "--rounds", "5", "--max-length", "64"]
DIRICHLET = ["--partition", "dirichlet", "--alpha", "0.5"]
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "centralised": ("centralized", []),
    "iid": ("simulate", []),
    "dirichlet-0.5": ("simulate", DIRICHLET),
    "dirichlet-0.1": ("simulate", ["--partition", "dirichlet", "--alpha", "0.1"]),
    "dp-eps8": ("simulate", ["--dp", "--epsilon", "8"]),
    "dp-eps3": ("simulate", ["--dp", "--epsilon", "3"]),
    "dp-eps1": ("simulate", ["--dp", "--epsilon", "1"]),
    "dirichlet-0.5-dp-eps8": ("simulate", [*DIRICHLET, "--dp", "--epsilon", "8"]),
    "dirichlet-0.5-dp-eps3": ("simulate", [*DIRICHLET, "--dp", "--epsilon", "3"]),
    "dirichlet-0.5-dp-eps1": ("simulate", [*DIRICHLET, "--dp", "--epsilon", "1"]),
    "secagg": ("simulate", ["--secagg"]),
}
SST2_TRAIN_ROWS = 8000


def prepare(name: str, scratch: Path) -> str:
    """A directory with train.jsonl and test.jsonl (+ labels.json) for data set `name`."""
    source, target = SHARED / name, scratch / name
    target.mkdir()
    shutil.copy(source / "labels.json", target / "labels.json")
    if name == "banking77":
        return str(source)
    train, test = SPLITS[name]
    if name == "sst2":
        rows = read_lines(source / train)
        random.Random(0).shuffle(rows)
        (target / "train.jsonl").write_text("".join(rows[:SST2_TRAIN_ROWS]), encoding="utf-8")
    else:
        shutil.copy(source / train, target / "train.jsonl")
    shutil.copy(source / test, target / "test.jsonl")
    return str(target)


def run(command: str, flags: list[str], out: Path) -> dict[str, float | None]:
    done = fedtune(command, flags, out)
    if done.error:
        return {"error": done.error}
    rows = read_rounds(out)
    last = rows[-1]
    return {"fedtune": " ".join([command, *flags]), "accuracy": last["accuracy"],
            "macro_f1": last.get("macro_f1"),
            "worst_client_accuracy": last.get("client_accuracy_worst"),
            "accuracy_per_round": [r["accuracy"] for r in rows],
            "epsilon_max": last.get("epsilon_max"), "seconds": done.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="built-in set, one round, 4 runs")
    parser.add_argument("--only", default="banking77,medical_abstracts,sst2",
                        help="comma-separated data sets")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated cells of the grid to (re)measure")
    args = parser.parse_args()
    from benchmarks.plots import grouped_bars
    from benchmarks.record import load, save

    common, names, chosen = COMMON, args.only.split(","), args.settings.split(",")
    unknown = set(chosen) - set(SETTINGS)
    if unknown:
        parser.error(f"--settings: unknown {sorted(unknown)}; choose from {list(SETTINGS)}")
    settings = {label: SETTINGS[label] for label in chosen}
    if args.quick:
        common = ["--num-clients", "3", "--rounds", "1", "--max-length", "32"]
        settings = {k: SETTINGS[k] for k in ("centralised", "dirichlet-0.5", "dp-eps8", "secagg")}
        names = ["builtin"]
    saved = None if args.quick else load("utility", quick=False)
    if saved and saved.get("common_flags") != common:  # measured with other flags: start over
        saved = None
    results: dict[str, dict[str, dict]] = saved["results"] if saved else {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            data = "builtin" if name == "builtin" else prepare(name, Path(scratch))
            results.setdefault(name, {})
            for label, (command, extra) in settings.items():
                out = Path(scratch) / f"{name}-{label}"
                results[name][label] = run(command, ["--data", data, *common, *extra], out)
                print(name, label, results[name][label], flush=True)
                path = save("utility", {"common_flags": common, "results": results},
                            quick=args.quick)
    grouped_bars(path.with_suffix(".png"),
                 {name: {label: r.get("accuracy") or 0.0 for label, r in runs.items()}
                  for name, runs in results.items()},
                 ylabel="test accuracy after the last round", title="Utility")


if __name__ == "__main__":
    main()
