"""Every benchmark still runs (quick mode) and records its figures with their provenance."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.slow
def test_quick_benchmarks_run_and_record_machine_versions_and_command():
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("dp_overhead", "secagg_cost"):
        body = json.loads((RESULTS / f"{name}-quick.json").read_text())
        assert body["quick"] is True and body["command"] and body["machine"]["versions"]["torch"]
        assert (RESULTS / f"{name}-quick.png").stat().st_size > 1000
    ratios = json.loads((RESULTS / "dp_overhead-quick.json").read_text())["ratios"]
    assert set(ratios) == {"hooks", "functorch", "ghost"}
    assert all(r["time_ratio"] > 0 for r in ratios.values())
