"""The pipeline: sessions, their retries, and the applier thread beside the receiver.

A session connects, runs the preflight checks, copies tables that need it,
then streams: the receiver (the calling thread, receiver.py) reads and
decodes the stream, answers keepalives and reports the durably applied
position; the applier thread applies the closed batches it hands over
(handoff.py). A failed session is retried by its error kind's policy.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import psycopg

from .. import deadline, failpoints
from .._decode import Decoder
from ..batch import SyncDone
from ..classify import classify, classify_connect, is_connect_failure
from ..config.settings import Config, DestinationSettings, SourceSettings
from ..destination import access, state
from ..destination.applier import Applier
from ..destination.indexes import IndexBuilder
from ..destination.lease import Holder, Lease
from ..errors import ErrorKind, ExitCode, ReplicatorError, Retries
from ..lsn import format_lsn, pg_now
from ..schema import MirrorTable
from ..source.connection import TEXT_MODE_OPTIONS, ReplicationConnection, protocol_for
from ..telemetry.metrics import Metrics, MetricsServer, SlotMonitor
from .backfill import Backfill, CopyStopped
from .handoff import Handoff, Progress
from .preflight import (
    check_destination_server,
    check_replication_role,
    check_slot,
    discover_tables,
)
from .receiver import Receiver, SessionRestart
from .stream_apply import apply_finishing

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
            monitor = SlotMonitor(self.metrics, cfg.source.conninfo(),
                                  cfg.destination.conninfo(), cfg.destination.state_schema,
                                  cfg.source.slot, cfg.metrics.slot_poll_interval).start()
        try:
            code = self._run()
            # Stopped because the lease was lost (the lease thread asked): not a clean end.
            self._check_lease(None)
            return code
        finally:
            self.metrics.status = "stopped"
            # Every writer of ours has stopped (the session joined them): a standby may
            # take over now instead of after the expiry.
            self.lease.release()
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
                self._session()
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

    # -- the pipeline's lease (lease.py) -----------------------------------

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

    # -- one connected session -------------------------------------------

    def _session(self) -> None:
        cfg = self.config
        src, dst = cfg.source, cfg.destination
        slot = src.slot
        try:
            catalog = deadline.connect(src.conninfo(), src.receive_timeout, side="source",
                                       setting="[source] receive_timeout", autocommit=True)
        except psycopg.OperationalError as exc:
            raise classify_connect(exc, src.conninfo(), settings=src) from exc
        fence = self.lease.fence
        applier = Applier(dst.conninfo(), dst.state_schema, slot, dst.on_error,
                          deadline.BatchLimits.of(dst), dst.analytics_roles,
                          source_conninfo=src.conninfo(), fence=fence)
        repl: ReplicationConnection | None = None
        applier_thread = None
        builder: IndexBuilder | None = None
        handoff = Handoff()
        try:
            tables = discover_tables(catalog, cfg)
            # Before the walsender refuses it with a startup error that looks like any other
            # failed connection (and would be retried as one).
            check_replication_role(catalog, src.user)
            binary = all(c.builtin for t in tables for c in t.columns)
            mirrors = {(t.schema, t.name): MirrorTable(
                t, *_target(cfg, t.schema, t.name), state_schema=dst.state_schema,
                binary=binary, options=cfg.options(t.schema, t.name))
                for t in tables}

            dest = applier.connect()
            try:
                check_destination_server(dest)
                state.setup(dest, dst.state_schema)
            except psycopg.Error as exc:
                # Named as the destination's, so the hint says whose grant is missing.
                raise classify(exc, settings=dst) from exc
            state.setup_component(dest, dst.state_schema, "freshness")
            applier.commit_times = True
            applier.defer_flush = True
            missing = sorted(set(dst.analytics_roles)
                             - set(access.existing_roles(dest, dst.analytics_roles)))
            if missing:
                log.warning("analytics roles missing: mirror tables created now get no "
                            "policy or grant for them", extra={
                                "roles": missing, "hint": "create them, then run "
                                "`replicator init` (or fix [destination] analytics_roles)"})
            applied = state.applied_lsn(dest, dst.state_schema, slot)

            repl = ReplicationConnection(src.conninfo(replication="database"),
                                         src.receive_timeout)
            repl.connect()
            sysinfo = repl.identify_system()
            synced_from = state.system_id(dest, dst.state_schema, slot)
            if synced_from and synced_from != sysinfo.system_id:
                raise ReplicatorError(
                    ErrorKind.RESYNC_REQUIRED,
                    f"the source is another PostgreSQL cluster (system id {sysinfo.system_id}) "
                    f"than the one the mirror was synced from ({synced_from})",
                    "check [source] host/port; if the source was really replaced, run "
                    "`replicator resync --config PATH --all`")
            # Tables never copied, whose copy did not finish (a crash or stop
            # mid-copy lands here again), that left the publication and came
            # back, or that are now mapped to another mirror table, are copied
            # before streaming starts; the others continue from the slot.
            synced = state.table_sync(dest, dst.state_schema, slot)
            identities = state.source_identities(dest, dst.state_schema, slot)
            continuing = [t.source.qualname for t in mirrors.values()
                          if _synced(synced, t, identities)]
            found = check_slot(catalog, slot, applied, continuing)
            if fence is not None and (found is None or found.invalidated):
                fence.check(dest)   # only the lease's holder creates or drops the slot
            if found is not None and found.invalidated:
                # Nothing relies on it (check_slot said so): every table is copied
                # again, from a snapshot consistent with the new slot.
                repl.drop_slot(slot)
                log.warning("dropped the invalidated replication slot to create it again",
                            extra={"slot": slot, "reason": found.why_invalidated()})
                found = None
            if found is None:
                point = repl.create_slot(slot)
                log.info("created replication slot", extra={
                    "slot": slot, "consistent_point": format_lsn(point)})
            repl.close()
            repl = None

            gone = [name for name in synced
                    if name not in {t.source.qualname for t in mirrors.values()}]
            with dest.transaction():
                if fence is not None:
                    fence.check(dest)
                removed = state.mark_removed(dest, dst.state_schema, slot, gone)
            for name in removed:
                log.info("table no longer replicated: its mirror keeps its rows; if it comes "
                         "back it is copied again", extra={"table": name})
            states = {name: (st, lsn) for name, (st, lsn, _m) in synced.items()}
            to_copy = [t for t in mirrors.values() if not _synced(synced, t, identities)]
            if to_copy:
                self.metrics.alive("copying")
                try:
                    sync_lsn = Backfill(cfg, to_copy, slot, self.stop_requested, self.metrics,
                                        fence=fence).run()
                except CopyStopped:
                    log.info("stopped during the initial copy: unfinished tables are copied "
                             "again on the next run")
                    return
                for t in to_copy:
                    states[t.source.qualname] = (state.COPIED, sync_lsn)
                failpoints.hit(failpoints.STARTUP_COPIED)
            # Streaming mirrors keep their columns: the stream alters them in
            # order (a replayed older transaction must not see the newest catalog).
            applier.prepare_tables(list(mirrors.values()), alter=False)
            with dest.transaction():
                if fence is not None:
                    fence.check(dest)
                for t in mirrors.values():
                    st, lsn = states[t.source.qualname]
                    if st != state.STREAMING or \
                            identities.get(t.source.qualname) != t.source.membership:
                        state.set_table(dest, dst.state_schema, slot, t,
                                        state.STREAMING, lsn)
            sync_lsns = {key: states[t.source.qualname][1] for key, t in mirrors.items()}

            options = [] if binary else [TEXT_MODE_OPTIONS]
            if src.logical_decoding_work_mem:
                options.append(f"-c logical_decoding_work_mem={src.logical_decoding_work_mem}")
            repl = ReplicationConnection(src.conninfo(
                replication="database",
                **({"options": " ".join(options)} if options else {})), src.receive_timeout)
            repl.connect()
            start = applied or 0
            protocol = protocol_for(repl.server_version)

            decoder = Decoder()
            decoder.skip_before = start
            repl.attach(decoder)
            repl.start(slot, start, src.publication, protocol, binary, src.streaming)
            self.progress.applied_lsn = start
            self.metrics.applied_to(start)
            self.metrics.alive("streaming")
            for t in mirrors.values():
                self.metrics.table_sync(t.qualname, state.STREAMING)
            log.info("streaming", extra={
                "slot": slot, "publication": src.publication, "from_lsn": format_lsn(start),
                "protocol": protocol, "mode": "binary" if binary else "text",
                "tables": len(mirrors), "target_lsn": format_lsn(sysinfo.xlogpos)
                if self.until_caught_up else None})

            applier_thread = threading.Thread(
                target=self._apply_loop, args=(applier, handoff, sysinfo.system_id),
                name="applier", daemon=True)
            applier_thread.start()
            # Secondary indexes of copied tables, built while the stream is applied.
            builder = IndexBuilder(dst, slot, self.metrics, fence=fence).start()
            applier.index_builds = builder

            def stream_applier() -> Applier:
                return Applier(dst.conninfo(), dst.state_schema, slot, dst.on_error,
                               deadline.BatchLimits.of(dst), dst.analytics_roles, fence=fence)

            Receiver(cfg, self.progress, self.metrics, self.stop_requested, repl, decoder,
                     handoff, catalog, mirrors, sync_lsns, binary,
                     sysinfo.xlogpos if self.until_caught_up else None,
                     stream_applier if dst.max_streams else None, fence=fence).loop()
        finally:
            if builder is not None:
                # A build in flight finishes on the destination; the next session waits
                # for it.
                builder.stop()
            handoff.close()
            if applier_thread is not None:
                # Its connection is closed only once it is done: a batch still
                # running could otherwise commit after the next session has
                # read the applied position.
                _stop_applier(applier_thread, applier, self.stop_requested.is_set())
            if repl is not None:
                repl.close()
            applier.close()
            catalog.close()

    # -- the applier thread ----------------------------------------------

    def _apply_loop(self, applier: Applier, handoff: Handoff, system_id: str) -> None:
        while True:
            batch = handoff.take()
            if batch is None:
                return
            try:
                if batch.stream is not None:
                    result = apply_finishing(batch, applier, system_id)
                else:
                    result = applier.apply(batch, system_id=system_id)
            except BaseException as exc:  # handed to the receiver, which raises it
                handoff.fail(exc)
                return
            finally:
                batch.close()
            self.progress.applied(batch.end_lsn, result.wal_lsn, result.wal_flushed)
            if batch.last_commit_ts:
                self.progress.last_commit_ts = batch.last_commit_ts
            if batch.txns:
                lag = max(0.0, (pg_now() - batch.last_commit_ts) / 1e6)
                log.info("batch applied", extra={
                    "txns": batch.txns, "rows": result.rows, "inserts": result.inserts,
                    "updates": result.updates, "deletes": result.deletes,
                    "dead_letters": result.dead_letters, "copies": result.copies,
                    "memory_bytes": batch.memory_bytes, "seconds": round(result.seconds, 4),
                    "lag_s": round(lag, 3), "lsn": format_lsn(batch.end_lsn),
                    "tables": sorted(result.per_op)})
            self.metrics.batch_applied(batch, result)
            if batch.stream is not None:
                self.metrics.streamed_applied(batch.stream.committed)
            for op in batch.ops:
                if isinstance(op, SyncDone):
                    self.metrics.table_sync(op.table.qualname, state.STREAMING)


def _synced(synced: dict[str, tuple[str, int, str]], t: MirrorTable,
            identities: dict[str, str | None]) -> bool:
    """Whether the table's mirror holds its rows and the stream only has to go on.

    Not if the source table or its publication membership is another one than
    the rows came from (dropped and created again, or dropped from the
    publication and added back, while stopped): the stream has a gap there.
    An identity not recorded yet (state from an older version) is trusted.
    """
    st, _lsn, mirror = synced.get(t.source.qualname, (state.PENDING, 0, ""))
    identity = identities.get(t.source.qualname)
    return st in (state.COPIED, state.STREAMING) and mirror == t.qualname \
        and (identity is None or identity == t.source.membership)


def _target(config: Config, schema: str, table: str) -> tuple[str, str]:
    """The mirror table of a source table discover_tables kept (so it is mapped)."""
    target = config.target(schema, table)
    assert target is not None, f"{schema}.{table} is not mapped"
    return target


def _stop_applier(thread: threading.Thread, applier: Applier, stopping: bool) -> None:
    """Wait for the batch in flight to end, then cancel it, then cut its connection.

    Its connection is closed only once it is done: a batch still running could otherwise
    commit after the next session has read the applied position. A destination that answers
    neither (dead) gets its socket shut: it never received the commit, so nothing commits.
    """
    # Stopping, the batch had its time already: a stop shuts dead connections (SHUT_AFTER).
    patience = 1 if stopping else 5
    thread.join(timeout=patience)
    if thread.is_alive():
        log.warning("cancelling the batch in flight before closing its connection")
        applier.cancel(timeout=1 if stopping else 5)
        thread.join(timeout=patience)
    if thread.is_alive():
        log.warning("the destination answers neither the batch nor its cancel: closing the "
                    "connection under it (the batch is rolled back and replayed)")
        applier.abort()
        thread.join(timeout=5)


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
