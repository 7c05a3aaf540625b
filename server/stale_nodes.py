"""Nodes a stopped SuperLink left marked online, marked offline before a new one starts.

A SuperLink that stops (a restart, a crash, the end of a run) cannot see its nodes go: their
rows in its database stay `online` until their last heartbeat's lease runs out (twice the
heartbeat interval, a minute by default). Until then Flower refuses a node that starts again
with the same key ("Failed to activate SuperNode"), and a new run samples the dead session and
waits for it. No SuperLink is running when `fedtune server` starts one, so no row can be live.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from fedtune.common.process_tree import open_by_others

ONLINE, OFFLINE = "online", "offline"  # Flower's NodeStatus values, as stored


def end_stale_sessions(database: Path) -> int:
    """Mark every node the database holds online as offline now; the number marked. Nothing is
    marked while another process holds the database open (a SuperLink still on it)."""
    if not database.exists():
        return 0
    holders = open_by_others(database)
    if holders:
        log(WARNING, "%s is open in processes %s; its nodes are left as they are", database,
            ", ".join(map(str, holders)))
        return 0
    stopped = datetime.now(UTC)
    try:
        with sqlite3.connect(database, timeout=30) as db:
            marked = db.execute(
                "UPDATE node SET status = ?, online_until = ?, last_deactivated_at = ? "
                "WHERE status = ?", (OFFLINE, stopped.timestamp(), stopped.isoformat(), ONLINE),
            ).rowcount
        db.close()
    except sqlite3.Error as error:  # another Flower schema: its nodes wait out their lease
        log(WARNING, "could not mark the nodes of %s offline (%s); a node started again within "
            "a minute of the last run may be refused until its old session expires",
            database, error)
        return 0
    return marked

