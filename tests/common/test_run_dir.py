"""A run saved by an earlier release resumes the same way through every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.common.config import RunConfig
from fedtune.common.run_dir import CONFIG_FILE, RunDirError, saved_config


def run_saved_before_pooling(root: Path) -> Path:
    """A run directory whose config.json predates `model.pooling` (its head read the pooler)."""
    run = root / "old-run"
    run.mkdir()
    values = RunConfig.from_mapping({"output.dir": str(run)}).to_dict()
    del values["model"]["pooling"]
    (run / CONFIG_FILE).write_text(json.dumps(values))
    return run


def test_the_saved_configuration_is_read_with_its_migration(tmp_path):
    run = run_saved_before_pooling(tmp_path)
    assert saved_config(run).model.pooling == "pooler"
    assert saved_config(tmp_path / "nowhere") is None
    (run / CONFIG_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable"):
        saved_config(run)


def test_simulate_resume_reads_the_old_run_as_it_trained(tmp_path):
    from fedtune.cli import build_parser, resolve_config

    run = run_saved_before_pooling(tmp_path)
    args = build_parser().parse_args(["simulate", "--resume", str(run), "--rounds", "9"])
    config = resolve_config(args)
    assert config.model.pooling == "pooler" and config.federation.rounds == 9


def test_flwr_run_resumes_the_old_run_as_it_trained(tmp_path):
    from fedtune.server.app import config_from_run_config

    run = run_saved_before_pooling(tmp_path)
    config, resuming = config_from_run_config({"output.dir": str(run)})
    assert resuming and config.model.pooling == "pooler"


def test_fedtune_server_sees_no_change_in_the_old_runs_pooling(tmp_path):
    from fedtune.server.config_guard import check_restart

    run = run_saved_before_pooling(tmp_path)
    restarted = RunConfig.from_mapping({"output.dir": str(run), "model.pooling": "pooler"})
    assert check_restart(run, restarted, accept=False) == []
