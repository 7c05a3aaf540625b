"""The classification objective's scores: accuracy, accuracy per label and macro-F1."""

from types import SimpleNamespace

import pytest
import torch

from fedtune.common.classifier import Classification


class FixedGuesses(torch.nn.Module):
    """Answers each batch with one-hot logits of the given guesses and a loss of 1."""

    def __init__(self, guesses: list[int], labels: int) -> None:
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(guesses), labels).float()

    def forward(self, labels: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=torch.tensor(1.0), logits=self.logits[:len(labels)])


def test_accuracy_per_label_and_macro_f1_match_a_hand_count():
    truth, guesses = [0, 0, 1, 2], [0, 1, 1, 1]
    stats = Classification(num_labels=4).evaluate(
        FixedGuesses(guesses, 4), [{"labels": torch.tensor(truth)}], torch.device("cpu"))
    assert stats.accuracy == 0.5 and stats.examples == 4 and stats.loss == 1.0
    assert stats.per_label_accuracy[:3] == [0.5, 1.0, 0.0]
    assert stats.per_label_accuracy[3] != stats.per_label_accuracy[3]  # NaN: label 3 unseen
    # F1: label 0 = 2/3, label 1 = 2/4, label 2 = 0; label 3 neither true nor guessed.
    assert stats.macro_f1 == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
