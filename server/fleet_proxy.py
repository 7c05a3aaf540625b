"""Only the Fleet API faces the network: Debian's nginx terminates TLS on the public port and
passes on nothing but the Fleet API's operations to a SuperLink that listens on loopback.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTP port, and the open-source
Control API has no authentication (anyone reaching it can list, start and stop runs and register
node keys). Its deprecated `--fleet-api-address` and `--control-api-address` flags only log a
warning; they split nothing (checked: the SuperLink still listens on `--host:--port` alone). So
the SuperLink binds 127.0.0.1 and a maintained reverse proxy publishes the Fleet routes only.
The routes are read from Flower's own Fleet router, each an exact `location` whose upstream URI
is fixed, so no other path (Control, Runtime, the API docs) can be reached by any spelling.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.errors import InputError
from fedtune.server.fleet_limits import (
    NODES_PER_ADDRESS,
    RATE_PER_NODE,
    REQUESTS_PER_NODE,
    FleetLimits,
)

PROXY_DIR = "fleet-proxy"  # in the state directory: configuration, pid file, temporary files
INSTALL_HINT = ("nginx is not installed; fedtune server runs it in front of the SuperLink so "
                "that only the Fleet API faces the network (Debian: `apt-get install nginx`)")


class ProxyError(InputError, RuntimeError):
    """The Fleet proxy cannot be configured or started."""


@dataclass(frozen=True)
class ProxySettings:
    host: str  # public address nodes dial
    port: int
    link_port: int  # the SuperLink on 127.0.0.1
    ca_cert: Path
    server_cert: Path
    server_key: Path
    state_dir: Path
    limits: FleetLimits


def fleet_paths() -> list[str]:
    """The Fleet API's operations, as Flower's own router declares them (all POST)."""
    from flwr.superlink.routers.fleet.router import router

    paths = sorted(route.path for route in router.routes)
    if not paths or any(not p.startswith("/v1/fleet/") for p in paths):
        raise ProxyError(f"unexpected Fleet API routes in this Flower version: {paths}")
    return paths


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ProxyError(INSTALL_HINT)
    return found


def nginx_config(settings: ProxySettings, paths: list[str]) -> str:
    """nginx.conf for the proxy: TLS on the public port, the listed POST routes, else 404, and
    limits sized to the run's real traffic (`server/fleet_limits.py`), each explained inline."""
    work = (settings.state_dir / PROXY_DIR).resolve()
    listen = f"[{settings.host}]" if ":" in settings.host else settings.host
    # A root master would hand requests to workers running as `nobody`, who could not write
    # the temporary files under the state directory: keep the workers as the server's own user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    routes = "".join(
        f"        location = {path} {{\n"
        f"            limit_except POST {{ deny all; }}\n"
        f"            proxy_pass https://superlink{path};\n"
        f"        }}\n" for path in paths)
    return (
        f"{user}worker_processes 1;\npid {work}/nginx.pid;\n"
        "# Client and upstream connections together (a node's take 2 x 4); the file limit\n"
        "# leaves room for temporary files.\n"
        "worker_rlimit_nofile 8192;\nevents { worker_connections 4096; }\n"
        "http {\n"
        "    log_format fleet '$remote_addr [$time_local] \"$request\" $status "
        "$request_length $body_bytes_sent $request_time $upstream_status';\n"
        f"    access_log {work}/access.log fleet;\n"
        f"    client_body_temp_path {work}/body;\n    proxy_temp_path {work}/proxy;\n"
        f"    fastcgi_temp_path {work}/fastcgi;\n    uwsgi_temp_path {work}/uwsgi;\n"
        f"    scgi_temp_path {work}/scgi;\n"
        "    server_tokens off;\n"
        f"{_limits(settings.limits)}"
        "    # The SuperLink handles at most this many requests at once: every node's own fit\n"
        f"    # ({REQUESTS_PER_NODE} each); beyond, nginx answers 502 and nodes retry.\n"
        "    upstream superlink {\n"
        f"        server 127.0.0.1:{settings.link_port} max_conns={settings.limits.upstream};\n"
        "    }\n"
        "    proxy_http_version 1.1;\n"
        "    proxy_connect_timeout 5s;\n    proxy_send_timeout 60s;\n    proxy_read_timeout 60s;\n"
        # the loopback SuperLink must prove it holds the federation's server certificate
        f"    proxy_ssl_trusted_certificate {settings.ca_cert.resolve()};\n"
        "    proxy_ssl_verify on;\n    proxy_ssl_name localhost;\n"
        "    server {\n"
        f"        listen {listen}:{settings.port} ssl;\n"
        f"        ssl_certificate {settings.server_cert.resolve()};\n"
        f"        ssl_certificate_key {settings.server_key.resolve()};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        f"{routes}"
        "        location / { return 404; }\n"
        "    }\n"
        "}\n")


# What an outsider (no registered key) can make nginx and the SuperLink hold, each value
# explained in the file itself. Flower's Fleet API reads a whole body before it checks the
# node's signature, so what passes here is what the SuperLink holds.
LIMITS = """\
    # The run's largest legitimate request: one object a node pushes (an adapter array; under
    # secure aggregation the whole adapter as one masked vector; at most a 5 MiB Flower chunk),
    # {largest_object} bytes at 8 bytes a value (twice today's widest), plus 64 KiB of framing.
    client_max_body_size {body_kib}k;
    # nginx takes a whole body before the SuperLink sees the request: a slow or oversized body
    # costs nginx (128 KiB of memory, the rest a temporary file), never the SuperLink. Its
    # answers are buffered too, so no peer holds it by reading slowly.
    proxy_request_buffering on;
    client_body_buffer_size 128k;
    proxy_buffering on;
    # A node sends its headers in one write and its body at network speed: a peer that stalls
    # this long is cut. nginx has no total body timeout; limit_conn bounds how many trickled
    # bodies one address keeps open. Headers: at most 4 x 8 KiB.
    client_header_timeout {header_timeout}s;
    client_body_timeout {body_timeout}s;
    large_client_header_buffers 4 8k;
    send_timeout 30s;
    # An idle node polls every 3 s; idle connections close after this, timed-out ones are
    # reset so that their buffers are freed at once.
    keepalive_timeout {keepalive_timeout}s;
    reset_timedout_connection on;
    # After refusing a body (413), nginx reads and drops what the peer still sends for at most
    # this long, so that the peer sees the answer.
    lingering_time 5s;
    # Per address: up to {nodes} nodes (a site behind one NAT), each with at most {requests}
    # requests at once and {node_rate} a second sustained; the burst lets each pull one
    # message's {message_objects} objects and push as many, one request each.
    limit_conn_zone $binary_remote_addr zone=per_address:1m;
    limit_conn per_address {connections};
    limit_req_zone $binary_remote_addr zone=requests:1m rate={rate}r/s;
    limit_req zone=requests burst={burst} nodelay;
    # 503: Flower's nodes retry 502, 503 and 504 with backoff (a 429 would make them give up).
    limit_conn_status 503;
    limit_req_status 503;
"""


def _limits(limits: FleetLimits) -> str:
    return LIMITS.format(
        largest_object=limits.largest_object, body_kib=limits.body_bytes // 1024,
        header_timeout=limits.header_timeout, body_timeout=limits.body_timeout,
        keepalive_timeout=limits.keepalive_timeout, nodes=NODES_PER_ADDRESS,
        requests=REQUESTS_PER_NODE, node_rate=RATE_PER_NODE,
        message_objects=limits.message_objects, connections=limits.connections,
        rate=limits.rate, burst=limits.burst)


def start_proxy(settings: ProxySettings, log_file: Path) -> subprocess.Popen:
    """Write the configuration, check it with `nginx -t`, and run nginx in the foreground."""
    binary = nginx_binary()
    work = settings.state_dir / PROXY_DIR
    work.mkdir(parents=True, exist_ok=True)
    config = work / "nginx.conf"
    config.write_text(nginx_config(settings, fleet_paths()))
    command = [binary, "-p", str(work.resolve()), "-c", str(config.resolve()),
               "-e", str(log_file.resolve())]
    checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
    if checked.returncode != 0:
        raise ProxyError(f"nginx refused its configuration {config}: "
                         f"{(checked.stdout + checked.stderr).strip()[-400:]}")
    return subprocess.Popen([*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
