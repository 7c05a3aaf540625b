"""`fedtune simulate` on an existing Ray cluster: two Ray nodes on loopback, one core each, so
the clients' workers must run on both."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedtune.common.ports import free_local_port
from fedtune.common.process_tree import PROC, descendants
from fedtune.server.metrics_log import read_rounds
from fedtune.simulations.ray_cluster import RayClusterError, check_address, cluster_address

RAY = Path(sys.executable).with_name("ray")
ACTOR = "ray::ClientAppActor"


def ray_node(*args: str, log: Path) -> subprocess.Popen:
    """One `ray start --block` node in its own process group (stopped with the group)."""
    return subprocess.Popen([str(RAY), "start", "--block", "--num-cpus", "1",
                             "--object-store-memory", str(100 * 2**20),
                             "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def actors_below(node: subprocess.Popen) -> int:
    count = 0
    for pid in descendants(node.pid):
        try:
            count += (PROC / str(pid) / "cmdline").read_bytes().startswith(ACTOR.encode())
        except OSError:
            continue
    return count


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.mark.slow
def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tiny_model_dir,
                                                                       toy_data_dir, tmp_path):
    port = free_local_port()
    # the cluster's files (its address file among them) in a directory of its own: a cluster
    # stopped by a signal leaves /tmp/ray/ray_current_cluster behind for any later ray.init()
    # to join (short: Ray's socket paths must fit 107 characters)
    files = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = ray_node("--head", "--port", str(port), "--include-dashboard", "false",
                    "--ray-client-server-port", str(free_local_port()), "--temp-dir", files,
                    log=tmp_path / "head.log")
    nodes = [head]
    try:
        wait_for(lambda: b"Ray runtime started" in (tmp_path / "head.log").read_bytes(), 120,
                 "the head node did not start")
        nodes.append(ray_node("--address", f"127.0.0.1:{port}", log=tmp_path / "worker.log"))
        wait_for(lambda: b"Ray runtime started" in (tmp_path / "worker.log").read_bytes(), 120,
                 "the second node did not join")
        out = tmp_path / "run"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("RAY_ADDRESS", None)
        run = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "simulate", "--ray-address", f"127.0.0.1:{port}",
             "--model", str(tiny_model_dir), "--data", str(toy_data_dir), "--num-clients", "4",
             "--rounds", "2", "--batch-size", "8", "--out", str(out)],
            stdout=(tmp_path / "run.log").open("w"), stderr=subprocess.STDOUT, env=env)
        seen = [0, 0]  # clients' workers seen running under each node
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            seen = [max(s, actors_below(node)) for s, node in zip(seen, nodes, strict=True)]
            time.sleep(0.5)
        if run.poll() is None:
            run.kill()
        output = (tmp_path / "run.log").read_text()
        assert run.returncode == 0, output[-3000:]
        assert seen == [1, 1], (seen, output[-2000:])
        assert [row["clients"] for row in read_rounds(out)] == [4, 4]
        # the cluster outlives the run: the simulation left it, it did not stop it
        assert head.poll() is None and nodes[1].poll() is None
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(files, ignore_errors=True)


def test_workers_share_the_machine_or_the_cluster_by_its_cores_and_gpus():
    from fedtune.simulations.engine import backend_config
    from fedtune.simulations.ray_cluster import Capacity

    assert backend_config(2, Capacity(cpus=4, gpus=0.0))["client_resources"] == {"num_cpus": 2}
    assert backend_config(4, Capacity(cpus=8, gpus=2.0))["client_resources"] == {
        "num_cpus": 2, "num_gpus": 0.5}


def test_a_run_on_this_machine_never_joins_a_cluster_ray_start_left(tmp_path, monkeypatch):
    # a cluster stopped by a signal leaves its address file behind; ray.init() with no address
    # would try to join it (and wait), so a local run asks Ray for a new local instance
    import ray

    from fedtune.simulations.ray_cluster import ray_for_run, this_machine

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_for_run("", verbose=False) as capacity:
        assert capacity == this_machine()
    assert seen["address"] == "local" and seen["num_cpus"] == this_machine().cpus


def test_an_address_that_names_no_cluster_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert cluster_address(None) == "127.0.0.1:1" and cluster_address("auto") == "auto"
    with pytest.raises(RayClusterError, match="does not answer"):
        check_address(cluster_address(None))
    with pytest.raises(RayClusterError, match="is not host:port"):
        check_address("head-node")
    with pytest.raises(RayClusterError, match="Ray Client"):
        check_address("ray://head:10001")
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) == ""


def test_the_cli_refuses_a_silent_cluster_before_reading_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedtune", "simulate", "--ray-address",
                           f"127.0.0.1:{free_local_port()}", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "does not answer" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
