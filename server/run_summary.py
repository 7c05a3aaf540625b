"""The last lines of a run, where a person looks: where its results are, its final accuracy, and
whether its last round trained anything (a run that trained nothing at the end is no success)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def summary_line(run_dir: str | Path, rows: list[dict[str, Any]]) -> str:
    """'run directory: ...  final accuracy: ...' (and perplexity, for a causal LM)."""
    last = rows[-1]
    perplexity = f"  perplexity: {last['perplexity']:.3f}" if "perplexity" in last else ""
    return f"run directory: {run_dir}  final accuracy: {last['accuracy']:.4f}{perplexity}"


def shortfall(rows: list[dict[str, Any]], rounds: int) -> str | None:
    """Why a run meant to end after round `rounds` did not end with a trained round; None when
    it did."""
    trained = [row["round"] for row in rows if "round_abandoned" not in row]
    since = f"its adapter is round {trained[-1]}'s" if trained else "no round ever trained"
    if not rows:
        return "no round was recorded"
    last = rows[-1]
    if "round_abandoned" in last:
        return (f"round {last['round']} was abandoned ({last['round_abandoned']}); {since}. "
                "Extend federation.rounds to train more (a node refused for its budget or its "
                "per-run cap trains again once its operator raises --budget-epsilon or "
                "--max-epsilon-per-run)")
    if last["round"] < rounds:
        return (f"the run stopped after round {last['round']} of {rounds}: no client was left "
                "to train (budgets spent or node policies refusing); started again, it "
                "resumes and asks every node again")
    return None


def failed_replies(rows: list[dict[str, Any]]) -> str | None:
    """How many sampled clients failed (errors or no answer), and in which rounds; None when
    none did. A run goes on without them, so its accuracy is then not the setting's."""
    failed = {row["round"]: row["clients_failed"] for row in rows if row.get("clients_failed")}
    if not failed:
        return None
    rounds = ", ".join(map(str, failed))
    return (f"{sum(failed.values())} client replies failed (round{'s' * (len(failed) > 1)} "
            f"{rounds}): the rounds went on without them")
