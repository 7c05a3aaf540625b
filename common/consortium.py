"""The consortium's node keys, bundled for every node to pin (`fedtune certs consortium`).

A node that uses secure aggregation signs with its own node key and accepts a cohort only if
every member's signing key is the one pinned for its name (`fedtune client --peers DIR`).
Without that, signing keys would arrive through the server, which could then fill a cohort
with clients of its own. The operator already holds every node's `<name>.pub` (the files it
registers with `fedtune server --node`), so one command copies them into one directory, checked
and named as the server names the nodes (the file's stem), with a manifest of fingerprints that
node operators can compare out of band. The files are public keys: nothing in the bundle is
secret, but it must reach each node unaltered.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.common.certs import CertError
from fedtune.common.secagg.signing import SigningError, read_peers

MANIFEST = "CONSORTIUM.txt"


@dataclass(frozen=True)
class Bundle:
    directory: Path
    names: list[str]
    digest: str  # sha256 over every (name, key): one value to compare for the whole bundle


def bundle(directory: str | Path, public_keys: list[Path], *, force: bool = False) -> Bundle:
    """Copy each `<name>.pub` (OpenSSH, as `fedtune certs node` makes) into `directory`, one
    name per key and one key per name, with a manifest; CertError naming what is wrong."""
    directory = Path(directory)
    keys: dict[str, bytes] = {}
    for path in public_keys:
        try:
            line = b" ".join(path.read_bytes().split()[:2])
            check_node_key(path.stem, line)
        except OSError as error:
            raise CertError(f"node public key {path} is unreadable: {error}") from None
        if path.stem in keys or line in keys.values():
            raise CertError(f"{path}: the name {path.stem!r} or its key is given twice; each "
                            "node needs its own key and file name")
        keys[path.stem] = line
    if not keys:
        raise CertError("name the consortium's node public keys (<name>.pub)")
    existing = sorted(directory.glob("*.pub")) if directory.is_dir() else []
    if existing and not force:
        raise CertError(f"{directory} already holds node keys; pass --force to replace the "
                        "bundle")
    directory.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    for name, line in sorted(keys.items()):
        (directory / f"{name}.pub").write_bytes(line + b"\n")
    digest = consortium_digest(keys)
    lines = [f"{name} SHA256:{fingerprint(line)}" for name, line in sorted(keys.items())]
    (directory / MANIFEST).write_text(
        "The consortium's node keys, pinned by `fedtune client --peers` (this directory).\n"
        f"bundle sha256:{digest}\n" + "\n".join(lines) + "\n")
    read_peers(directory)  # as a node will read it
    return Bundle(directory, sorted(keys), digest)


def check_node_key(name: str, line: bytes) -> None:
    """CertError unless `line` is an OpenSSH public key a node can pin (ECDSA or Ed25519)."""
    if not name or name.startswith("."):
        raise CertError(f"node name {name!r} must be a plain file name")
    try:
        key = serialization.load_ssh_public_key(line)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise CertError(f"{name}.pub is not an OpenSSH public key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise CertError(f"{name}.pub is neither an ECDSA nor an Ed25519 key")


def fingerprint(line: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (as `ssh-keygen -lf` prints it)."""
    blob = base64.b64decode(line.split()[1])
    return base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def consortium_digest(keys: dict[str, bytes]) -> str:
    """One hash of the whole bundle: every name with its key, in name order."""
    hasher = hashlib.sha256(b"fedtune consortium v1")
    for name, line in sorted(keys.items()):
        hasher.update(len(name).to_bytes(4, "big") + name.encode())
        hasher.update(len(line).to_bytes(4, "big") + line)
    return hasher.hexdigest()


def pinned_digest(directory: str | Path) -> str:
    """The digest of a bundle as a node reads it (to compare with the operator's)."""
    try:
        return consortium_digest(read_peers(directory))
    except SigningError as error:
        raise CertError(f"peers: {error}") from None
