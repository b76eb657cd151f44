"""The metrics server as a network service: where it listens, what idle clients cost.

No database: the server alone, in this process, on loopback addresses (127.0.0.2 is a
loopback address a server bound to 127.0.0.1 does not answer on).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from replicator.errors import ReplicatorError
from replicator.telemetry import metrics
from replicator.telemetry.metrics import Metrics, MetricsServer


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        return resp.status


@pytest.fixture
def server():
    started: list[MetricsServer] = []

    def start(**kwargs) -> MetricsServer:
        s = MetricsServer(Metrics(), 0, "/metrics", **kwargs).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_listens_on_this_host_only_unless_told(server):
    default = server()
    assert reachable("127.0.0.1", default.port)
    assert not reachable("127.0.0.2", default.port)
    everywhere = server(host="0.0.0.0")
    assert reachable("127.0.0.2", everywhere.port)


def test_a_host_it_cannot_listen_on_is_one_line(server):
    with pytest.raises(ReplicatorError) as err:
        server(host="192.0.2.1")   # TEST-NET-1: no address of this machine
    assert "[metrics] 192.0.2.1:0: cannot listen" in err.value.message
    assert "[metrics] port or host" in err.value.hint


def test_idle_connections_cost_no_thread_each_and_time_out(server):
    s = server()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(200)]
    try:
        time.sleep(1)
        assert threading.active_count() - before <= metrics.MAX_REQUESTS, \
            threading.active_count() - before
        # Those that got a slot send nothing: their slots come back after the timeout, and
        # the server answers again while they are still open.
        time.sleep(metrics.REQUEST_TIMEOUT + 1)
        assert health(s.port) == 200
    finally:
        for c in idle:
            c.close()
