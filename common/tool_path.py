"""Flower's processes start one another by name from PATH (the SuperLink starts
`flower-superexec`, the SuperNode `flower-superexec`, which starts `flwr-serverapp` or
`flwr-clientapp`). Run by path from a virtual environment that is not activated, fedtune's own
Python would find Flower's tools but its children would not (the SuperLink exits with code 3).
So child processes get this interpreter's bin directory first on PATH."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def tool_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with this Python's bin directory first and
    no FLWR_INTERNAL_* variables."""
    env = dict(os.environ if base is None else base)
    # Flower's internal switches would start its old gRPC Control and Fleet servers on 0.0.0.0,
    # past the Fleet proxy: never inherited
    env = {k: v for k, v in env.items() if not k.startswith("FLWR_INTERNAL_")}
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *rest])
    return env
