"""Run the ServerApp and ClientApp through Flower's simulation engine (Ray), in one process.

Why `flwr.simulation.run_simulation`, which Flower 1.41 calls deprecated ("use `flwr run`"):
`flwr run` starts the ServerApp in another process from the run config alone, so `fedtune
simulate` would lose what only one process gives it: the typed `RunConfig` handed to the ServerApp
as it is, the live progress display, and the node names read from the engine's own registration
(`simulations/node_names.py`) instead of one message per virtual node. Flower 1.42 still has it
(pyproject admits 1.41 and 1.42, `flwr<1.43`); `tests/simulations/test_engine.py` fails when
the function or its signature changes. `flwr run .` remains available (docs/simulation.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from fedtune.client.app import app as client_app
from fedtune.common.canaries import RELEASES_ENV, releases_directory
from fedtune.common.config import RunConfig
from fedtune.common.console import QUIET_WORKERS
from fedtune.server import progress
from fedtune.server.app import make_server_app
from fedtune.server.metrics_log import read_rounds
from fedtune.simulations.node_names import recorded_node_names
from fedtune.simulations.ray_cluster import Capacity, ray_for_run


def backend_config(num_workers: int, capacity: Capacity) -> dict[str, Any]:
    """`num_workers` Ray actors, each holding one model and training one client at a time.

    Each actor takes cores / workers of `capacity` (Ray sets its thread count to match) and as
    much of its GPUs. Ray itself is started (or joined) before Flower looks (ray_cluster.py).
    """
    resources: dict[str, float] = {"num_cpus": max(1, capacity.cpus // num_workers)}
    if capacity.gpus:
        resources["num_gpus"] = capacity.gpus / num_workers
    return {"client_resources": resources}


def simulate(config: RunConfig, *, resume: bool = False, num_workers: int | None = None,
             verbose: bool = False, ray_address: str = "") -> list[dict[str, Any]]:
    """Simulate `config.federation.num_clients` clients; return the run's metrics rows.

    `ray_address` names an existing Ray cluster to run the clients on (see ray_cluster.py)."""
    # inherited by this run's Ray workers (never by a deployed node's processes); a later verbose
    # run in the same process must not inherit an earlier run's "1"
    os.environ[QUIET_WORKERS] = "0" if verbose else "1"
    with ExitStack() as stack:
        stack.enter_context(_releases_for_workers(config))
        capacity = stack.enter_context(ray_for_run(ray_address, verbose=verbose))
        workers = num_workers or min(config.federation.num_clients, max(1, capacity.cpus))
        names = stack.enter_context(recorded_node_names())
        display = stack.enter_context(progress.shown(progress.RoundProgress()))
        run_simulation(server_app=make_server_app(config, resume=resume, node_names=names,
                                                  display=display),
                       client_app=client_app, num_supernodes=config.federation.num_clients,
                       backend_config=backend_config(workers, capacity),
                       verbose_logging=verbose)
    return read_rounds(Path(config.output.dir))


@contextmanager
def _releases_for_workers(config: RunConfig) -> Iterator[None]:
    """Tell this run's Ray workers where canary clients keep their releases (the audit, docs/
    audit.md), for this run only: nothing started after it inherits the directory."""
    if not config.audit.enabled:
        yield
        return
    os.environ[RELEASES_ENV] = str(releases_directory(config.output.dir))
    try:
        yield
    finally:
        os.environ.pop(RELEASES_ENV, None)
