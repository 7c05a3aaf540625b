"""Scale: 1,000, 10,000 and 50,000 virtual clients of sst2 in one simulation (its 67,349
training rows allow no more), ten of them sampled per round: seconds per round and peak resident
memory of the whole process tree (the driver, Ray's processes and its workers; shared pages count
once per process, so this is an upper bound).
Goals: under 4 GiB at 50,000 clients, and a first round within 3x of the second (the population
costs nothing until sampled: `simulations/node_names.py`).

    python -m benchmarks.scale [--quick] [--sizes 10000,50000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks.shared_data import SHARED_BANKING77

GIB = 1024**3
SHARED_SST2 = SHARED_BANKING77.parent / "sst2"
GOAL_PEAK_RSS_GIB = 4.0
GOAL_FIRST_OVER_SECOND = 3.0


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every descendant, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry.name)] = int(fields.get("PPid", "0"))
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        members.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in members)


def run(clients: int, sampled: int, rounds: int, data: str, out: Path) -> dict[str, float]:
    fraction = min(1.0, sampled / clients)
    config = out.with_suffix(".toml")
    config.write_text(f'[data]\npath = "{data}"\n[model]\nmax_length = 32\n[train]\n'
                      f"batch_size = 8\nlr = 0.003\n[federation]\nnum_clients = {clients}\n"
                      f"rounds = {rounds}\nfraction_train = {fraction}\n"
                      f"fraction_evaluate = {fraction}\n")
    process = subprocess.Popen([sys.executable, "-m", "fedtune", "simulate", "--config",
                                str(config), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], tree_rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{clients} clients failed: {errors[-2000:]}")
    from fedtune.server.metrics_log import read_rounds

    rows = read_rounds(out)
    seconds = [r["seconds"] for r in rows]
    return {"clients": clients, "sampled_per_round": rows[-1]["clients"],
            "round_seconds": seconds, "peak_rss_gib": peak[0] / GIB,
            "first_over_second_round": seconds[0] / seconds[1] if len(seconds) > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="built-in set, 10 and 30 clients")
    parser.add_argument("--sizes", help="comma-separated client counts (default 1000,10000,50000)")
    args = parser.parse_args()
    if args.quick:
        data, sizes, sampled, rounds = "builtin", (10, 30), 3, 1
    else:
        if not SHARED_SST2.is_dir():
            raise SystemExit(f"the scale benchmark reads sst2 from {SHARED_SST2}")
        data, sizes, sampled, rounds = str(SHARED_SST2), (1000, 10_000, 50_000), 10, 2
    if args.sizes:
        sizes = tuple(int(size) for size in args.sizes.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for clients in sizes:
            row = run(clients, sampled, rounds, data, Path(scratch) / f"run-{clients}")
            rows.append(row)
            print(row, flush=True)
    rows.sort(key=lambda r: r["clients"])
    from benchmarks.plots import line_chart
    from benchmarks.record import save

    goals = {"peak_rss_gib": GOAL_PEAK_RSS_GIB, "first_over_second_round": GOAL_FIRST_OVER_SECOND}
    met = all(r["peak_rss_gib"] < GOAL_PEAK_RSS_GIB and (r["first_over_second_round"] or 0)
              <= GOAL_FIRST_OVER_SECOND for r in rows)
    path = save("scale", {"runs": rows, "data": Path(data).name, "sampled_per_round": sampled,
                          "goals": goals, "goals_met": met}, quick=args.quick)
    counts = [r["clients"] for r in rows]
    line_chart(path.with_suffix(".png"),
               {"peak RSS, GiB": (counts, [r["peak_rss_gib"] for r in rows]),
                "first round, minutes": (counts, [r["round_seconds"][0] / 60 for r in rows]),
                "last round, minutes": (counts, [r["round_seconds"][-1] / 60 for r in rows])},
               xlabel="virtual clients", ylabel="GiB / minutes", title="Scale")

if __name__ == "__main__":
    main()
