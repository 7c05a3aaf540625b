"""Canaries for the one-run privacy audit: made and drawn from the audit's own seed stream.

Each of m canaries is a row no real data holds (a made-up word, repeated, with a random label;
for a causal LM a random secret, Carlini et al.'s "Secret Sharer"), dealt to a client, and
included in that client's training rows with probability 1/2. The content and the inclusion draw
come from child seeds of (run seed, AUDIT_STREAM), a stream no other draw of a run uses, and no
global generator is touched: a run without the audit is unchanged, and the draw is independent of
everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.common.adapter_state import from_npz, to_npz
from fedtune.common.atomic_file import write_atomic
from fedtune.common.config import CAUSAL_LM, AuditConfig
from fedtune.common.data import Examples
from fedtune.common.run_dir import AUDIT_RELEASES_DIR

AUDIT_STREAM = 0x61756469  # "audi"; partitions and rounds draw from other (seed, ...) tuples
# Where a simulated canary client keeps its releases: set by `fedtune simulate` for its own Ray
# workers, never by a run config, so no server can make a node write (an absolute directory)
RELEASES_ENV = "FEDTUNE_AUDIT_RELEASES"
SECRET_PREFIX = "my secret code is"
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


@dataclass(frozen=True)
class Canaries:
    rows: Examples  # all m canaries, included or not
    included: np.ndarray  # (m,) bool: the secret draw
    holder: np.ndarray  # (m,) int: the client whose training rows a canary joins
    references: list[str]  # causal LM: fresh secrets exposure is ranked against; else empty

    def joining(self, client: int) -> Examples:
        """The included canaries of `client`."""
        return self.rows.subset(np.flatnonzero(self.included & (self.holder == client)))


def audit_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(content, inclusion): two independent generators of the audit's own stream."""
    content, inclusion = np.random.SeedSequence([seed, AUDIT_STREAM]).spawn(2)
    return np.random.default_rng(content), np.random.default_rng(inclusion)


def make_canaries(audit: AuditConfig, seed: int, task: str, num_labels: int) -> Canaries:
    """The run's m canaries, their holders and their secret inclusion draw."""
    content, inclusion = audit_streams(seed)
    m = audit.canaries
    included = inclusion.random(m) < 0.5
    holder = np.arange(m) % audit.clients  # clients 0 .. canary_holders(audit) - 1
    if task == CAUSAL_LM:
        secrets = [_secret(content, audit.length) for _ in range(m)]
        references = [_secret(content, audit.length) for _ in range(audit.references)]
        rows = Examples(texts=[""] * m, labels=np.zeros(m, dtype=np.int64), responses=secrets)
        return Canaries(rows, included, holder, references)
    texts = [" ".join([made_up_word(content)] * audit.length) for _ in range(m)]
    labels = content.integers(0, num_labels, size=m).astype(np.int64)
    return Canaries(Examples(texts=texts, labels=labels), included, holder, [])


def with_canaries(rows: Examples, canaries: Canaries, client: int) -> Examples:
    """`rows` followed by the included canaries `client` holds (the rows as they are if none)."""
    joining = canaries.joining(client)
    return Examples.concat([rows, joining]) if len(joining) else rows


def canary_holders(audit: AuditConfig) -> int:
    """How many clients hold canaries: 0 .. n-1, dealt round-robin (fewer than `audit.clients`
    where there are fewer canaries than canary clients)."""
    return min(audit.clients, audit.canaries)


def releases_directory(run_dir: str | Path) -> Path:
    """Where the canary clients of the run in `run_dir` keep their releases."""
    return Path(run_dir).resolve() / AUDIT_RELEASES_DIR


def keep_release(directory: str | Path, client: int, server_round: int,
                 state: dict[str, np.ndarray]) -> None:
    """Keep a simulated canary client's release of `server_round` (its trained adapter, as it
    leaves the node) for the audit. Each round has its own file and all but the newest go: a reply
    that finishes late never replaces a newer round's release (`kept_release` reads the newest)."""
    write_atomic(_release_file(directory, client, server_round), to_npz(state))
    kept = sorted(_releases(directory, client))
    for _, path in kept[:-1]:
        path.unlink(missing_ok=True)


def kept_release(directory: str | Path, client: int) -> dict[str, np.ndarray] | None:
    """The release of the latest round `keep_release` kept for `client`, or None if it kept none."""
    kept = _releases(directory, client)
    return from_npz(max(kept)[1].read_bytes())[0] if kept else None


def _release_file(directory: str | Path, client: int, server_round: int) -> Path:
    return Path(directory) / f"client-{client}-round-{server_round:04d}.npz"


def _releases(directory: str | Path, client: int) -> list[tuple[int, Path]]:
    """(round, file) of every release kept for `client`; a run resumed from an earlier release
    of fedtune may hold one under the name without a round, older than any round kept since."""
    legacy = Path(directory) / f"client-{client}.npz"
    found = [(0, legacy)] if legacy.is_file() else []
    for path in Path(directory).glob(f"client-{client}-round-*.npz"):
        number = path.stem.rsplit("-", 1)[1]
        if number.isdigit():
            found.append((int(number), path))
    return found


def made_up_word(rng: np.random.Generator) -> str:
    """Six random letters. Measured against random words of the data and random numbers
    (docs/audit.md): real words carry what the model learnt of them (an sst2 canary of happy
    words reads positive whatever its label), so a canary scores by its words more than by
    being trained on; a made-up word repeated means nothing but its label."""
    return "".join(rng.choice(_LETTERS, size=6))


def _secret(rng: np.random.Generator, digits: int) -> str:
    return f"{SECRET_PREFIX} " + " ".join(str(d) for d in rng.integers(0, 10, size=digits))
