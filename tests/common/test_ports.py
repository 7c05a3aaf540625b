"""A port in use is named with who holds it; a child is known to listen only when it does."""

from __future__ import annotations

import os
import socket

import pytest

from fedtune.common import ports
from fedtune.common.ports import (
    LOCAL_PORTS,
    PortBusy,
    check_free,
    free_local_port,
    listens,
    local_ports,
)


def test_a_busy_port_is_one_error_naming_the_flag_and_the_holder():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]

        with pytest.raises(PortBusy) as busy:
            check_free("127.0.0.1", port, "--port")

        assert f"port {port} on 127.0.0.1 is already in use" in str(busy.value)
        assert "choose another --port" in str(busy.value)
        assert f"(pid {os.getpid()})" in str(busy.value)  # Linux: /proc shows who
    check_free("127.0.0.1", port, "--port")  # free again


def test_listening_is_told_apart_from_someone_else_listening():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert not listens(os.getpid(), port)  # bound, not listening yet
        held.listen()
        assert listens(os.getpid(), port)
        assert not listens(1, port)


def test_a_local_port_for_a_child_is_free_and_outside_the_kernels_range(monkeypatch):
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy = free_local_port()
        held.bind(("127.0.0.1", busy))
        held.listen()
        drawn = iter([busy, busy])
        real = ports.random.choice
        monkeypatch.setattr(ports.random, "choice", lambda seq: next(drawn, None) or real(seq))

        port = free_local_port()

        assert port != busy and port in LOCAL_PORTS  # the busy draws were passed over
        assert port in local_ports()  # not a port an outgoing connection can be handed
        check_free("127.0.0.1", port, "--port")


def test_local_ports_leave_out_a_widened_outgoing_range_and_reserved_ports(tmp_path, monkeypatch):
    sysctl = tmp_path / "sys" / "net" / "ipv4"
    sysctl.mkdir(parents=True)
    monkeypatch.setattr(ports, "PROC", tmp_path)
    (sysctl / "ip_local_port_range").write_text("25000\t60999\n")
    (sysctl / "ip_local_reserved_ports").write_text("20000-20009,21000\n")
    assert local_ports() == [p for p in range(20_010, 25_000) if p != 21_000]

    (sysctl / "ip_local_port_range").write_text("1024 65535\n")  # nothing left outside it
    assert local_ports() == list(LOCAL_PORTS)

    for name in ("ip_local_port_range", "ip_local_reserved_ports"):
        (sysctl / name).unlink()  # not Linux: its default range, nothing reserved
    assert local_ports() == list(LOCAL_PORTS)
