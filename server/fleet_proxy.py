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

PROXY_DIR = "fleet-proxy"  # in the state directory: configuration, pid file, temporary files
INSTALL_HINT = ("nginx is not installed; fedtune server runs it in front of the SuperLink so "
                "that only the Fleet API faces the network (Debian: `apt-get install nginx`)")


class ProxyError(RuntimeError):
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


MAX_BODY = "512m"  # one Fleet request: far above a LoRA adapter's objects
MAX_CONNECTIONS_PER_PEER = 64


def nginx_config(settings: ProxySettings, paths: list[str]) -> str:
    """nginx.conf for the proxy: TLS on the public port, the listed POST routes, else 404."""
    work = (settings.state_dir / PROXY_DIR).resolve()
    listen = f"[{settings.host}]" if ":" in settings.host else settings.host
    upstream = f"https://127.0.0.1:{settings.link_port}"
    # A root master would hand requests to workers running as `nobody`, who could not write
    # the temporary files under the state directory: keep the workers as the server's own user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    routes = "".join(
        f"        location = {path} {{\n"
        f"            limit_except POST {{ deny all; }}\n"
        f"            proxy_pass {upstream}{path};\n"
        f"        }}\n" for path in paths)
    return (
        f"{user}worker_processes 1;\npid {work}/nginx.pid;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {work}/access.log;\n"
        f"    client_body_temp_path {work}/body;\n    proxy_temp_path {work}/proxy;\n"
        f"    fastcgi_temp_path {work}/fastcgi;\n    uwsgi_temp_path {work}/uwsgi;\n"
        f"    scgi_temp_path {work}/scgi;\n"
        "    server_tokens off;\n"
        # Flower's HTTP Fleet API reads a whole body before it checks the node's signature:
        # bound what an unauthenticated peer can make it hold, and how many connections
        f"    client_max_body_size {MAX_BODY};\n"
        "    limit_conn_zone $binary_remote_addr zone=per_peer:1m;\n"
        f"    limit_conn per_peer {MAX_CONNECTIONS_PER_PEER};\n"
        "    proxy_http_version 1.1;\n    proxy_request_buffering off;\n"
        "    proxy_buffering off;\n    proxy_read_timeout 600s;\n    proxy_send_timeout 600s;\n"
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
