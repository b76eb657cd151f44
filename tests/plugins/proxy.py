"""pytest plugin: a TCP proxy on loopback that the fault tests control (network faults).

`Proxy(host, port)` listens on 127.0.0.1 (an ephemeral port) and forwards to host:port. Modes:

- `forward()`: pass bytes both ways (the default); `delay(ms)` holds each chunk that long;
- `blackhole()`: a dead tunnel or a stalled pooler: connections stay open, what the client
  sends is read and dropped, nothing reaches either side, nothing is closed (the client's
  kernel sees its bytes acknowledged, so TCP keepalives see nothing wrong); new connections
  are accepted into the same silence. Going back to `forward()` resets the black-holed
  connections (their bytes are lost, as across a real tunnel restart), `forward(reset=False)`
  leaves them silent for ever and passes only new ones (a dead NAT entry, a pooler that lost
  its clients: the old connections never answer again); `keep_server_side()`
  instead keeps their server side open for ever, like a pooler that holds a dead client's
  server connection (and its open transaction);
- `refuse()`: new connections are accepted and closed at once;
- `cut()`: close every current connection now (the mode stays).

The `proxy` fixture is a factory: `proxy(db)` proxies a test database's server; every proxy
is closed at teardown. `proxied(db, proxy)` is the `source=`/`destination=` override of
`write_config` pointing a side at it.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

FORWARD, BLACKHOLE, REFUSE = "forward", "blackhole", "refuse"


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.held = False  # black-holed: its bytes were dropped, it must not carry more
        self.hello = b""   # the client's first chunk: its startup packet, unless it asks for TLS

    def close(self) -> None:
        for s in (self.client, self.server):
            try:
                s.close()
            except OSError:
                pass


class Proxy:
    """One listening port, one thread (selectors), any number of connections."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = FORWARD
        self.delay_s = 0.0
        self.keep_held_server_side = False
        self.accepted = 0
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._kept: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    host = "127.0.0.1"

    # -- control ---------------------------------------------------------------------------

    def forward(self, reset: bool = True) -> None:
        self._set(FORWARD, 0.0, reset)

    def delay(self, ms: float) -> None:
        self._set(FORWARD, ms / 1000)

    def blackhole(self, only: bytes | None = None) -> None:
        """All connections; or, with `only`, just the current ones whose first chunk contains
        it (b"replication\\x00database\\x00": a walsender's startup packet, sent in clear with sslmode=disable),
        new ones forwarded."""
        if only is None:
            self._set(BLACKHOLE, 0.0)
            return
        with self._lock:
            for p in self._pairs:
                p.held = p.held or only in p.hello

    def refuse(self) -> None:
        self._set(REFUSE, 0.0)

    def keep_server_side(self) -> None:
        """From now on, a black-holed connection that ends keeps its server side open."""
        self.keep_held_server_side = True

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for p in pairs:
            self._drop(p)
        self._wake()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._thread.join(5)
        self.cut()
        for s in self._kept:
            s.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    def _set(self, mode: str, delay: float, reset_held: bool = True) -> None:
        with self._lock:
            self.mode, self.delay_s = mode, delay
            reset = [p for p in self._pairs if p.held] if mode != BLACKHOLE and reset_held \
                else []
            self._pairs = [p for p in self._pairs if p not in reset]
            if mode == BLACKHOLE:
                for p in self._pairs:
                    p.held = True
        for p in reset:
            self._drop(p)
        self._wake()

    def _drop(self, pair: _Pair) -> None:
        for s in (pair.client, pair.server):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
        if pair.held and self.keep_held_server_side:
            # The server still sees its session (and its open transaction) alive.
            self._kept.append(pair.server)
            try:
                pair.client.close()
            except OSError:
                pass
        else:
            pair.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            for key, _ev in self._sel.select(timeout=0.5):
                s = key.fileobj
                if s is self._wake_r:
                    self._wake_r.recv(4096)
                elif s is self._listener:
                    self._accept()
                else:
                    self._pump(key.data, s)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        if self.mode == REFUSE:
            client.close()
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        pair = _Pair(client, server)
        pair.held = self.mode == BLACKHOLE
        for s in (client, server):
            s.setblocking(True)
            self._sel.register(s, selectors.EVENT_READ, pair)
        with self._lock:
            self._pairs.append(pair)

    def _pump(self, pair: _Pair, s: socket.socket) -> None:
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        with self._lock:
            if pair not in self._pairs:
                return
            if not data:
                self._pairs.remove(pair)
            held, delay = pair.held, self.delay_s
        if not data:
            self._drop(pair)
            return
        if held:
            return  # read and dropped: the sender's kernel saw it acknowledged
        if s is pair.client and not pair.hello:
            pair.hello = data
        if delay:
            time.sleep(delay)
        other = pair.server if s is pair.client else pair.client
        try:
            other.sendall(data)
        except OSError:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            self._drop(pair)


@pytest.fixture
def proxy() -> Iterator[Any]:
    """A factory: `proxy(db)` starts a Proxy in front of the test database's server."""
    made: list[Proxy] = []

    def make(db: Any) -> Proxy:
        p = Proxy(db.cluster.host, db.cluster.port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def proxied(db: Any, p: Proxy, **keys: Any) -> dict[str, Any]:
    """The keys of write_config's source= or destination= that reach `db` through `p`."""
    return {"host": p.host, "port": p.port, "database": db.name, **keys}
