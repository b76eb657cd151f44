"""The fault tests' TCP proxy (tests/plugins/proxy.py) does what each mode says, on an echo server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from plugins.proxy import Proxy


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    closed: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
        closed.append(conn)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    yield server.getsockname()
    stop.set()
    th.join(2)
    server.close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[Proxy]:
    p = Proxy(*echo)
    yield p
    p.close()


def _client(p: Proxy) -> socket.socket:
    c = socket.create_connection((p.host, p.port), timeout=1)
    return c


def _roundtrip(c: socket.socket, data: bytes = b"ping") -> bytes:
    c.sendall(data)
    return c.recv(4096)


def test_forwards_both_ways(proxy: Proxy) -> None:
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"


def test_blackhole_keeps_the_connection_open_and_silent_then_resets_it(proxy: Proxy) -> None:
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"
        proxy.blackhole()
        c.sendall(b"lost")  # accepted by the kernel: no error
        with pytest.raises(TimeoutError):
            c.recv(4096)
        with _client(proxy) as fresh:  # a new connection is accepted into the silence too
            fresh.settimeout(0.3)
            fresh.sendall(b"x")
            with pytest.raises(TimeoutError):
                fresh.recv(4096)
        proxy.forward()
        # The black-holed connection lost bytes: it is reset, not resumed.
        assert c.recv(4096) == b""
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"


def test_blackhole_only_matching_connections(proxy: Proxy) -> None:
    with _client(proxy) as a, _client(proxy) as b:
        assert _roundtrip(a, b"replication") == b"replication"
        assert _roundtrip(b, b"catalog") == b"catalog"
        proxy.blackhole(only=b"replication")
        assert _roundtrip(b) == b"ping"
        a.settimeout(0.3)
        a.sendall(b"lost")
        with pytest.raises(TimeoutError):
            a.recv(4096)
        proxy.forward()
        assert a.recv(4096) == b""
        assert _roundtrip(b) == b"ping"


def test_cut_closes_current_connections_and_new_ones_go_through(proxy: Proxy) -> None:
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"
        proxy.cut()
        assert c.recv(4096) == b""
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"


def test_refuse_closes_new_connections(proxy: Proxy) -> None:
    proxy.refuse()
    with _client(proxy) as c:
        assert c.recv(4096) == b""
    proxy.forward()
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"


def test_delay_holds_each_chunk(proxy: Proxy) -> None:
    proxy.delay(300)
    with _client(proxy) as c:
        started = time.monotonic()
        assert _roundtrip(c) == b"ping"
        assert time.monotonic() - started >= 0.55  # held on the way there and back


def test_kept_server_side_outlives_the_client(proxy: Proxy) -> None:
    proxy.keep_server_side()
    with _client(proxy) as c:
        assert _roundtrip(c) == b"ping"
        proxy.blackhole()
    # The client is gone; the proxy holds the server side open (an orphaned session).
    time.sleep(0.3)
    assert len(proxy._kept) == 1 and proxy._kept[0].fileno() != -1
