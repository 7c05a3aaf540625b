"""The last lines of a run: where its results are, and whether its last round trained."""

from __future__ import annotations

from fedtune.server.run_summary import failed_replies, shortfall, summary_line


def rows(*abandoned: bool) -> list[dict]:
    return [{"round": i + 1, "accuracy": 0.5 + i / 10,
             **({"round_abandoned": "cohort"} if a else {})} for i, a in enumerate(abandoned)]


def test_the_summary_names_the_run_directory_and_the_final_accuracy():
    assert summary_line("state/run", rows(False, False)) == \
        "run directory: state/run  final accuracy: 0.6000"


def test_a_run_that_trained_its_last_round_has_no_shortfall():
    assert shortfall(rows(True, False), rounds=2) is None  # an earlier abandoned round is fine


def test_an_abandoned_last_round_says_which_adapter_is_left():
    problem = shortfall(rows(False, False, True), rounds=3)
    assert problem.startswith("round 3 was abandoned (cohort); its adapter is round 2's")
    assert "Extend federation.rounds" in problem
    assert "no round ever trained" in shortfall(rows(True), rounds=1)


def test_a_run_that_stopped_early_says_it_resumes():
    problem = shortfall(rows(False), rounds=3)
    assert problem.startswith("the run stopped after round 1 of 3: no client was left")
    assert shortfall([], rounds=1) == "no round was recorded"


def test_failed_replies_are_counted_with_their_rounds():
    assert failed_replies(rows(False, False)) is None
    lost = [{"round": 1, "clients_failed": 0}, {"round": 2, "clients_failed": 4},
            {"round": 3, "clients_failed": 5, "round_abandoned": "5 failed or did not answer"}]
    assert failed_replies(lost) == "9 client replies failed (rounds 2, 3): the rounds went on " \
        "without them"
    assert failed_replies(lost[:2]).startswith("4 client replies failed (round 2):")

