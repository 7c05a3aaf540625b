"""A node whose SuperLink stopped under it can start again at once on the next SuperLink."""

from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

from fedtune.server.stale_nodes import end_stale_sessions


def _link_state(path):
    state = SqlLinkState(str(path), NoOpFederationManager(), ObjectStoreFactory().store())
    state.initialize()
    return state


def test_a_node_left_online_by_a_stopped_superlink_can_activate_again(tmp_path):
    database = tmp_path / "superlink.db"
    first = _link_state(database)
    online = first.create_node("aid", "hospital-a", b"key-a", 30.0)
    registered = first.create_node("aid", "hospital-b", b"key-b", 30.0)
    assert first.activate_node(online, 30.0)
    assert not _link_state(database).activate_node(online, 30.0)  # Flower's own refusal

    assert end_stale_sessions(database) == 1
    again = _link_state(database)
    assert again.activate_node(online, 30.0)
    assert again.activate_node(registered, 30.0)  # untouched: never activated


def test_no_database_yet_marks_nothing(tmp_path):
    assert end_stale_sessions(tmp_path / "superlink.db") == 0


def test_another_schema_is_a_warning_not_a_crash(tmp_path):
    import sqlite3
    database = tmp_path / "superlink.db"
    sqlite3.connect(database).execute("CREATE TABLE other (x)").connection.commit()
    assert end_stale_sessions(database) == 0


def test_a_database_another_process_holds_open_is_left_alone(tmp_path):
    import subprocess
    import sys
    import time

    database = tmp_path / "superlink.db"
    state = _link_state(database)
    node = state.create_node("aid", "hospital-a", b"key-a", 30.0)
    assert state.activate_node(node, 30.0)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                               "print(1, flush=True); time.sleep(60)", str(database)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"1"
        assert end_stale_sessions(database) == 0  # a SuperLink may still be on it
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert end_stale_sessions(database) == 1
