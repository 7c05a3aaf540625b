"""Signatures for secure aggregation: each client signs its round keys and, before it reveals
anything, the survivor set it was sent (Bonawitz et al.'s consistency round).

A client signs with a fresh Ed25519 key per round, or, on a deployed node that pins its peers'
keys, with its long-term node key (the OpenSSH key pair `fedtune certs node` makes: ECDSA P-384
or Ed25519). Public keys travel in OpenSSH format, so either kind verifies the same way.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.common.secagg.protocol import fields

KEYS_PURPOSE = b"fedtune secagg round keys v1"
SURVIVORS_PURPOSE = b"fedtune secagg survivors v1"
COMPLAINT_PURPOSE = b"fedtune secagg complaint v1"
_OPENSSH = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


class SigningError(ValueError):
    """A signing key that cannot be read or used."""


class Signer:
    """A private signing key: a fresh per-round Ed25519 key, or a node's key file."""

    def __init__(self, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
                 path: str = "") -> None:
        self.key, self.path = key, path

    @classmethod
    def fresh(cls) -> Signer:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        try:
            key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
        except (OSError, UnsupportedAlgorithm, ValueError) as error:
            raise SigningError(f"cannot read the node key {path}: {error}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise SigningError(f"the node key {path} is neither ECDSA nor Ed25519")
        return cls(key, str(path))

    def public(self) -> bytes:
        return self.key.public_key().public_bytes(*_OPENSSH)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA384()))
        return self.key.sign(data)

    def to_state(self) -> dict[str, str]:
        """What a client keeps between messages: the key file's path, or the fresh key."""
        if self.path:
            return {"path": self.path}
        raw = self.key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        return {"ed25519": raw.hex()}

    @classmethod
    def from_state(cls, state: dict[str, str]) -> Signer:
        if "path" in state:
            return cls.from_file(state["path"])
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(state["ed25519"])))


def verifies(public: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `signature` over `data` is valid under the OpenSSH public key `public`."""
    try:
        key = serialization.load_ssh_public_key(public)
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def keys_statement(session: bytes, server_round: int, name: str, c_public: bytes,
                   s_public: bytes) -> bytes:
    """What a client's key signature covers: its two round keys, bound to round and name."""
    return fields(KEYS_PURPOSE, session, str(server_round).encode(), name.encode(), c_public,
                  s_public)


def survivors_statement(session: bytes, server_round: int, survivors: list[str],
                        routing: bytes) -> bytes:
    """What a consistency signature covers: the exact survivor set of this round and the
    digest of who delivered shares to whom (`routing_digest`)."""
    return fields(SURVIVORS_PURPOSE, session, str(server_round).encode(), routing,
                  *(name.encode() for name in sorted(survivors)))


def complaint_statement(session: bytes, server_round: int, complainer: str,
                        accused: list[str]) -> bytes:
    """What a complaint covers: this round, who complains, and whose shares to it did not open."""
    return fields(COMPLAINT_PURPOSE, session, str(server_round).encode(), complainer.encode(),
                  *(name.encode() for name in sorted(accused)))


def read_peers(directory: str | Path) -> dict[str, bytes]:
    """{name: OpenSSH public key} from a directory of `<name>.pub` files (the consortium's
    node keys, distributed out of band)."""
    peers = {}
    for path in sorted(Path(directory).glob("*.pub")):
        line = path.read_bytes().strip()
        try:
            serialization.load_ssh_public_key(line)
        except (UnsupportedAlgorithm, ValueError) as error:
            raise SigningError(f"peer key {path} is not an OpenSSH public key: {error}") from None
        peers[path.stem] = b" ".join(line.split()[:2])
    if not peers:
        raise SigningError(f"no <name>.pub peer keys in {directory}")
    return peers
