"""The initial copy of existing rows, consistent with the stream that follows.

One backfill copies a set of tables from one snapshot: a temporary logical
slot created with SNAPSHOT 'export' gives the snapshot and its LSN (the
tables' sync LSN); the stream applies a table's changes only from
transactions that commit at or after it. The exporting connection stays idle
until every worker has imported the snapshot, then goes (and its temporary
slot with it).

Rows move as COPY (FORMAT BINARY) from the source straight into COPY FROM
STDIN on the destination, through a C loop (replicator.pipeline._pipe) that never
decodes them. Tables copy in parallel, and a large table is cut into ctid
ranges so it alone can keep every worker busy. Mirror tables that the copy
creates get their primary key after the data, before the table is marked
copied (MERGE needs it); the source's secondary indexes are only recorded
(state.record_index_builds) and built once the table streams (destination/indexes.py),
so streaming never waits for them.

A mirror that has rows (a resync, a copy after a crash) keeps them for its readers:
the copy goes into a shadow table, and the transaction that marks the table
copied brings the mirror to it (destination/shadow.py). A crash at any point
leaves the table 'copying': the next start copies it again. A copy made
before streaming starts marks each table 'copied' as soon as its rows and
key are in, and such a table is never copied again. A copy made while the
stream runs (`live`: an added table, a resync) leaves the table 'copying':
the stream holds its changes meanwhile, and the batch that merges them (on
top of the copy, swapped in already) also marks it 'streaming', in one
destination transaction, so the held changes and the state can never be apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg import pq, sql

from .. import deadline, failpoints
from ..classify import classify_connect, setup_error
from ..config.settings import Config, ConnectionSettings
from ..destination import access, shadow, state, watchdog
from ..destination.batch_sql import check_filter
from ..destination.lease import Fence
from ..destination.mirror_ddl import (
    create_mirror_sql,
    create_staging_sql,
    ensure_mirror_columns,
    mirror_exists,
)
from ..destination.state import IndexBuild
from ..errors import ErrorKind, ReplicatorError
from ..libpq import function_addresses
from ..lsn import format_lsn, parse_lsn
from ..schema import (
    MirrorTable,
    Origin,
    check_options,
    check_source_filter,
    column_origins,
)
from ..source.catalog import SourceIndex, secondary_indexes, table_size
from ..source.connection import ReplicationConnection, quote_ident
from ..telemetry.metrics import Metrics
from ..telemetry.progress import CopyProgress
from ._pipe import Pipe

log = logging.getLogger(__name__)

PAGES_PER_RANGE = 8192          # 64 MB of heap per ctid range


@dataclass
class TableCopy:
    table: MirrorTable
    pages: int
    est_rows: int
    ranges: list[tuple[int | None, int | None]] = field(default_factory=list)
    ranges_left: int = 0
    rows: int = 0
    bytes: int = 0
    pipes: list[Pipe] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    created: bool = False        # the copy created the mirror: build its key after
    # Where the rows go: the mirror, or the shadow of a mirror that has rows (its origins:
    # for bringing the mirror's columns to the source's when the shadow is swapped in).
    target: sql.Composable | None = None
    origins: tuple[Origin, ...] | None = None
    indexes: list[sql.Composed | sql.SQL] = field(default_factory=list)   # the primary key
    index_left: int = 0
    secondary: int = 0           # secondary indexes recorded, built once the table streams
    state: str = "copying"

    @property
    def name(self) -> str:
        return self.table.qualname

    @property
    def shadowed(self) -> bool:
        return self.target is not None

    def live(self) -> tuple[int, int]:
        return (self.rows + sum(p.rows for p in self.pipes),
                self.bytes + sum(p.bytes for p in self.pipes))


def _libpq() -> tuple[int, ...]:
    return function_addresses("PQgetCopyData", "PQputCopyData", "PQfreemem")


_SIDE = {ErrorKind.SOURCE_CONNECT: "source", ErrorKind.SOURCE_SETUP: "source",
         ErrorKind.DESTINATION_CONNECT: "destination", ErrorKind.DESTINATION_APPLY: "destination"}


def _exec(conn: pq.abc.PGconn, query: str | bytes, what: str, kind: ErrorKind,
          table: tuple[str, str] | None = None) -> pq.abc.PGresult:
    """Run one statement; a failure is ``kind`` unless its SQLSTATE means a setup error
    (``classify.setup_error``: a missing grant on ``table``, (schema, name), is not waited
    out as a lost connection)."""
    res = conn.exec_(query if isinstance(query, bytes) else query.encode())
    if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK,
                          pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_IN):
        msg = res.error_message.decode("utf-8", "replace").strip()
        exc = psycopg.errors.error_from_result(res)
        side = _SIDE[kind]
        role = (conn.user or b"").decode("utf-8", "replace") or None
        refused = setup_error(exc, side=side, role=role, table=table)
        if refused is not None:
            raise ReplicatorError(refused.kind, f"[{side}] {what}: {exc.diag.message_primary}",
                                  refused.hint) from exc
        raise ReplicatorError(kind, f"{what}: {msg}")
    return res


def _connect(conninfo: str, settings: ConnectionSettings) -> pq.abc.PGconn:
    conn = pq.PGconn.connect(conninfo.encode())
    if conn.status != pq.ConnStatus.OK:
        msg = conn.error_message.decode("utf-8", "replace").strip()
        conn.finish()
        # As psycopg words it, so that the server's refusal is told apart from a network
        # failure (a missing CONNECT privilege or role is no outage to wait out).
        err = classify_connect(psycopg.OperationalError(f"connection failed: {msg}"), conninfo,
                               settings=settings)
        raise ReplicatorError(err.kind, f"cannot connect for the initial copy: {msg}",
                              err.hint) from None
    return conn


class CopyStopped(Exception):
    """A stop was requested: the copy ended early, unfinished tables stay 'copying'."""


class Backfill:
    """Copies a set of mirror tables from one snapshot; returns their sync LSN."""

    def __init__(self, config: Config, tables: list[MirrorTable], slot: str,
                 stop: threading.Event | None = None, metrics: Metrics | None = None,
                 live: bool = False, fence: Fence | None = None) -> None:
        self.config = config
        self.live = live
        # The pipeline's lease: every destination transaction of the copy checks it first.
        self.fence = fence
        self.tables = tables
        self.slot = slot
        self.stop = stop or threading.Event()
        self.workers = copy_workers(config)
        self.metrics = metrics
        self.copies: list[TableCopy] = []
        self._planning: MirrorTable | None = None   # the table _plan is at, for its errors
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    # -- the whole job ---------------------------------------------------

    def run(self) -> int:
        cfg = self.config
        dst = cfg.destination
        with psycopg.connect(cfg.source.conninfo(), autocommit=True,
                             prepare_threshold=None) as catalog, \
                watchdog.connect(dst.conninfo(), autocommit=True) as dest:
            exporter = ReplicationConnection(cfg.source.conninfo(replication="database"))
            exporter.connect()
            try:
                name = f"{self.slot[:40]}_sync_{uuid.uuid4().hex[:8]}"
                rows = exporter.command(
                    f"CREATE_REPLICATION_SLOT {quote_ident(name)} TEMPORARY LOGICAL pgoutput "
                    "(SNAPSHOT 'export')")
                sync_lsn, snapshot = parse_lsn(rows[0][1]), rows[0][2]
                try:
                    self._plan(catalog, dest, sync_lsn)
                except psycopg.Error as exc:
                    # Planning reads only the source's catalog (a filter's refusal is a
                    # ConfigError): a refused statement is the destination's.
                    t = self._planning
                    refused = setup_error(exc, side="destination", settings=dst, table=(
                        t.dest_schema, t.dest_name) if t is not None else None)
                    if refused is None:
                        raise
                    raise refused from exc
                failpoints.hit(failpoints.COPY_PLANNED)
                log.info("initial copy started", extra={
                    "tables": [c.table.qualname for c in self.copies], "workers": self.workers,
                    "sync_lsn": format_lsn(sync_lsn)})
                # SNAPSHOT 'export' always names the snapshot (snapshot_name).
                assert snapshot is not None, "CREATE_REPLICATION_SLOT returned no snapshot"
                self._copy(snapshot, exporter, sync_lsn)
            finally:
                exporter.close()
        return sync_lsn

    def _plan(self, catalog: psycopg.Connection, dest: psycopg.Connection, sync_lsn: int) -> None:
        dst = self.config.destination
        for t in self.tables:
            self._planning = t
            pages, est = table_size(catalog, t.source.oid)
            copy = TableCopy(t, pages, est)
            check_options(t.source, t.options)
            check_source_filter(catalog, t.source, t.options)
            origins = column_origins(catalog, t.source.oid, t.columns)
            with dest.transaction():
                self._fenced(dest)
                if mirror_exists(dest, t):
                    known = state.source_identities(dest, dst.state_schema, self.slot).get(
                        t.source.qualname)
                    if known and known.split(":")[0] != str(t.source.oid):
                        # Another table of that name (dropped and created again):
                        # the attnums remembered are the old table's.
                        state.record_column_attnums(dest, dst.state_schema, self.slot,
                                                    t.source.qualname, {})
                    if shadow.has_primary_key(dest, t):
                        # Readers keep the old rows until the copy is complete: it goes
                        # into a shadow, and the mirror is brought to it when it is.
                        shadow.check_owner(dest, t)
                        for stmt in shadow.create_shadow_sql(t):
                            dest.execute(stmt)
                        copy.target, copy.origins = t.shadow, origins
                    else:
                        # A mirror left without its key by an interrupted first copy
                        # is loaded and gets its indexes like a new one. User triggers
                        # (the invoice-to-memory one) must not fire for every historical
                        # row; they are enabled again after.
                        dest.execute(sql.SQL("alter table {} disable trigger user").format(
                            t.dest))
                        dest.execute(sql.SQL("truncate {}").format(t.dest))
                        # The copy writes the source's columns as they are now: the
                        # mirror gets them first; an empty table always converts.
                        ensure_mirror_columns(dest, t, dst.state_schema, self.slot, origins,
                                              fast_defaults=False)
                        copy.created = True
                else:
                    # No key while loading: the primary key is built after the data.
                    for stmt in create_mirror_sql(t, with_key=False):
                        dest.execute(stmt)
                    access.secure_table(dest, t.dest_schema, t.dest_name,
                                        dst.analytics_roles)
                    copy.created = True
                    state.record_column_attnums(
                        dest, dst.state_schema, self.slot, t.source.qualname,
                        {o.attnum: c.name for c, o in zip(t.columns, origins)
                         if o.attnum is not None})
                dest.execute(create_staging_sql(t))
                check_filter(dest, t)
                if not self.live:
                    # Changes held by an earlier live copy that never finished
                    # are older than this copy's snapshot; no stream runs now.
                    dest.execute(sql.SQL("drop table if exists {}").format(t.held))
                state.set_table(dest, dst.state_schema, self.slot, t, state.COPYING, sync_lsn)
                if copy.created:
                    copy.indexes = [primary_key_sql(t)]
                    # Recorded with the state, so that a crash at any later point
                    # leaves them owed, never forgotten.
                    owed = source_indexes(catalog, t) if dst.copy_indexes else []
                    state.record_index_builds(dest, dst.state_schema, self.slot, t.qualname,
                                              owed)
                    copy.secondary = len(owed)
            if pages >= 2 * PAGES_PER_RANGE:
                bounds = list(range(0, pages, PAGES_PER_RANGE))
                copy.ranges = [(lo, bounds[i + 1] if i + 1 < len(bounds) else None)
                               for i, lo in enumerate(bounds)]
            else:
                copy.ranges = [(None, None)]
            copy.ranges_left = len(copy.ranges)
            self.copies.append(copy)
            if self.metrics is not None:
                self.metrics.table_sync(t.qualname, state.COPYING)
            log.info("table sync state", extra={"table": t.qualname, "state": "copying",
                                                "est_rows": est, "ranges": len(copy.ranges)})

    # -- copying ---------------------------------------------------------

    def _copy(self, snapshot: str, exporter: ReplicationConnection, sync_lsn: int) -> None:
        # One queue for copies and key builds: a table's key is queued when its
        # last range is in, so workers build keys while other tables still
        # copy. `_outstanding` counts queued and running work.
        self._tasks: queue.Queue = queue.Queue()
        self._sync_lsn = sync_lsn
        # Largest ranges first, so a big table does not finish last on one worker.
        for copy in sorted(self.copies, key=lambda c: -c.pages):
            for rng in copy.ranges:
                self._tasks.put(("copy", copy, rng))
        self._outstanding = self._tasks.qsize()
        n = self._running = min(self.workers, self._outstanding) or 1
        imported = threading.Barrier(n + 1)
        threads = [threading.Thread(target=self._worker, args=(snapshot, imported),
                                    name=f"copy-{i}", daemon=True) for i in range(n)]
        for th in threads:
            th.start()
        try:
            with CopyProgress(self.copies) as progress:
                # Every worker has imported the snapshot once the barrier opens: only
                # then may the exporting connection do anything else.
                imported.wait()
                exporter.close()
                while any(th.is_alive() for th in threads):
                    progress.tick()
                    if self.metrics is not None:
                        self.metrics.alive()
                    for th in threads:
                        th.join(0.2)
        except threading.BrokenBarrierError:
            pass
        finally:
            for th in threads:
                th.join()
        if self._errors:
            raise self._errors[0]
        if self.stop.is_set():
            raise CopyStopped()
        if any(c.state != "copied" for c in self.copies):
            raise ReplicatorError(ErrorKind.INTERNAL, "initial copy ended with tables not copied",
                                  "report this as a bug; the next run copies them again")

    def _worker(self, snapshot: str, imported: threading.Barrier) -> None:
        cfg = self.config
        src = dest = None
        try:
            src = _connect(cfg.source.conninfo(), cfg.source)
            _exec(src, "begin isolation level repeatable read read only", "begin",
                  ErrorKind.SOURCE_CONNECT)
            _exec(src, f"set transaction snapshot {sql.Literal(snapshot).as_string()}",
                  "importing the copy snapshot", ErrorKind.SOURCE_SETUP)
            imported.wait()
            # The source side is watched too: a black-holed source leaves the C loop
            # waiting in libpq for ever (TCP keepalives do not see a pooler or tunnel that
            # acknowledges the bytes).
            me = _exec(src, watchdog.BACKEND_SQL, "select", ErrorKind.SOURCE_CONNECT)
            pulled = watchdog.Pulled(src)
            pulled.backend_pid, pulled.backend_start = (
                int(me.get_value(0, 0) or 0), int(me.get_value(0, 1) or 0))
            watchdog.watch(pulled, cfg.source.conninfo(), "source")
            # Watched (destination/watchdog.py): no deadline bounds a copy, a dead
            # connection is shut.
            dest = watchdog.connect(cfg.destination.conninfo(), autocommit=True)
            while not self.stop.is_set() and not self._errors:
                try:
                    task = self._tasks.get(timeout=0.2)
                except queue.Empty:
                    with self._lock:
                        if self._outstanding == 0:
                            return
                    continue
                if task[0] == "done":
                    return
                if task[0] == "copy":
                    with dest.blocking():
                        self._copy_range(src, dest.pgconn, task[1], task[2], dest, pulled)
                    self._range_done(dest, task[1])
                else:
                    self._build_index(dest, task[1], task[2])
        except BaseException as exc:
            with self._lock:
                self._errors.append(exc)
            imported.abort()
        finally:
            if src is not None:
                src.finish()
            if dest is not None:
                dest.close()

    def _range_done(self, dest: psycopg.Connection, copy: TableCopy) -> None:
        with self._lock:
            copy.ranges_left -= 1
            if not copy.ranges_left:
                copy.finished = time.monotonic()
                copy.state = "indexing" if copy.indexes else copy.state
                copy.index_left = len(copy.indexes)
                self._outstanding += len(copy.indexes)
                for stmt in copy.indexes:
                    self._tasks.put(("index", copy, stmt))
            self._task_done()
            if copy.ranges_left:
                return
        if not copy.indexes:
            self._mark_copied(dest, copy)

    def _task_done(self) -> None:
        # Under self._lock. Work is only added by a task still counted, so the
        # count never rises again from 0: every worker can stop. Without the
        # wake-up, idle workers noticed it only at their next poll, 0.2 s on
        # every initial copy.
        self._outstanding -= 1
        if self._outstanding == 0:
            for _ in range(self._running):
                self._tasks.put(("done",))

    def _build_index(self, dest: psycopg.Connection, copy: TableCopy,
                     stmt: sql.Composed | sql.SQL) -> None:
        t = copy.table
        try:
            with dest.transaction():
                self._fenced(dest)
                watchdog.note_backend(dest)
                dest.execute("set local maintenance_work_mem = '256MB'")
                dest.execute(stmt)
        except psycopg.Error as exc:
            refused = setup_error(exc, side="destination", settings=self.config.destination,
                                  table=(t.dest_schema, t.dest_name))
            raise ReplicatorError(
                refused.kind if refused else ErrorKind.DESTINATION_APPLY,
                f"cannot add the primary key to {t.qualname}: {exc}",
                refused.hint if refused else "the table is copied again on the next run",
            ) from exc
        with self._lock:
            self._task_done()
            copy.index_left -= 1
            last = copy.index_left == 0
        if last:
            self._mark_copied(dest, copy)

    def _swap(self, dest: psycopg.Connection, copy: TableCopy) -> None:
        """Bring the mirror to its shadow, in the caller's transaction (destination/shadow.py)."""
        t, dst = copy.table, self.config.destination
        dest.execute("select set_config('lock_timeout', %s, true)",
                     [f"{max(1, round(dst.lock_timeout * 1000))}ms"])
        try:
            shadow.swap_in(dest, t, dst.state_schema, self.slot, copy.origins, copy.rows)
        except shadow.ShadowIncomplete as exc:
            raise ReplicatorError(
                ErrorKind.DESTINATION_CONNECT, f"{exc} (the destination restarted and emptied "
                "it): the mirror was left as it was",
                "the table is copied again when the replicator starts over") from None
        except psycopg.errors.LockNotAvailable:
            raise
        except psycopg.Error as exc:
            # A grant or ownership taken away during the copy: the operator's to fix.
            refused = setup_error(exc, side="destination", settings=dst,
                                  table=(t.dest_schema, t.dest_name))
            if refused is None:
                raise
            raise refused from exc

    def _fenced(self, dest: psycopg.Connection) -> None:
        if self.fence is not None:
            self.fence.check(dest)

    def _mark_copied(self, dest: psycopg.Connection, copy: TableCopy) -> None:
        """The table's rows and primary key are in (its secondary indexes come later).

        Before streaming: marked copied, never copied again even if the rest of
        the job fails. Live: stays copying until the batch that merges the
        changes held during the copy marks it streaming (see the module doc).
        """
        t = copy.table
        failpoints.hit(failpoints.COPY_DONE_BEFORE_MARK)
        waits = 0
        while True:
            try:
                with dest.transaction():
                    self._fenced(dest)
                    dest.execute("set local synchronous_commit = on")
                    if copy.shadowed:
                        self._swap(dest, copy)
                    else:
                        dest.execute(sql.SQL("alter table {} enable trigger user").format(
                            t.dest))
                    state.set_table(dest, self.config.destination.state_schema, self.slot, t,
                                    state.COPYING if self.live else state.COPIED,
                                    self._sync_lsn, rows=copy.rows)
                break
            except psycopg.errors.LockNotAvailable:
                # The swap needs a lock a long query (or an index build) holds: rather than
                # queue every reader behind it, give up for now and try again, the shadow
                # kept.
                waits += 1
                log.warning("the mirror is busy: its new copy is swapped in once the lock "
                            "is free", extra={"table": t.qualname, "attempt": waits,
                                              "lock_timeout_s": self.config.destination
                                              .lock_timeout})
                if self.stop.wait(min(30.0, 2.0 ** waits)):
                    raise CopyStopped() from None
        if not self.live:
            failpoints.hit(failpoints.COPY_MARKED)
        copy.state = "copied"
        if self.metrics is not None:
            self.metrics.copy_rows.labels(t.qualname).inc(copy.rows)
            self.metrics.table_sync(t.qualname, state.COPIED)
        secs = max(1e-6, (copy.finished or time.monotonic()) - (copy.started or time.monotonic()))
        log.info("table sync state", extra={
            "table": t.qualname, "state": "copied", "rows": copy.rows,
            "mb": round(copy.bytes / 1e6, 1), "copy_seconds": round(secs, 2),
            "rows_per_s": int(copy.rows / secs), "indexes_to_build": copy.secondary})

    def _copy_range(self, src: pq.abc.PGconn, dst: pq.abc.PGconn, copy: TableCopy,
                    rng: tuple[int | None, int | None],
                    watched: deadline.Connection | None = None,
                    pulled: watchdog.Pulled | None = None) -> None:
        t = copy.table
        cols = sql.SQL(", ").join(
            sql.Identifier(c.name) if c.builtin else
            sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in t.kept)
        where: list[sql.Composable] = []
        if t.options.filter is not None:
            # [mappings] filter runs here on the source, on the rows as they are now.
            where.append(sql.SQL("({})").format(sql.SQL(t.options.filter)))
        if rng[0] is not None:
            where.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({rng[0]},0)")))
        if rng[1] is not None:
            where.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({rng[1]},0)")))
        select = sql.SQL("select {} from {}").format(
            cols, sql.Identifier(t.source.schema, t.source.name))
        if where:
            select += sql.SQL(" where ") + sql.SQL(" and ").join(where)
        out = sql.SQL("copy ({}) to stdout (format binary)").format(select).as_string()
        into = sql.SQL("copy {} ({}) from stdin (format binary)").format(
            copy.target or t.dest,
            sql.SQL(", ").join(sql.Identifier(c.name) for c in t.kept)).as_string()

        if not copy.started:
            copy.started = time.monotonic()
        _exec(dst, "begin", "begin", ErrorKind.DESTINATION_CONNECT)
        if self.fence is not None:
            try:
                self.fence.check_pq(dst)
            except ReplicatorError:
                _exec(dst, "rollback", "rollback", ErrorKind.DESTINATION_APPLY)
                raise
        if watched is not None:
            # For the watchdog: this transaction's backend (a pooler may pick another).
            me = _exec(dst, watchdog.BACKEND_SQL, "select", ErrorKind.DESTINATION_CONNECT)
            watched.backend_pid, watched.backend_start = (
                int(me.get_value(0, 0) or 0), int(me.get_value(0, 1) or 0))
        # The table is marked copied later by a synchronous commit, which
        # flushes these commits too.
        _exec(dst, "set local synchronous_commit = off", "set", ErrorKind.DESTINATION_APPLY)
        # Triggers that know it (the invoice-to-memory one) skip copied rows:
        # history, not news. Also when a trigger is created while a copy runs,
        # after the copy disabled the table's user triggers (SET LOCAL: pooler safe).
        _exec(dst, "set local replicator.phase = 'copy'", "set", ErrorKind.DESTINATION_APPLY)
        _exec(dst, into, f"copy into {t.qualname}", ErrorKind.DESTINATION_APPLY,
              (t.dest_schema, t.dest_name))
        pipe: Pipe | None = None
        if watched is not None:
            # Sending, not waiting for an answer: the destination waiting for our data is
            # normal while the source is slow, not if the data we sent does not arrive.
            watched.pushed = lambda: pipe.bytes if pipe is not None else 0
        # The source is waited on (for the watchdog) from its COPY to its end only: before,
        # its backend is rightly idle in transaction while the destination is prepared.
        with pulled.blocking() if pulled is not None else contextlib.nullcontext():
            _exec(src, out, f"copy from {t.source.qualname}", ErrorKind.SOURCE_CONNECT,
                  (t.source.schema, t.source.name))
            pipe = Pipe(*_libpq())
            if pulled is not None:
                pulled.pushed = lambda: pipe.bytes if pipe is not None else 0
                pulled.reading = lambda: pipe is not None and pipe.reading
            with self._lock:
                copy.pipes.append(pipe)
            # pgconn_ptr is documented on pq.PGconn (both implementations have it), but
            # psycopg's pq.abc.PGconn protocol does not declare it.
            rc = pipe.run(src.pgconn_ptr, dst.pgconn_ptr)  # type: ignore[attr-defined]
            src_err = _drain(src)
        if watched is not None:
            watched.pushed = None
        if rc == 0 and not src_err:
            dst.put_copy_end()
        else:
            dst.put_copy_end(b"source copy failed")
        dst_err = _drain(dst)
        if src_err or dst_err or rc != 0:
            _exec(dst, "rollback", "rollback", ErrorKind.DESTINATION_APPLY)
            raise ReplicatorError(
                ErrorKind.DESTINATION_APPLY if dst_err else ErrorKind.SOURCE_CONNECT,
                f"copying {t.source.qualname} into {t.qualname} failed: {src_err or dst_err}",
                "the table is copied again from the start on the next run")
        _exec(dst, "commit", "commit", ErrorKind.DESTINATION_CONNECT)
        with self._lock:
            copy.pipes.remove(pipe)
            copy.rows += max(0, pipe.rows - 1)   # the trailer is a CopyData of its own
            copy.bytes += pipe.bytes


def _drain(conn: pq.abc.PGconn) -> str:
    """Read a connection's pending results; the error message if one failed."""
    err = ""
    while True:
        res = conn.get_result()
        if res is None:
            return err
        if res.status == pq.ExecStatus.FATAL_ERROR:
            err = res.error_message.decode("utf-8", "replace").strip()
        elif res.status == pq.ExecStatus.COPY_OUT:
            # The source is still sending (we stopped early): let it finish.
            while conn.get_copy_data(0)[0] > 0:
                pass


def primary_key_sql(t: MirrorTable) -> sql.Composed:
    name = f"{t.dest_name[:58]}_pkey"
    return sql.SQL(
        "do $$ begin if not exists (select 1 from pg_constraint where conrelid = {reg}::regclass "
        "and contype = 'p') then alter table {dest} add constraint {name} primary key ({cols}); "
        "end if; end $$").format(
        reg=sql.Literal(t.dest.as_string()), dest=t.dest, name=sql.Identifier(name),
        cols=sql.SQL(", ").join(map(sql.Identifier, t.source.key)))


def source_indexes(catalog: psycopg.Connection, t: MirrorTable) -> list[IndexBuild]:
    """The source's secondary indexes, rewritten for the mirror table.

    Unique indexes become plain ones: a batch applies many changes in one
    statement, and an intermediate state (two rows swapping a value) would
    trip a uniqueness check the source never saw fail. CONCURRENTLY: they are
    built while the applier writes to the table (destination/indexes.py).
    """
    return [IndexBuild(t.qualname, t.dest_schema, ix.name, index_sql(t, ix).as_string())
            for ix in secondary_indexes(catalog, t.source.oid)]


def index_sql(t: MirrorTable, ix: SourceIndex) -> sql.Composed:
    """The CREATE INDEX of a source index for the mirror table, from its catalog fields.

    Names are quoted identifiers; only expressions and the predicate are the source's
    text, each deparsed by the source from one expression (so it cannot end the statement).
    """
    keys = []
    for c in ix.columns:
        if not c.key:
            continue
        part = sql.Identifier(c.column) if c.column is not None else \
            sql.SQL("({})").format(sql.SQL(c.expression))
        if c.collation is not None:
            part = sql.SQL("{} collate {}").format(part, sql.Identifier(*c.collation))
        if c.opclass is not None:
            part = sql.SQL("{} {}").format(part, sql.Identifier(*c.opclass))
        if c.descending:
            part = sql.SQL("{} desc").format(part)
        if c.nulls_first != c.descending:   # DESC puts nulls first unless told otherwise
            part = sql.SQL("{} nulls {}").format(
                part, sql.SQL("first" if c.nulls_first else "last"))
        keys.append(part)
    stmt = sql.SQL("create index concurrently if not exists {} on {} using {} ({})").format(
        sql.Identifier(ix.name), t.dest, sql.Identifier(ix.method), sql.SQL(", ").join(keys))
    included = [sql.Identifier(c.column) for c in ix.columns if not c.key and c.column]
    if included:
        stmt += sql.SQL(" include ({})").format(sql.SQL(", ").join(included))
    if ix.options:
        stmt += sql.SQL(" with ({})").format(sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in ix.options))
    if ix.predicate is not None:
        stmt += sql.SQL(" where ({})").format(sql.SQL(ix.predicate))
    return stmt


def default_copy_workers(cpus: int) -> int:
    """Copy workers for a machine with this many usable CPUs (no setting given).

    Half the CPUs, at most 4: each stream keeps a source and a destination
    backend busy besides this process, and on a machine running both servers more
    streams only contend (bench/backfill.py --tune; figures in BENCHMARKS.md).
    """
    return max(1, min(4, cpus // 2))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        return os.cpu_count() or 1


def copy_workers(config: Config) -> int:
    """[destination] copy_workers, or the CPUs' default; at most what max_connections leaves."""
    wanted = config.destination.copy_workers or default_copy_workers(usable_cpus())
    # The replication and catalog connections count against max_connections too.
    return max(1, min(config.source.max_connections - 2, wanted))
