"""A node's name is its registered key's file stem: one name per key, one key per name."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from fedtune.common import certs
from fedtune.server.node_registry import (
    RegistryError,
    key_bytes,
    node_names,
    read_node_names,
    write_node_names,
)


class Listing:
    """The Control API's ListNodes answer, as `listed_keys` reads it."""

    def __init__(self, nodes: dict[bytes, tuple[int, str]]) -> None:
        self.nodes = nodes

    def ListNodes(self, request):  # Flower's method name
        return SimpleNamespace(nodes_info=[
            SimpleNamespace(public_key=k, node_id=i, status=s) for k, (i, s) in
            self.nodes.items()])


def test_each_registered_node_id_is_named_by_its_key_files_stem(tmp_path):
    a = certs.node_key(tmp_path, "hospital-a")[1]
    b = certs.node_key(tmp_path, "hospital-b")[1]
    gone = certs.node_key(tmp_path, "revoked")[1]
    listing = Listing({key_bytes(a): (101, "registered"), key_bytes(b): (102, "online"),
                       key_bytes(gone): (103, "unregistered")})
    names = node_names(listing, [a, b])
    assert names == {101: "hospital-a", 102: "hospital-b"}
    write_node_names(tmp_path / "names.json", names)
    assert read_node_names(tmp_path / "names.json") == names


def test_a_name_or_a_key_given_twice_is_refused(tmp_path):
    a = certs.node_key(tmp_path / "one", "hospital-a")[1]
    other = certs.node_key(tmp_path / "two", "hospital-a")[1]  # another key, the same name
    (tmp_path / "copy").mkdir()
    copy = shutil.copy(a, tmp_path / "copy" / "hospital-c.pub")  # the same key, another name
    listing = Listing({})
    with pytest.raises(RegistryError, match="'hospital-a' or its key is given twice"):
        node_names(listing, [a, other])
    with pytest.raises(RegistryError, match="'hospital-c' or its key is given twice"):
        node_names(listing, [a, copy])
