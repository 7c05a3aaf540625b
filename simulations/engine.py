"""Run the ServerApp and ClientApp through Flower's simulation engine (Ray), in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from flwr.simulation import run_simulation

from client.app import app as client_app
from common.config import RunConfig
from server.app import make_server_app
from server.metrics_log import read_rounds


def backend_config(num_workers: int) -> dict[str, Any]:
    """`num_workers` Ray actors, each holding one model and training one client at a time.

    Each actor takes CPUs / workers cores (Ray sets its thread count to match); with CUDA they
    share the one GPU.
    """
    cpus = os.cpu_count() or 1
    resources: dict[str, float] = {"num_cpus": max(1, cpus // num_workers)}
    if torch.cuda.is_available():
        resources["num_gpus"] = 1.0 / num_workers
    return {"client_resources": resources,
            "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": True}}


def simulate(config: RunConfig, *, resume: bool = False,
             num_workers: int | None = None) -> list[dict[str, Any]]:
    """Simulate `config.federation.num_clients` clients; return the run's metrics rows."""
    workers = num_workers or min(config.federation.num_clients, os.cpu_count() or 1)
    run_simulation(server_app=make_server_app(config, resume=resume), client_app=client_app,
                   num_supernodes=config.federation.num_clients,
                   backend_config=backend_config(workers))
    return read_rounds(Path(config.output.dir))
