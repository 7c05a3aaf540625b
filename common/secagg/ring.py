"""Fixed-point encoding of real vectors into the ring Z_2^64, where masks cancel exactly.

Values are scaled by 2^FRACTION_BITS and rounded; their sum over n clients must stay within
+-2^63, so each encoded value is bounded by 2^63 / n: `encode` refuses (never wraps) anything
beyond. numpy's uint64 arithmetic is the ring: addition wraps modulo 2^64.
"""

from __future__ import annotations

import numpy as np

FRACTION_BITS = 24
SCALE = float(2**FRACTION_BITS)


class RingError(ValueError):
    """A value too large for the ring at this many clients, or a vector of the wrong kind."""


def bound(clients: int) -> float:
    """The largest |value| that n clients may each encode without the sum overflowing."""
    return (2.0**62 / max(clients, 1)) / SCALE


def encode(values: np.ndarray, clients: int) -> np.ndarray:
    """Round `values` to multiples of 2^-FRACTION_BITS as uint64 (two's complement)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise RingError("cannot encode NaN or infinite values")
    limit = bound(clients)
    if values.size and np.abs(values).max() > limit:
        raise RingError(f"|value| {np.abs(values).max():.3g} exceeds {limit:.3g}, the bound for "
                        f"{clients} clients")
    return np.rint(values * SCALE).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """Real values of a ring element (e.g. the unmasked sum)."""
    if total.dtype != np.uint64:
        raise RingError(f"ring vectors are uint64, got {total.dtype}")
    return total.view(np.int64).astype(np.float64) / SCALE


def error_bound(clients: int) -> float:
    """Worst-case absolute error of a decoded sum of `clients` encodings (rounding only)."""
    return clients * 0.5 / SCALE
