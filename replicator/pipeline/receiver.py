"""The receiver: reads and decodes the stream, closes batches, never goes silent.

It runs on the session's calling thread: it follows Relation and Truncate messages and
streamed (in-progress) transactions, and closes batches at transaction boundaries, which
go to the applier thread through a Handoff. What it tells the source (status updates,
heartbeats) is feedback.py's; tables copied while the stream goes on are table_copies.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import psycopg

from .. import deadline
from .._decode import (
    EV_COMMIT,
    EV_COPY_DONE,
    EV_ERROR,
    EV_KEEPALIVE,
    EV_LIMIT,
    EV_RELATION,
    EV_STREAM_ABORT,
    EV_STREAM_COMMIT,
    EV_STREAM_START,
    EV_STREAM_STOP,
    EV_TRUNCATE,
    EV_WOULD_BLOCK,
    Decoder,
)
from ..batch import (
    AlterTable,
    Batch,
    Rows,
    SpilledSlice,
    StreamedTxn,
    SyncDone,
    SyncStart,
    TableRows,
    Truncate,
)
from ..classify import classify_connect
from ..destination import watchdog
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn
from ..schema import Column, MirrorTable, check_replicable, column_origins, read_table
from ..source.catalog import column_type, publication_members, publication_tables
from ..source.connection import ReplicationConnection
from .feedback import Feedback
from .handoff import Handoff, Shared
from .stream_apply import StreamApply
from .table_copies import TableCopies

log = logging.getLogger(__name__)

PUMP_MESSAGES = 20000      # messages decoded between looks at memory, status and signals
BUSY_WAIT = 0.005          # socket wait while a batch is ready but the applier is busy


class Receiver:
    """One session's stream, from START_REPLICATION until it stops, catches up or fails.

    ``target`` is the LSN to catch up to (or None: run on); ``stream_applier`` makes the
    Applier of a streamed transaction applied while it runs (None: never).
    """

    def __init__(self, shared: Shared, repl: ReplicationConnection, decoder: Decoder,
                 handoff: Handoff, catalog: psycopg.Connection,
                 mirrors: dict[tuple[str, str], MirrorTable], sync_lsns: dict[tuple[str, str], int],
                 binary: bool, target: int | None,
                 stream_applier: Callable[[], object] | None = None):
        config = shared.config
        self.cfg = config
        # The pipeline's lease: the receiver's own writes (live copies, removed tables).
        self.fence = fence = shared.fence
        # Makes the Applier of a streamed transaction applied while it runs (None: never).
        self.stream_applier = stream_applier
        self.progress = progress = shared.progress
        self.metrics = metrics = shared.metrics
        self.stop_requested = shared.stop
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
        self.layouts: dict[int, tuple | None] = {}
        # The layout each mirror was last altered to in this session.
        self.altered: dict[tuple[str, str], tuple] = {}
        self.types: dict[tuple[int, int], tuple[str, int]] = {}
        self.target = target
        self.batch = Batch()
        # In-progress transactions the source streams in chunks, by top-level xid, and
        # the one whose chunk is being read (between Stream Start and Stream Stop).
        self.streams: dict[int, StreamedTxn] = {}
        self.stream: StreamedTxn | None = None
        self.workers: list[StreamApply] = []
        self.poll_conn: psycopg.Connection | None = None
        self.feedback = Feedback(config, repl, progress, catalog, self._poll_conn,
                                 self._nothing_pending, probing=target is not None)
        # Copies running while the stream goes on (added tables, resyncs).
        self.copies = TableCopies(config, metrics, catalog, self._poll_conn, fence)
        # Decoded rows kept in memory before spilling: a quarter of the budget,
        # since a batch also exists as bytes handed to the applier, and one
        # more batch can wait for it.
        self.memory_limit = self.cfg.destination.max_memory_mb * (1 << 20) // 4

    # -- main loop -------------------------------------------------------

    def loop(self) -> None:
        try:
            # Opened now, while the destination is known to answer: opened later through a
            # dead connection it would wait its connect_timeout, not the stall deadline.
            self._poll_conn()
            self.progress.restart(self.feedback.wal_position("pg_current_wal_insert_lsn()"))
            self._loop()
        finally:
            # Open streamed transactions are sent again from their start by the next session.
            for worker in self.workers:
                worker.close()
            for st in self.streams.values():
                st.close()
            self.streams.clear()
            self.copies.stop()
            if self.poll_conn is not None:
                self.poll_conn.close()

    def _loop(self) -> None:
        dec, stop, feedback = self.dec, self.stop_requested, self.feedback
        while True:
            self._check_applier()
            between = not (dec.in_txn or dec.in_stream)
            if (stop.is_set() or self._caught_up()) and between:
                self._finish()
                return
            if between:
                self._sync_progress()
            ev = dec.pump(PUMP_MESSAGES)
            feedback.received = max(feedback.received, dec.wal_start)
            if dec.wal_end > self.metrics.wal_end:
                self.metrics.wal_end = dec.wal_end
            if ev != EV_WOULD_BLOCK:
                feedback.heard()
            if ev == EV_WOULD_BLOCK:
                feedback.check_silence()
                self.metrics.alive()
                self._maybe_close(idle=True)
                feedback.maybe_send()
                feedback.maybe_heartbeat()
                waited = time.monotonic()
                # A batch left waiting for a busy applier goes over the moment the
                # applier is done (batches close when it is idle); its end does not wake
                # this wait, so look again soon. Catching up, the batch being applied
                # may be the last one: the same.
                busy = (not self.batch.empty and not dec.in_txn) or (
                    self.target is not None and not self.handoff.idle())
                self.repl.wait_readable(BUSY_WAIT if busy else 0.2)
                feedback.listened(time.monotonic() - waited)
            elif ev == EV_COMMIT:
                if not dec.skipping:
                    self.batch.commit(dec.end_lsn, dec.commit_ts, dec.final_lsn)
                    if self.batch.txns == 1:
                        self.metrics.received_commit(dec.end_lsn, dec.commit_ts)
                self._maybe_close()
                feedback.maybe_send()
            elif ev == EV_KEEPALIVE:
                self._on_keepalive()
            elif ev == EV_RELATION:
                self._on_relation(dec.event)
            elif ev == EV_TRUNCATE:
                self._on_truncate(dec.event)
            elif ev == EV_LIMIT:
                self.metrics.alive()
                feedback.maybe_send()
            elif ev == EV_STREAM_START:
                self._on_stream_start(dec.event)
            elif ev == EV_STREAM_STOP:
                self._on_stream_stop()
            elif ev == EV_STREAM_COMMIT:
                self._on_stream_commit(dec.event)
                self._maybe_close()
                feedback.maybe_send()
            elif ev == EV_STREAM_ABORT:
                self._on_stream_abort(dec.event)
            if dec.buffered_bytes > self.memory_limit:
                # A transaction larger than memory: its rows go to temporary
                # files and are streamed into staging when the batch applies.
                if self.stream is not None:
                    moved = self._stream_take()
                else:
                    moved = self.batch.spill(dec.take())
                log.info("batch spilled to disk", extra={"bytes": moved,
                                                         "limit_bytes": self.memory_limit})
            elif ev in (EV_COPY_DONE, EV_ERROR):
                pgconn = self.repl.pgconn
                reason = self.repl.end_result() or (pgconn.error_message.decode(
                    'utf-8', 'replace').strip() if pgconn is not None else "")
                raise ReplicatorError(
                    ErrorKind.SOURCE_CONNECT, f"the source ended the replication stream: {reason}",
                    "the replicator reconnects and resumes from the last applied position")
            # Begin, Origin, Type and logical decoding Messages need nothing here.

    def _caught_up(self) -> bool:
        # Changes received after the target need not be waited for: _finish applies the
        # whole transactions already batched and confirms only what was applied. Waiting for
        # nothing to be pending never ends under a source that writes all the time.
        return self.target is not None and self.progress.applied_lsn >= self.target \
            and not self.copies

    def _check_applier(self) -> None:
        if self.handoff.error is not None:
            raise self.handoff.error

    # -- batches ---------------------------------------------------------

    def _pending_rows(self) -> int:
        return self.batch.rows + self.dec.batch_rows + self.batch.spilled_rows

    def _maybe_close(self, idle: bool = False) -> None:
        """Hand the batch over at a transaction boundary when it is time."""
        if self.dec.in_txn or self.dec.in_stream or self.batch.empty:
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
        if not self._room(block):
            return      # the applier is busy and the batch is not full: keep filling it
        batch = self.batch
        batch.add_rows(self.dec.take(), self.by_relid)
        if not batch.end_lsn:
            # Only table-sync operations, no transaction: the position stays
            # (the state never stores a lower one than it has).
            batch.end_lsn = self.progress.applied_lsn
        self._offer(batch)
        self.batch = Batch()

    def _room(self, block: bool) -> bool:
        while not self.handoff.has_room(timeout=1.0 if block else 0.0):
            self._check_applier()
            if not block:
                return False
            # Backpressure: stop reading, but keep the source from timing us out.
            self.feedback.send()
        return True

    def _offer(self, batch: Batch) -> None:
        # Only this thread offers: the room _room() found cannot go away before this.
        if not self.handoff.offer(batch, timeout=0.0):
            self._check_applier()
            raise ReplicatorError(ErrorKind.INTERNAL,
                                  "the hand-off refused a batch it had room for",
                                  "report this as a bug; the batch is replayed after the restart")

    def _finish(self) -> None:
        # A copy that finished in the meantime is handed over with this last
        # batch, so it is not copied again at the next start.
        self._collect_syncs()
        if not self.batch.empty:
            self._close(block=True)
        while not self.handoff.wait_idle(1.0):
            self._check_applier()
            self.feedback.send()
        self._check_applier()
        # Only what is on the destination's disk is confirmed: the last batches committed
        # without waiting for it, so flush them before the last status update.
        if self.progress.undurable:
            self.feedback.check_flush(force=True)
        self.feedback.send()
        log.info("stopped" if self.stop_requested.is_set() else "caught up",
                 extra={"applied_lsn": format_lsn(self.progress.applied_lsn)})

    def _nothing_pending(self) -> bool:
        return (not self.dec.in_txn and not self.dec.in_stream and self.batch.empty
                and self.dec.batch_rows == 0 and self.handoff.idle())

    def _on_keepalive(self) -> None:
        wal_end = self.dec.wal_end
        if self._nothing_pending() and wal_end > self.progress.applied_lsn:
            # Everything up to wal_end was sent and nothing of it is ours:
            # record that in the destination before confirming it, so the
            # slot stops holding WAL for tables we do not replicate.
            marker = Batch(end_lsn=wal_end)
            self.handoff.offer(marker, timeout=0.0)
        if self.dec.reply_requested:
            self.feedback.send()

    # -- relations and truncates ------------------------------------------

    def _on_relation(self, event: tuple) -> None:
        relid, nspname, relname, replident, cols, _xid = event
        key = (nspname, relname)
        t = self.mirrors.get(key)
        if t is None and key not in self.copies.refused \
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
        if key in self.copies:
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
        # In a streamed transaction (its commit LSN not known yet) it applies with the
        # transaction: the Stream Commit drops both, if the transaction was applied already.
        applies = self.dec.in_stream or (
            not self.dec.skipping and self.dec.final_lsn >= self.sync_lsns.get(key, 0))
        alter = applies and self.altered.get(key) != layout
        if self.layouts.get(relid) == layout and not alter:
            return
        # Rows already buffered belong to the old layout: apply them first.
        if self.stream is not None and not differs:
            # A streamed transaction's first mention of a table since the session began:
            # not its own DDL (that would be a new layout), so the mirror's catch-up to it
            # goes with the committed transactions, and the streamed rows after it wait
            # for that batch (the barrier counts it).
            self._stream_take()
            sink = self.batch
        else:
            sink = self._sink()
        if differs:
            source = dataclasses.replace(t.source, columns=columns, key=key_cols)
            t = MirrorTable(source, t.dest_schema, t.dest_name, t.state_schema, t.binary,
                            columns=columns, options=t.options)
            self.mirrors[key] = t
        if alter:
            self.altered[key] = layout
            origins = column_origins(self.catalog, t.source.oid, columns)
            sink.ops.append(AlterTable(t, origins))
            if differs:
                log.info("table columns changed at the source", extra={
                    "table": t.source.qualname, "columns": [c.name for c in columns]})
        elif key not in self.copies:
            # Rows of skipped transactions are parsed (to be dropped) with
            # this layout, and the next applied ones may use it too.
            sink.ops.append(AlterTable(t, alter=False))
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

    def _on_truncate(self, event: tuple) -> None:
        options, relids, xid = event
        # Like rows: a truncate committed before a table's copy snapshot is in
        # the copy already (replaying it would empty the copied mirror). In a
        # streamed transaction that is decided at its commit.
        streamed = self.dec.in_stream
        lsn = 0 if streamed else self.dec.final_lsn
        tables = [t for t in (self.by_relid[r] for r in relids if r in self.by_relid)
                  if streamed or lsn >= self.sync_lsns.get((t.source.schema, t.source.name), 0)]
        if not tables:
            return
        self._sink().ops.append(Truncate(tables, bool(options & 1), bool(options & 2),
                                         lsn=lsn, seq=self.dec.seq, xid=xid or 0))

    def _sink(self) -> Batch:
        """Where the rows decoded so far go, and the operation that follows them.

        The streamed transaction whose chunk is being read, or the batch. Rows
        of a streamed transaction always go to disk: it may be any size.
        """
        if self.stream is not None:
            if self.stream.worker is not None:
                # DDL, a TRUNCATE or a table copy inside it: applied at its commit instead.
                self.stream.worker.give_up("DDL, TRUNCATE or a table copy inside it")
            pending = self.stream.pending
            pending.spill(self.dec.take(), self.by_relid)
            pending.add_rows([], self.by_relid)
            return pending
        self.batch.add_rows(self.dec.take(), self.by_relid)
        return self.batch

    # -- streamed (in-progress) transactions ---------------------------------

    def _on_stream_start(self, event: tuple) -> None:
        xid, first = event
        # What was decoded before belongs to transactions already committed.
        self.batch.add_rows(self.dec.take(), self.by_relid)
        st = self.streams.get(xid)
        if first == (st is not None):
            raise ReplicatorError(
                ErrorKind.PROTOCOL,
                f"the source {'restarted' if first else 'continued'} streamed transaction {xid}"
                f" {'it had begun already' if first else 'whose start this session never saw'}",
                "the replicator reconnects and receives it again from its start")
        if st is None:
            st = self.streams[xid] = StreamedTxn(xid, first_seq=self.dec.seq)
            running = sum(1 for s in self.streams.values()
                          if s.worker is not None and s.worker.failed is None)
            if self.stream_applier is not None and running < self.cfg.destination.max_streams:
                st.worker = StreamApply(xid, self.stream_applier,  # type: ignore[arg-type]
                                        self.handoff, self._applies_early)
                st.worker.start()
                # A finished one has nothing left to close or give up (its batch, if any,
                # holds it until applied): a long session would keep one per transaction.
                self.workers = [w for w in self.workers if w.is_alive()]
                self.workers.append(st.worker)
        st.chunks += 1
        self.stream = st

    def _stream_take(self) -> int:
        """The chunk's rows decoded so far: to disk, and to its open destination transaction."""
        st = self.stream
        assert st is not None
        taken = self.dec.take()
        if st.worker is None or st.worker.failed is not None:
            return st.pending.spill(taken, self.by_relid)
        slices = st.pending.spill_slices(taken, self.by_relid)
        # Applied once every batch handed over so far, and the one being filled (the
        # transactions committed before these rows arrived), is applied.
        barrier = self.handoff.offered + (0 if self.batch.empty else 1)
        marks, lost = self.dec.taken_marks
        st.worker.submit(barrier, slices, marks, lost, self._while_chunks_wait)
        return sum(tr.data.size for tr in slices if isinstance(tr.data, SpilledSlice))

    def _while_chunks_wait(self) -> None:
        # The chunks waiting may wait for the batch being filled: hand it over (the
        # decoder's rows were just taken, so it holds committed transactions only).
        self._check_applier()
        self.feedback.send()
        self._close(block=False)

    def _applies_early(self, tr: TableRows) -> bool:
        """Whether a streamed chunk's rows of this table may be merged before the commit.

        Not with a row filter, soft deletes or history (they need the commit LSN and
        time), nor for a table being copied; nor if its copy may hold this transaction. A
        transaction the source streams has not committed where the source decodes, which
        is past every position the stream has delivered: so its commit comes after the
        highest dataStart received, and a copy whose snapshot is no later holds nothing of
        it. Not the current frame's dataStart: a Relation message sent again inside the
        chunk (after an ANALYZE, or for another table's first change) may carry 0.
        """
        t = tr.table
        key = (t.source.schema, t.source.name)
        o = t.options
        return o.filter is None and not o.soft_delete and not o.history and key not in \
            self.copies and 0 < self.sync_lsns.get(key, 0) <= self.feedback.received

    def _on_stream_stop(self) -> None:
        st = self.stream
        if st is None:
            raise ReplicatorError(ErrorKind.PROTOCOL, "Stream Stop without Stream Start",
                                  "the replicator reconnects; report this if it repeats")
        self._stream_take()
        st.last_seq = self.dec.seq
        self.stream = None

    def _on_stream_abort(self, event: tuple) -> None:
        xid, subxid, _lsn, _ts = event
        st = self.streams.get(xid)
        if st is None:
            return      # nothing of it reached this session
        if subxid == xid:
            del self.streams[xid]
            if st.worker is not None:
                st.worker.abort()
            st.close()
        else:
            # Its open destination transaction rolls back to the subtransaction's
            # savepoint; the files drop its rows too, for a commit applied from them.
            if st.worker is not None and st.worker.failed is None:
                st.worker.abort_subxact(subxid, self._while_chunks_wait)
            st.abort_subxact(subxid)

    def _on_stream_commit(self, event: tuple) -> None:
        xid, _flags, commit_lsn, end_lsn, commit_ts = event
        st = self.streams.pop(xid, None)
        if st is None:
            raise ReplicatorError(
                ErrorKind.PROTOCOL, f"Stream Commit of transaction {xid}, never streamed",
                "the replicator reconnects and receives it again from its start")
        if commit_lsn < self.dec.skip_before:
            # In the destination already: replayed from before the applied position.
            if st.worker is not None:
                st.worker.close()
            st.close()
            return
        self.batch.add_rows(self.dec.take(), self.by_relid)
        base = self.dec.reserve_seq(st.span)
        sync_lsns = dict(self.sync_lsns)

        def keep(t: MirrorTable) -> bool:
            return commit_lsn >= sync_lsns.get((t.source.schema, t.source.name), 0)

        if st.worker is not None and st.worker.failed is None:
            # Its own batch, after everything committed before it: the applier commits
            # its open destination transaction in turn (or applies it from the files).
            if not self.batch.empty:
                self._close(block=True)
            own = Batch(stream=st.worker, fallback=(st, commit_lsn, base, keep))
            own.commit(end_lsn, commit_ts, commit_lsn)
            self._room(block=True)
            self._offer(own)
        else:
            if st.worker is not None:
                st.worker.close()
            try:
                ops = st.commit(commit_lsn, base, keep)
            finally:
                st.close()
            self.batch.ops.extend(ops)
            self.batch.rows += sum(tr.rows for op in ops if isinstance(op, Rows)
                                   for tr in op.tables)
            self.batch.commit(end_lsn, commit_ts, commit_lsn)
            self.metrics.streamed_applied(False)
        if self.batch.txns <= 1:
            self.metrics.received_commit(end_lsn, commit_ts)
        log.debug("streamed transaction committed", extra={
            "xid": xid, "chunks": st.chunks,
            "commit_lsn": format_lsn(commit_lsn)})

    # -- tables copied while the stream runs --------------------------------

    def _sync_progress(self) -> None:
        """Between transactions: look for new work, and hand finished copies over."""
        if self.copies.due():
            work = self.copies.poll(self.mirrors)
            for key in work.added:
                self._start_sync(key)
            if work.gone:
                self._remove(work.gone)
            for key in work.resync:
                log.info("resync requested", extra={"table": self.mirrors[key].source.qualname})
                self._start_sync(key)
        self._collect_syncs()

    def _collect_syncs(self) -> None:
        for key, t, lsn in self.copies.finished():
            # Rows decoded so far were held; from here on the decoder drops
            # what the copy already has.
            self.batch.add_rows(self.dec.take(), self.by_relid)
            self.batch.ops.append(SyncDone(t, lsn))
            self.sync_lsns[key] = lsn
            if t.relid and t.relid in self.by_relid:
                self.dec.set_skip(t.relid, lsn)

    def _poll_conn(self) -> psycopg.Connection:
        if self.poll_conn is None:
            dst = self.cfg.destination
            try:
                # Watched: a dead connection is shut in seconds, not stall_timeout
                # (destination/watchdog.py).
                self.poll_conn = watchdog.connect(
                    dst.conninfo(), deadline.BatchLimits.of(dst).answer_timeout, side="destination",
                    setting="[destination] stall_timeout", autocommit=True)
            except psycopg.OperationalError as exc:
                raise classify_connect(exc, dst.conninfo(), settings=dst) from exc
        return self.poll_conn

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
        self.copies.mark_removed(keys)

    def _start_sync(self, key: tuple[str, str]) -> None:
        t = self.mirrors.get(key)
        if t is None:
            members = publication_members(self.catalog, self.cfg.source.publication)
            source = dataclasses.replace(read_table(self.catalog, *key),
                                         membership=members.get(key, ""))
            try:
                check_replicable(source)
            except ReplicatorError as exc:
                self.copies.refused.add(key)
                log.error("table added to the publication cannot be replicated",
                          extra={"table": source.qualname, "error": exc.message, "hint": exc.hint})
                return
            if self.binary and not all(c.builtin for c in source.columns):
                raise ReplicatorError(
                    ErrorKind.PROTOCOL, f"table {source.qualname} added to the publication has "
                    "user-defined column types", "the replicator restarts in text mode to copy it")
            target = self.cfg.target(*key)
            taken = next((m.source.qualname for m in self.mirrors.values()
                          if (m.dest_schema, m.dest_name) == target), None)
            if taken is not None:
                self.copies.refused.add(key)
                log.error("table added to the publication cannot be replicated", extra={
                    "table": source.qualname, "error": f"{taken} is mirrored to "
                    f"{'.'.join(target)} already", "hint": "give it another name in "
                    "[mappings] and restart"})
                return
            t = MirrorTable(source, *target,
                            state_schema=self.cfg.destination.state_schema, binary=self.binary,
                            options=self.cfg.options(*key))
            self.mirrors[key] = t
            log.info("table added to the publication", extra={"table": source.qualname})
        self._sink()
        for worker in self.workers:
            # Its copy would wait for their row locks, held until their commits.
            worker.give_up("a table copy started")
        op = SyncStart(t)
        self.batch.ops.append(op)
        self.sync_lsns[key] = 0
        if t.relid and t.relid in self.by_relid:
            self.dec.set_skip(t.relid, 0)
        self.copies.start(key, t, op)
