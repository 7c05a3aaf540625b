"""`fedtune server --node ...` is the registry: after a start, exactly the named node keys are
registered with the SuperLink, and every other key registered earlier is unregistered.

Flower's `flwr supernode list` shows node ids but not their keys, so this talks to the Control API
through Flower's own client (the one its CLI wraps), whose `ListNodes` answer carries each node's
public key. Success is judged by listing the keys afterwards, never by an error's wording.
An unregistered key stays in the SuperLink's database and cannot be registered again (checked on
Flower 1.41: the Control API answers 412), so a revoked node comes back only with a new key.

A node's name is its key file's stem (`hospital-a.pub` names `hospital-a`): the ServerApp names
each node id by the key registered for it (`node_names`), never by what the node says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.common.errors import InputError

_UNREGISTERED = "unregistered"  # Flower's status of a revoked node


class RegistryError(InputError, RuntimeError):
    """The SuperLink's registered node keys cannot be made to match `--node`."""


@dataclass(frozen=True)
class SyncReport:
    registered: list[str]  # key files registered by this start
    kept: list[str]  # key files that were registered already
    unregistered: list[int]  # node ids of keys no longer named


def key_bytes(public_key: Path) -> bytes:
    """The key as Flower stores it (PEM of the public key), from an OpenSSH `.pub` file."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    try:
        key = serialization.load_ssh_public_key(public_key.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as error:
        raise RegistryError(f"node public key {public_key} is unreadable: {error}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):  # Flower's nodes sign with ECDSA
        raise RegistryError(f"node public key {public_key} is not an elliptic-curve key (a "
                            "node makes one with `fedtune certs node`)")
    return public_key_to_bytes(key)


def control_client(address: str, ca_cert: Path):
    """Flower's Control API client for the loopback SuperLink at `address`."""
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=str(ca_cert),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="fedtune server")])


def listed_keys(client) -> dict[bytes, tuple[int, str]]:
    """public key -> (node id, status) of every node the SuperLink knows, revoked ones too."""
    from flwr.proto.control_pb2 import ListNodesRequest

    return {bytes(n.public_key): (n.node_id, n.status)
            for n in client.ListNodes(ListNodesRequest()).nodes_info}


def sync_nodes(client, named: list[Path]) -> SyncReport:
    """Register each named key not yet registered, unregister every other one, then check."""
    from flwr.proto.control_pb2 import RegisterNodeRequest, UnregisterNodeRequest

    wanted = {key_bytes(path): path for path in named}
    before = listed_keys(client)
    revoked = [str(wanted[k]) for k, (_, status) in before.items()
               if k in wanted and status == _UNREGISTERED]
    if revoked:
        raise RegistryError(f"node key {', '.join(revoked)} was unregistered earlier and "
                            "cannot be registered again; the node needs a new key "
                            "(`fedtune certs node --force`)")
    report = SyncReport([], [], [])
    for key, path in wanted.items():
        if key in before:
            report.kept.append(str(path))
            continue
        try:
            client.RegisterNode(RegisterNodeRequest(public_key=key))
        except Exception as error:  # Flower's client raises httpx or Flower errors
            raise RegistryError(f"registering {path} failed: {error}") from None
        report.registered.append(str(path))
    for key, (node_id, status) in before.items():
        if key not in wanted and status != _UNREGISTERED:
            try:
                client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
            except Exception as error:
                raise RegistryError(f"unregistering node {node_id} (a key no --node names) "
                                    f"failed: {error}") from None
            report.unregistered.append(node_id)
    after = {k for k, (_, status) in listed_keys(client).items() if status != _UNREGISTERED}
    if after != set(wanted):
        missing = sorted(str(wanted[k]) for k in set(wanted) - after)
        raise RegistryError(f"after registration the SuperLink lists {len(after)} node keys, "
                            f"expected {len(wanted)}; not registered: {missing or 'none'}")
    return report


def key_names(named: list[Path]) -> dict[bytes, str]:
    """{key as Flower stores it: the node's name, its file's stem}; RegistryError for a name or
    a key given twice (two nodes could then act in one name)."""
    names: dict[bytes, str] = {}
    for path in named:
        key = key_bytes(path)
        if key in names or path.stem in names.values():
            raise RegistryError(f"--node {path}: the name {path.stem!r} or its key is given "
                                "twice; each node needs its own key and file name")
        names[key] = path.stem
    return names


def node_names(client, named: list[Path]) -> dict[int, str]:
    """{node id: name} of every registered key named by `--node`."""
    names = key_names(named)
    return {node_id: names[key] for key, (node_id, status) in listed_keys(client).items()
            if key in names and status != _UNREGISTERED}


def write_node_names(path: Path, names: dict[int, str]) -> None:
    path.write_text(json.dumps({str(node_id): name for node_id, name in names.items()}))


def read_node_names(path: str | Path) -> dict[int, str]:
    return {int(node_id): str(name) for node_id, name in json.loads(Path(path).read_text()).items()}
