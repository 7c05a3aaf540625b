"""A port in use is named with who holds it; a child is known to listen only when it does."""

from __future__ import annotations

import os
import socket

import pytest

from fedtune.common.ports import PortBusy, check_free, listens


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
