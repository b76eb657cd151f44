"""Applying a batch: one destination transaction, COPY into staging, one MERGE per table.

The transaction also records the applied LSN, so a batch is in the mirror exactly when its
position is. Its statements are built in batch_sql.py, the mirror's DDL in mirror_ddl.py.

A table's inserts, in a batch without deletes of it, are COPYed into the mirror as they
are, with no staging and no MERGE (Applier._copy_inserts); its other rows are staged and
merged after them. An insert of a key the mirror has already (a `verify --repair` got
there first) fails that COPY, and the batch runs again by MERGE, which updates the row.

A change the mirror rejects for its data makes the batch run again with each table's MERGE
under a savepoint, and the failing table's staged keys are bisected down to the keys that
fail (isolation.py; its statements in reject_sql.py). With [destination] on_error = "stop"
the first such key stops the pipeline (the batch rolls back); with "dead_letter" every
change of it goes to the dead letter table, in order, and the rest of the batch is applied.

Pooler safe (Supabase port 6543, transaction mode): no prepared statements,
settings by SET LOCAL only, nothing that outlives the transaction.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import deadline, failpoints
from .._decode import COPY_HEADER, COPY_TRAILER, Pieces, split_inserts
from ..batch import (
    AlterTable,
    Batch,
    Rows,
    SpilledRows,
    SpilledSlice,
    SyncDone,
    SyncStart,
    TableRows,
    Truncate,
)
from ..classify import connection_lost, setup_error
from ..config.settings import ON_ERROR
from ..deadline import BatchLimits, timed_out
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn, parse_lsn
from ..schema import (
    DELETED_AT,
    Column,
    MirrorTable,
    Origin,
    check_options,
)
from . import access, state, watchdog
from .apply_result import ApplyResult
from .batch_sql import (
    COMMIT_TIME,
    STAGING_VACUUM_ROWS,
    check_filter,
    clear_staging_sql,
    copy_held_sql,
    copy_mirror_sql,
    copy_sql,
    dead_letter_sql,
    fill_moving_in_sql,
    history_sql,
    ident,
    merge_sql,
    merge_toast_sql,
    moving_in_sql,
    soft_deleted_sql,
    source_values_sql,
    temp_staging_sql,
    unhold_sql,
    vacuum_staging_sql,
)
from .isolation import KeyIsolation
from .lease import Fence
from .mirror_ddl import (
    create_held_sql,
    create_history_sql,
    create_mirror_sql,
    create_staging_sql,
    ensure_mirror_columns,
    has_user_triggers,
    mirror_exists,
    takes_rows_as_sent,
)
from .reject_sql import (
    isolate_links_sql,
    isolate_queued_sql,
    isolate_stage_sql,
    letter_sql,
    queued_sql,
    rejects,
)

if TYPE_CHECKING:  # the pipeline hands the applier its session's builder
    from .indexes import IndexBuilder

log = logging.getLogger(__name__)


def _write(copy: psycopg.Copy,
           data: bytes | bytearray | Pieces | SpilledRows | SpilledSlice) -> None:
    if isinstance(data, (SpilledRows, SpilledSlice)):
        for chunk in data.chunks():
            copy.write(chunk)
    elif isinstance(data, Pieces):
        # A memoryview: psycopg sends a big part in slices, which a Span cannot make.
        for part in data.parts:
            copy.write(memoryview(part))
    else:
        copy.write(data)


class Applier:
    """Owns the destination connection; applies batches one transaction each."""

    def __init__(self, conninfo: str, state_schema: str, slot: str, on_error: str = "stop",
                 limits: BatchLimits | None = None, readers: tuple[str, ...] = (),
                 source_conninfo: str | None = None, fence: Fence | None = None,
                 commit_times: bool = False, defer_flush: bool = False):
        assert on_error in ON_ERROR, on_error
        self._conninfo = conninfo
        # Read only for rows that move into a [mappings] filter with unchanged-TOAST values.
        self._source_conninfo = source_conninfo
        self._source: psycopg.Connection | None = None
        # The batch's commit LSNs and times (soft deletes, history rows).
        self._times: dict[str, list[int]] = {"lsns": [], "times": []}
        self.state_schema = state_schema
        self.slot = slot
        self.on_error = on_error
        self.limits = limits
        # The pipeline's lease (lease.py): every transaction of this applier that writes
        # checks it first, and fails without writing once another process took over.
        self.fence = fence
        # The session's index builder: a batch that alters a mirror table holds its builds.
        self.index_builds: IndexBuilder | None = None
        self._held: list[str] = []   # mirror tables whose builds this transaction holds
        # Mirror tables that may have waiting dead letters (None: not read yet). A batch
        # checks their staged keys against the letters; a table found to have none leaves.
        self._lettered: set[str] | None = None
        # Set while a batch runs again after a rejected change: each table's MERGE then
        # runs under a savepoint, and a failing one is bisected.
        self._careful = False
        # Whether a mirror table takes its inserts by COPY as the stream sent them
        # (takes_rows_as_sent) and has user triggers, per table and columns, checked once a
        # session; and whether the batch in flight runs by MERGE only, after one of its
        # inserts met its key.
        self._as_sent: dict[tuple[str, tuple[Column, ...]], tuple[bool, bool]] = {}
        self._merge_only = False
        # [destination] analytics_roles: the policy of every mirror table it creates.
        self.readers = readers
        # Each batch records its commit time for the tables it changed: <state>.commit_times
        # must exist before the first batch (the pipeline sets up its component).
        self.commit_times = commit_times
        # Commit batches with synchronous_commit off and report where their commit records
        # are (ApplyResult.wal_lsn): the caller confirms a batch to the source only once the
        # destination's WAL is flushed past it. The pipeline's applier does; other callers
        # get a commit that is durable when apply() returns.
        self.defer_flush = defer_flush
        self.conn: psycopg.Connection | None = None
        self._statements: dict[tuple[str, str, bool], sql.SQL] = {}
        # Mirror tables being copied while the stream runs: their changes are
        # held, not merged, until the copy is in (SyncStart ... SyncDone).
        self.holding: set[str] = set()
        # Staging tables known to be empty as committed: every batch empties what it
        # stages before it commits, so only the first use in a session (after an older
        # replicator, or a crash of one that emptied staging before COPY) clears first.
        self._clean: set[str] = set()
        # Staging tables emptied by the batch in flight, and rows staged since the last
        # VACUUM (table name -> (table, rows)).
        self._emptied: set[str] = set()
        self._staged: dict[str, tuple[MirrorTable, int]] = {}

    def connect(self) -> psycopg.Connection:
        try:
            # Watched: a dead connection is noticed long before stall_timeout (watchdog.py);
            # never prepared, as no connection deadline.connect makes is (a pooler).
            self.conn = watchdog.connect(
                self._conninfo, self.limits.answer_timeout if self.limits else None,
                side="destination", setting="[destination] stall_timeout", autocommit=True)
        except psycopg.OperationalError as exc:
            raise ReplicatorError(
                ErrorKind.DESTINATION_CONNECT, f"cannot connect to the destination: {exc}",
                "check [destination] host/port/user/password and that the database exists",
            ) from exc
        return self.conn

    @property
    def _dest(self) -> psycopg.Connection:
        """The connection connect() opened; applying without one is a bug."""
        assert self.conn is not None, "Applier.connect() was not called"
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def abort(self) -> None:
        """Shut the connection down under the batch in flight (from another thread).

        For a destination that answers neither the batch nor a cancel: the batch fails at
        once, and the server rolls it back (it never got the commit).
        """
        deadline.shut(self.conn)

    def cancel(self, timeout: float = 5) -> None:
        """Ask the destination to cancel the statement in flight (from another thread)."""
        conn = self.conn
        if conn is None:
            return
        try:
            conn.cancel_safe(timeout=timeout)
        except (psycopg.Error, OSError) as exc:
            log.warning("cannot cancel the batch in flight", extra={"error": str(exc)})

    def prepare_tables(self, tables: list[MirrorTable], alter: bool = True) -> None:
        """Create missing mirror and staging tables; alter existing mirrors unless told not to.

        At startup the pipeline passes alter=False: the stream may replay
        transactions older than the catalog, and the mirror's columns follow
        the Relation messages of transactions it applies, in stream order.
        """
        with self._dest.transaction():
            if self.fence is not None:
                self.fence.check(self._dest)
            for t in tables:
                self._ensure_table(t, alter=alter)

    def _ensure_table(self, t: MirrorTable, origins: tuple[Origin, ...] | None = None,
                      alter: bool = True) -> None:
        conn = self._dest
        if mirror_exists(conn, t):
            if alter:
                ensure_mirror_columns(conn, t, self.state_schema, self.slot, origins,
                                      before_alter=lambda: self._hold_index_builds(t))
        else:
            for stmt in create_mirror_sql(t):
                conn.execute(stmt)
            access.secure_table(conn, t.dest_schema, t.dest_name, self.readers)
            log.info("created mirror table", extra={"table": t.qualname})
            if origins:
                state.record_column_attnums(
                    conn, self.state_schema, self.slot, t.source.qualname,
                    {o.attnum: c.name for c, o in zip(t.columns, origins) if o.attnum is not None})
        conn.execute(create_staging_sql(t))
        self._ensure_options(t)
        self._as_sent[t.qualname, t.columns] = (takes_rows_as_sent(conn, t),
                                                 has_user_triggers(conn, t))

    def _hold_index_builds(self, t: MirrorTable) -> None:
        """No index build on t until this batch transaction ends: its ALTER TABLE waits for
        a CREATE INDEX CONCURRENTLY's lock, and the build waits for this transaction (an
        older snapshot, and maybe t's rows written): a deadlock the server ends by failing
        one of them. The build in flight is cancelled and done again after."""
        if self.index_builds is not None and t.qualname not in self._held:
            self.index_builds.hold(t.qualname)
            self._held.append(t.qualname)

    def _ensure_options(self, t: MirrorTable) -> None:
        """What the table's [mappings] options need in the mirror, checked before any row."""
        conn = self._dest
        check_options(t.source, t.options)
        if t.options.soft_delete:
            conn.execute(sql.SQL("alter table {} add column if not exists {} timestamptz").format(
                t.dest, ident(DELETED_AT)))
        if t.options.history:
            row = conn.execute("select to_regclass(%s) is null",
                               [t.history.as_string(conn)]).fetchone()
            for stmt in create_history_sql(t):
                conn.execute(stmt)
            if row and row[0]:
                # As a mirror table, in the transaction that creates it: the schema's
                # default privileges (Supabase's for anon) must not outlive the commit.
                access.secure_table(conn, t.dest_schema, t.history_name, self.readers)
        check_filter(conn, t)

    def _stmt(self, kind: str, t: MirrorTable) -> sql.SQL:
        key = (kind, t.staging, t.temp_stage)
        stmt = self._statements.get(key)
        if stmt is None:
            build = {"copy": copy_sql, "copy_held": copy_held_sql, "merge": merge_sql,
                     "copy_mirror": copy_mirror_sql,
                     "merge_toast": merge_toast_sql, "dead": dead_letter_sql,
                     "queued": queued_sql, "isolate_links": isolate_links_sql,
                     "isolate_queued": isolate_queued_sql, "isolate_stage": isolate_stage_sql,
                     "letter": letter_sql, "history": history_sql, "moving_in": moving_in_sql,
                     "fill_moving_in": fill_moving_in_sql,
                     "soft_deleted": soft_deleted_sql}[kind]
            stmt = self._statements[key] = sql.SQL(build(t).as_string(self.conn))
        return stmt

    def apply(self, batch: Batch, record_lsn: bool = True,
              source: state.SourceServer | None = None) -> ApplyResult:
        if batch.txns:
            failpoints.hit(failpoints.BATCH_BEFORE_BEGIN)
        try:
            try:
                return self._apply(batch, record_lsn, source)
            except KeyPresent as present:
                log.info("the batch inserts a key the mirror has already: applying it again "
                         "by MERGE, which updates that row", extra={
                             "lsn": format_lsn(batch.end_lsn), "table": present.table,
                             "constraint": present.exc.diag.constraint_name})
                self._merge_only = True
                return self._apply(batch, record_lsn, source)
        except _Rejected as rejected:
            # Savepoints cost nothing until a change fails: only then does the batch run
            # again, each table's MERGE under one, to find the keys that fail.
            exc = rejected.exc
            log.warning("the destination rejected a change: applying the batch again, "
                        "table by table, to find it", extra={
                            "lsn": format_lsn(batch.end_lsn), "sqlstate": exc.sqlstate,
                            "condition": type(exc).__name__})
            self._careful = True
            try:
                return self._apply(batch, record_lsn, source)
            finally:
                self._careful = False
        finally:
            self._merge_only = False
            self._release_index_builds()

    def _release_index_builds(self) -> None:
        """The batch transaction has ended: the index builds it held may go on."""
        if self.index_builds is not None:
            for table in self._held:
                self.index_builds.release(table)
        self._held = []

    def _apply(self, batch: Batch, record_lsn: bool,
               source: state.SourceServer | None) -> ApplyResult:
        res = ApplyResult()
        started = time.monotonic()
        holding_before = set(self.holding)
        syncs_done = any(isinstance(op, SyncDone) for op in batch.ops)
        self._times = {"lsns": list(batch.commit_times), "times": list(batch.commit_times.values())}
        self._emptied = set()
        try:
            conn = self._dest
            with conn.transaction(), conn.cursor() as cur:
                # The source may forget a transaction once it is confirmed, so the commit
                # must be durable before we confirm it: at once (on), or later, once the
                # destination's WAL is flushed past it (defer_flush): the commit returns
                # without waiting for the disk, which a small batch spends much of its time on.
                durability = "off" if self.defer_flush else "on"
                if self.limits is not None:
                    self.limits.set_local(cur, synchronous_commit=durability, fence=self.fence)
                else:
                    cur.execute(f"set local synchronous_commit = {durability}")
                    if self.fence is not None:
                        self.fence.check(cur)
                if record_lsn and batch.end_lsn:
                    # First, so the pipeline's row is locked for the whole batch: a
                    # `dead-letters --retry` locks it before touching the mirror, and the
                    # two take turns instead of deadlocking on mirror rows. The position
                    # still commits with the batch, or not at all.
                    state.record_applied(cur, self.state_schema, self.slot, batch.end_lsn,
                                         source)
                if self._lettered is None:
                    self._lettered = state.lettered_tables(cur, self.state_schema, self.slot)
                for op in batch.ops:
                    if isinstance(op, Rows):
                        for tr in op.tables:
                            self._apply_rows(cur, tr, batch.end_lsn, res)
                    elif isinstance(op, Truncate):
                        self._truncate(cur, op)
                    elif isinstance(op, AlterTable) and not op.alter:
                        cur.execute(create_staging_sql(op.table))
                    elif isinstance(op, AlterTable):
                        self._ensure_table(op.table, op.origins)
                    elif isinstance(op, SyncStart):
                        self._hold(cur, op.table)
                    elif isinstance(op, SyncDone):
                        self._unhold(cur, op, batch.end_lsn, res)
                if self.commit_times and batch.last_commit_ts:
                    changed = sorted({tr.table.source.qualname for tr in batch.table_rows()
                                      if tr.table.qualname not in self.holding}
                                     | {t.source.qualname for op in batch.ops
                                        if isinstance(op, Truncate) for t in op.tables
                                        if t.qualname not in self.holding})
                    if changed:
                        state.record_commit_times(cur, self.state_schema, self.slot, changed,
                                                  batch.last_commit_ts)
                if syncs_done:
                    failpoints.hit(failpoints.SYNC_DONE_BEFORE_COMMIT)
                if batch.txns:
                    failpoints.hit(failpoints.BATCH_BEFORE_COMMIT)
        except (ReplicatorError, KeyPresent):
            self.holding = holding_before
            raise
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled,
                psycopg.errors.DeadlockDetected) as exc:
            self.holding = holding_before
            raise timed_out(exc, batch.end_lsn, self.limits) from exc
        except psycopg.OperationalError as exc:
            self.holding = holding_before
            raise connection_lost(
                exc, "destination", f"while applying up to {format_lsn(batch.end_lsn)}",
                "the batch was rolled back; the replicator retries it after reconnecting",
            ) from exc
        except psycopg.Error as exc:
            self.holding = holding_before
            if not self._careful and rejects(exc):
                raise _Rejected(exc) from exc
            refused = setup_error(exc, side="destination", role=self.conn.info.user
                                  if self.conn is not None else None)
            if refused is not None:  # a missing grant: the same on every retry
                raise refused from exc
            raise ReplicatorError(
                ErrorKind.DESTINATION_APPLY,
                f"the destination rejected the batch ending at {format_lsn(batch.end_lsn)}: {exc}",
                "nothing of this batch was applied; fix the mirror table named above "
                "(or drop it so it is recreated) and restart",
            ) from exc
        self._clean |= self._emptied
        res.seconds = time.monotonic() - started
        if batch.txns:
            failpoints.hit(failpoints.BATCH_COMMITTED)
        if self._lettered is not None:
            self._lettered |= res.lettered
        if syncs_done:
            failpoints.hit(failpoints.SYNC_DONE_COMMITTED)
        for op in batch.ops:
            if isinstance(op, SyncStart):
                failpoints.hit(failpoints.SYNC_START_COMMITTED)
                op.applied.set()
        if self.defer_flush:
            self._commit_position(res)
        self._vacuum_staging()
        return res

    def _commit_position(self, res: ApplyResult) -> None:
        """Where the batch's commit record is in the destination's WAL, and what is flushed.

        Read after the commit: the insert position then is past the commit record (read
        inside the transaction it would be before it). Both are server-wide, so through a
        transaction-mode pooler any server connection answers the same.
        """
        try:
            row = self._dest.execute(
                "select pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
            ).fetchone()
        except psycopg.OperationalError as exc:
            raise connection_lost(
                exc, "destination", "after a commit, before its WAL position",
                "the batch is not confirmed to the source; the replicator reconnects") from exc
        assert row is not None  # a select without from: always one row
        res.wal_lsn, res.wal_flushed = parse_lsn(row[0]), parse_lsn(row[1])

    def _vacuum_staging(self) -> None:
        """VACUUM the staging tables that took STAGING_VACUUM_ROWS rows since the last one.

        Between batches, outside any transaction (VACUUM cannot run in one; through a
        transaction-mode pooler it is a transaction of its own). The batch committed
        already: a lost connection here is retried like one lost before the next batch.
        """
        for name, (t, rows) in list(self._staged.items()):
            if rows < STAGING_VACUUM_ROWS:
                continue
            del self._staged[name]
            try:
                self._dest.execute(vacuum_staging_sql(t))
            except psycopg.OperationalError as exc:
                raise connection_lost(
                    exc, "destination", f"while vacuuming {t.qualname}'s staging",
                    "the batches before were committed; the replicator reconnects") from exc
            except psycopg.Error as exc:
                # Only the speed of later batches depends on it: autovacuum still comes.
                log.warning("cannot vacuum a staging table", extra={
                    "table": t.qualname, "error": str(exc).strip()})

    # -- tables being copied while the stream runs ---------------------------

    def _hold(self, cur: psycopg.Cursor, t: MirrorTable) -> None:
        cur.execute(create_staging_sql(t))
        cur.execute(create_held_sql(t))
        cur.execute(sql.SQL("truncate {}").format(t.held))
        state.set_table(cur, self.state_schema, self.slot, t, state.PENDING)
        self.holding.add(t.qualname)

    def _unhold(self, cur: psycopg.Cursor, op: SyncDone, end_lsn: int, res: ApplyResult) -> None:
        t = op.table
        statements, truncated = unhold_sql(t)
        cur.execute(statements[0], {"sync": op.sync_lsn})
        cur.execute(truncated)
        held_truncate = cur.fetchone()
        assert held_truncate is not None  # select exists (...): always one row
        if held_truncate[0]:
            cur.execute(sql.SQL("truncate {}").format(t.dest))
        for stmt in statements[1:]:
            cur.execute(stmt)
        cur.execute(sql.SQL(
            "select count(*) filter (where _r_op = 'I'), count(*) filter (where _r_op = 'U'), "
            "count(*) filter (where _r_op = 'D'), count(_r_u) from {}").format(t.stage))
        counts = cur.fetchone()
        assert counts is not None  # count(*) without group by: always one row
        ins, upd, dele, unchanged = counts
        rows = ins + upd + dele
        if rows:
            out = self._merge_table(cur, t, bool(unchanged), end_lsn, res)
            ins, upd, dele = (max(0, n - out.get(o, 0)) for n, o in zip((ins, upd, dele), "IUD"))
            rows -= sum(out.values())
        res.count(t.qualname, ins, upd, dele)
        cur.execute(clear_staging_sql(t))
        cur.execute(sql.SQL("truncate {}").format(t.held))
        state.set_table(cur, self.state_schema, self.slot, t, state.STREAMING, op.sync_lsn)
        self.holding.discard(t.qualname)
        res.rows += rows
        log.info("table sync state", extra={"table": t.qualname, "state": "streaming",
                                            "held_changes": rows})

    def _truncate(self, cur: psycopg.Cursor, op: Truncate) -> None:
        direct = [t for t in op.tables if t.qualname not in self.holding]
        for t in direct:
            if t.options.history:
                cur.execute(sql.SQL(
                    "insert into {} (_op, _commit_time, _lsn, _seq) select 'T', {}, "
                    "'0/0'::pg_lsn + s._r_lsn::numeric, 2 * %(seq)s::int8 "
                    "from (select %(lsn)s::int8 as _r_lsn) s").format(t.history, COMMIT_TIME),
                    {**self._times, "seq": op.seq, "lsn": op.lsn})
        soft = [t for t in direct if t.options.soft_delete]
        for t in soft:
            # Every row was deleted at the source: all are marked, none removed.
            cur.execute(sql.SQL(
                "update {} set {} = {} from (select %(lsn)s::int8 as _r_lsn) s "
                "where {} is null").format(t.dest, ident(DELETED_AT), COMMIT_TIME,
                                           ident(DELETED_AT)), {**self._times, "lsn": op.lsn})
        direct = [t for t in direct if not t.options.soft_delete]
        if direct:
            cur.execute(sql.SQL("truncate {}").format(sql.SQL(", ").join(t.dest for t in direct)))
        for t in op.tables:
            if t.qualname in self.holding:
                cur.execute(sql.SQL(
                    "insert into {} (_r_seq, _r_lsn, _r_op) values (%s, %s, 'T')").format(
                    t.held), [op.seq, op.lsn])

    def _apply_rows(self, cur: psycopg.Cursor, tr: TableRows, end_lsn: int,
                    res: ApplyResult) -> None:
        t = tr.table
        if t.qualname in self.holding:
            with cur.copy(self._stmt("copy_held", t)) as copy:
                _write(copy, tr.data)
            return
        data: bytes | bytearray | Pieces | SpilledRows | SpilledSlice = tr.data
        staged = tr.rows
        split = self._copy_inserts(cur, t, tr.inserts, tr.updates, tr.deletes + tr.moves, data,
                                   self._lettered is None or t.qualname in self._lettered)
        if split is not None:
            res.copies += 1
            data, staged = split
        if staged:
            if t.staging not in self._clean and t.staging not in self._emptied:
                cur.execute(clear_staging_sql(t))
            with cur.copy(self._stmt("copy", t)) as copy:
                _write(copy, data)
            res.copies += 1
            out = self._merge_table(cur, t, bool(tr.unchanged), end_lsn, res)
            cur.execute(clear_staging_sql(t))
            self._emptied.add(t.staging)
            self._staged[t.staging] = (t, self._staged.get(t.staging, (t, 0))[1] + staged)
        else:
            out = {}
        res.rows += tr.rows - sum(out.values())
        # A key change's delete is not counted as a delete, hence the floor.
        res.count(t.qualname, *(max(0, n - out.get(o, 0))
                                for n, o in zip((tr.inserts, tr.updates, tr.deletes), "IUD")))

    def _copy_inserts(self, cur: psycopg.Cursor, t: MirrorTable, inserts: int, updates: int,
                      deletes: int, data: bytes | bytearray | Pieces | SpilledRows | SpilledSlice,
                      lettered: bool) -> tuple[bytearray, int] | None:
        """COPY t's inserts into the mirror as they are, with no staging and no MERGE;
        returns its other rows, to stage and merge (a COPY BINARY stream, how many), or
        None: every row goes through staging.

        Not when a row is a delete (split_inserts: an insert may then follow an earlier
        change of its key), nor from a buffer too big for memory or holding big values left
        where they came, nor into a mirror that does not take rows as sent, nor for a table
        with dead letters a key could queue behind, nor with a [mappings] option that needs
        the MERGE: a filter decides which rows go in, a history logs them, and a
        soft-deleted row keeps its key in the mirror.
        """
        if not (inserts > 0 and deletes == 0 and not self._careful and not self._merge_only
                and isinstance(data, (bytes, bytearray, SpilledSlice)) and not lettered
                and t.options.filter is None and not t.options.history
                and not t.options.soft_delete):
            return None
        known = self._as_sent.get((t.qualname, t.columns))
        if known is None:
            known = self._as_sent[t.qualname, t.columns] = (
                takes_rows_as_sent(cur.connection, t), has_user_triggers(cur.connection, t))
        as_sent, triggered = known
        # A user trigger (the invoice-to-memory one) sees one insert per key with the batch's
        # last values when the MERGE collapses the key's changes (docs: What the mirror
        # sees): with updates to follow, its table keeps the MERGE.
        if not as_sent or (triggered and updates):
            return None
        if isinstance(data, SpilledSlice):
            rows: bytes | memoryview = data.read()
        else:
            rows = memoryview(data)[len(COPY_HEADER):len(data) - len(COPY_TRAILER)]
        split = split_inserts(rows, bytes(c.name not in t.options.exclude for c in t.columns))
        if split is None:
            return None
        mirror_rows, rest, nrest = split
        try:
            with cur.copy(self._stmt("copy_mirror", t)) as copy:
                copy.write(mirror_rows)
        except psycopg.errors.UniqueViolation as exc:
            raise KeyPresent(t.qualname, exc) from exc
        return rest, nrest

    def merge_streamed(self, cur: psycopg.Cursor, t: MirrorTable,
                       data: bytes | bytearray | Pieces | SpilledRows | SpilledSlice,
                       unchanged: bool, res: ApplyResult, lettered: bool = False, inserts: int = 0,
                       updates: int = 0, deletes: int = 0) -> int | None:
        """Stage and merge streamed rows of one table: a chunk's, or a piece of one.

        lettered: the table has waiting dead letters. If one of the staged keys has one,
        nothing is merged and None returned: the key's change must queue behind its
        letters, and a letter needs the commit LSN, which only the commit brings.
        inserts, updates, deletes: how many of its rows are of each (the inserts may go into
        the mirror by COPY, see _copy_inserts, which finds any delete row itself).
        """
        split = self._copy_inserts(cur, t, inserts, updates, deletes, data, lettered)
        if split is not None:
            res.copies += 1
            data, rest = split
            if not rest:
                return 0
        if t.temp_stage:
            cur.execute(temp_staging_sql(t))
        else:
            cur.execute(clear_staging_sql(t))
        with cur.copy(self._stmt("copy", t)) as copy:
            _write(copy, data)
        res.copies += 1
        if lettered:
            cur.execute(self._stmt("queued", t), {"slot": self.slot, "table": t.qualname})
            found = cur.fetchone()
            assert found is not None  # select exists ...: always one row
            if found[1]:
                return None
        dead = self._merge_staged(cur, t, unchanged, 0)
        if not t.temp_stage:
            cur.execute(clear_staging_sql(t))
        return dead

    # -- merging a table's staged rows ---------------------------------------

    def _merge_staged(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool,
                      end_lsn: int) -> int:
        """Merge what is staged; returns the unchanged-TOAST rows set aside (dead letters)."""
        if unchanged and t.options.filter is not None:
            self._fill_moving_in(cur, t)
        if t.options.history:
            cur.execute(self._stmt("history", t), self._times)
        if not unchanged:
            cur.execute(self._stmt("merge", t), self._times)
            if t.options.soft_delete:
                cur.execute(self._stmt("soft_deleted", t), self._times)
            return 0
        cur.execute(self._stmt("dead", t), [self.slot, t.qualname, format_lsn(end_lsn)])
        dead = max(cur.rowcount, 0)
        if dead:
            log.warning("rows sent with unchanged TOAST values that the mirror cannot "
                        "supply were written to the dead letter table",
                        extra={"table": t.qualname, "rows": dead})
        cur.execute(self._stmt("merge_toast", t), self._times)
        if t.options.soft_delete:
            cur.execute(self._stmt("soft_deleted", t), self._times)
        return dead

    def _fill_moving_in(self, cur: psycopg.Cursor, t: MirrorTable) -> None:
        """Rows an update moves into the filter come with unchanged-TOAST values that no
        mirror row has: they are read from the source, now. The source may be ahead of the
        stream, but a value changed since then comes again in a later change of the stream
        (a changed large value is always sent), which overwrites it; a row deleted since
        is not found and its change goes to the dead letters like any unsuppliable one."""
        cur.execute(self._stmt("moving_in", t), self._times)
        found = cur.fetchone()
        keys = found[0] if found else []
        if not keys:
            return
        if self._source_conninfo is None:
            return
        try:
            if self._source is None or self._source.closed:
                self._source = psycopg.connect(self._source_conninfo, autocommit=True,
                                               prepare_threshold=None)
            row = self._source.execute(source_values_sql(t), [Jsonb(keys)]).fetchone()
        except psycopg.OperationalError as exc:
            # Connecting or reading: the same retry either way, so the message names both.
            raise ReplicatorError(
                ErrorKind.SOURCE_CONNECT, f"cannot read {t.source.qualname} on the source for "
                f"rows entering its [mappings] filter: {exc}",
                "the batch was rolled back; the replicator retries it after reconnecting",
            ) from exc
        values = row[0] if row else []
        log.info("rows entering the filter took unchanged large values from the source",
                 extra={"table": t.qualname, "rows": len(keys), "found": len(values)})
        if values:
            cur.execute(self._stmt("fill_moving_in", t), [Jsonb(values)])

    def _merge_table(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool, end_lsn: int,
                     res: ApplyResult) -> dict[str, int]:
        """Merge the table's staged rows; returns the changes dead-lettered, per op."""
        queued = False
        if self._lettered is not None and t.qualname in self._lettered:
            cur.execute(self._stmt("queued", t), {"slot": self.slot, "table": t.qualname})
            found = cur.fetchone()
            assert found is not None  # select exists ...: always one row
            if not found[0]:
                self._lettered.discard(t.qualname)
            queued = bool(found[1])
        failed: psycopg.Error | None = None
        if not queued:
            if not self._careful:
                res.dead(t.qualname, self._merge_staged(cur, t, unchanged, end_lsn))
                return {}
            try:
                with cur.connection.transaction():
                    dead = self._merge_staged(cur, t, unchanged, end_lsn)
                res.dead(t.qualname, dead)
                return {}
            except psycopg.Error as exc:
                if not rejects(exc):
                    raise
                failed = exc
        return KeyIsolation(self._stmt, self._merge_staged, self.slot, self.on_error,
                            self._lettered).run(cur, t, unchanged, end_lsn, res, failed)

class KeyPresent(Exception):
    """A key inserted by COPY is in the mirror already: apply its batch (or streamed
    transaction, at its commit) by MERGE."""

    def __init__(self, table: str, exc: psycopg.Error) -> None:
        super().__init__(str(exc))
        self.table, self.exc = table, exc


class _Rejected(Exception):
    """A change was rejected in a batch applied without savepoints: apply it again with them."""

    def __init__(self, exc: psycopg.Error) -> None:
        super().__init__(str(exc))
        self.exc = exc
