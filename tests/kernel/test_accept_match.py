"""The tracepoint backend's accept match, on the running kernel: accept() returns only the
peer's address, which two queued sockets can share. Per kernel: the backend is forced, and
what it reads (sk_socket, at the kernel's BTF offset) is the kernel's."""

from __future__ import annotations

import select
import socket

import pytest

from .harness import Tracer

pytestmark = [pytest.mark.kernel, pytest.mark.per_kernel]


def _client(port: int = 0) -> socket.socket:
    """A client socket bound to 127.0.0.1:port with SO_REUSEADDR: two of them may share a
    port as long as they connect to different places."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    return s


def _queued(listener: socket.socket) -> None:
    """Until the listener's accept queue holds a connection (readable)."""
    assert select.select([listener], [], [], 10)[0], "the connection was not queued"


def test_two_connections_from_one_client_port_are_told_apart_at_accept() -> None:
    """accept() gives the tracepoint backend only the peer's address; a client port used
    towards two listeners of one namespace gives two queued sockets the same one (seen in
    test_scale, where the kernel reused ports). Accepting one must not mark the other,
    which no one accepts, as accepted."""
    tracer = Tracer(["--backend", "tracepoint", "--threshold", "1s", "--report-min", "100ms",
                     "--accept-watch", "always"]).start()
    socks: list[socket.socket] = []
    try:
        ready = next(r for r in tracer.records if r["type"] == "ready")
        assert "listener-link" not in ready["features_off"], ready  # what the match reads
        idle = socket.create_server(("127.0.0.1", 0), backlog=4)  # never accepts
        busy = socket.create_server(("127.0.0.1", 0), backlog=4)
        socks += [idle, busy]
        to_busy = _client()
        socks.append(to_busy)
        to_busy.connect(("127.0.0.1", busy.getsockname()[1]))
        _queued(busy)
        to_idle = _client(to_busy.getsockname()[1])
        socks.append(to_idle)
        to_idle.connect(("127.0.0.1", idle.getsockname()[1]))
        _queued(idle)  # established second: its peer key is the one the map holds
        socks.append(busy.accept()[0])
        to_idle.close()
        to_busy.close()
        for lst, want in ((idle, ("no", "never-accepted")),
                          (busy, ("yes", "accepted-not-closed"))):
            port = lst.getsockname()[1]
            rec = tracer.wait_for(lambda r, p=port: r["type"] == "leak"
                                  and r["connection"]["local"].endswith(f":{p}"),
                                  60, what=f"leak on {port}")
            c = rec["connection"]
            assert (c["accepted"], c["verdict"]["cause"]) == want, c
    finally:
        tracer.stop()
        for s in socks:
            s.close()
