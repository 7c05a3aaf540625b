"""A deployed node driven by hand-built messages, as a curious or malicious server sends them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.common import record_keys as keys
from fedtune.common.adapter_state import to_record
from fedtune.common.config import RunConfig
from fedtune.common.task import cached_task
from tests.conftest import write_jsonl

NODE = "hospital-a"


@pytest.fixture(autouse=True)
def _identity(message_identity):
    """Every client test may build Messages by hand."""
    yield


def run_config(model_dir: Path, data_dir: Path, **overrides) -> RunConfig:
    """A DP-SGD run as a server would ask it of a deployed node."""
    settings = {"model.name": str(model_dir), "data.path": str(data_dir),
                "federation.rounds": 1, "train.batch_size": 8, "privacy.dp": True,
                "privacy.epsilon": 8.0, "output.dir": "server-run",
                "privacy.planning_rows": 60}
    return RunConfig.from_mapping({**settings, **overrides})


def node_context(model_dir: Path, data_dir: Path, ledger: Path, **policy) -> Context:
    """A deployed node's context: its own data, ledger and policy (the model it allows)."""
    node_config = {"data-path": str(data_dir), "ledger-dir": str(ledger), "name": NODE,
                   "models": str(model_dir), **policy}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def request(config: RunConfig, message_type: str = "train",
            adapter: dict[str, np.ndarray] | None = None, **extra) -> Message:
    settings = {keys.RUN_CONFIG: json.dumps(config.to_flat()), keys.SERVER_ROUND: 1, **extra}
    adapter = cached_task(config).initial_adapter if adapter is None else adapter
    content = RecordDict({keys.ARRAYS: to_record(adapter), keys.CONFIG: ConfigRecord(settings)})
    return Message(content, dst_node_id=7, message_type=message_type)


def refusal_reason(reply: Message) -> str:
    assert reply.content[keys.CONFIG][keys.STATUS] == keys.POLICY_REFUSED
    assert not reply.content.array_records and not reply.content.metric_records  # no data
    return str(reply.content[keys.CONFIG][keys.REASON])


def ledger_rounds(ledger: Path) -> list[dict]:
    """Every entry of the one ledger in `ledger` (none if nothing was ever spent)."""
    files = list(ledger.glob("ledger-*.json")) if ledger.exists() else []
    return [r for f in files for r in json.loads(f.read_text())["rounds"]]


def toy_rows(count: int, offset: int = 0) -> list[dict]:
    words = ["alpha", "bravo", "charlie"]
    return [{"text": f"{words[i % 3]} item {i}", "label": i % 3}
            for i in range(offset, offset + count)]


def data_dir(path: Path, rows: list[dict]) -> Path:
    """A deployed node's data directory holding `rows` and the toy label set."""
    path.mkdir(parents=True)
    write_jsonl(path / "train.jsonl", rows)
    (path / "labels.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    return path
