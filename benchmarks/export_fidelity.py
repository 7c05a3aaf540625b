"""Does an exported model score what its run reported? `python -m benchmarks.export_fidelity
--data DIR [--train-rows N --test-rows M --clients C --rounds R]`.

Takes a seeded subsample of a data directory (train and test rows, labels.json), runs `fedtune
simulate` on it, `fedtune export`s the run, then labels the test rows with a transformers
`pipeline("text-classification", trust_remote_code=True)` in a Python process that never imports
fedtune, and records the run's accuracy beside the pipeline's (benchmarks/results/
export_fidelity.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fedtune_run import fedtune
from benchmarks.record import save
from fedtune.server.metrics_log import read_rounds

# What a user runs elsewhere: transformers only. argv: model dir, test.jsonl, labels.json.
# Prints the pipeline's labels, the true label names, whether loading without
# trust_remote_code was refused, and which fedtune modules the process imported (none).
TRANSFORMERS_ONLY_SCRIPT = """
import json, sys
from transformers import AutoModelForSequenceClassification, pipeline
out, test, labels = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in open(test)]
names = json.load(open(labels))
classify = pipeline("text-classification", model=out, trust_remote_code=True)
answers = classify([row["text"] for row in rows], truncation=True, batch_size=32)
try:
    AutoModelForSequenceClassification.from_pretrained(out)
    refused = False
except ValueError:  # custom code not trusted: an error, not a standard head reading token 0
    refused = True
ours = sorted(m for m in sys.modules if m.split(".")[0] in
              ("common", "server", "client", "simulations", "fedtune"))
print("\\nRESULT", json.dumps({"labels": [a["label"] for a in answers], "truth": [
    names[str(row["label"])] for row in rows], "refused": refused, "ours": ours}))
"""


def label_with_transformers_only(model_dir: Path, test_file: Path, labels_file: Path,
                                 work_dir: Path) -> dict[str, Any]:
    """Run TRANSFORMERS_ONLY_SCRIPT isolated (`python -I`: no fedtune on its path, offline)."""
    script = work_dir / "transformers_only.py"
    script.write_text(TRANSFORMERS_ONLY_SCRIPT)
    done = subprocess.run([sys.executable, "-I", str(script), str(model_dir), str(test_file),
                           str(labels_file)], capture_output=True, text=True, cwd=work_dir,
                          timeout=3600, check=False,
                          env={"HF_HUB_OFFLINE": "1", "HOME": os.environ.get("HOME", "/tmp")})
    if done.returncode != 0:
        raise RuntimeError(f"the transformers-only process failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.split("\nRESULT ")[-1])  # after transformers' own prompt
    result["accuracy"] = float(np.mean([a == b for a, b in zip(result["labels"], result["truth"],
                                                               strict=True)]))
    return result


def subsample(source: Path, target: Path, train_rows: int, test_rows: int, seed: int) -> None:
    """`train_rows` and `test_rows` rows drawn without replacement (seeded), in file order."""
    target.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        lines = (source / name).read_text(encoding="utf-8").splitlines()
        keep = np.sort(rng.choice(len(lines), size=min(count, len(lines)), replace=False))
        (target / name).write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    shutil.copyfile(source / "labels.json", target / "labels.json")


OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a data directory with "
                        "train.jsonl, test.jsonl and labels.json")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300/100 rows, "
                        "2 clients, 1 round (results to export_fidelity-quick.json)")
    args = parser.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.clients, args.rounds = 300, 100, 2, 1
    with tempfile.TemporaryDirectory(prefix="export-fidelity-") as scratch:
        work = Path(scratch)
        subsample(args.data, work / "data", args.train_rows, args.test_rows, args.seed)
        simulated = fedtune("simulate", ["--data", work / "data", "--num-clients", args.clients,
                                         "--rounds", args.rounds, "--max-length", args.max_length,
                                         "--seed", args.seed], work / "run", OFFLINE,
                            check=True).seconds
        rows = read_rounds(work / "run")
        fedtune("export", [work / "run", work / "model"], env=OFFLINE, check=True)
        used = label_with_transformers_only(work / "model", work / "data" / "test.jsonl",
                                            work / "data" / "labels.json", work)
    figures = {
        "data": str(args.data), "subsample": {"train_rows": args.train_rows,
                                              "test_rows": args.test_rows, "seed": args.seed},
        "clients": args.clients, "rounds": args.rounds, "max_length": args.max_length,
        "run_accuracy": rows[-1]["accuracy"], "pipeline_accuracy": used["accuracy"],
        "difference": used["accuracy"] - rows[-1]["accuracy"],
        "refused_without_trust_remote_code": used["refused"],
        "fedtune_modules_in_that_process": used["ours"], "simulate_seconds": simulated,
    }
    path = save("export_fidelity", figures, quick=args.quick)
    print(json.dumps({k: figures[k] for k in ("run_accuracy", "pipeline_accuracy",
                                              "difference")}), path)


if __name__ == "__main__":
    main()
