"""The few plot shapes the benchmarks draw (matplotlib, files only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def bar_chart(path: Path, values: dict[str, float], *, title: str,
              goal: float | None = None) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.bar(list(values), list(values.values()), color="#4c72b0")
    if goal is not None:
        axis.axhline(goal, color="#c44e52", linestyle="--", label=f"goal {goal:g}")
        axis.legend()
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def line_chart(path: Path, series: dict[str, tuple[list[float], list[float]]], *, xlabel: str,
               ylabel: str, title: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for label, (xs, ys) in series.items():
        axis.plot(xs, ys, marker="o", label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def grouped_bars(path: Path, groups: dict[str, dict[str, float]], *, ylabel: str,
                 title: str) -> None:
    """One group of bars per key of `groups` (e.g. a data set), one bar per setting."""
    settings = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(len(settings), 1)
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(groups) + 3), 3.4))
    for i, setting in enumerate(settings):
        xs = [g + i * width for g in range(len(groups))]
        axis.bar(xs, [values.get(setting, 0.0) for values in groups.values()], width,
                 label=setting)
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
