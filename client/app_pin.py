"""A node runs only the app its operator approved: Flower's SuperNode, started here with the
node's pin on the FAB digests it accepts, refuses any other bundle before installing it.

Flower 1.41's own answer is `flower-supernode --trusted-entities`: a FAB must carry a publisher's
signature. Those signatures come only from Flower Hub (the SuperLink fills them in when it fetches
a Hub app; a bundle sent with `flwr run` carries none), so offline the option refuses every app,
the approved one too. The pin reuses that same step instead: the SuperNode's FAB verification
(`_verify_fab`, called once per new run before the FAB is stored, let alone installed or run) asks
whether SHA-256 of the bundle is one the node approved, and on "no" Flower does what it does for
an unverified FAB: logs it, and answers the server's message with an `INVALID_FAB` error reply
instead of starting the ClientApp. Run as
`python -P -m fedtune.client.app_pin --approve DIGEST ... -- <flower-supernode arguments>`;
`fedtune client` does so.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from logging import ERROR, INFO
from typing import Any

PIN_ENTITY = "fedtune-app-pin"  # the one "trusted entity" Flower is told about: this pin


class PinError(RuntimeError):
    """The installed Flower lacks the verification step the pin hooks into."""


def approves(content: bytes, approved: frozenset[str]) -> bool:
    """Whether this bundle's SHA-256 (of its bytes, not the hash the server claims) is pinned."""
    from flwr.common.logger import log

    digest = hashlib.sha256(content).hexdigest()
    if digest in approved:
        log(INFO, "fedtune: app sha256:%s is the approved app; running it", digest)
        return True
    log(ERROR, "fedtune: refused app sha256:%s: this node runs only %s (its --app-digest); "
        "the server's message is answered with an error and the app is not installed",
        digest, ", ".join(f"sha256:{d}" for d in sorted(approved)))
    return False


# Flower versions whose SuperNode internals install_pin replaces, each read and checked
# (`_pull_and_store_message` and `_verify_fab` are the same in 1.41.0 and 1.42.0).
PINNED_FLOWER = ("1.41.", "1.42.")


def safe_run_names(fab_id: str, fab_version: str) -> bool:
    """A run's app id ("publisher/name") and version, as the SuperLink reports them, are plain
    names: Flower installs and imports the app from a folder built from them."""
    return bool(re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", fab_id or "")
                and re.fullmatch(r"[A-Za-z0-9_.+-]+", fab_version or "")
                and ".." not in fab_id + fab_version)


def install_pin(approved: frozenset[str]) -> None:
    """Route the SuperNode's FAB verification to `approves` for every run."""
    import flwr
    from flwr.common.logger import log
    from flwr.supernode import start_client_internal as node

    if not flwr.__version__.startswith(PINNED_FLOWER):
        raise PinError(f"fedtune's app pin is written for Flower "
                       f"{' or '.join(v + '*' for v in PINNED_FLOWER)}, this is "
                       f"{flwr.__version__}: it could stop checking without a word")

    pull = getattr(node, "_pull_and_store_message", None)
    if pull is None or not hasattr(node, "_verify_fab") or not {"get_fab", "trusted_entities"} \
            <= set(inspect.signature(pull).parameters) or "get_run" not in \
            inspect.signature(pull).parameters:
        raise PinError("this Flower version has no SuperNode FAB-verification step for "
                       "fedtune's app pin; use the Flower version pyproject.toml names")

    def pull_pinned(**kwargs: Any) -> Any:
        get_fab: Callable[[str, int], Any] = kwargs["get_fab"]
        get_run: Callable[[int], Any] = kwargs["get_run"]
        unsafe: set[int] = set()  # runs whose names would steer where the app is loaded from

        def get_run_for_pin(run_id: int) -> Any:
            run = get_run(run_id)
            if not safe_run_names(run.fab_id, run.fab_version):
                log(ERROR, "fedtune: refused run %d: its app id %r or version %r is not a plain "
                    "name (the node loads the app from a folder named after them)", run_id,
                    run.fab_id, run.fab_version)
                unsafe.add(run_id)
            return run

        def get_fab_for_pin(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            # Whatever the SuperLink says about the bundle is no evidence here: the pin decides.
            fab.verifications = {"valid_license": PIN_ENTITY}
            if run_id in unsafe:
                fab.content = b""  # approved by no digest: refused like any other app
            return fab

        return pull(**{**kwargs, "get_fab": get_fab_for_pin, "get_run": get_run_for_pin,
                       "trusted_entities": {PIN_ENTITY: "the approved app digests"}})

    node._pull_and_store_message = pull_pinned
    node._verify_fab = lambda fab, _trusted: approves(fab.content, approved)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -P -m fedtune.client.app_pin",
                                     description="flower-supernode that runs only pinned apps")
    parser.add_argument("--approve", action="append", required=True, metavar="SHA256")
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    from fedtune.common.app_bundle import check_digest

    install_pin(frozenset(check_digest(d) for d in args.approve))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
