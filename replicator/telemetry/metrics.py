"""Prometheus metrics on [metrics] port/path, and /health for container health checks.

Metric names are docs/monitoring.md's (the shipped alert rules use them) and live here
as constants, nowhere else.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import ErrorKind, ReplicatorError
from ..lsn import pg_now

log = logging.getLogger(__name__)

RECORDS_PROCESSED = "etl_records_processed_total"
RECORDS_FAILED = "etl_records_failed_total"
LAG_SECONDS = "etl_lag_seconds"
BATCH_DURATION = "etl_batch_duration_seconds"
BATCH_ROWS = "etl_batch_rows"
TRANSACTIONS = "etl_transactions_total"
APPLIED_LSN = "etl_applied_lsn"
LAST_APPLY = "etl_last_apply_timestamp_seconds"
COPY_ROWS = "etl_copy_rows_total"
TABLE_STATE = "etl_table_sync_state"
RESTARTS = "etl_restarts_total"
LAG_BYTES = "etl_lag_bytes"
SLOT_RETAINED_WAL = "etl_slot_retained_wal_bytes"
SLOT_WAL_STATUS = "etl_slot_wal_status"
UP = "etl_up"
DEAD_LETTERS = "etl_dead_letters"
INDEX_BUILDS = "etl_index_builds_pending"
STREAMED = "etl_streamed_transactions_total"
# How a transaction the source streamed while it ran was applied (label "applied").
STREAMED_HOW = ("while_running", "at_commit")

WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")

# /health fails when the pipeline has shown no sign of life for this long:
# the receiver loops at least every second, even when the source is idle.
STALE_AFTER = 60.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.processed = Counter(RECORDS_PROCESSED.removesuffix("_total"),
                                 "Row changes applied to the mirror", ["table", "op"], registry=r)
        self.failed = Counter(RECORDS_FAILED.removesuffix("_total"),
                              "Row changes that could not be applied (dead letters)", ["table"],
                              registry=r)
        # Computed at each scrape: a stuck pipeline shows a growing lag, not its last value.
        self.lag = Gauge(LAG_SECONDS, "Age of the oldest committed source change not yet in "
                         "the mirror (0 when nothing is pending)", registry=r)
        self.lag.set_function(self.lag_seconds)
        self.lag_bytes = Gauge(LAG_BYTES, "Source WAL end minus the applied position", registry=r)
        self.lag_bytes.set_function(self.lag_bytes_now)
        self.slot_retained = Gauge(SLOT_RETAINED_WAL, "Source WAL the replication slot holds "
                                   "(current LSN minus restart_lsn)", registry=r)
        self.slot_wal_status = Gauge(SLOT_WAL_STATUS, "1 for the slot's current wal_status",
                                     ["wal_status"], registry=r)
        self.up = Gauge(UP, "1 while copying or streaming normally, else 0", registry=r)
        self.up.set_function(lambda: 1.0 if self.is_up() else 0.0)
        self.dead_letters = Gauge(DEAD_LETTERS, "Rows waiting in the dead-letter table",
                                  registry=r)
        self.batch_duration = Histogram(
            BATCH_DURATION, "Time to apply one batch (one destination transaction)", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_rows = Histogram(BATCH_ROWS, "Row changes per batch", registry=r,
                                    buckets=(1, 10, 100, 1000, 10_000, 100_000, 1_000_000))
        self.transactions = Counter(TRANSACTIONS.removesuffix("_total"),
                                    "Source transactions applied", registry=r)
        self.applied_lsn = Gauge(APPLIED_LSN, "Source WAL position applied in the mirror",
                                 registry=r)
        self.last_apply = Gauge(LAST_APPLY, "Unix time of the last applied batch", registry=r)
        self.copy_rows = Counter(COPY_ROWS.removesuffix("_total"),
                                 "Rows copied by initial copies and resyncs", ["table"], registry=r)
        self.table_state = Gauge(TABLE_STATE, "1 for the sync state each table is in",
                                 ["table", "state"], registry=r)
        self.index_builds = Gauge(INDEX_BUILDS, "Secondary indexes of copied mirror tables "
                                  "not built yet (built while the stream runs)", registry=r)
        self.streamed = Counter(STREAMED.removesuffix("_total"),
                                "Big source transactions streamed while they ran: applied "
                                "while they ran, or at their commit", ["applied"], registry=r)
        for how in STREAMED_HOW:
            self.streamed.labels(how)
        self.restarts = Counter(RESTARTS.removesuffix("_total"),
                                "Sessions restarted after a connection problem", registry=r)
        self.heartbeat = time.monotonic()
        self.status = "starting"
        # Written by the receiver (wal_end, received commits), the applier (applied),
        # the slot monitor (current_lsn); read by scrapes.
        self.wal_end = 0
        self.current_lsn = 0
        self.applied = 0
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._lock = threading.Lock()

    # -- lag ---------------------------------------------------------------

    def received_commit(self, end_lsn: int, commit_ts: int) -> None:
        """A commit that starts a batch (commit_ts: microseconds since 2000-01-01).

        Only the first transaction of each batch is kept: batches apply whole,
        so the oldest unapplied change is always the first of some batch.
        """
        with self._lock:
            self._pending.append((end_lsn, commit_ts))

    def applied_to(self, lsn: int) -> None:
        with self._lock:
            self.applied = max(self.applied, lsn)
            while self._pending and self._pending[0][0] <= self.applied:
                self._pending.popleft()

    def lag_seconds(self) -> float:
        with self._lock:
            if not self._pending:
                return 0.0
            oldest = self._pending[0][1]
        return max(0.0, (pg_now() - oldest) / 1e6)

    def lag_bytes_now(self) -> float:
        end = max(self.wal_end, self.current_lsn)
        return float(max(0, end - self.applied)) if self.applied else 0.0

    def slot_polled(self, retained: int | None, wal_status: str | None) -> None:
        if retained is not None:
            self.slot_retained.set(max(0, retained))
        for st in WAL_STATUSES:
            self.slot_wal_status.labels(st).set(1 if st == wal_status else 0)

    def is_up(self) -> bool:
        return self.status in ("streaming", "copying") \
            and time.monotonic() - self.heartbeat < STALE_AFTER

    def alive(self, status: str | None = None) -> None:
        self.heartbeat = time.monotonic()
        if status:
            self.status = status

    def batch_applied(self, batch: Any, result: Any) -> None:
        for table, counts in result.per_op.items():
            for op, n in counts.items():
                if n:
                    self.processed.labels(table, op).inc(n)
        for table, n in result.dead_per_table.items():
            self.failed.labels(table).inc(n)
        if batch.txns:
            self.transactions.inc(batch.txns)
            self.batch_duration.observe(result.seconds)
            self.batch_rows.observe(result.rows)
        self.applied_lsn.set(batch.end_lsn)
        self.applied_to(batch.end_lsn)
        if result.dead_letters:
            self.dead_letters.inc(result.dead_letters)
        self.last_apply.set(time.time())
        self.alive()

    def streamed_applied(self, while_running: bool) -> None:
        self.streamed.labels(STREAMED_HOW[0] if while_running else STREAMED_HOW[1]).inc()

    def table_sync(self, table: str, state: str) -> None:
        self.failed.labels(table)  # the series exists (at 0) before the first failure
        for s in ("pending", "copying", "copied", "streaming"):
            self.table_state.labels(table, s).set(1 if s == state else 0)

    def health(self) -> tuple[int, dict]:
        age = time.monotonic() - self.heartbeat
        # A standby is healthy: waiting for the lease is its job (/ready says it is not
        # the writer).
        ok = self.status in ("streaming", "copying", "starting", "standby") \
            and age < STALE_AFTER
        # No error text: the port has no authentication, and an error's text carries
        # server names and SQL context. The log and `replicator status` have the details.
        body = {"status": self.status if ok or age < STALE_AFTER else "stalled",
                "seconds_since_activity": round(age, 1)}
        return (200 if ok else 503), body


# Requests served at once; a connection beyond them is closed unanswered. A scrape, a
# health check and a person with curl need a few; hundreds of idle connections must not
# cost a thread each.
MAX_REQUESTS = 16
# Seconds a connection may take to send its request and to read the answer.
REQUEST_TIMEOUT = 5.0


class _BoundedServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen()'s backlog: socketserver's 5 makes a burst of clients wait for SYN retries
    # (seconds each) before they are even accepted, and closed if over the bound.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """Serves `path` (Prometheus text format), /health and /ready on ``host``:``port``."""

    def __init__(self, metrics: Metrics, port: int, path: str, host: str = "127.0.0.1"):
        self.metrics = metrics
        handler = _handler(metrics, path)
        try:
            self.httpd = _BoundedServer((host, port), handler)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ReplicatorError(
                ErrorKind.CONFIG, f"[metrics] {host}:{port}: cannot listen ({reason})",
                "another process uses that port, or the host is not an address of this "
                "machine: choose another [metrics] port or host, or set [metrics] enabled = "
                "false") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        log.info("metrics served", extra={"host": self.httpd.server_address[0],
                                          "port": self.httpd.server_address[1]})
        return self

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(metrics: Metrics, path: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT  # the socket's: a silent client frees its slot

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            route = self.path.split("?", 1)[0]
            if route == path:
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif route in ("/health", "/ready"):
                code, body = metrics.health()
                if route == "/ready" and metrics.status != "streaming":
                    code = 503
                self._send(code, orjson.dumps(body), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every 15 s are not log lines
            pass

    return Handler
