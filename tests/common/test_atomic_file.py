"""A file written atomically holds the old content or the new, never a torn mix, and nothing
is left beside it."""

from __future__ import annotations

import os

import pytest

from fedtune.common import atomic_file
from fedtune.common.atomic_file import write_atomic


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "deep" / "ledger.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["ledger.json"]


def test_a_write_stopped_before_the_rename_keeps_the_old_content_and_no_temp_file(
        tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    write_atomic(path, b"old")

    def stopped(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_file.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new, half written")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ledger.json"]
