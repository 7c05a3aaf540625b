"""Two clients' shared keys: X25519 agreement, HKDF-SHA256 for separate purposes, and
ChaCha20-Poly1305 for the shares one sends the other through the server.

Every ciphertext is bound (as associated data) to the round, its sender and its recipient, so
the server cannot replay it in another round or redirect it to another client.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASK_PURPOSE = b"fedtune secagg pairwise mask v1"
SHARE_PURPOSE = b"fedtune secagg share encryption v1"
_RAW = serialization.Encoding.Raw


class ChannelError(ValueError):
    """A ciphertext that fails authentication, or a malformed key."""


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(data)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def check_public_key(data: bytes) -> None:
    """ChannelError for bytes that are no usable X25519 public key: wrong length, or a
    low-order point (e.g. all zeros) with which every agreement yields the all-zero secret."""
    try:
        new_private_key().exchange(X25519PublicKey.from_public_bytes(data))
    except ValueError as error:
        raise ChannelError(f"unusable public key: {error}") from None


def shared_key(own: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """32 bytes both sides derive alike; different `purpose` or `context` give unrelated keys."""
    try:
        secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise ChannelError(f"unusable public key: {error}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=purpose + b"|" + context).derive(secret)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext), authenticated together with `associated`."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext, or ChannelError when the ciphertext or its binding was altered."""
    if len(sealed) < 12 + 16:
        raise ChannelError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], associated)
    except InvalidTag:
        raise ChannelError("ciphertext failed authentication (tampered, replayed or "
                           "misrouted)") from None
