"""Where a simulation's Ray workers run: this machine's own Ray, started for the run, or an
existing Ray cluster (`--ray-address`, or Ray's own `RAY_ADDRESS`) when one machine is not enough.

On a cluster every node must hold the same fedtune install (and the data path, and the model)
as the machine that runs `fedtune simulate`: Ray starts each client's worker on a node's own
Python, not from the caller's files.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedtune.common.errors import InputError

RAY_ADDRESS = "RAY_ADDRESS"  # Ray's own variable: `ray.init()` joins the cluster it names
REACH_SECONDS = 5.0


class RayClusterError(InputError):
    """A Ray cluster address that names nothing fedtune can join."""


@dataclass(frozen=True)
class Capacity:
    """What the workers may share: CPU cores and GPUs (this machine's, or the whole cluster's)."""

    cpus: int
    gpus: float


def cluster_address(flag: str | None) -> str:
    """The cluster to join: the flag, else `RAY_ADDRESS`; empty for this machine's own Ray."""
    return (flag or os.environ.get(RAY_ADDRESS, "")).strip()


def check_address(address: str) -> None:
    """Refuse, in one line and before any data is read, an address that cannot be joined."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise RayClusterError(f"Ray cluster address {address}: Ray Client (ray://) is not "
                              "supported; give the head node's GCS address, host:port "
                              "(`ray start --head` prints it)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(f"Ray cluster address {address!r} is not host:port (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_SECONDS).close()
    except OSError as error:
        raise RayClusterError(f"Ray cluster at {address} does not answer: {error}") from None


@contextmanager
def ray_for_run(address: str, *, verbose: bool) -> Iterator[Capacity]:
    """Ray for one run, started before Flower looks (Flower then uses it as it is), and what its
    workers may share: the cluster at `address`, joined and left (it keeps running); or, with no
    address, a new Ray on this machine, stopped afterwards. "local", never a cluster `ray start`
    left behind: with no address, Ray joins the one its address file names."""
    import ray

    # workers find what this process imports (as Flower's own start of Ray arranges)
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    common = {"logging_level": "WARNING" if verbose else "ERROR", "log_to_driver": True,
              "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    try:
        if address:
            ray.init(address=address, **common)
            total = ray.cluster_resources()
            capacity = Capacity(int(total.get("CPU", 0)), float(total.get("GPU", 0)))
        else:
            capacity = this_machine()
            ray.init(address="local", num_cpus=capacity.cpus, include_dashboard=False, **common)
        yield capacity
    finally:
        ray.shutdown()  # a no-op where init failed


def this_machine() -> Capacity:
    import torch

    return Capacity(os.cpu_count() or 1, 1.0 if torch.cuda.is_available() else 0.0)
