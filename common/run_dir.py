"""A run directory's files, and the configuration it saved (read with every migration).

Every fedtune command that starts, resumes, extends or exports a run reads and writes these
names from here, and reads the saved configuration through `saved_config`: a run saved by an
earlier release resumes the same way whichever command picks it up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.common.config import RunConfig
from fedtune.common.errors import InputError

CONFIG_FILE = "config.json"  # the run's configuration, sorted JSON (federated: .resolved())
ADAPTER_DIR = "adapter"  # the final adapter, as PEFT saves it
CHECKPOINT_DIR = "checkpoints"  # one directory per completed round
METRICS_FILE = "metrics.jsonl"  # one JSON object per round
SAMPLES_FILE = "samples.jsonl"  # a causal LM's sample generations per round
LABEL_NAMES_FILE = "labels.json"  # {"0": name, ...}, as in a data directory
RELEASES_FILE = "client_level_releases.json"  # client-level DP: each noised release, logged first
AUDIT_FILE = "audit.json"  # the privacy audit's bound
AUDIT_RELEASES_DIR = "audit-releases"  # the audit: each simulated canary client's last release


class RunDirError(InputError, RuntimeError):
    """A run directory that cannot be used as asked (none to resume, one already there)."""


def saved_config(run_dir: str | Path) -> RunConfig | None:
    """The configuration `run_dir` saved, migrated to today's fields; None where it saved none."""
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        return None
    try:
        values = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirError(f"{saved} is unreadable: {error}") from None
    return RunConfig.from_mapping(migrated(values))


def migrated(values: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration as today's fields read it: a run saved before `model.pooling`
    trained the model's own pooler head, one saved before `model.head_init` a random head."""
    if isinstance(values.get("model"), dict):
        values["model"].setdefault("pooling", "pooler")
        values["model"].setdefault("head_init", "random")
    return values


def write_config(run_dir: Path, config: RunConfig) -> None:
    from fedtune.common.atomic_file import write_atomic

    write_atomic(run_dir / CONFIG_FILE, config.to_json().encode())
