"""What one round sums, and the check of the decoded sum against what honest inputs allow.

Inside its masks a client can put any ring value: the server cannot see one input, only the sum.
So the sum itself is checked (`Summation.average`): every entry, the weight, the totals and the
L2 norm must be ones that the survivors' honest inputs could give, else the round is dropped;
and the average taken from a sum that passes is clipped to the bounds that honest inputs obey,
so the documented bound holds whatever a minority put in its masks (docs/secagg.md, "Bounded
influence"). Per-client proofs of range (ACORN, RoFL) are not built: a malicious client can
still move the average anywhere inside those bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtune.common.secagg.ring import Encoding

TOTALS = ("examples", "loss-sum")  # a client's scalars that the server may learn only summed
MAX_LOSS = 20.0  # a client's mean loss counts at most this much in the summed loss (ln 150 = 5)
NOISE_TAIL = 10.0  # standard deviations of noise the bounds leave room for (P ~ 1e-23)


class ImpossibleSum(ValueError):
    """A decoded sum that no set of honest inputs could give: some client sent values outside
    the round's bounds inside its masks."""


@dataclass(frozen=True)
class Summation:
    """What one round sums, fixed by the run configuration and the cohort size, so every client
    and the server derive the same (`summation_for`): each client sends

        [w x clip(delta) ..., w, e, e x l]

    with delta its change of the adapter, clipped to L2 norm `norm` and then each value to
    `bound` (under client-level DP: clipped to the clip norm, plus its share of the noise, then
    each value to the bound), e = min(examples, max_examples) / max_examples, w = e, or 1 when
    unweighted (under any DP: no count or loss then leaves the node, e = l = 0), and
    l = min(loss, MAX_LOSS) / MAX_LOSS. Every entry is within the bound, so the cohort's 32-bit
    encodings cannot overflow."""

    clients: int  # the cohort size
    bound: float  # largest |change| of one adapter value that is summed exactly
    max_examples: int  # examples that give a client full weight
    weighted: bool = True  # False: every client counts once (under any DP)
    noise_std: float = 0.0  # each client's share of the Gaussian noise (client-level DP), per value
    survivors: int = 0  # the fewest masked inputs any sum is revealed for
    norm: float = math.inf  # L2 bound of one client's change (before its noise share)

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.clients, max(self.bound, 1.0))

    def to_vector(self, delta: dict[str, np.ndarray], examples: int, loss: float) -> np.ndarray:
        """The client's input: weighted, clipped change (sorted by name), weight, totals."""
        e = min(examples, self.max_examples) / self.max_examples
        w = e if self.weighted else 1.0
        if not self.weighted:  # under DP counts and losses would be released un-noised
            e, loss = 0.0, 0.0
        change = np.concatenate([np.asarray(delta[k], dtype=np.float64).ravel()
                                 for k in sorted(delta)])
        if self.noise_std == 0:  # a noised change was clipped before its noise was added
            change = _clip_norm(change, self.norm)
        loss_share = min(max(float(loss), 0.0), MAX_LOSS) / MAX_LOSS
        clipped = np.clip(change, -self.bound, self.bound)
        return np.concatenate([w * clipped, [w, e, e * loss_share]])

    def average(self, total: np.ndarray, like: dict[str, np.ndarray],
                summed: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(the average change, shaped as `like`; the summed `TOTALS`) from the decoded sum of
        `summed` inputs, or ImpossibleSum naming what no honest inputs could give.

        The average is clipped to the bounds every honest average obeys (each value within the
        bound, L2 norm within `norm` plus the noise allowance), so rounding cannot carry it out."""
        problems = self.problems(total, summed)
        if problems:
            raise ImpossibleSum(f"the decoded sum of {summed} inputs is impossible for honest "
                                f"ones: {'; '.join(problems)}")
        weight = float(summed) if not self.weighted else float(total[-3])
        change = np.clip(total[:-3] / weight, -self.bound, self.bound)
        change = _clip_norm(change, self.norm + self.noise_allowance(summed, change.size) / weight)
        state, offset = {}, 0
        for key in sorted(like):
            template = np.asarray(like[key])
            state[key] = change[offset:offset + template.size].reshape(template.shape)
            offset += template.size
        return state, {"examples": float(total[-2] * self.max_examples),
                       "loss-sum": float(total[-1] * self.max_examples * MAX_LOSS)}

    def problems(self, total: np.ndarray, summed: int) -> list[str]:
        """What in the decoded sum of `summed` inputs no honest inputs could give (empty: none).

        Honest inputs are each within the bound per value and within `norm` in L2 (plus their
        noise share), with w in [1 / max_examples, 1] (exactly 1 unweighted), e = w (0
        unweighted) and 0 <= e x l <= e; the 32-bit rounding adds under one unit per input."""
        slack = self.encoding.error_bound(summed)
        values, (weight, examples, loss) = total[:-3], total[-3:]
        problems = []
        if self.weighted:
            least = summed / self.max_examples
            # above 0 whatever the rounding: the average divides by it
            if not (weight > 0 and least - slack <= weight <= summed + slack):
                problems.append(f"weight {weight:.6g} outside [{least:.3g}, {summed}]")
            if abs(examples - weight) > 2 * slack:
                problems.append(f"example share {examples:.6g} differs from the weight")
        else:
            if abs(weight - summed) > slack:
                problems.append(f"weight {weight:.6g}, not one per input")
            if abs(examples) > slack:
                problems.append(f"example share {examples:.6g} where none is sent")
            weight = summed
        if not -slack <= loss <= max(examples, 0.0) + 2 * slack:
            problems.append(f"loss share {loss:.6g} outside [0, the example share]")
        weight = max(weight, 0.0) + slack  # the most the exact weight can be
        largest = float(np.abs(values).max()) if values.size else 0.0
        if largest > self.bound * weight + slack:
            problems.append(f"a value {largest:.6g} beyond {self.bound:g} x the weight")
        norm = float(np.linalg.norm(values))
        allowed = (self.norm * weight + self.noise_allowance(summed, values.size)
                   + slack * math.sqrt(values.size))
        if norm > allowed:
            problems.append(f"L2 norm {norm:.6g} beyond {allowed:.6g}")
        return problems

    def noise_allowance(self, summed: int, length: int) -> float:
        """The L2 norm the summed noise shares of `summed` inputs stay under (but for a chance
        of about e^-50): sigma (sqrt(length) + NOISE_TAIL), sigma their summed std per value."""
        return self.noise_std * math.sqrt(summed) * (math.sqrt(length) + NOISE_TAIL)


def _clip_norm(vector: np.ndarray, norm: float) -> np.ndarray:
    length = float(np.linalg.norm(vector))
    return vector * (norm / length) if length > norm else vector


def vector_length(like: dict[str, np.ndarray]) -> int:
    return sum(int(np.asarray(v).size) for v in like.values()) + 1 + len(TOTALS)
