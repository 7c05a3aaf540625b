"""Ports the deployment commands bind: free before a child is started on one, and then held by
that child, not by whatever else was there (an earlier server's nginx, a second node).

Linux's `/proc/net/tcp{,6}` lists listening sockets by inode, and `/proc/PID/fd` shows which
process holds each one; elsewhere only the bind test works and `held_by` answers None.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path

from fedtune.common.errors import InputError

PROC = Path("/proc")
LISTEN = "0A"  # TCP state in /proc/net/tcp
# Ports for a child that binds 127.0.0.1 (the SuperLink's own): below Linux's default range for
# outgoing connections (32768-60999) and Kubernetes' NodePorts (30000-32767).
LOCAL_PORTS = range(20_000, 30_000)


class PortBusy(InputError, RuntimeError):
    """The port is already in use; the message names who holds it when that can be seen."""


def check_free(host: str, port: int, flag: str) -> None:
    """Raise PortBusy (naming `flag`, the option that chooses the port) unless `host:port` can
    be bound now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise PortBusy(f"cannot bind {host}:{port} ({error.strerror}); choose "
                               f"another {flag}") from None
            holder = held_by(port)
            who = f" by {holder}" if holder else ""
            raise PortBusy(f"port {port} on {host} is already in use{who}; stop it or choose "
                           f"another {flag}") from None


def why_busy(host: str, port: int, flag: str) -> str | None:
    """`check_free`'s message (naming who holds the port) when `host:port` cannot be bound
    now, else None."""
    try:
        check_free(host, port, flag)
    except PortBusy as busy:
        return str(busy)
    return None


def free_local_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for a child that binds it next. Not one the kernel hands out
    (bind to 0): those also serve outgoing connections, any of which may take the port before
    the child binds it ("address already in use" once in the suite)."""
    candidates = local_ports()
    for _ in range(1000):
        port = random.choice(candidates)
        if why_busy(host, port, "port") is None:
            return port
    raise PortBusy(f"no free port on {host} between {LOCAL_PORTS.start} and "
                   f"{LOCAL_PORTS.stop - 1} after 1000 tries")


def local_ports() -> list[int]:
    """LOCAL_PORTS less those this host hands out to outgoing connections (a widened
    `ip_local_port_range`) and those it reserves for a service (`ip_local_reserved_ports`);
    all of LOCAL_PORTS where that leaves none (the caller's start then guards the race)."""
    low, high = _ephemeral_range()
    reserved = _reserved_ports()
    kept = [port for port in LOCAL_PORTS if not low <= port <= high and port not in reserved]
    return kept or list(LOCAL_PORTS)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (PROC / "sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def _reserved_ports() -> set[int]:
    try:
        text = (PROC / "sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    except OSError:
        return set()
    reserved: set[int] = set()
    for item in filter(None, text.split(",")):
        first, _, last = item.partition("-")
        try:
            reserved.update(range(int(first), int(last or first) + 1))
        except ValueError:
            continue
    return reserved


def inspectable() -> bool:
    """Whether this system shows who listens where (Linux's /proc)."""
    return (PROC / "net" / "tcp").exists()


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port` (any address)."""
    inodes = _listening_inodes(port)
    return bool(inodes) and bool(inodes & _socket_inodes(pid))


def held_by(port: int) -> str | None:
    """'NAME (pid N)' of a process listening on `port`, if this user can see one."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if entry.name.isdigit() and inodes & _socket_inodes(int(entry.name)):
            try:
                name = (entry / "comm").read_text(errors="replace").strip()
            except OSError:
                name = "a process"
            name = "".join(c for c in name if c.isprintable()) or "a process"  # its own choice
            return f"{name} (pid {entry.name})"
    return None


def _listening_inodes(port: int) -> set[str]:
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes
