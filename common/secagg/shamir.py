"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

`cryptography` has no secret sharing, so this is ours: a random polynomial of degree t-1 with the
secret as constant term, evaluated at x = 1..n; Lagrange interpolation at 0 recovers it from any
t shares, and t-1 shares reveal nothing. Randomness comes from `secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1  # a Mersenne prime comfortably above 2^256
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Shares that cannot rebuild a secret (too few, duplicated, or out of range)."""


def split(secret: bytes, shares: int, threshold: int) -> list[tuple[int, bytes]]:
    """(x, y) pairs for x = 1..shares; any `threshold` of them rebuild `secret`."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= shares:
        raise ShamirError(f"threshold {threshold} must be in [1, {shares}]")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                      for _ in range(threshold - 1)]
    return [(x, _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big"))
            for x in range(1, shares + 1)]


def combine(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least `threshold` distinct shares (extra shares are ignored)."""
    points = {x: int.from_bytes(y, "big") for x, y in shares}
    if len(points) != len(shares):
        raise ShamirError("duplicate share indices")
    if len(points) < threshold:
        raise ShamirError(f"{len(points)} shares cannot rebuild a {threshold}-of-n secret")
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in points.items()):
        raise ShamirError("share out of the field's range")
    chosen = sorted(points.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(chosen):
            if i != j:
                numerator = numerator * -x_j % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("shares do not belong to one 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
