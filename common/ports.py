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
LOCAL_PORTS = range(20_000, 32_768)  # below Linux's ephemeral range (32768 and up)


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


def free_local_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for a child that binds it next. Not one the kernel hands out
    (bind to 0): that range also serves outgoing connections, any of which may take the port
    before the child binds it ("address already in use" once in the suite)."""
    for _ in range(1000):
        port = random.randrange(LOCAL_PORTS.start, LOCAL_PORTS.stop)
        try:
            check_free(host, port, "port")
        except PortBusy:
            continue
        return port
    raise PortBusy(f"no free port on {host} between {LOCAL_PORTS.start} and "
                   f"{LOCAL_PORTS.stop - 1} after 1000 tries")


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
                name = (entry / "comm").read_text().strip()
            except OSError:
                name = "a process"
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
