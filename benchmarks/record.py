"""Write a benchmark's figures with what produced them: machine, versions, command, time."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedtune.common.atomic_file import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "peft", "opacus", "flwr", "cryptography")


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "gpu": gpu,
            "versions": {name: metadata.version(name) for name in PACKAGES}}


def result_path(name: str, *, quick: bool) -> Path:
    """benchmarks/results/<name>[-quick].json; quick runs never overwrite the real figures."""
    return RESULTS / f"{name}{'-quick' if quick else ''}.json"


def load(name: str, *, quick: bool) -> dict[str, Any] | None:
    """What `save` last wrote for this benchmark, or None."""
    path = result_path(name, quick=quick)
    return json.loads(path.read_text()) if path.exists() else None


def today() -> str:
    """The UTC day a figure inside a results file was measured (the file's own `date` is its
    last invocation's), in the format of that date's first ten characters."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def save(name: str, figures: dict[str, Any], *, quick: bool) -> Path:
    """Write the figures with their provenance to `result_path`, whole or not at all: a
    benchmark stopped while writing keeps the figures it saved before."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, quick=quick)
    body = {"benchmark": name, "quick": quick, "command": " ".join([sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            **figures}
    write_atomic(path, (json.dumps(body, indent=2) + "\n").encode())
    return path
