"""Text another party sends (a refusal reason, an error, metric names) reaches logs bounded."""

from __future__ import annotations


def test_another_partys_text_is_one_bounded_line_without_terminal_escapes():
    from fedtune.common.console import FOREIGN_TEXT_LIMIT, printable

    forged = "refused\nINFO : round 9 accuracy 1.000\x1b[2J" + "x" * 1000
    shown = printable(forged)
    assert "\n" not in shown and "\x1b" not in shown
    assert shown.startswith("refused\\nINFO : round 9 accuracy 1.000\\x1b[2J")
    assert shown.endswith("more characters)") and len(shown) < FOREIGN_TEXT_LIMIT + 60
    assert printable("its keys carry no valid signature") == "its keys carry no valid signature"
