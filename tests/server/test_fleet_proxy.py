"""server/fleet_proxy.py: the proxy publishes Flower's Fleet routes and nothing else, within
limits sized to the run."""

from __future__ import annotations

import re
import subprocess

import pytest

from fedtune.common import certs
from fedtune.server.fleet_limits import FleetLimits
from fedtune.server.fleet_proxy import ProxySettings, fleet_paths, nginx_binary, nginx_config

LIMITS = FleetLimits(largest_object=600_000, message_objects=56, upstream=40)


def settings(tmp_path) -> ProxySettings:
    made = certs.init(tmp_path / "certs", ["localhost"])
    return ProxySettings("0.0.0.0", 9200, 40001, made.ca_cert, made.server_cert,
                         made.server_key, tmp_path / "state", LIMITS)


def directive(text: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name} ([^;{{\n]*);", text, flags=re.MULTILINE)


def test_the_fleet_routes_come_from_flowers_router_and_are_all_fleet():
    paths = fleet_paths()

    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/get-fab" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)


def test_only_fleet_routes_are_forwarded_each_to_its_own_fixed_upstream_path(tmp_path):
    text = nginx_config(settings(tmp_path), fleet_paths())

    forwarded = re.findall(r"proxy_pass https://superlink(\S*);", text)
    assert sorted(forwarded) == fleet_paths()
    assert directive(text, "server") == ["127.0.0.1:40001 max_conns=40"]
    assert "/v1/control" not in text and "/v1/runtime" not in text
    assert "location / { return 404; }" in text
    assert "listen 0.0.0.0:9200 ssl;" in text and "proxy_ssl_verify on;" in text


def test_the_limits_are_the_runs_and_bodies_never_stream_to_the_superlink(tmp_path):
    text = nginx_config(settings(tmp_path), fleet_paths())

    assert directive(text, "client_max_body_size") == [f"{LIMITS.body_bytes // 1024}k"]
    assert directive(text, "limit_conn per_address") == ["16"]
    assert directive(text, "limit_req zone=requests") == [f"burst={LIMITS.burst} nodelay"]
    assert "rate=20r/s" in directive(text, "limit_req_zone")[0]
    assert directive(text, "proxy_request_buffering") == ["on"]
    assert directive(text, "client_body_timeout") == ["10s"]
    assert directive(text, "client_header_timeout") == ["10s"]
    assert directive(text, "limit_req_status") == directive(text, "limit_conn_status") == ["503"]
    assert "600000 bytes" in text and "56 objects" in text  # the derivation, in the file


def test_nginx_accepts_the_configuration(tmp_path):
    try:
        binary = nginx_binary()
    except RuntimeError as missing:
        pytest.fail(str(missing))  # the deployment needs it: .ci/run installs it
    proxy = settings(tmp_path)
    (proxy.state_dir / "fleet-proxy").mkdir(parents=True)
    config = proxy.state_dir / "fleet-proxy" / "nginx.conf"
    config.write_text(nginx_config(proxy, fleet_paths()))

    checked = subprocess.run([binary, "-t", "-q", "-p", str(config.parent), "-c", str(config),
                              "-e", str(tmp_path / "error.log")], capture_output=True, text=True)

    assert checked.returncode == 0, checked.stderr
