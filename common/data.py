"""Text examples from a data directory, a CSV file, a hub data set or the built-in set.

Classification rows are (text, label); causal-LM rows are (prompt, response), where a plain
`{"text"}` row is all response and an `{"instruction", "input", "output"}` row is prompted.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common.config import BUILTIN_DATA, CAUSAL_LM, CLASSIFICATION, DataConfig
from fedtune.common.errors import InputError

BUILTIN_DIR = Path(__file__).resolve().parent / "default_data"
TRAIN_NAMES = ("train.jsonl", "train.jsonl.gz")
LABELS_FILE = "labels.json"  # a data directory's label names: {"0": name, ...}
TEST_NAMES = ("test.jsonl", "test.jsonl.gz", "validation.jsonl", "validation.jsonl.gz")


class DataError(InputError, ValueError):
    """The data cannot be used as given; the message names the file, row or field."""


@dataclass(frozen=True)
class Examples:
    """Texts with integer labels, or prompts (`texts`) with `responses` for a causal LM (labels
    all 0); `fields` keeps the other columns (for natural partitions)."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64
    fields: dict[str, list[Any]] = field(default_factory=dict)
    responses: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def item(self, index: int) -> tuple[str, int | str]:
        """(text, label) or (prompt, response)."""
        if self.responses is not None:
            return self.texts[index], self.responses[index]
        return self.texts[index], int(self.labels[index])

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        """The rows of `parts` in order (their extra fields are dropped)."""
        lm = bool(parts) and parts[0].responses is not None
        return cls(texts=[t for p in parts for t in p.texts],
                   labels=np.concatenate([p.labels for p in parts]),
                   responses=[r for p in parts for r in p.responses or []] if lm else None)

    def subset(self, indices: np.ndarray | list[int]) -> Examples:
        idx = [int(i) for i in indices]
        return Examples(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            fields={name: [column[i] for i in idx] for name, column in self.fields.items()},
            responses=None if self.responses is None else [self.responses[i] for i in idx],
        )


@dataclass(frozen=True)
class LabelledData:
    """A training split, a test split and the label names shared by both."""

    train: Examples
    test: Examples
    label_names: list[str]  # empty for a causal LM

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_data(config: DataConfig, seed: int, task: str = CLASSIFICATION, *,
              held_out_only: bool = False) -> LabelledData:
    """Read the source named by `config.path` as rows of `task`; carve a seeded test split when
    it has none. `held_out_only` (a deployed server's data, which never trains): a directory
    may hold its test split alone, and the training split is then empty."""
    path = config.path
    convert = _to_lm_examples if task == CAUSAL_LM else _to_examples
    if path == BUILTIN_DATA:
        if task == CAUSAL_LM:
            raise DataError("the built-in data set is for classification; give --data a "
                            "directory of {\"text\"} or {\"instruction\", \"input\", \"output\"} "
                            "rows for model.task 'causal-lm'")
        return _load_directory(BUILTIN_DIR, config, seed, convert)
    if path.startswith("hf:"):
        return _load_hub(path[3:], config, seed, convert)
    source = Path(path)
    if source.is_dir():
        return _load_directory(source, config, seed, convert, held_out_only)
    if source.is_file() and source.suffix.lower() == ".csv":
        rows = _read_csv(source)
        return _finish(convert(rows, config, str(source)), None, None, config, seed)
    if source.exists():
        raise DataError(f"data path {source} is neither a data directory nor a .csv file")
    raise DataError(f"data path {source} does not exist")


def training_records(path: str | Path) -> list[dict[str, Any]]:
    """Every raw row of a local source's training file (a data directory's train.jsonl[.gz] or
    a CSV file), as stored: no split, no field interpreted. A node keys its ledger on these."""
    source = Path(path)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _read_csv(source)
    if not source.exists():
        raise DataError(f"data path {source} does not exist")
    if not source.is_dir():
        raise DataError(f"data path {source} is neither a data directory nor a .csv file")
    train_file = _first_existing(source, TRAIN_NAMES)
    if train_file is None:
        raise DataError(f"data directory {source} has no {' or '.join(TRAIN_NAMES)}")
    return list(_read_jsonl(train_file))


def file_records(path: str | Path) -> list[dict[str, Any]]:
    """Every raw row of one JSONL (.jsonl, .jsonl.gz) or CSV file, as stored (`fedtune predict`'s
    input)."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"input file {source} does not exist")
    if source.suffix.lower() == ".csv":
        return _read_csv(source)
    if source.name.lower().endswith((".jsonl", ".jsonl.gz")):
        return list(_read_jsonl(source))
    raise DataError(f"input file {source} is neither .jsonl, .jsonl.gz nor .csv")


def training_rows(config: DataConfig, task: str = CLASSIFICATION) -> Examples:
    """Every row of the training file of `config.path` as examples of `task`, with no test split
    carved out: a deployed node splits its rows itself, by its own seed."""
    convert = _to_lm_examples if task == CAUSAL_LM else _to_examples
    return convert(training_records(config.path), config, str(config.path))


def _load_directory(directory: Path, config: DataConfig, seed: int,
                    convert: Any, held_out_only: bool = False) -> LabelledData:
    train_file = _first_existing(directory, TRAIN_NAMES)
    test_file = _first_existing(directory, TEST_NAMES)
    if train_file is None and held_out_only and test_file is not None:
        test = convert(_read_jsonl(test_file), config, str(test_file))
        names = _label_names([test], _read_label_names(directory / LABELS_FILE))
        return LabelledData(train=test.subset([]), test=test, label_names=names)
    if train_file is None:
        wanted = " or ".join(TRAIN_NAMES + (TEST_NAMES if held_out_only else ()))
        raise DataError(f"data directory {directory} has no {wanted}")
    train = convert(_read_jsonl(train_file), config, str(train_file))
    test = None
    if test_file is not None:
        test = convert(_read_jsonl(test_file), config, str(test_file))
    names = _read_label_names(directory / LABELS_FILE)
    return _finish(train, test, names, config, seed)


def _load_hub(dataset_id: str, config: DataConfig, seed: int, convert: Any) -> LabelledData:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise DataError("hub data sets need `datasets`: pip install datasets") from error
    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as error:  # datasets raises many unrelated types for "not found/offline"
        raise DataError(f"could not load hub data set {dataset_id!r}: {error}") from None
    if "train" not in loaded:
        raise DataError(f"hub data set {dataset_id!r} has no 'train' split")
    train = convert(loaded["train"], config, f"{dataset_id}[train]")
    test_split = next((s for s in ("test", "validation") if s in loaded), None)
    test = None
    if test_split:
        test = convert(loaded[test_split], config, f"{dataset_id}[{test_split}]")
    names = None
    feature = loaded["train"].features.get(config.label_field)
    if getattr(feature, "names", None):
        names = list(feature.names)
    return _finish(train, test, names, config, seed)


def _finish(train: Examples, test: Examples | None, names: list[str] | None,
            config: DataConfig, seed: int) -> LabelledData:
    if test is None:
        order = np.random.default_rng(seed).permutation(len(train))
        cut = max(1, round(len(train) * config.test_fraction))
        train, test = train.subset(np.sort(order[cut:])), train.subset(np.sort(order[:cut]))
    names = _label_names([train, test], names)
    if len(train) < 2:
        raise DataError(f"the training split has {len(train)} rows; at least 2 are needed")
    return LabelledData(train=train, test=test, label_names=names)


def _label_names(splits: list[Examples], names: list[str] | None) -> list[str]:
    """labels.json's names (else "0".."K") after checking every label is among them; none for
    a causal LM."""
    if splits[0].responses is not None:
        return names or []
    highest = int(max(split.labels.max() for split in splits))
    names = names or [str(i) for i in range(highest + 1)]
    if highest >= len(names):
        raise DataError(f"label {highest} is out of range: labels.json names {len(names)} "
                        f"labels")
    return names


def _to_examples(rows: Any, config: DataConfig, where: str) -> Examples:
    texts: list[str] = []
    labels: list[int] = []
    extra: dict[str, list[Any]] = {}
    for number, row in enumerate(rows, start=1):
        text, label = row.get(config.text_field), row.get(config.label_field)
        if not isinstance(text, str):
            raise DataError(f"{where} row {number}: field {config.text_field!r} is missing or "
                            f"not text")
        labels.append(_parse_label(label, config.label_field, where, number))
        texts.append(text)
        for key, value in row.items():
            if key not in (config.text_field, config.label_field):
                extra.setdefault(key, []).append(value)
    if not texts:
        raise DataError(f"{where} has no rows")
    extra = {key: column for key, column in extra.items() if len(column) == len(texts)}
    return Examples(texts=texts, labels=np.asarray(labels, dtype=np.int64), fields=extra)


def _to_lm_examples(rows: Any, config: DataConfig, where: str) -> Examples:
    """(prompt, response) rows: instruction rows through the template, text rows unprompted."""
    prompts: list[str] = []
    responses: list[str] = []
    extra: dict[str, list[Any]] = {}
    for number, row in enumerate(rows, start=1):
        prompt, response = _prompt_and_response(row, config, f"{where} row {number}")
        prompts.append(prompt)
        responses.append(response)
        for key, value in row.items():
            if key not in (config.text_field, "instruction", "input", "output"):
                extra.setdefault(key, []).append(value)
    if not prompts:
        raise DataError(f"{where} has no rows")
    extra = {key: column for key, column in extra.items() if len(column) == len(prompts)}
    return Examples(texts=prompts, labels=np.zeros(len(prompts), dtype=np.int64), fields=extra,
                    responses=responses)


def _prompt_and_response(row: Any, config: DataConfig, where: str) -> tuple[str, str]:
    if "instruction" in row:
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get(
            "output")
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            raise DataError(f"{where}: 'instruction', 'input' and 'output' must be text")
        return config.prompt_template.format(instruction=instruction, input=extra), output
    text = row.get(config.text_field)
    if not isinstance(text, str):
        raise DataError(f"{where}: needs a text field {config.text_field!r}, or 'instruction' "
                        f"and 'output'")
    return "", text


def _parse_label(value: Any, name: str, where: str, number: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where} row {number}: label field {name!r} must be an integer, "
                        f"got {value!r}")
    if value < 0:
        raise DataError(f"{where} row {number}: label {value} is out of range (negative)")
    return value


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number} is not JSON: {error.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {number} is not a JSON object")
                yield row
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {path}: {error}") from None


def _read_label_names(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        names = [str(mapping[str(i)]) for i in range(len(mapping))]
        for name in names:
            name.encode("utf-8")  # a lone surrogate (a JSON escape) is no text
    except (OSError, UnicodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as error:
        raise DataError(f"{path} must map '0'..'N-1' to label names: {error}") from None
    if len(names) < 2:  # else the label set would come from the rows after all
        raise DataError(f"{path} must name at least two labels, got {len(names)}")
    return names


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)
