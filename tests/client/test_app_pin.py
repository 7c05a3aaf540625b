"""client/app_pin.py: the SuperNode's FAB verification asks the pin, and only the pin."""

from __future__ import annotations

import hashlib

from flwr.supercore.fab import Fab

from client.app_pin import PIN_ENTITY, approves, install_pin


def test_only_the_pinned_bundle_is_approved_by_its_own_bytes():
    content = b"the approved bundle"
    approved = frozenset({hashlib.sha256(content).hexdigest()})

    assert approves(content, approved)
    assert not approves(b"another bundle", approved)


def test_the_supernode_verification_step_is_routed_to_the_pin(monkeypatch):
    from flwr.supernode import start_client_internal as node

    monkeypatch.setattr(node, "_verify_fab", node._verify_fab)  # restored after the test
    good, bad = b"approved", b"other"
    seen = {}

    def fake_pull(*, get_fab, trusted_entities, **rest):  # records what the pin hands Flower's
        seen.update(get_fab=get_fab, trusted_entities=trusted_entities)

    monkeypatch.setattr(node, "_pull_and_store_message", fake_pull)
    install_pin(frozenset({hashlib.sha256(good).hexdigest()}))
    node._pull_and_store_message(get_fab=lambda h, r: Fab(h, bad, {"claimed": "by server"}),
                                 trusted_entities=None)

    fab = seen["get_fab"]("hash-the-server-claims", 1)
    assert seen["trusted_entities"] == {PIN_ENTITY: "the approved app digests"}
    assert fab.verifications == {"valid_license": PIN_ENTITY}  # the server's claims dropped
    assert node._verify_fab(Fab("x", good, {}), {}) is True
    assert node._verify_fab(fab, {}) is False
