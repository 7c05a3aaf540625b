"""`fedtune report RUN_DIR`: plots and a Markdown summary of a finished (or running) run.

Reads only `metrics.jsonl` (and `audit.json` where the run was audited), so it works the same on
simulations, deployments and baselines: accuracy and loss per round, each client's accuracy with
the worst client marked, the spread, epsilon per client, bytes per round, the worst-served labels
of the last round, by the names in the run's labels.json (label indices where a run kept none),
and the audit's lower bound beside the claimed epsilon.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedtune.common.errors import InputError
from fedtune.common.run_dir import AUDIT_FILE, METRICS_FILE
from fedtune.server.metrics_log import label_name, read_label_names, read_rounds

SUMMARY = "report.md"
WORST_LABELS = 20  # bars in labels.png: the worst-served labels, not all 150 of banking77


class ReportError(InputError, ValueError):
    """The directory holds no metrics to report on."""


def write_report(run_dir: str | Path) -> list[Path]:
    """Write the plots and `report.md` into `run_dir`; return the files written."""
    run_dir = Path(run_dir)
    rows = read_rounds(run_dir)
    if not rows:
        raise ReportError(f"{run_dir} has no {METRICS_FILE} rows to report on")
    written = [_plot_global(run_dir / "accuracy.png", rows)]
    if any("client_accuracy" in r for r in rows):
        written.append(_plot_clients(run_dir / "clients.png", rows))
    if any("epsilon" in r for r in rows):
        written.append(_plot_epsilon(run_dir / "epsilon.png", rows))
    if any("bytes_up" in r for r in rows):
        written.append(_plot_bytes(run_dir / "bytes.png", rows))
    names = read_label_names(run_dir)
    if rows[-1].get("label_accuracy"):
        written.append(_plot_labels(run_dir / "labels.png", rows[-1], names))
    summary = run_dir / SUMMARY
    audit = run_dir / AUDIT_FILE
    summary.write_text(summarise(rows, json.loads(audit.read_text()) if audit.exists() else None,
                                 names))
    return [*written, summary]


def audit_line(audit: dict[str, Any]) -> str:
    """The audit's lower bound beside the epsilon the run claims, in one line."""
    reported = audit["epsilon_reported"]
    claim = "no DP (nothing claimed)" if reported is None else f"ledger epsilon {reported:.3f}"
    verdict = (" DEFECT: the measured lower bound exceeds the claimed epsilon."
               if audit["defect"] else "")
    return (f"Privacy audit: epsilon >= {audit['epsilon_lower_bound']:.3f} at "
            f"{audit['confidence']:.0%} confidence beside {claim} ({audit['guesses_right']}/"
            f"{audit['guesses']} membership guesses right on {audit['canaries']} canaries, TPR "
            f"{audit['tpr_at_1pct_fpr']:.3f} at 1% FPR{_scored(audit)}).{verdict}{_power(audit)}"
            f"{_unprotected(audit)}")


def _scored(audit: dict[str, Any]) -> str:
    """Which adapter the canaries were scored in (audit.json's `vantage`), where it says."""
    return f", scored in {audit['vantage']}" if audit.get("vantage") else ""


def _unprotected(audit: dict[str, Any]) -> str:
    """A low bound without DP must not read as 'no leakage': nothing bounds it."""
    if audit["epsilon_reported"] is not None or audit["epsilon_lower_bound"] >= 1:
        return ""
    return (" Without DP nothing limits what training gives away: a bound this low means this "
            "attack found little (it needs memorised canaries, which few rounds, and for a "
            "classifier few labels, make rare), not that the data are safe.")


def _power(audit: dict[str, Any]) -> str:
    """What an audit too weak for the run's claim (or for 1, without DP) cannot show."""
    ceiling = audit.get("epsilon_detectable_max")
    if ceiling is None or not audit.get("underpowered"):
        return ""
    goal = ("1" if audit["epsilon_reported"] is None
            else f"the ledger's {audit['epsilon_reported']:.3f}")
    return (f" This audit can detect at most epsilon {ceiling:.3f} (every guess right; "
            f"{audit['canaries']} canaries at delta {audit['delta']:.2g}), less than {goal}: "
            "a bound below that says little; more canaries (audit.canaries) raise it.")


def worst_labels(row: dict[str, Any], names: list[str], count: int) -> list[tuple[str, float]]:
    """(name, accuracy) of the `count` labels with the lowest accuracy in `row`, worst first
    (labels absent from the test split are left out)."""
    scored = [(a, i) for i, a in enumerate(row.get("label_accuracy") or []) if not _nan(a)]
    return [(label_name(names, i), a) for a, i in sorted(scored)[:count]]


def summarise(rows: list[dict[str, Any]], audit: dict[str, Any] | None = None,
              names: list[str] | None = None) -> str:
    """The Markdown summary: a table per round and who the federation serves worst."""
    lines = ["# Run report", "", "| round | accuracy | loss | clients | worst client | spread "
             "| epsilon (max) | bytes up |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['accuracy']:.4f} | {r['loss']:.4f} | "
                     f"{r.get('clients', '-')} | {_fmt(r.get('client_accuracy_worst'))} | "
                     f"{_fmt(r.get('client_accuracy_std'))} | "
                     f"{_fmt(r.get('epsilon_max', r.get('epsilon_client_level')), 2)} | "
                     f"{r.get('bytes_up', '-')} |")
    last = rows[-1]
    lines += ["", f"Final accuracy {last['accuracy']:.4f} after round {last['round']}."]
    if "perplexity" in last:
        lines.append(f"Held-out perplexity {rows[0]['perplexity']:.3f} after round "
                     f"{rows[0]['round']}, {last['perplexity']:.3f} after round {last['round']} "
                     f"(accuracy is next-token accuracy on response tokens).")
    clients = last.get("client_accuracy") or {}
    if clients:
        worst = min(clients, key=clients.get)
        lines.append(f"Worst client: {worst} at {clients[worst]:.4f} (mean "
                     f"{last['client_accuracy_mean']:.4f}, std {last['client_accuracy_std']:.4f}).")
    worst = worst_labels(last, names or [], WORST_LABELS)
    if worst:
        lines.append("Worst labels: " + ", ".join(f"{n} ({a:.3f})" for n, a in worst[:3]) + ".")
    exhausted = sorted({n for r in rows for n in r.get("clients_exhausted", [])})
    if exhausted:
        lines.append(f"Clients that spent their privacy budget: {', '.join(exhausted)}.")
    if audit is not None:
        lines.append(audit_line(audit))
    if len(worst) > 3:
        lines += ["", f"## The {len(worst)} worst-served labels, round {last['round']}", "",
                  "| label | accuracy |", "|---|---|"]
        lines += [f"| {name} | {accuracy:.3f} |" for name, accuracy in worst]
    return "\n".join(lines) + "\n"


def _plot_global(path: Path, rows: list[dict[str, Any]]) -> Path:
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    rounds = [r["round"] for r in rows]
    left.plot(rounds, [r["accuracy"] for r in rows], marker="o", label="global (test split)")
    if any("client_accuracy_mean" in r for r in rows):
        left.plot(rounds, [r.get("client_accuracy_mean", math.nan) for r in rows], marker=".",
                  label="clients (mean)")
    left.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    left.legend()
    right.plot(rounds, [r["loss"] for r in rows], marker="o", label="test loss")
    if any(r.get("train_loss") is not None for r in rows):
        right.plot(rounds, [r.get("train_loss") or math.nan for r in rows], marker=".",
                   label="train loss")
    title = "Loss (perplexity = exp(test loss))" if "perplexity" in rows[-1] else "Loss"
    right.set(xlabel="round", ylabel="loss", title=title)
    right.legend()
    return _save(figure, path)


def _per_client(rows: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """{client: its value of `key` per round (NaN where it took no part)}, sorted by name."""
    names = sorted({n for r in rows for n in r.get(key, {})})
    return {n: [r.get(key, {}).get(n, math.nan) for r in rows] for n in names}


def _plot_clients(path: Path, rows: list[dict[str, Any]]) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    rounds = [r["round"] for r in rows]
    final = rows[-1].get("client_accuracy", {})
    worst = min(final, key=final.get) if final else None
    for name, values in _per_client(rows, "client_accuracy").items():
        style = {"color": "#c44e52", "linewidth": 2.5, "label": f"{name} (worst)"} \
            if name == worst else {"color": "#999999", "linewidth": 0.8}
        axis.plot(rounds, values, **style)
    axis.set(xlabel="round", ylabel="held-out accuracy", title="Accuracy per client")
    if worst:
        axis.legend()
    return _save(figure, path)


def _plot_epsilon(path: Path, rows: list[dict[str, Any]]) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    rounds = [r["round"] for r in rows]
    series = _per_client(rows, "epsilon")
    names = list(series)
    for name, values in series.items():
        axis.plot(rounds, values, marker=".", label=name if len(names) <= 10 else None)
    axis.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per client")
    if len(names) <= 10:
        axis.legend(fontsize="small")
    return _save(figure, path)


def _plot_bytes(path: Path, rows: list[dict[str, Any]]) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.2))
    rounds = [r["round"] for r in rows]
    axis.bar([x - 0.2 for x in rounds], [r.get("bytes_up", 0) / 1e6 for r in rows], 0.4,
             label="up")
    axis.bar([x + 0.2 for x in rounds], [r.get("bytes_down", 0) / 1e6 for r in rows], 0.4,
             label="down")
    axis.set(xlabel="round", ylabel="MB", title="Adapter bytes per round")
    axis.legend()
    return _save(figure, path)


def _plot_labels(path: Path, row: dict[str, Any], names: list[str]) -> Path:
    """The worst-served labels by name, worst at the top."""
    worst = worst_labels(row, names, WORST_LABELS)
    figure, axis = plt.subplots(figsize=(6.4, 1.0 + 0.28 * max(len(worst), 1)))
    axis.barh(range(len(worst)), [a for _, a in worst], color="#4c72b0")
    axis.set_yticks(range(len(worst)), [n for n, _ in worst], fontsize="small")
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    shown = len(row["label_accuracy"])
    title = (f"Accuracy per label, round {row['round']}" if len(worst) == shown else
             f"The {len(worst)} worst-served of {shown} labels, round {row['round']}")
    axis.set(xlabel="accuracy", title=title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _save(figure: Any, path: Path) -> Path:
    for axis in figure.axes:  # rounds and labels are whole numbers
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
