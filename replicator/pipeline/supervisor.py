"""The pipeline: its lease, its sessions and their retries, and how it stops.

One process writes for a pipeline: it holds the lease in the destination (a second one
waits as a standby). Each session (session.py) connects, copies what needs it and
streams until it ends; a failed one is retried by its error kind's policy. A stop signal
finishes the batch in flight, within a bound whatever a dead connection holds up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import psycopg

from .. import deadline
from ..classify import classify, classify_connect, is_connect_failure
from ..config.settings import Config, DestinationSettings, SourceSettings
from ..destination import state
from ..destination.lease import Holder, Lease
from ..errors import ErrorKind, ExitCode, ReplicatorError, Retries
from ..redact import redact
from ..telemetry.metrics import Metrics, MetricsServer
from .handoff import Progress, Shared
from .preflight import (
    check_destination_server,
)
from .session import Session
from .slot_monitor import SlotMonitor
from .table_copies import SessionRestart

log = logging.getLogger(__name__)

# Seconds from SIGTERM to the process's exit at most, dead connections or not (a container
# runtime's default grace is 10 s): what is in flight after SHUT_AFTER has its connections
# shut (every wait on them ends), and a process still there at STOP_DEADLINE exits at once.
SHUT_AFTER = 5.0
STOP_DEADLINE = 9.0


class Pipeline:
    """Replicates until stopped (or, with ``until_caught_up``, until the mirror is current)."""

    def __init__(self, config: Config, until_caught_up: bool = False) -> None:
        self.config = config
        self.until_caught_up = until_caught_up
        self.stop_requested = threading.Event()
        self.progress = Progress()
        self.metrics = Metrics()
        dst = config.destination
        # Held from the first session on, across reconnects, until the process stops.
        self.lease = Lease(dst.conninfo(), dst.state_schema, config.source.slot,
                           dst.lease_timeout)

    # -- lifecycle -------------------------------------------------------

    def run(self) -> int:
        server = monitor = None
        cfg = self.config
        if cfg.metrics.enabled:
            server = MetricsServer(self.metrics, cfg.metrics.port, cfg.metrics.path,
                                   cfg.metrics.host).start()
            monitor = SlotMonitor.of(cfg, self.metrics).start()
        # Why this process stops, for `status`: its error's one line, or how it was stopped.
        reason = "exited on an internal error (the log has the traceback)"
        try:
            code = self._run()
            # Stopped because the lease was lost (the lease thread asked): not a clean end.
            self._check_lease(None)
            reason = ("stopped on request" if self.stop_requested.is_set()
                      else "caught up (run --until-caught-up) and exited")
            return code
        except ReplicatorError as exc:
            reason = redact(exc.one_line())
            raise
        except KeyboardInterrupt:
            reason = "interrupted"
            raise
        finally:
            self.metrics.status = "stopped"
            # Every writer of ours has stopped (the session joined them): a standby may
            # take over now instead of after the expiry.
            self.lease.release(reason=reason)
            if monitor is not None:
                monitor.stop()
            if server is not None:
                server.stop()

    def _run(self) -> int:
        """Sessions until one ends normally; retry failures by their kind's policy.

        Attempts count failures of one kind in a row (errors.Retries): a batch applied resets
        them all, a session that reached streaming resets the connection kinds, so the
        first retry after progress comes within about a second. With ``until_caught_up`` (a
        one-shot job) an unreachable server is retried for at most its ``retry_timeout``.
        """
        retries = Retries()
        while True:
            applied_before = self.progress.applied_lsn
            try:
                if not self._claim():
                    return 0
                Session(Shared(self.config, self.metrics, self.progress, self.stop_requested,
                               self.lease.fence), self.until_caught_up).run()
                self._check_lease(None)
                return 0
            except SessionRestart as exc:
                self._check_lease(exc)
                log.info("session restarts", extra={"reason": str(exc)})
                if self.stop_requested.is_set():
                    return 0
                continue
            except (ReplicatorError, psycopg.Error) as exc:
                self._check_lease(exc)
                err = self._classified(exc)
                now = time.monotonic()
                if self.progress.applied_lsn != applied_before:
                    retries.progress()
                elif self.metrics.status == "streaming":
                    retries.progress(connected=True)
                failures = retries.failed(err.kind, now)
                if self.stop_requested.is_set() and deadline.shut_down:
                    self._raise(ReplicatorError(
                        err.kind, f"stopped {SHUT_AFTER:g} s after the stop signal by closing "
                        f"database connections that did not answer ({err.message})",
                        "nothing unapplied was confirmed: the next run replays it; if a "
                        "connection is dead, see [source] receive_timeout and [destination] "
                        "stall_timeout"), exc)
                if self.stop_requested.is_set() or not err.policy.should_retry(failures):
                    self._raise(err, exc)
                delay = err.policy.delay(failures)
                if self.until_caught_up and err.exit_code is ExitCode.UNAVAILABLE:
                    bound = self._side(err.kind).retry_timeout
                    left = bound - retries.failing_for(err.kind, now)
                    if left <= 0:
                        side = self._side(err.kind).section
                        self._raise(ReplicatorError(
                            err.kind, f"{err.message} (still failing after {bound:g} s of "
                            f"retries: --until-caught-up gives up after [{side}] retry_timeout)",
                            err.hint), exc)
                    delay = min(delay, left)
                self.metrics.status = "reconnecting"
                self.metrics.restarts.inc()
                log.warning("retrying after an error", extra={
                    "kind": err.kind.name.lower(), "error": err.message, "hint": err.hint,
                    "attempt": failures, "retry_in_s": round(delay, 1)})
                if self.stop_requested.wait(delay):
                    return 0

    # -- the pipeline's lease (destination/lease.py) --------------------------

    def _claim(self) -> bool:
        """Hold the lease before anything is written, as a standby until it is free.

        False if a stop came first. A one-shot run (--until-caught-up) does not wait for a
        writer that keeps renewing: past one lease_timeout it says who writes and exits.
        """
        lease = self.lease
        if lease.held:
            return True
        dst = self.config.destination
        try:
            conn = deadline.connect(dst.conninfo(), deadline.BatchLimits.of(dst).answer_timeout,
                                    side="destination", setting="[destination] stall_timeout",
                                    autocommit=True)
        except psycopg.OperationalError as exc:
            raise classify_connect(exc, dst.conninfo(), settings=dst) from exc
        with conn:
            try:
                check_destination_server(conn)
                state.setup(conn, dst.state_schema)
            except psycopg.Error as exc:
                raise classify(exc, settings=dst) from exc
            got = lease.claim(conn, self.stop_requested, self._standby,
                              give_up_after=dst.lease_timeout + 5 if self.until_caught_up
                              else None)
        if got:
            lease.keep(on_lost=self._superseded)
        return got

    def _standby(self, holder: Holder, first: bool) -> None:
        self.metrics.alive("standby")
        if first:
            log.warning("another replicator process writes for this pipeline: waiting as a "
                        "standby", extra={
                            "slot": self.config.source.slot, "owner": holder.owner,
                            "generation": holder.generation,
                            "lease_expires_in_s": round(max(0.0, holder.expires_in), 1),
                            "hint": "this process takes over when that one stops, or "
                            "[destination] lease_timeout after it stops renewing"})

    def _superseded(self) -> None:
        """From the lease thread: another process took the lease; stop, writing nothing."""
        self.stop_requested.set()
        for delay, action in ((SHUT_AFTER, _shut_connections), (STOP_DEADLINE, _exit_now)):
            timer = threading.Timer(delay, action)
            timer.daemon = True
            timer.start()

    def _check_lease(self, exc: BaseException | None) -> None:
        """A session that ended because the lease was lost ends the process (exit 5)."""
        fence = self.lease.fence
        if self.lease.lost.is_set() and fence is not None:
            err = fence.superseded()
            if exc is None:
                raise err
            self._raise(err, exc)

    def _classified(self, exc: BaseException) -> ReplicatorError:
        if isinstance(exc, deadline.NoAnswer):
            return ReplicatorError(
                ErrorKind.SOURCE_CONNECT if exc.side == "source"
                else ErrorKind.DESTINATION_CONNECT, str(exc),
                "the replicator reconnects and resumes from the last applied position")
        if not isinstance(exc, ReplicatorError):
            return classify(exc)
        cause = exc.__cause__
        if exc.kind is ErrorKind.DESTINATION_CONNECT and cause is not None \
                and is_connect_failure(cause):
            # The applier wraps every failed connect alike; what the server said decides
            # whether waiting can help (a missing database or role, a wrong password: no).
            dst = self.config.destination
            return classify_connect(cause, dst.conninfo(), settings=dst)
        return exc

    def _side(self, kind: ErrorKind) -> SourceSettings | DestinationSettings:
        if kind is ErrorKind.DESTINATION_CONNECT:
            return self.config.destination
        return self.config.source

    @staticmethod
    def _raise(err: ReplicatorError, exc: BaseException) -> None:
        if err is exc:
            raise err
        raise err from exc

    def request_stop(self, *_args: Any) -> None:
        if self.stop_requested.is_set():
            # A second signal: leave now, as a crash would; nothing unapplied was confirmed.
            # Not SystemExit: unwinding runs the finally blocks that wait for the batch in
            # flight (its cancel, its connection), which is what the second signal refuses.
            log.warning("second stop signal: exiting without finishing the batch (it is "
                        "applied again at the next start)")
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(ExitCode.INTERRUPTED)
        log.info("stop requested: finishing the transaction and batch in flight")
        self.stop_requested.set()
        # Whatever a dead connection holds up, the process ends within its promise: nothing
        # unapplied was confirmed, so leaving is as safe as a crash.
        for delay, action in ((SHUT_AFTER, _shut_connections), (STOP_DEADLINE, _exit_now)):
            timer = threading.Timer(delay, action)
            timer.daemon = True
            timer.start()


def _shut_connections() -> None:
    """Still running after SHUT_AFTER: some wait is on a dead connection; end them all."""
    n = deadline.shut_all()
    if n:
        log.warning("still not stopped %g s after the stop signal: closing the %d database "
                    "connections still open (what is in flight is replayed at the next start)",
                    SHUT_AFTER, n)


def _exit_now() -> None:
    log.error("still not stopped %g s after the stop signal (a connection is dead): exiting "
              "now; nothing unapplied was confirmed, it is replayed at the next start",
              STOP_DEADLINE)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(ExitCode.UNAVAILABLE)


def run(config: Config, until_caught_up: bool = False) -> int:
    pipeline = Pipeline(config, until_caught_up)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, pipeline.request_stop)
        signal.signal(signal.SIGINT, pipeline.request_stop)
    return pipeline.run()
