"""Per-round checkpoints of the global adapter and the server's state, written atomically."""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.common.adapter_state import fit_problem
from fedtune.common.atomic_file import write_atomic
from fedtune.common.errors import InputError
from fedtune.common.run_dir import CHECKPOINT_DIR

_NAME = re.compile(r"^round-(\d{4,})\.pt$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]  # the global adapter after `round`
    state: dict[str, Any]  # JSON-safe: strategy RNG, retired clients, ...
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # server optimiser moments


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    buffer = io.BytesIO()
    torch.save({"round": checkpoint.round,
                "arrays": {k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in checkpoint.arrays.items()},
                "optimizer": {k: torch.from_numpy(np.ascontiguousarray(v))
                              for k, v in checkpoint.optimizer.items()},
                "state": json.dumps(checkpoint.state, sort_keys=True)}, buffer)
    path = Path(run_dir) / CHECKPOINT_DIR / f"round-{checkpoint.round:04d}.pt"
    write_atomic(path, buffer.getvalue())
    return path


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """Rounds that have a checkpoint file, ascending (nothing is loaded)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.glob("round-*.pt") if (m := _NAME.match(p.name)))


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of the highest complete round, or None when the run has none."""
    rounds = checkpoint_rounds(run_dir)
    if not rounds:
        return None
    return load_checkpoint(Path(run_dir) / CHECKPOINT_DIR / f"round-{rounds[-1]:04d}.pt")


def check_fits(checkpoint: Checkpoint, adapter: dict[str, np.ndarray], path: Path) -> None:
    """Refuse a checkpoint whose adapter is not this run's (another model, rank or pooling)."""
    if problem := fit_problem({name: value.shape for name, value in adapter.items()},
                              checkpoint.arrays):
        raise CheckpointError(f"checkpoint {path} holds an adapter of another model setup "
                              f"(model, lora or model.pooling changed?): {problem}")


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(round=int(raw["round"]),
                          arrays={k: v.numpy() for k, v in raw["arrays"].items()},
                          state=json.loads(raw["state"]),
                          optimizer={k: v.numpy() for k, v in raw.get("optimizer", {}).items()})
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError,
            pickle.UnpicklingError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable: {error}") from None
