"""The real data sets in ../shared/data (each folder has its SOURCE.md): where they lie and which
files are their training and test splits. Benchmarks read them there and never copy them in."""

from __future__ import annotations

import gzip
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_BANKING77 = SHARED / "banking77"
# (train file, test file) of each data set; medical_abstracts: its derived re-split (SOURCE.md);
# sst2's labelled test split is its validation split.
SPLITS = {"banking77": ("train.jsonl", "test.jsonl"),
          "sst2": ("train.jsonl.gz", "validation.jsonl"),
          "medical_abstracts": ("resplit_train.jsonl", "resplit_test.jsonl"),
          "pubmedqa_pqal": ("train.jsonl", "test.jsonl")}


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSONL file, gzipped or not, each with its newline."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line for line in handle if line.strip()]
