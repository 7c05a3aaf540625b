"""metrics.jsonl (one JSON object per completed round) and, for a causal LM, samples.jsonl (the
round's sample generations): appended, trimmed on resume. labels.json: the names of the labels
that `label_accuracy` lists by index, so reports speak the data's words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.common.atomic_file import write_atomic
from fedtune.common.run_dir import LABEL_NAMES_FILE, METRICS_FILE, SAMPLES_FILE


def append_round(run_dir: Path, row: dict[str, Any], file: str = METRICS_FILE) -> None:
    with (Path(run_dir) / file).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")


def read_rounds(run_dir: Path, file: str = METRICS_FILE) -> list[dict[str, Any]]:
    path = Path(run_dir) / file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def keep_rounds_up_to(run_dir: Path, last_round: int) -> None:
    """Drop rows of rounds after the checkpoint being resumed (written before a crash)."""
    for file in (METRICS_FILE, SAMPLES_FILE):
        if file == SAMPLES_FILE and not (Path(run_dir) / file).exists():
            continue
        rows = [r for r in read_rounds(run_dir, file) if r["round"] <= last_round]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        write_atomic(Path(run_dir) / file, text.encode())


def write_label_names(run_dir: Path, names: list[str]) -> None:
    """Keep the data's label names beside the metrics (nothing for a causal LM)."""
    if names:
        text = json.dumps({str(i): name for i, name in enumerate(names)}, indent=1)
        write_atomic(Path(run_dir) / LABEL_NAMES_FILE, text.encode())


def read_label_names(run_dir: Path) -> list[str]:
    """The run's label names in index order; empty when it kept none (an older run)."""
    path = Path(run_dir) / LABEL_NAMES_FILE
    if not path.exists():
        return []
    mapping = json.loads(path.read_text(encoding="utf-8"))
    return [str(mapping[str(i)]) for i in range(len(mapping))]


def label_name(names: list[str], index: int) -> str:
    """A label's name, or its index where the run kept no names."""
    return names[index] if index < len(names) else str(index)
