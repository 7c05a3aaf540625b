"""TensorBoard event files of a run (`output.tensorboard`): each metrics row as scalars per round,
and the spread over clients (accuracy, epsilon) and labels as histograms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

TENSORBOARD_DIR = "tensorboard"
SCALARS = ("accuracy", "macro_f1", "loss", "perplexity", "train_loss", "client_accuracy_mean",
           "client_accuracy_worst", "client_accuracy_std", "epsilon_max", "epsilon_client_level",
           "clients", "clients_failed", "bytes_up", "bytes_down", "seconds")
HISTOGRAMS = {"client_accuracy": "clients/accuracy", "epsilon": "clients/epsilon",
              "label_accuracy": "labels/accuracy"}


class TensorBoardLog:
    """Writes rows as they complete; a resumed run drops events after its checkpoint."""

    def __init__(self, run_dir: Path, first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=first_round)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key in SCALARS:
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(f"round/{key}", row[key], step)
        for key, tag in HISTOGRAMS.items():
            values = row.get(key)
            values = list(values.values()) if isinstance(values, dict) else values or []
            finite = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
            if finite.size:
                self.writer.add_histogram(tag, finite, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
