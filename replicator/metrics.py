"""Prometheus metrics on [metrics] port/path, and /health for container health checks.

Metric names are the deployment doc's (its alerts use them) and live here
as constants, nowhere else.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import ErrorKind, ReplicatorError

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
        self.lag = Gauge(LAG_SECONDS, "Seconds from a source commit to its apply in the mirror "
                         "(0 when nothing is pending)", registry=r)
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
        self.restarts = Counter(RESTARTS.removesuffix("_total"),
                                "Sessions restarted after a connection problem", registry=r)
        self.heartbeat = time.monotonic()
        self.status = "starting"
        self.error: str | None = None

    def alive(self, status: str | None = None) -> None:
        self.heartbeat = time.monotonic()
        if status:
            self.status = status
            self.error = None

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
        self.last_apply.set(time.time())
        self.alive()

    def table_sync(self, table: str, state: str) -> None:
        self.failed.labels(table)  # the series exists (at 0) before the first failure
        for s in ("pending", "copying", "copied", "streaming"):
            self.table_state.labels(table, s).set(1 if s == state else 0)

    def health(self) -> tuple[int, dict]:
        age = time.monotonic() - self.heartbeat
        ok = self.status in ("streaming", "copying", "starting") and age < STALE_AFTER
        body = {"status": self.status if ok or age < STALE_AFTER else "stalled",
                "seconds_since_activity": round(age, 1)}
        if self.error:
            body["error"] = self.error
        return (200 if ok else 503), body


class MetricsServer:
    """Serves `path` (Prometheus text format), /health and /ready."""

    def __init__(self, metrics: Metrics, port: int, path: str, host: str = "0.0.0.0"):
        self.metrics = metrics
        handler = _handler(metrics, path)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ReplicatorError(
                ErrorKind.CONFIG, f"[metrics] port {port}: cannot listen ({exc.strerror})",
                "another process uses that port: choose another [metrics] port, or set "
                "[metrics] enabled = false") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        log.info("metrics served", extra={"port": self.httpd.server_address[1]})
        return self

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(metrics: Metrics, path: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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
