"""client/app_pin.py: the SuperNode's FAB verification asks the pin, and only the pin."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from flwr.supercore.fab import Fab

from fedtune.client.app_pin import PIN_ENTITY, approves, install_pin, safe_run_names

RUNS = {1: SimpleNamespace(fab_id="fedtune/fedtune", fab_version="0.1.0"),
        2: SimpleNamespace(fab_id="fedtune/fedtune", fab_version="0.1.0.abcd/../../../tmp/x")}


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

    def fake_pull(*, get_fab, get_run, trusted_entities, **rest):  # what the pin hands Flower's
        seen.update(get_fab=get_fab, get_run=get_run, trusted_entities=trusted_entities)

    monkeypatch.setattr(node, "_pull_and_store_message", fake_pull)
    install_pin(frozenset({hashlib.sha256(good).hexdigest()}))
    node._pull_and_store_message(get_fab=lambda h, r: Fab(h, bad, {"claimed": "by server"}),
                                 get_run=lambda r: RUNS[r], trusted_entities=None)

    fab = seen["get_fab"]("hash-the-server-claims", 1)
    assert seen["trusted_entities"] == {PIN_ENTITY: "the approved app digests"}
    assert fab.verifications == {"valid_license": PIN_ENTITY}  # the server's claims dropped
    assert node._verify_fab(Fab("x", good, {}), {}) is True
    assert node._verify_fab(fab, {}) is False


def test_a_run_whose_names_would_steer_the_app_folder_is_refused(monkeypatch):
    from flwr.supernode import start_client_internal as node

    monkeypatch.setattr(node, "_verify_fab", node._verify_fab)
    good = b"approved"
    seen = {}
    monkeypatch.setattr(node, "_pull_and_store_message",
                        lambda *, get_fab, get_run, trusted_entities, **rest: seen.update(
                            get_fab=get_fab, get_run=get_run))
    install_pin(frozenset({hashlib.sha256(good).hexdigest()}))
    node._pull_and_store_message(get_fab=lambda h, r: Fab(h, good, {}),
                                 get_run=lambda r: RUNS[r], trusted_entities=None)
    for run_id, approved in ((1, True), (2, False)):
        seen["get_run"](run_id)
        assert node._verify_fab(seen["get_fab"]("h", run_id), {}) is approved
    assert not safe_run_names("../x", "1.0") and not safe_run_names("a/b", "1.0/..")
    assert safe_run_names("fedtune/fedtune", "0.1.0")


def test_a_flower_version_whose_internals_were_not_checked_is_refused(monkeypatch):
    import flwr
    import pytest

    from fedtune.client.app_pin import PinError

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(PinError, match=r"written for Flower 1\.41\.\* or 1\.42\.\*, this is 1\.43"):
        install_pin(frozenset({"0" * 64}))
