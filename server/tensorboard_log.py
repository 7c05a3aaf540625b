"""TensorBoard event files of a run (`output.tensorboard`): each metrics row as scalars per round,
the spread over clients (accuracy, epsilon) and labels as histograms, and the worst-served labels
by name (the run's labels.json) as a table per round."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.server.metrics_log import label_name, read_label_names

TENSORBOARD_DIR = "tensorboard"
SCALARS = ("accuracy", "macro_f1", "loss", "perplexity", "train_loss", "client_accuracy_mean",
           "client_accuracy_worst", "client_accuracy_std", "epsilon_max", "epsilon_client_level",
           "clients", "clients_failed", "bytes_up", "bytes_down", "seconds")
WORST_LABELS = 20
HISTOGRAMS = {"client_accuracy": "clients/accuracy", "epsilon": "clients/epsilon",
              "label_accuracy": "labels/accuracy"}


class TensorBoardLog:
    """Writes rows as they complete; a resumed run drops events after its checkpoint."""

    def __init__(self, run_dir: Path, first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=first_round)
        self.label_names = read_label_names(run_dir)

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
        if table := self._worst_labels(row.get("label_accuracy") or []):
            self.writer.add_text("labels/worst", table, step)
        self.writer.flush()

    def _worst_labels(self, accuracy: list[float]) -> str:
        """A Markdown table of the worst-served labels, by name."""
        scored = sorted((a, i) for i, a in enumerate(accuracy) if not math.isnan(a))
        rows = [f"| {label_name(self.label_names, i)} | {a:.3f} |"
                for a, i in scored[:WORST_LABELS]]
        return "\n".join(["| label | accuracy |", "|---|---|", *rows]) if rows else ""

    def close(self) -> None:
        self.writer.close()
