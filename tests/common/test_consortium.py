"""`fedtune certs consortium`: the nodes' public keys in one directory every node pins."""

from __future__ import annotations

import pytest

from fedtune.common import certs
from fedtune.common.consortium import MANIFEST, bundle, fingerprint, pinned_digest
from fedtune.common.secagg.signing import read_peers


def test_the_bundle_holds_each_key_under_its_name_with_a_manifest(tmp_path):
    publics = [certs.node_key(tmp_path / "keys", n)[1] for n in ("hospital-a", "hospital-b")]
    made = bundle(tmp_path / "peers", publics)
    assert made.names == ["hospital-a", "hospital-b"]
    pinned = read_peers(tmp_path / "peers")
    assert sorted(pinned) == made.names
    assert pinned["hospital-a"] == publics[0].read_bytes().strip()
    manifest = (tmp_path / "peers" / MANIFEST).read_text()
    assert f"bundle sha256:{made.digest}" in manifest
    assert f"hospital-b SHA256:{fingerprint(pinned['hospital-b'])}" in manifest
    assert pinned_digest(tmp_path / "peers") == made.digest  # what a node prints at start-up


def test_a_changed_bundle_has_another_digest_and_is_replaced_only_with_force(tmp_path):
    a, b, c = (certs.node_key(tmp_path / "keys", n)[1] for n in ("a", "b", "c"))
    first = bundle(tmp_path / "peers", [a, b])
    with pytest.raises(certs.CertError, match="--force"):
        bundle(tmp_path / "peers", [a, b, c])
    second = bundle(tmp_path / "peers", [a, c], force=True)  # b left, c added
    assert second.digest != first.digest
    assert sorted(read_peers(tmp_path / "peers")) == ["a", "c"]


def test_a_name_or_key_given_twice_or_not_a_key_is_refused(tmp_path):
    a = certs.node_key(tmp_path / "one", "hospital-a")[1]
    again = certs.node_key(tmp_path / "two", "hospital-a")[1]
    with pytest.raises(certs.CertError, match="'hospital-a' or its key is given twice"):
        bundle(tmp_path / "peers", [a, again])
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(certs.CertError, match=r"junk\.pub is not an OpenSSH public key"):
        bundle(tmp_path / "peers", [a, tmp_path / "junk.pub"])
    with pytest.raises(certs.CertError, match="unreadable"):
        bundle(tmp_path / "peers", [tmp_path / "missing.pub"])
