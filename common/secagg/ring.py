"""Fixed-point encoding of bounded real vectors into the ring Z_2^32, where masks cancel exactly.

A round's `Encoding` follows from two numbers every client and the server know: the cohort size n
and the bound on each value. Its scale is the largest for which n encodings of in-bound values
cannot overflow, n (bound x scale + 1) <= 2^31 - 1, so a sum never wraps, by construction.
Values are rounded stochastically (down or up with the probability that keeps the mean), so the
decoded sum is unbiased. numpy's uint32 arithmetic is the ring: addition wraps modulo 2^32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DTYPE = np.uint32
LIMIT = 2**31 - 1  # the largest |sum| the two's-complement reading of a uint32 holds


class RingError(ValueError):
    """A value outside the round's bound, settings that leave no precision, or a foreign vector."""


@dataclass(frozen=True)
class Encoding:
    """How one round's values become ring elements: the same at every client and the server."""

    clients: int  # the cohort: at most this many encodings are ever summed
    bound: float  # every encoded value lies in [-bound, bound]

    def __post_init__(self) -> None:
        if self.clients < 1 or not (math.isfinite(self.bound) and self.bound > 0):
            raise RingError(f"an encoding needs clients >= 1 and a finite bound > 0, got "
                            f"{self.clients} and {self.bound}")
        if self.scale < 1:
            raise RingError(f"{self.clients} clients with values up to {self.bound:g} leave no "
                            "precision in a 32-bit ring")

    @property
    def scale(self) -> float:
        """Ring units per unit of value: n (bound x scale + 1) <= LIMIT."""
        return float(math.floor((LIMIT / self.clients - 1) / self.bound))

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`values` x scale, rounded stochastically, as uint32 (two's complement); refuses
        (never wraps) NaN and anything beyond the bound."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise RingError("cannot encode NaN or infinite values")
        if values.size and np.abs(values).max() > self.bound:
            raise RingError(f"|value| {np.abs(values).max():.3g} exceeds the round's bound "
                            f"{self.bound:.3g}")
        scaled = values * self.scale
        rounded = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
        return (rounded % 2**32).astype(DTYPE)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """Real values of a ring element (e.g. the unmasked sum of at most `clients` encodings)."""
        if total.dtype != DTYPE:
            raise RingError(f"ring vectors are {np.dtype(DTYPE).name}, got {total.dtype}")
        return total.view(np.int32).astype(np.float64) / self.scale

    def error_bound(self, summed: int | None = None) -> float:
        """Worst-case absolute error of a decoded sum: under one unit per encoding."""
        return (summed or self.clients) / self.scale


def zeros(length: int) -> np.ndarray:
    return np.zeros(length, dtype=DTYPE)
