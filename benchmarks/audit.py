"""The one-run privacy audit (docs/audit.md) at epsilon 1, 3, 8 and without DP on one shared data
set (a seeded banking77 subset): the lower bound on epsilon beside the ledger's epsilon; and with
`--defaults`, its power where users meet it: a non-private `fedtune simulate --audit` with every
setting at its default on each data set of the privacy-utility benchmark.

    python -m benchmarks.audit [--quick] [--settings no-dp,dp-eps8]
    python -m benchmarks.audit --defaults [--only sst2,banking77] [--seed 1]

Every run is `fedtune simulate ... --audit` with the same data, model, seed and canaries; only the
privacy flags differ. `defect-eps1` is the DP run at epsilon 1 with a deliberate defect
(`benchmarks/defect_hook`: DP-SGD without its noise, the ledger charged as if it had it): the
audit must flag it. Each cell is saved as soon as it is measured, into the grid already on disk.
`--defaults --seed N` (N > 0) repeats the runs at the defaults with `--seed N` on the same
subsamples, saved under `defaults_seeds` beside seed 0's `defaults`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from benchmarks.fedtune_run import fedtune, last_round, lost_clients
from benchmarks.shared_data import SHARED_BANKING77
from fedtune.common.run_dir import AUDIT_FILE

TRAIN_ROWS, TEST_ROWS = 250, 200
COMMON = ["--num-clients", "2", "--rounds", "4", "--local-epochs", "3", "--max-length", "32",
          "--batch-size", "16", "--lr", "0.005", "--delta", "1e-5", "--audit",
          "--canaries", "200"]
SETTINGS: dict[str, list[str]] = {
    "no-dp": [],
    "dp-eps8": ["--dp", "--epsilon", "8"],
    "dp-eps3": ["--dp", "--epsilon", "3"],
    "dp-eps1": ["--dp", "--epsilon", "1"],
    "defect-eps1": ["--dp", "--epsilon", "1"],
}
DEFECT_HOOK = Path(__file__).resolve().parent / "defect_hook"
DEFECTS = {"defect-eps1": "no-noise"}  # setting -> FEDTUNE_INJECT_DEFECT
QUICK = ["--num-clients", "2", "--rounds", "1", "--max-length", "32", "--audit",
         "--canaries", "40"]
# The audit's design these figures belong to; cells saved under another are measured again.
DESIGN = ("made-up-word canaries scored in their client's last release, minus the initial "
          "adapter's scores, top-only and two-sided guesses")
# --defaults: (train rows, test rows) of each seeded subsample, what 2 CPU cores allow
DEFAULTS_ROWS = {"banking77": (2000, 1000), "sst2": (2000, 872),
                 "medical_abstracts": (2000, 582), "pubmedqa_pqal": (500, 500)}


def prepare(scratch: Path) -> str:
    """A seeded banking77 subset (train and test rows) in `scratch`; the data stay shared."""
    target = scratch / "banking77"
    target.mkdir()
    shutil.copy(SHARED_BANKING77 / "labels.json", target / "labels.json")
    for name, rows, seed in (("train.jsonl", TRAIN_ROWS, 0), ("test.jsonl", TEST_ROWS, 1)):
        lines = (SHARED_BANKING77 / name).read_text(encoding="utf-8").splitlines(keepends=True)
        random.Random(seed).shuffle(lines)
        (target / name).write_text("".join(lines[:rows]), encoding="utf-8")
    return str(target)


def run(flags: list[str], out: Path, defect: str | None = None) -> dict:
    env = dict(os.environ)
    if defect is not None:
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(DEFECT_HOOK),
                                                            env.get("PYTHONPATH")])),
                   FEDTUNE_INJECT_DEFECT=defect)
    done = fedtune("simulate", flags, out, env)
    if done.error:
        return {"error": done.error}
    if lost := lost_clients(out):
        return {"error": f"clients lost, {lost}"}
    audit = json.loads((out / AUDIT_FILE).read_text())
    last = last_round(out)
    keep = ("epsilon_lower_bound", "epsilon_reported", "delta", "confidence", "canaries",
            "canaries_included", "guesses", "guesses_right", "guesses_tried", "tpr_at_1pct_fpr",
            "defect", "epsilon_detectable_max", "underpowered", "vantage")
    injected = f"FEDTUNE_INJECT_DEFECT={defect} " if defect else ""
    return {"fedtune": injected + " ".join(["simulate", *flags]), "accuracy": last["accuracy"],
            **{key: audit[key] for key in keep}}


def plot(path: Path, results: dict[str, dict]) -> None:
    """Lower bound against reported epsilon, with the line the bound must stay under."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {k: r for k, r in results.items() if "error" not in r}
    claimed = [r["epsilon_reported"] for r in done.values() if r["epsilon_reported"]]
    no_dp_x = 1.4 * max(claimed, default=1.0) + 1
    figure, axis = plt.subplots(figsize=(5.2, 3.6))
    top = max([no_dp_x, *claimed])
    axis.plot([0, top], [0, top], color="#999999", linestyle="--",
              label="bound = reported (never above)")
    for label, r in done.items():
        x = r["epsilon_reported"] if r["epsilon_reported"] is not None else no_dp_x
        axis.scatter([x], [r["epsilon_lower_bound"]], s=40,
                     color="#c44e52" if r["defect"] else "#4c72b0")
        axis.annotate(label, (x, r["epsilon_lower_bound"]), textcoords="offset points",
                      xytext=(4, 6), fontsize=8)
    axis.set_xlabel("epsilon reported by the ledger (no DP plotted at the right)")
    axis.set_ylabel("audit lower bound (95%)")
    axis.set_title("One-run audit: measured vs claimed epsilon")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


DEFAULTS_KEYS = ("defaults", "defaults_seeds")  # --defaults' figures: seed 0, other seeds
KEPT = ("data", "common_flags", "results", *DEFAULTS_KEYS)  # what a save keeps


def measure_defaults(names: list[str], seed: int = 0) -> None:
    """A non-private run at fedtune's defaults with `--audit` (its defaults too) per data set;
    seed 0 is fedtune's default seed, another is passed as `--seed`."""
    from benchmarks.privacy_utility import prepare as prepare_subsample
    from benchmarks.record import load, save, today

    saved = load("audit", quick=False) or {}
    if saved.get("design") != DESIGN:
        saved = {}
    kept = {key: saved[key] for key in KEPT if key in saved}
    figures = (kept.setdefault("defaults", {}) if seed == 0 else
               kept.setdefault("defaults_seeds", {}).setdefault(str(seed), {}))
    flags = ["--audit", *(["--seed", str(seed)] if seed else [])]
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            data, sizes = prepare_subsample(name, Path(scratch), *DEFAULTS_ROWS[name])
            result = run(["--data", str(data), *flags], Path(scratch) / f"defaults-{name}")
            print(name, result, flush=True)
            if "error" in result:  # a failed run never replaces a figure measured before
                continue
            figures[name] = {**sizes, **result, "date": today()}
            save("audit", {**kept, "design": DESIGN}, quick=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="built-in set, one round, 2 runs")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated cells to (re)measure")
    parser.add_argument("--defaults", action="store_true",
                        help="the audit's power at the defaults, a run per data set")
    parser.add_argument("--only", default=",".join(DEFAULTS_ROWS),
                        help="--defaults: comma-separated data sets")
    parser.add_argument("--seed", type=int, default=0,
                        help="--defaults: fedtune's --seed (0, its default, is `defaults`)")
    args = parser.parse_args()
    from benchmarks.record import load, save, today

    if args.seed and not args.defaults:
        parser.error("--seed: only with --defaults (the claim grid runs at fedtune's seed)")
    if args.defaults:
        unknown = set(args.only.split(",")) - set(DEFAULTS_ROWS)
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)}; choose from {list(DEFAULTS_ROWS)}")
        if args.seed < 0:
            parser.error(f"--seed: must be 0 or more, got {args.seed}")
        measure_defaults(args.only.split(","), args.seed)
        return

    chosen = args.settings.split(",")
    unknown = set(chosen) - set(SETTINGS)
    if unknown:
        parser.error(f"--settings: unknown {sorted(unknown)}; choose from {list(SETTINGS)}")
    common = QUICK if args.quick else COMMON
    if args.quick:
        chosen = ["no-dp", "dp-eps8"]
    saved = None if args.quick else load("audit", quick=False)
    if saved and saved.get("design") != DESIGN:
        saved = None
    results: dict[str, dict] = saved["results"] if saved and "results" in saved else {}
    kept = {key: saved[key] for key in DEFAULTS_KEYS if key in saved} if saved else {}
    path = None
    with tempfile.TemporaryDirectory() as scratch:
        data = "builtin" if args.quick else prepare(Path(scratch))
        for label in chosen:
            out = Path(scratch) / label
            result = run(["--data", data, *common, *SETTINGS[label]], out, DEFECTS.get(label))
            print(label, result, flush=True)
            if "error" in result and "error" not in results.get(label, {"error": None}):
                continue  # a failed run never replaces a figure measured before
            results[label] = {**result, "date": today()}
            if label in DEFECTS:
                results[label]["injected_defect"] = DEFECTS[label]
            path = save("audit", {"data": "builtin" if args.quick else
                                  f"banking77 seeded subset: {TRAIN_ROWS} train, "
                                  f"{TEST_ROWS} test rows",
                                  "common_flags": common, "results": results,
                                  "design": DESIGN, **kept},
                        quick=args.quick)
    if path is not None:
        plot(path.with_suffix(".png"), results)


if __name__ == "__main__":
    main()
