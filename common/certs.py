"""Keys and certificates for a deployment, made with `cryptography`'s x509 and key APIs.

`init` makes the federation's CA and the server's TLS certificate (with the subject alternative
names nodes will dial); `node_key` makes a SuperNode's authentication key pair (ECDSA P-384 in
OpenSSH form, as `flower-supernode` and `flwr supernode register` read them).
Private keys are written owner-only and never over an existing file unless `force`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.errors import InputError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
VALID_DAYS = 825


class CertError(InputError, ValueError):
    """A key or certificate that cannot be made, read or used as asked."""


@dataclass(frozen=True)
class ServerFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def init(directory: str | Path, hosts: list[str], *, force: bool = False) -> ServerFiles:
    """A new CA and a server certificate for `hosts` (DNS names or IP addresses)."""
    directory = Path(directory)
    if not hosts:
        raise CertError("name at least one --server-host the nodes will connect to")
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))  # the operator's own CLI
    paths = [directory / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    _refuse_overwrite(paths, force)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                            False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (_builder(server_name, ca_name, server_key.public_key())
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    directory.mkdir(parents=True, exist_ok=True)
    _write(paths[0], ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths[1], _pem_private(ca_key), private=True)
    _write(paths[2], server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths[3], _pem_private(server_key), private=True)
    return ServerFiles(paths[0], paths[2], paths[3])


def node_key(directory: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """(private key, public key) of node `name`: `<name>.key` and `<name>.pub` (OpenSSH)."""
    if not name or "/" in name or name.startswith("."):
        raise CertError(f"node name {name!r} must be a plain file name")
    directory = Path(directory)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    _refuse_overwrite([private, public], force)
    key = ec.generate_private_key(ec.SECP384R1())
    directory.mkdir(parents=True, exist_ok=True)
    _write(private, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n",
           private=False)
    return private, public


def check_certificate(path: str | Path) -> x509.Certificate:
    """The PEM certificate at `path`, or CertError naming what is wrong with it."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"certificate {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise CertError(f"{path} is not a PEM certificate: {error}") from None


def check_private_key(path: str | Path) -> None:
    """Refuse a node key that is missing, unreadable or not an elliptic-curve private key."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"node key {path} does not exist") from None
    except (OSError, ValueError, TypeError) as error:
        raise CertError(f"node key {path} is unreadable: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"node key {path} is not an elliptic-curve key (make one with "
                        "`fedtune certs node`)")


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertError(f"{', '.join(existing)} already exist; pass --force to replace them")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create with owner-only permissions from the start (no window where others could read)."""
    mode = 0o600 if private else 0o644
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
