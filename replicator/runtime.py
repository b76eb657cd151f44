"""The pipeline: a receiver that never goes silent, an applier, and the hand-off between them.

The receiver (the calling thread) reads and decodes the stream, answers
keepalives and reports the durably applied position. The applier thread
applies closed batches. At most one closed batch waits between them; when the
applier is idle, the receiver closes the batch at the next transaction
boundary, so batches stay small when there is no backlog and grow up to
`batch_size` rows when there is one.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time

import psycopg

from . import failpoints, state
from ._decode import (EV_COMMIT, EV_COPY_DONE, EV_ERROR, EV_KEEPALIVE, EV_LIMIT, EV_RELATION,
                      EV_STREAM_ABORT, EV_STREAM_COMMIT, EV_STREAM_START, EV_STREAM_STOP,
                      EV_TRUNCATE, EV_WOULD_BLOCK, Decoder)
from .apply import Applier
from .backfill import Backfill, CopyStopped
from .batch import AlterTable, Batch, SyncDone, SyncStart, Truncate
from .classify import classify, classify_connect, is_connect_failure
from .errors import ErrorKind, ExitCode, ReplicatorError, Retries
from .lsn import format_lsn, pg_now
from .metrics import Metrics, MetricsServer
from .schema import (Column, MirrorTable, SourceTable, check_replicable, column_origins,
                     column_type, publication_exists, publication_members, publication_tables,
                     read_table)
from .settings import Config
from .source import TEXT_MODE_OPTIONS, ReplicationConnection, protocol_for

log = logging.getLogger(__name__)

STATUS_INTERVAL = 5.0      # seconds between standby status updates when nothing changes
IDLE_PROBE_INTERVAL = 1.0  # how often an idle receiver asks the source where WAL ends
PUMP_MESSAGES = 20000      # messages decoded between looks at memory, status and signals
POLL_INTERVAL = 2.0        # how often to look for tables added to the publication or resyncs


class SessionRestart(Exception):
    """The session starts over from the applied position; not a failure (no retry counted)."""


class Handoff:
    """One closed batch waiting for the applier, and whether the applier is busy."""

    def __init__(self):
        self._cv = threading.Condition()
        self._next: Batch | None = None
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None

    def idle(self) -> bool:
        with self._cv:
            return self._next is None and not self._busy

    def has_room(self, timeout: float) -> bool:
        with self._cv:
            return bool(self._cv.wait_for(lambda: self._next is None or self.error, timeout)) \
                and not self.error

    def offer(self, batch: Batch, timeout: float) -> bool:
        with self._cv:
            if not self._cv.wait_for(lambda: self._next is None or self.error, timeout):
                return False
            if self.error:
                return False
            self._next = batch
            self._cv.notify_all()
            return True

    def take(self) -> Batch | None:
        with self._cv:
            self._busy = False
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._next is not None or self._closed)
            batch, self._next = self._next, None
            self._busy = batch is not None
            return batch

    def fail(self, exc: BaseException) -> None:
        with self._cv:
            self.error = exc
            self._busy = False
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(
                lambda: (self._next is None and not self._busy) or self.error, timeout)


@dataclasses.dataclass
class Progress:
    applied_lsn: int = 0
    last_commit_ts: int = 0


class Pipeline:
    def __init__(self, config: Config, until_caught_up: bool = False):
        self.config = config
        self.until_caught_up = until_caught_up
        self.stop_requested = threading.Event()
        self.progress = Progress()
        self.metrics = Metrics()

    # -- lifecycle -------------------------------------------------------

    def run(self) -> int:
        server = None
        if self.config.metrics.enabled:
            server = MetricsServer(self.metrics, self.config.metrics.port,
                                   self.config.metrics.path).start()
        try:
            return self._run()
        finally:
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
                self._session()
                return 0
            except SessionRestart as exc:
                log.info("session restarts", extra={"reason": str(exc)})
                if self.stop_requested.is_set():
                    return 0
                continue
            except (ReplicatorError, psycopg.Error) as exc:
                err = self._classified(exc)
                now = time.monotonic()
                if self.progress.applied_lsn != applied_before:
                    retries.progress()
                elif self.metrics.status == "streaming":
                    retries.progress(connected=True)
                failures = retries.failed(err.kind, now)
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
                self.metrics.status, self.metrics.error = "reconnecting", err.message
                self.metrics.restarts.inc()
                log.warning("retrying after an error", extra={
                    "kind": err.kind.name.lower(), "error": err.message, "hint": err.hint,
                    "attempt": failures, "retry_in_s": round(delay, 1)})
                if self.stop_requested.wait(delay):
                    return 0

    def _classified(self, exc: BaseException) -> ReplicatorError:
        if not isinstance(exc, ReplicatorError):
            return classify(exc)
        cause = exc.__cause__
        if exc.kind is ErrorKind.DESTINATION_CONNECT and is_connect_failure(cause):
            # The applier wraps every failed connect alike; what the server said decides
            # whether waiting can help (a missing database or role, a wrong password: no).
            dst = self.config.destination
            return classify_connect(cause, dst.conninfo(), settings=dst)
        return exc

    def _side(self, kind: ErrorKind):
        if kind is ErrorKind.DESTINATION_CONNECT:
            return self.config.destination
        return self.config.source

    @staticmethod
    def _raise(err: ReplicatorError, exc: BaseException):
        if err is exc:
            raise err
        raise err from exc

    def request_stop(self, *_args) -> None:
        if self.stop_requested.is_set():
            # A second signal: leave now; nothing unapplied was confirmed.
            log.warning("second stop signal: exiting without finishing the batch")
            raise SystemExit(1)
        log.info("stop requested: finishing the transaction and batch in flight")
        self.stop_requested.set()

    # -- one connected session -------------------------------------------

    def _session(self) -> None:
        cfg = self.config
        src, dst = cfg.source, cfg.destination
        slot = src.slot
        try:
            catalog = psycopg.connect(src.conninfo(), autocommit=True)
        except psycopg.OperationalError as exc:
            raise classify_connect(exc, src.conninfo(), settings=src) from exc
        applier = Applier(dst.conninfo(), dst.state_schema, slot)
        repl: ReplicationConnection | None = None
        applier_thread = None
        handoff = Handoff()
        try:
            tables = self._discover(catalog)
            binary = all(c.builtin for t in tables for c in t.columns)
            mirrors = {(t.schema, t.name): MirrorTable(
                t, *cfg.target(t.schema, t.name), state_schema=dst.state_schema, binary=binary)
                for t in tables}

            applier.connect()
            state.setup(applier.conn, dst.state_schema)
            applied = state.applied_lsn(applier.conn, dst.state_schema, slot)

            repl = ReplicationConnection(src.conninfo(replication="database"))
            repl.connect()
            sysinfo = repl.identify_system()
            synced_from = state.system_id(applier.conn, dst.state_schema, slot)
            if synced_from and synced_from != sysinfo.system_id:
                raise ReplicatorError(
                    ErrorKind.RESYNC_REQUIRED,
                    f"the source is another PostgreSQL cluster (system id {sysinfo.system_id}) "
                    f"than the one the mirror was synced from ({synced_from})",
                    "check [source] host/port; if the source was really replaced, run "
                    "`replicator resync --config PATH --all`")
            self._check_slot(catalog, repl, slot, applied, sysinfo)
            repl.close()
            repl = None

            # Tables never copied, whose copy did not finish (a crash or stop
            # mid-copy lands here again), that left the publication and came
            # back, or that are now mapped to another mirror table, are copied
            # before streaming starts.
            synced = state.table_sync(applier.conn, dst.state_schema, slot)
            identities = state.source_identities(applier.conn, dst.state_schema, slot)
            gone = [name for name in synced
                    if name not in {t.source.qualname for t in mirrors.values()}]
            for name in state.mark_removed(applier.conn, dst.state_schema, slot, gone):
                log.info("table no longer replicated: its mirror keeps its rows; if it comes "
                         "back it is copied again", extra={"table": name})
            states = {name: (st, lsn) for name, (st, lsn, _m) in synced.items()}
            to_copy = [t for t in mirrors.values() if not _synced(synced, t, identities)]
            if to_copy:
                self.metrics.alive("copying")
                try:
                    sync_lsn = Backfill(cfg, to_copy, slot, self.stop_requested, self.metrics).run()
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
            with applier.conn.transaction():
                for t in mirrors.values():
                    st, lsn = states[t.source.qualname]
                    if st != state.STREAMING or \
                            identities.get(t.source.qualname) != t.source.membership:
                        state.set_table(applier.conn, dst.state_schema, slot, t,
                                        state.STREAMING, lsn)
            sync_lsns = {key: states[t.source.qualname][1] for key, t in mirrors.items()}

            repl = ReplicationConnection(src.conninfo(
                replication="database",
                **({} if binary else {"options": TEXT_MODE_OPTIONS})))
            repl.connect()
            start = applied or 0
            protocol = protocol_for(repl.server_version)

            decoder = Decoder()
            decoder.skip_before = start
            repl.attach(decoder)
            repl.start(slot, start, src.publication, protocol, binary)
            self.progress.applied_lsn = start
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
            _Receiver(self, repl, decoder, handoff, catalog, mirrors, sync_lsns, binary,
                      sysinfo.xlogpos if self.until_caught_up else None).loop()
        finally:
            handoff.close()
            if applier_thread is not None:
                # Its connection is closed only once it is done: a batch still
                # running could otherwise commit after the next session has
                # read the applied position.
                _stop_applier(applier_thread, applier)
            if repl is not None:
                repl.close()
            applier.close()
            catalog.close()

    def _discover(self, catalog: psycopg.Connection) -> list[SourceTable]:
        src = self.config.source
        wal_level = catalog.execute("show wal_level").fetchone()[0]
        if wal_level != "logical":
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP, f"the source has wal_level={wal_level}",
                "set wal_level = logical in the source's postgresql.conf and restart it")
        if not publication_exists(catalog, src.publication):
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP,
                f"publication {src.publication!r} does not exist in the source database",
                f"create it: CREATE PUBLICATION {src.publication} FOR TABLE account_move, "
                "account_move_line, res_partner, project_task, hr_expense, hr_expense_sheet")
        published = publication_tables(catalog, src.publication)
        names = {f"{s}.{t}" for s, t in published}
        for source_name in self.config.mappings:
            if source_name not in names:
                schema, _, table = source_name.partition(".")
                raise ReplicatorError(
                    ErrorKind.SOURCE_SETUP,
                    f"[mappings] {source_name} is not in publication {src.publication!r}",
                    f"add it on the source: ALTER PUBLICATION {src.publication} "
                    f"ADD TABLE {source_name}; or remove the mapping")
        members = publication_members(catalog, src.publication)
        tables = [dataclasses.replace(read_table(catalog, s, t), membership=members.get((s, t), ""))
                  for s, t in published if self.config.target(s, t) is not None]
        for t in tables:
            check_replicable(t)
        return tables

    def _check_slot(self, catalog, repl, slot, applied, sysinfo) -> None:
        row = catalog.execute(
            "select plugin, database, confirmed_flush_lsn::text from pg_replication_slots "
            "where slot_name = %s", [slot]).fetchone()
        state_schema = self.config.destination.state_schema
        lost_hint = ("the mirror misses changes: run `replicator resync --config PATH --all`, "
                     "then `replicator run` copies every table again")
        if row is None:
            if applied is not None:
                raise ReplicatorError(
                    ErrorKind.RESYNC_REQUIRED,
                    f"slot {slot!r} no longer exists on the source but the mirror was synced "
                    f"up to {format_lsn(applied)}: changes made since may be lost",
                    lost_hint)
            point = repl.create_slot(slot)
            log.info("created replication slot", extra={"slot": slot,
                                                        "consistent_point": format_lsn(point)})
            return
        plugin, database, confirmed = row
        if plugin != "pgoutput" or database != catalog.info.dbname:
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP,
                f"slot {slot!r} exists but uses plugin {plugin!r} on database {database!r}",
                "set [source] slot to another name, or drop that slot if it is unused")
        from .lsn import parse_lsn
        if applied is not None and parse_lsn(confirmed) > applied:
            raise ReplicatorError(
                ErrorKind.RESYNC_REQUIRED,
                f"slot {slot!r} has confirmed {confirmed} but the mirror only applied "
                f"{format_lsn(applied)} (restored or failed-over destination?)",
                lost_hint)

    # -- the applier thread ----------------------------------------------

    def _apply_loop(self, applier: Applier, handoff: Handoff, system_id: str) -> None:
        while True:
            batch = handoff.take()
            if batch is None:
                return
            try:
                result = applier.apply(batch, system_id=system_id)
            except BaseException as exc:  # handed to the receiver, which raises it
                handoff.fail(exc)
                return
            finally:
                batch.close()
            self.progress.applied_lsn = max(self.progress.applied_lsn, batch.end_lsn)
            if batch.last_commit_ts:
                self.progress.last_commit_ts = batch.last_commit_ts
            if batch.txns:
                lag = max(0.0, (pg_now() - batch.last_commit_ts) / 1e6)
                self.metrics.lag.set(lag)
                log.info("batch applied", extra={
                    "txns": batch.txns, "rows": result.rows, "inserts": result.inserts,
                    "updates": result.updates, "deletes": result.deletes,
                    "dead_letters": result.dead_letters, "copies": result.copies,
                    "memory_bytes": batch.memory_bytes, "seconds": round(result.seconds, 4),
                    "lag_s": round(lag, 3), "lsn": format_lsn(batch.end_lsn)})
            self.metrics.batch_applied(batch, result)
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


def _stop_applier(thread: threading.Thread, applier: Applier) -> None:
    thread.join(timeout=5)
    while thread.is_alive():
        log.warning("waiting for the batch in flight to end before closing its connection")
        applier.cancel()
        thread.join(timeout=5)


class _Receiver:
    def __init__(self, pipeline: Pipeline, repl: ReplicationConnection, decoder: Decoder,
                 handoff: Handoff, catalog: psycopg.Connection,
                 mirrors: dict[tuple[str, str], MirrorTable], sync_lsns: dict[tuple[str, str], int],
                 binary: bool, target: int | None):
        self.p = pipeline
        self.cfg = pipeline.config
        self.repl = repl
        self.dec = decoder
        self.handoff = handoff
        self.catalog = catalog
        self.mirrors = mirrors
        # A table's changes from transactions committed before its copy's
        # snapshot are in the copy already: the decoder drops them.
        self.sync_lsns = sync_lsns
        self.binary = binary
        self.by_relid: dict[int, MirrorTable] = {}
        self.layouts: dict[int, tuple] = {}
        # The layout each mirror was last altered to in this session.
        self.altered: dict[tuple[str, str], tuple] = {}
        self.types: dict[tuple[int, int], tuple[str, int]] = {}
        self.target = target
        self.batch = Batch()
        self.sent_flush = -1
        self.last_status = 0.0
        self.last_probe = 0.0
        self.received = 0
        # Copies running while the stream goes on (added tables, resyncs).
        self.syncing: dict[tuple[str, str], threading.Thread] = {}
        self.sync_results: queue.Queue = queue.Queue()
        self.sync_stop = threading.Event()
        self.refused: set[tuple[str, str]] = set()
        self.last_poll = time.monotonic()
        self.poll_conn: psycopg.Connection | None = None
        # Decoded rows kept in memory before spilling: a quarter of the budget,
        # since a batch also exists as bytes handed to the applier, and one
        # more batch can wait for it.
        self.memory_limit = self.cfg.destination.max_memory_mb * (1 << 20) // 4

    # -- main loop -------------------------------------------------------

    def loop(self) -> None:
        try:
            self._loop()
        finally:
            self.sync_stop.set()
            for th in self.syncing.values():
                th.join(timeout=30)
            if self.poll_conn is not None:
                self.poll_conn.close()

    def _loop(self) -> None:
        dec, stop = self.dec, self.p.stop_requested
        while True:
            self._check_applier()
            if (stop.is_set() or self._caught_up()) and not dec.in_txn:
                self._finish()
                return
            if not dec.in_txn:
                self._sync_progress()
            ev = dec.pump(PUMP_MESSAGES)
            self.received = max(self.received, dec.wal_start)
            if ev == EV_WOULD_BLOCK:
                self.p.metrics.alive()
                self._maybe_close(idle=True)
                self._maybe_status()
                if self._nothing_pending():
                    self.p.metrics.lag.set(0)
                self.repl.wait_readable(0.2)
            elif ev == EV_COMMIT:
                if not dec.skipping:
                    self.batch.commit(dec.end_lsn, dec.commit_ts)
                self._maybe_close()
                self._maybe_status()
            elif ev == EV_KEEPALIVE:
                self._on_keepalive()
            elif ev == EV_RELATION:
                self._on_relation(dec.event)
            elif ev == EV_TRUNCATE:
                self._on_truncate(dec.event)
            elif ev == EV_LIMIT:
                self.p.metrics.alive()
                self._maybe_status()
            if dec.buffered_bytes > self.memory_limit:
                # A transaction larger than memory: its rows go to temporary
                # files and are streamed into staging when the batch applies.
                moved = self.batch.spill(dec.take())
                log.info("batch spilled to disk", extra={"bytes": moved,
                                                         "limit_bytes": self.memory_limit})
            elif ev in (EV_COPY_DONE, EV_ERROR):
                reason = self.repl.end_result()
                raise ReplicatorError(
                    ErrorKind.SOURCE_CONNECT, f"the source ended the replication stream: "
                    f"{reason or self.repl.pgconn.error_message.decode('utf-8', 'replace').strip()}",
                    "the replicator reconnects and resumes from the last applied position")
            elif ev in (EV_STREAM_START, EV_STREAM_STOP, EV_STREAM_COMMIT, EV_STREAM_ABORT):
                raise ReplicatorError(ErrorKind.PROTOCOL,
                                      "the source streams an in-progress transaction, which "
                                      "this replicator did not ask for", "report this as a bug")
            # Begin, Origin, Type and logical decoding Messages need nothing here.

    def _caught_up(self) -> bool:
        return self.target is not None and self.p.progress.applied_lsn >= self.target \
            and not self.syncing and self._nothing_pending()

    def _check_applier(self) -> None:
        if self.handoff.error is not None:
            raise self.handoff.error

    # -- batches ---------------------------------------------------------

    def _pending_rows(self) -> int:
        return self.batch.rows + self.dec.batch_rows + self.batch.spilled_rows

    def _maybe_close(self, idle: bool = False) -> None:
        """Hand the batch over at a transaction boundary when it is time."""
        if self.dec.in_txn or self.batch.empty:
            return
        full = self._pending_rows() >= self.cfg.destination.batch_size
        old = time.monotonic() - self.batch.opened >= self.cfg.destination.flush_interval
        if self.handoff.idle() or full or (old and idle):
            self._close(block=full)

    def _close(self, block: bool) -> None:
        # The decoder's rows are taken only once the hand-off has room: taken
        # early, they would leave the decoder's memory accounting (and its
        # spilling) while the batch keeps growing, and each take would become
        # one more COPY and MERGE per table. Only this thread offers, so the
        # room cannot go away before the offer below.
        while not self.handoff.has_room(timeout=1.0 if block else 0.0):
            self._check_applier()
            if not block:
                return      # the applier is busy and the batch is not full: keep filling it
            # Backpressure: stop reading, but keep the source from timing us out.
            self._send_status()
        batch = self.batch
        batch.add_rows(self.dec.take(), self.by_relid)
        if not batch.end_lsn:
            # Only table-sync operations, no transaction: the position stays
            # (the state never stores a lower one than it has).
            batch.end_lsn = self.p.progress.applied_lsn
        if not self.handoff.offer(batch, timeout=0.0):
            self._check_applier()
            raise ReplicatorError(ErrorKind.INTERNAL, "the hand-off refused a batch it had room for",
                                  "report this as a bug; the batch is replayed after the restart")
        self.batch = Batch()

    def _finish(self) -> None:
        # A copy that finished in the meantime is handed over with this last
        # batch, so it is not copied again at the next start.
        self._collect_syncs()
        if not self.batch.empty:
            self._close(block=True)
        while not self.handoff.wait_idle(1.0):
            self._check_applier()
            self._send_status()
        self._check_applier()
        self._send_status()
        log.info("stopped" if self.p.stop_requested.is_set() else "caught up",
                 extra={"applied_lsn": format_lsn(self.p.progress.applied_lsn)})

    # -- status ----------------------------------------------------------

    def _send_status(self, reply: bool = False) -> None:
        flush = self.p.progress.applied_lsn
        self.repl.send_status(max(self.received, flush), flush, flush, reply)
        self.sent_flush = flush
        self.last_status = time.monotonic()

    def _maybe_status(self) -> None:
        now = time.monotonic()
        if self.p.progress.applied_lsn != self.sent_flush or now - self.last_status >= STATUS_INTERVAL:
            self._send_status()
        if self.target is not None and self._nothing_pending() \
                and now - self.last_probe >= IDLE_PROBE_INTERVAL:
            # Ask for a keepalive: it tells where the source's WAL ends, which
            # is how we learn that only unpublished tables changed since.
            self.last_probe = now
            self._send_status(reply=True)

    def _nothing_pending(self) -> bool:
        return (not self.dec.in_txn and self.batch.empty and self.dec.batch_rows == 0
                and self.handoff.idle())

    def _on_keepalive(self) -> None:
        wal_end = self.dec.wal_end
        if self._nothing_pending() and wal_end > self.p.progress.applied_lsn:
            # Everything up to wal_end was sent and nothing of it is ours:
            # record that in the destination before confirming it, so the
            # slot stops holding WAL for tables we do not replicate.
            marker = Batch(end_lsn=wal_end)
            self.handoff.offer(marker, timeout=0.0)
        if self.dec.reply_requested:
            self._send_status()

    # -- relations and truncates ------------------------------------------

    def _on_relation(self, event) -> None:
        relid, nspname, relname, replident, cols, _xid = event
        key = (nspname, relname)
        t = self.mirrors.get(key)
        if t is None and key not in self.refused and self.cfg.target(nspname, relname) is not None \
                and key in publication_tables(self.catalog, self.cfg.source.publication):
            # Added to the publication while we run: copy it, hold its changes
            # meanwhile. (A table that already left it again may still be
            # described by changes made before it left: those are not a reason
            # to copy it.)
            self._start_sync(key)
            t = self.mirrors.get(key)
        if t is None:
            if relid not in self.layouts:
                self.dec.define(relid, len(cols), [], False)
                self.layouts[relid] = None
            return
        columns = tuple(self._column(name, typoid, typmod) for _f, name, typoid, typmod in cols)
        if replident in ("d", "i"):
            key_cols = tuple(name for flags, name, _o, _m in cols if flags & 1)
        else:
            key_cols = t.source.key
        # The full type (typmod included): numeric(10,2) -> (12,4) is a change.
        layout = (tuple((c.name, c.type_sql) for c in columns), key_cols)
        differs = t.columns != columns or t.source.key != key_cols
        if key in self.syncing:
            if differs:
                raise ReplicatorError(
                    ErrorKind.PROTOCOL, f"the columns of {t.source.qualname} changed while it "
                    "was being copied", "the replicator restarts and copies it again")
            # The copy brings the mirror to these columns.
            self.altered[key] = layout
        # The mirror follows only Relation messages of transactions that are
        # applied, in stream order: one replayed from before the applied
        # position or the table's copy describes an older table. A later DDL
        # always brings a fresh Relation message before the next change.
        applies = not self.dec.skipping and self.dec.final_lsn >= self.sync_lsns.get(key, 0)
        alter = applies and self.altered.get(key) != layout
        if self.layouts.get(relid) == layout and not alter:
            return
        # Rows already buffered belong to the old layout: apply them first.
        self.batch.add_rows(self.dec.take(), self.by_relid)
        if differs:
            source = dataclasses.replace(t.source, columns=columns, key=key_cols)
            t = MirrorTable(source, t.dest_schema, t.dest_name, t.state_schema, t.binary,
                            columns=columns)
            self.mirrors[key] = t
        if alter:
            self.altered[key] = layout
            self.batch.ops.append(AlterTable(t, column_origins(self.catalog, t.source.oid, columns)))
            if differs:
                log.info("table columns changed at the source", extra={
                    "table": t.source.qualname, "columns": [c.name for c in columns]})
        elif key not in self.syncing:
            # Rows of skipped transactions are parsed (to be dropped) with
            # this layout, and the next applied ones may use it too.
            self.batch.ops.append(AlterTable(t, alter=False))
        t.relid = relid
        self.by_relid[relid] = t
        self.dec.define(relid, len(columns), t.key_idx, True, self.sync_lsns.get(key, 0))
        self.layouts[relid] = layout

    def _column(self, name: str, typoid: int, typmod: int) -> Column:
        known = self.types.get((typoid, typmod))
        if known is None:
            known = self.types[(typoid, typmod)] = column_type(self.catalog, typoid, typmod)
        type_sql, typlen = known
        return Column(name, type_sql, typoid, typlen)

    def _on_truncate(self, event) -> None:
        options, relids, _xid = event
        # Like rows: a truncate committed before a table's copy snapshot is in
        # the copy already (replaying it would empty the copied mirror).
        lsn = self.dec.final_lsn
        tables = [t for t in (self.by_relid[r] for r in relids if r in self.by_relid)
                  if lsn >= self.sync_lsns.get((t.source.schema, t.source.name), 0)]
        if not tables:
            return
        self.batch.add_rows(self.dec.take(), self.by_relid)
        self.batch.ops.append(Truncate(tables, bool(options & 1), bool(options & 2),
                                       lsn=self.dec.final_lsn, seq=self.dec.seq))

    # -- tables copied while the stream runs --------------------------------

    def _sync_progress(self) -> None:
        """Between transactions: look for new work, and hand finished copies over."""
        now = time.monotonic()
        if now - self.last_poll >= POLL_INTERVAL:
            self.last_poll = now
            self._poll()
        self._collect_syncs()

    def _collect_syncs(self) -> None:
        while True:
            try:
                key, t, result = self.sync_results.get_nowait()
            except queue.Empty:
                return
            self.syncing.pop(key).join()
            if isinstance(result, BaseException):
                raise result
            # Rows decoded so far were held; from here on the decoder drops
            # what the copy already has.
            self.batch.add_rows(self.dec.take(), self.by_relid)
            self.batch.ops.append(SyncDone(t, result))
            self.sync_lsns[key] = result
            if t.relid and t.relid in self.by_relid:
                self.dec.set_skip(t.relid, result)

    def _poll(self) -> None:
        src, dst = self.cfg.source, self.cfg.destination
        members = publication_members(self.catalog, src.publication)
        published = set(members)
        for key, t in self.mirrors.items():
            if key in published and key not in self.syncing and t.source.membership \
                    and members[key] != t.source.membership:
                # Dropped and created again, or dropped from the publication and
                # added back, since the last poll: the stream may have missed
                # changes. The next session's start copies it again (its sync
                # state still holds the old identity).
                log.info("table was recreated or rejoined the publication: copied again",
                         extra={"table": t.source.qualname})
                raise SessionRestart(f"{t.source.qualname} changed identity at the source")
        for key in sorted(published):
            if key not in self.mirrors and key not in self.refused \
                    and self.cfg.target(*key) is not None:
                self._start_sync(key)
        if self.poll_conn is None:
            self.poll_conn = psycopg.connect(dst.conninfo(), autocommit=True)
        gone = [key for key in self.mirrors if key not in published and key not in self.syncing]
        if gone:
            self._remove(gone)
        states = state.table_states(self.poll_conn, dst.state_schema, src.slot)
        for key, t in list(self.mirrors.items()):
            if states.get(t.source.qualname, ("",))[0] == state.PENDING and key not in self.syncing:
                log.info("resync requested", extra={"table": t.source.qualname})
                self._start_sync(key)

    def _remove(self, keys: list[tuple[str, str]]) -> None:
        """Tables that left the publication: their mirrors stop changing.

        Changes the stream still sends for them (from before they left) are
        dropped; if a table comes back it is copied again, so nothing made
        in between is missed.
        """
        self.batch.add_rows(self.dec.take(), self.by_relid)
        for key in keys:
            t = self.mirrors.pop(key)
            if t.relid in self.by_relid:
                del self.by_relid[t.relid]
                self.layouts.pop(t.relid, None)
                self.dec.define(t.relid, len(t.columns), [], False)
            self.sync_lsns.pop(key, None)
            self.altered.pop(key, None)
        names = state.mark_removed(self.poll_conn, self.cfg.destination.state_schema,
                                   self.cfg.source.slot, [f"{s}.{n}" for s, n in keys])
        for name in names:
            log.info("table left the publication: its mirror keeps its rows; if it comes back "
                     "it is copied again", extra={"table": name})

    def _start_sync(self, key: tuple[str, str]) -> None:
        t = self.mirrors.get(key)
        if t is None:
            members = publication_members(self.catalog, self.cfg.source.publication)
            source = dataclasses.replace(read_table(self.catalog, *key),
                                         membership=members.get(key, ""))
            try:
                check_replicable(source)
            except ReplicatorError as exc:
                self.refused.add(key)
                log.error("table added to the publication cannot be replicated",
                          extra={"table": source.qualname, "error": exc.message, "hint": exc.hint})
                return
            if self.binary and not all(c.builtin for c in source.columns):
                raise ReplicatorError(
                    ErrorKind.PROTOCOL, f"table {source.qualname} added to the publication has "
                    "user-defined column types", "the replicator restarts in text mode to copy it")
            t = MirrorTable(source, *self.cfg.target(*key), state_schema=self.cfg.destination.state_schema,
                            binary=self.binary)
            self.mirrors[key] = t
            log.info("table added to the publication", extra={"table": source.qualname})
        self.batch.add_rows(self.dec.take(), self.by_relid)
        op = SyncStart(t)
        self.batch.ops.append(op)
        self.sync_lsns[key] = 0
        if t.relid and t.relid in self.by_relid:
            self.dec.set_skip(t.relid, 0)
        th = threading.Thread(target=self._copy_table, args=(key, t, op), daemon=True,
                              name=f"sync-{t.dest_name}")
        self.syncing[key] = th
        th.start()

    def _copy_table(self, key, t: MirrorTable, op: SyncStart) -> None:
        try:
            # Copy only once the applier holds the table's changes, so nothing
            # it applies afterwards lands on top of the copy.
            while not op.applied.wait(0.5):
                if self.sync_stop.is_set():
                    return
            self.p.metrics.table_sync(t.qualname, state.COPYING)
            lsn = Backfill(self.cfg, [t], self.cfg.source.slot, self.sync_stop, self.p.metrics,
                           live=True).run()
            self.sync_results.put((key, t, lsn))
        except CopyStopped:
            pass  # the receiver is stopping; the table stays pending for the next run
        except BaseException as exc:
            self.sync_results.put((key, t, exc))


def run(config: Config, until_caught_up: bool = False) -> int:
    pipeline = Pipeline(config, until_caught_up)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, pipeline.request_stop)
        signal.signal(signal.SIGINT, pipeline.request_stop)
    return pipeline.run()


def check(config: Config) -> int:
    """`replicator check`: can this configuration replicate? Changes nothing.

    Prints one line per finding; raises the first blocking problem as the
    usual one-line error, so the exit code says what kind it is.
    """
    src, dst = config.source, config.destination
    try:
        catalog = psycopg.connect(src.conninfo(), autocommit=True)
    except psycopg.Error as exc:
        raise classify(exc, settings=src) from None
    with catalog:
        tables = Pipeline(config)._discover(catalog)
        is_repl = catalog.execute("select rolreplication or rolsuper from pg_roles "
                                  "where rolname = current_user").fetchone()[0]
        if not is_repl:
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP, f"source user {src.user!r} may not replicate",
                f"run on the source: ALTER ROLE {src.user} WITH REPLICATION")
        slot = catalog.execute("select plugin, active from pg_replication_slots "
                               "where slot_name = %s", [src.slot]).fetchone()
        binary = all(c.builtin for t in tables for c in t.columns)
        print(f"source OK: wal_level=logical, publication {src.publication} with "
              f"{len(tables)} replicated table(s), {'binary' if binary else 'text'} mode; slot "
              + (f"{src.slot} exists ({'active' if slot[1] else 'inactive'})" if slot
                 else f"{src.slot} will be created"))
        for t in tables:
            print(f"  {t.qualname:40} key ({', '.join(t.key)}) -> "
                  f"{'.'.join(config.target(t.schema, t.name))}")
    try:
        dest = psycopg.connect(dst.conninfo(), autocommit=True)
    except psycopg.Error as exc:
        raise classify(exc, settings=dst) from None
    with dest:
        can_create = dest.execute("select has_database_privilege(current_user, "
                                  "current_database(), 'create')").fetchone()[0]
        if not can_create:
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP,
                f"destination user {dst.user!r} cannot create schemas in {dst.database!r}",
                f"run on the destination: GRANT CREATE ON DATABASE {dst.database} TO {dst.user}")
        has_state = dest.execute("select to_regclass(%s) is not null",
                                 [f"{dst.state_schema}.pipelines"]).fetchone()[0]
        applied = state.applied_lsn(dest, dst.state_schema, src.slot) if has_state else None
        print(f"destination OK: mirror schema {dst.schema}, state schema {dst.state_schema}; "
              + (f"applied up to {format_lsn(applied)}" if applied is not None
                 else "nothing replicated yet (the first run copies the existing rows)"))
    return 0
