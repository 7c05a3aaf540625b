"""Masks: a 32-byte seed expanded into a vector of ring elements by the ChaCha20 stream cipher."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.common.secagg.ring import DTYPE

_NONCE = bytes(16)  # each seed expands exactly one mask, so a fixed nonce is safe


def expand(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudorandom ring elements: the ChaCha20 keystream under key `seed`."""
    if len(seed) != 32:
        raise ValueError(f"mask seeds are 32 bytes, got {len(seed)}")
    width = np.dtype(DTYPE).itemsize
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(width * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=DTYPE).copy()
