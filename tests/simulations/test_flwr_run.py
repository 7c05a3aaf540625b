"""`flwr run .` runs the same ServerApp and ClientApp on Flower's local simulation federation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_flwr_run_completes_on_the_local_simulation_federation(tiny_model_dir, toy_data_dir,
                                                                 tmp_path):
    bin_dir = str(Path(sys.executable).parent)  # flwr starts flower-superlink from PATH
    out = tmp_path / "run"
    overrides = f"model.name='{tiny_model_dir}' data.path='{toy_data_dir}' output.dir='{out}'"
    home = tmp_path / "flwr-home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_HOME": str(home),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           # the app's dependencies are this environment's; no per-run `uv sync`
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        done = subprocess.run([str(Path(bin_dir) / "flwr"), "run", str(ROOT), "--stream",
                               "--federation-config", "num-supernodes=3",
                               "--run-config", overrides],
                              capture_output=True, text=True, timeout=600, env=env)
    finally:  # flwr run leaves its local SuperLink running; stop the one it started for us
        subprocess.run(["pkill", "-f", str(home)], check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 3 for r in rows)
