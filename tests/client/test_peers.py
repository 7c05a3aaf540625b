"""Pinned peers: a node signs secure aggregation with its node key and knows its peers' keys."""

from __future__ import annotations

import shutil

import pytest

from fedtune.client.deploy import check_peers
from fedtune.common import certs
from fedtune.common.secagg.signing import Signer, keys_statement, read_peers, verifies


def test_a_node_key_signs_and_its_pub_file_verifies(tmp_path):
    private, _ = certs.node_key(tmp_path, "hospital-a")
    signer = Signer.from_file(private)
    statement = keys_statement(b"session", 3, "hospital-a", b"c" * 32, b"s" * 32)
    pinned = read_peers(tmp_path)["hospital-a"]
    assert pinned == signer.public()
    assert verifies(pinned, signer.sign(statement), statement)
    assert not verifies(pinned, signer.sign(statement), statement + b"x")
    assert Signer.from_state(signer.to_state()).public() == pinned  # kept between messages


def test_start_up_refuses_peers_without_this_nodes_own_key(tmp_path):
    from fedtune.client.deploy import ClientSettings
    from fedtune.client.policy import NodePolicy

    keys, peers = tmp_path / "keys", tmp_path / "peers"
    private, _ = certs.node_key(keys, "hospital-a")
    _, other = certs.node_key(keys, "hospital-b")
    peers.mkdir()
    shutil.copy(other, peers / "hospital-b.pub")
    settings = ClientSettings(server="127.0.0.1:9092", root_cert=tmp_path / "ca.pem",
                              node_key=private, data=tmp_path, ledger=tmp_path / "ledger",
                              name="hospital-a", policy=NodePolicy(require_dp=False,
                                                                   peers=str(peers)))
    with pytest.raises(certs.CertError, match=r"no hospital-a\.pub"):
        check_peers(settings)
    shutil.copy(keys / "hospital-a.pub", peers / "hospital-a.pub")
    check_peers(settings)
    (peers / "hospital-a.pub").write_text("not a key\n")
    with pytest.raises(certs.CertError, match="not an OpenSSH public key"):
        check_peers(settings)


def settings_for(tmp_path, **policy):
    from fedtune.client.deploy import ClientSettings
    from fedtune.client.policy import NodePolicy

    private, _ = certs.node_key(tmp_path / "keys", "hospital-a")
    return ClientSettings(server="127.0.0.1:9092", root_cert=tmp_path / "ca.pem",
                          node_key=private, data=tmp_path, ledger=tmp_path / "ledger",
                          name="hospital-a", policy=NodePolicy(require_dp=False, **policy))


def test_a_node_starts_only_with_its_consortiums_keys_pinned_or_a_loud_waiver(tmp_path, capsys):
    with pytest.raises(certs.CertError, match=r"peers: give --peers DIR.*--allow-unpinned-peers"):
        check_peers(settings_for(tmp_path / "default"))
    check_peers(settings_for(tmp_path / "waived", require_peers=False))
    assert "WARNING: --allow-unpinned-peers" in capsys.readouterr().err


def test_a_bundle_from_certs_consortium_is_what_a_node_pins(tmp_path, capsys):
    from fedtune.common.consortium import bundle

    settings = settings_for(tmp_path, peers=str(tmp_path / "peers"))
    _, other = certs.node_key(tmp_path / "keys", "hospital-b")
    made = bundle(tmp_path / "peers", [tmp_path / "keys" / "hospital-a.pub", other])
    check_peers(settings)
    assert f"2 node keys, bundle sha256:{made.digest}" in capsys.readouterr().out


def test_a_malformed_server_or_an_unquotable_value_is_a_node_setup_error(tmp_path):
    from fedtune.client.deploy import ClientSettings, NodeSetupError, _toml_value, supernode_command
    from fedtune.client.policy import NodePolicy

    settings = ClientSettings(server="fed.example.org", root_cert=tmp_path / "ca.pem",
                              node_key=tmp_path / "k.key", data=tmp_path,
                              ledger=tmp_path / "ledger", name="hospital-a",
                              policy=NodePolicy(require_dp=False))
    with pytest.raises(NodeSetupError, match="--server must be HOST:PORT"):
        supernode_command(settings)
    with pytest.raises(NodeSetupError, match="may not hold quotes"):
        _toml_value('/data/"x"')
    assert not issubclass(NodeSetupError, certs.CertError)  # a command line is no certificate
