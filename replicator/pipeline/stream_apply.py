"""A streamed source transaction applied while it runs, in its own destination transaction.

The source streams a big transaction in chunks before it commits (protocol 2+). The
receiver keeps every chunk on disk (batch.StreamedTxn) and, for up to ``[destination]
max_streams`` transactions at a time, also hands each chunk to one of these: a thread with
its own destination connection and one open transaction, which COPYs the chunk into staging
and merges it into the mirror at once. At the source's commit only the last chunk, the
applied position and the COMMIT remain, and they run in the applier's turn, so the mirror
still changes in source commit order.

Why applying before the commit is safe: a chunk is applied only once every transaction that
committed before it arrived is applied (``barrier``: the batches handed to the applier
before it, and the one being filled, are applied). Its rows were locked at the source by
this transaction until it commits, so no transaction committed later (and applied meanwhile
by the applier) touches them; in the mirror each statement sees what committed before it
(READ COMMITTED). Each transaction stages its chunks in temporary tables of its own
(apply.temp_staging_sql), so its long life leaves no dead rows in the applier's staging.

Subtransactions map to savepoints. A savepoint is set where a subtransaction's first row
is merged (chunks are cut there, decoder marks), and a Stream Abort of a subtransaction
rolls back to its savepoint. Why that undoes exactly the rolled-back rows: the aborted
subtransaction (and its children, each aborted in its own message) was open from its first
row to its abort, and while a subtransaction is open only it or its children write, so
every row merged after its savepoint is one of theirs. The savepoints are never released
(a released subtransaction is rolled back only with its parent, whose savepoint comes
first). At most MAX_SAVEPOINTS per transaction: each one that writes holds a destination
subtransaction id, and past the 64 a backend caches every session's snapshots on the
destination get slower. A rollback the savepoints cannot express (more subtransactions than
that, or more than the decoder could mark) gives up instead.

Anything this path does not handle makes it give up (roll back, ``failed``), and the
transaction is applied from its files at commit like any other: DDL or TRUNCATE inside it,
a table with [mappings] options or a copy in progress, a key with waiting dead letters
(its changes queue behind them, apply.py), a rollback of a subtransaction that has no
savepoint, any destination error. Giving up loses nothing: the files hold it all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from .. import failpoints
from .._decode import Pieces, cut_rows
from ..batch import Batch, SpilledRows, SpilledSlice, TableRows
from ..destination import state
from ..destination.applier import Applier, ApplyResult, KeyPresent
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn
from ..schema import MirrorTable
from .handoff import Handoff

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2          # chunks waiting for this transaction's connection (on disk, not memory)
BARRIER_POLL = 0.002      # seconds between looks at the applied position
MAX_SAVEPOINTS = 32       # per destination transaction; a backend caches 64 subtransaction ids
KEEPALIVES = 4            # statements sent per idle_in_transaction_session_timeout of waiting
KEEPALIVE = "select 1"

SAVEPOINT = sql.SQL("savepoint {}")
ROLLBACK_TO = sql.SQL("rollback to savepoint {}")


def _savepoint_name(xid: int) -> sql.Identifier:
    return sql.Identifier(f"x{xid}")


class GiveUp(Exception):
    """This transaction is applied from its files at commit instead."""


@dataclass
class _Chunk:
    barrier: int                 # apply only once this many batches are applied
    tables: list[TableRows]      # data: the chunk's rows in this transaction's files
    marks: list[tuple[int, int]]  # (seq, xid) where the rows' (sub)transaction changes
    lost: bool = False           # more changes than the decoder could mark


@dataclass
class _SubAbort:
    xid: int                     # a subtransaction the source rolled back


@dataclass
class _Commit:
    end_lsn: int
    commit_ts: int
    source: state.SourceServer | None
    record_times: bool


_ABORT = object()


class StreamApply(threading.Thread):
    """One streamed transaction's destination transaction, open from its first chunk."""

    def __init__(self, xid: int, make_applier: Callable[[], Applier], handoff: Handoff,
                 eligible: Callable[[TableRows], bool]):
        super().__init__(name=f"stream-{xid}", daemon=True)
        self.xid = xid
        self._make_applier = make_applier
        self._handoff = handoff
        self._eligible = eligible
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._applier: Applier | None = None
        self.failed: BaseException | None = None   # set when it gave up (before any commit)
        self.chunks = 0
        self.rows = 0
        self.tables: set[str] = set()
        self._done = threading.Event()
        self._commit_error: BaseException | None = None
        self._lock = threading.Lock()
        self._finishing = False     # the commit began: a failure now has an unknown outcome
        self._committed = False
        self.result = ApplyResult()
        # Savepoints set, oldest first (subtransaction xids), each with the counts of what
        # was merged after it; _levels[0] is what came before any.
        self._savepoints: list[int] = []
        self._levels: list[ApplyResult] = [ApplyResult()]
        self._made = 0                  # savepoints ever set (each may hold an xid)
        self._seen: set[int] = {xid}    # (sub)transactions whose rows were merged
        self._unmapped: set[int] = set()  # of those, with rows merged but no savepoint
        self._blind = False             # marks were lost: some rows' xids are unknown
        self.savepoint_rollbacks = 0
        self._temp: dict[str, MirrorTable] = {}   # tables staged in temporary tables
        self._lettered: set[str] = set()   # mirror tables with waiting dead letters
        self._keepalive: float | None = None   # seconds between statements while waiting
        self._waited_from = 0.0

    # -- the receiver's side ----------------------------------------------------

    def submit(self, barrier: int, tables: list[TableRows], marks: list[tuple[int, int]],
               lost: bool, wait: Callable[[], None]) -> None:
        """Queue a chunk; ``wait`` runs while the queue is full (the receiver's status)."""
        if any(not self._eligible(tr) for tr in tables):
            self.give_up("a table that only the applier handles (options, copy or letters)")
        self._enqueue(_Chunk(barrier, tables, marks, lost), wait)

    def abort_subxact(self, xid: int, wait: Callable[[], None]) -> None:
        """The source rolled a subtransaction back: after the chunks queued before it."""
        self._enqueue(_SubAbort(xid), wait)

    def _enqueue(self, item: object, wait: Callable[[], None]) -> None:
        while self.failed is None:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                wait()

    def give_up(self, why: str, quiet: bool = False) -> None:
        """Roll back; the transaction is applied from its files at commit.

        Too late once its commit began (then it commits, or the session starts over).
        """
        with self._lock:
            if self._finishing or self.failed is not None:
                return
            self.failed = GiveUp(why)
        if not quiet:
            log.info("streamed transaction applied at its commit instead", extra={
                "xid": self.xid, "reason": why})
        self._drain()
        self._put(_ABORT)

    def abort(self) -> None:
        """The source rolled it back, or the session ends: roll back, quietly."""
        self.give_up("aborted", quiet=True)

    def _put(self, item: object) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            pass    # the thread is busy with a chunk; it sees `failed` before the next one

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # -- the applier's side -------------------------------------------------------

    def commit(self, end_lsn: int, commit_ts: int, source: state.SourceServer | None,
               record_times: bool) -> bool:
        """In the applier's turn: apply what is left, the position, COMMIT.

        False if it gave up before the commit began (apply the transaction from its
        files instead). A failure once the commit began raises: its outcome is not
        known, so the session starts over from the stored position.
        """
        item = _Commit(end_lsn, commit_ts, source, record_times)
        while self.failed is None and self.is_alive():
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                continue
        self._done.wait()
        if self._commit_error is not None:
            raise self._commit_error
        return self._committed

    @property
    def committed(self) -> bool:
        """Whether its own destination transaction committed it (not the fallback)."""
        return self._committed

    def close(self) -> None:
        """Roll back unless its commit began (the applier then sees that through)."""
        self.abort()
        if self._finishing or not self.is_alive():
            return
        self.join(timeout=10)
        if self._applier is not None and self.is_alive():
            self._applier.abort()

    # -- the thread ------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._applier = self._make_applier()
            conn = self._applier.connect()
            with conn.transaction(), conn.cursor() as cur:
                self._begin(cur)
                while True:
                    item = self._next(cur)
                    if item is _ABORT or self.failed is not None:
                        raise psycopg.Rollback()
                    if isinstance(item, _Commit):
                        with self._lock:
                            if self.failed is not None:
                                raise psycopg.Rollback()
                            self._finishing = True
                        self._finish(cur, item)
                        break
                    if isinstance(item, _SubAbort):
                        self._roll_back_subxact(cur, item.xid)
                    else:
                        self._apply(cur, item)
            self._committed = self._finishing
            if self._committed:
                failpoints.hit(failpoints.STREAM_COMMITTED)
        except BaseException as exc:  # noqa: BLE001 - every failure means: use the files
            if self._finishing:
                self._commit_error = exc if isinstance(exc, ReplicatorError) else \
                    ReplicatorError(
                        ErrorKind.DESTINATION_CONNECT,
                        f"committing streamed transaction {self.xid} failed: {exc}",
                        "the replicator reconnects and replays from the applied position")
            elif self.failed is None:
                with self._lock:
                    self.failed = exc
                log.info("streamed transaction applied at its commit instead", extra={
                    "xid": self.xid, "reason": str(exc) if isinstance(exc, GiveUp)
                    else f"{type(exc).__name__}: {exc}".strip()})
        finally:
            self._done.set()
            if self._applier is not None:
                self._applier.close()

    def _begin(self, cur: psycopg.Cursor) -> None:
        applier = self._applier
        assert applier is not None
        cur.execute("set local synchronous_commit = on")
        if applier.limits is not None:
            applier.limits.set_local(cur, fence=applier.fence)
        elif applier.fence is not None:
            applier.fence.check(cur)
        # Open across the source transaction's pauses, however long. The server still ends
        # it once idle for idle_in_transaction_session_timeout (after a kill behind a pooler
        # that keeps the connection, its row locks would otherwise stay for ever); alive, it
        # never is: while it waits it sends a statement every KEEPALIVES-th of that.
        cur.execute("select setting::int8 from pg_settings "
                    "where name = 'idle_in_transaction_session_timeout'")
        row = cur.fetchone()
        idle_ms = int(row[0]) if row else 0
        self._keepalive = idle_ms / 1000 / KEEPALIVES if idle_ms > 0 else None

    def _next(self, cur: psycopg.Cursor) -> Any:   # what _queue holds
        """The next chunk, abort or commit; the transaction kept busy while it waits."""
        idle_from = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self._keepalive)
                break
            except queue.Empty:
                cur.execute(KEEPALIVE)
                idle_from = time.monotonic()
        # A barrier wait next is more of the same idle time.
        self._waited_from = idle_from
        return item

    def _apply(self, cur: psycopg.Cursor, chunk: _Chunk) -> None:
        applier = self._applier
        assert applier is not None
        while self._handoff.applied < chunk.barrier:
            if self.failed is not None:
                raise psycopg.Rollback()
            time.sleep(BARRIER_POLL)
            if self._keepalive is not None and \
                    time.monotonic() - self._waited_from >= self._keepalive:
                cur.execute(KEEPALIVE)
                self._waited_from = time.monotonic()
        # Read again for every chunk: a transaction applied since the last one may have
        # left a letter on a key this chunk writes (it committed before the chunk came).
        self._lettered = state.lettered_tables(cur, applier.state_schema, applier.slot)
        cuts = self._cuts(chunk)
        if not cuts:
            for tr in chunk.tables:
                self._merge(cur, tr, tr.data, (tr.rows, tr.inserts, tr.updates, tr.deletes))
        else:
            pieces = []
            for tr in chunk.tables:
                assert isinstance(tr.data, SpilledSlice)
                pieces.append((tr, tr.data, cut_rows(tr.data.read(), [seq for seq, _ in cuts])))
            for i in range(len(cuts) + 1):
                if i:
                    xid = cuts[i - 1][1]
                    cur.execute(SAVEPOINT.format(_savepoint_name(xid)))
                    self._savepoints.append(xid)
                    self._levels.append(ApplyResult())
                for tr, data, cut in pieces:
                    offset, size, *counts = cut[i]
                    if counts[0]:
                        self._merge(cur, tr, data.part(offset, size), tuple(counts))
        self.chunks += 1
        failpoints.hit(failpoints.STREAM_CHUNK_APPLIED)

    def _cuts(self, chunk: _Chunk) -> list[tuple[int, int]]:
        """Where the chunk's pieces begin: the first rows of subtransactions new here.

        A chunk's marks are its first changes of subtransaction, in order, so they are
        right even when later ones were lost; but from then on a mark may be a
        subtransaction's second appearance (its first was lost), and a savepoint there
        would leave its earlier rows in place on a rollback: no new savepoints then.
        """
        cuts = []
        for seq, xid in chunk.marks:
            if xid in self._seen:
                continue
            self._seen.add(xid)
            if self._made < MAX_SAVEPOINTS and not self._blind:
                self._made += 1
                cuts.append((seq, xid))
            else:
                self._unmapped.add(xid)
        self._blind = self._blind or chunk.lost
        return cuts

    def _merge(self, cur: psycopg.Cursor, tr: TableRows,
               data: bytes | Pieces | SpilledRows | SpilledSlice, counts: tuple[int, ...]) -> None:
        applier = self._applier
        assert applier is not None
        level = self._levels[-1]
        table = self._temp.get(tr.table.qualname)
        if table is None or table.columns != tr.table.columns:
            table = self._temp[tr.table.qualname] = replace(tr.table, temp_stage=True)
        try:
            dead = applier.merge_streamed(cur, table, data, bool(tr.unchanged), level,
                                          lettered=tr.table.qualname in self._lettered,
                                          inserts=counts[1], updates=counts[2],
                                          deletes=counts[3])
        except KeyPresent as exc:
            # The constraint, not the key: the log is read by more people than the mirror.
            raise GiveUp(f"an insert of a key the mirror has already ({exc.table}, "
                         f"constraint {exc.exc.diag.constraint_name})") from exc
        # Dead letters need the commit LSN: the applier writes them at the commit.
        if dead is None:
            raise GiveUp("a key with a waiting dead letter")
        if dead:
            # Unchanged-TOAST values the mirror cannot supply.
            raise GiveUp("a change the mirror cannot complete")
        rows, inserts, updates, deletes = counts
        level.rows += rows
        level.count(tr.table.qualname, inserts, updates, deletes)
        self.tables.add(tr.table.source.qualname)

    def _roll_back_subxact(self, cur: psycopg.Cursor, xid: int) -> None:
        if xid in self._savepoints:
            at = self._savepoints.index(xid)
            cur.execute(ROLLBACK_TO.format(_savepoint_name(xid)))
            # The later savepoints are gone with it; what follows counts one level down.
            del self._savepoints[at:]
            del self._levels[at + 1:]
            self.savepoint_rollbacks += 1
            failpoints.hit(failpoints.STREAM_SAVEPOINT_ROLLED_BACK)
            log.debug("subtransaction rolled back to its savepoint", extra={
                "xid": self.xid, "subxid": xid})
        elif xid in self._unmapped or (self._blind and xid not in self._seen):
            raise GiveUp("a subtransaction without a savepoint rolled back")
        # Otherwise none of its rows was merged, or a rollback to an earlier savepoint
        # (its parent's or an older child's of the same rollback) undid them already.

    def _finish(self, cur: psycopg.Cursor, item: _Commit) -> None:
        applier = self._applier
        assert applier is not None
        for level in self._levels:
            self.result.rows += level.rows
            self.result.copies += level.copies
            for table, ops in level.per_op.items():
                self.result.count(table, ops["insert"], ops["update"], ops["delete"])
        self.rows = self.result.rows
        state.record_applied(cur, applier.state_schema, applier.slot, item.end_lsn,
                             item.source)
        if item.record_times and self.tables:
            state.record_commit_times(cur, applier.state_schema, applier.slot,
                                      sorted(self.tables), item.commit_ts)
        failpoints.hit(failpoints.STREAM_BEFORE_COMMIT)
        log.debug("streamed transaction commits", extra={
            "xid": self.xid, "chunks": self.chunks, "lsn": format_lsn(item.end_lsn)})


def apply_finishing(batch: Batch, applier: Applier,
                    source: state.SourceServer | None) -> ApplyResult:
    """A streamed transaction's own batch, in the applier's turn (source commit order).

    Its open destination transaction commits, or, if that one gave up, the
    transaction is applied from its files like any other batch.
    """
    worker, fallback = batch.stream, batch.fallback
    assert worker is not None and fallback is not None
    started = time.monotonic()
    if worker.commit(batch.end_lsn, batch.last_commit_ts, source, applier.commit_times):
        worker.result.seconds = time.monotonic() - started
        log.debug("streamed transaction applied while it ran", extra={
            "xid": worker.xid, "chunks": worker.chunks, "lsn": format_lsn(batch.end_lsn)})
        return worker.result
    worker.join()   # done with the files before they are read here
    st, commit_lsn, seq_base, keep = fallback
    batch.ops = st.commit(commit_lsn, seq_base, keep)
    batch.rows = sum(tr.rows for tr in batch.table_rows())
    return applier.apply(batch, source=source)
