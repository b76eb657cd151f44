"""One connected session: checks, the slot, the copies it needs, then the stream until it ends.

The steps run in this order, each on what the one before established:
the source's tables and the destination's state (``_tables``, ``_destination``), the slot
and the cluster it belongs to (``_slot``), tables that left or must be copied
(``_forget_gone``, ``_copy``), then the stream: the receiver on the calling thread, the
applier thread beside it (``_stream``). Whatever the session opened is closed when it ends,
the batch in flight finished or cancelled first (``_stop_applier``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import psycopg

from .. import deadline, failpoints
from .._decode import Decoder
from ..batch import SyncDone
from ..classify import classify, classify_connect
from ..config.settings import Config
from ..destination import access, state
from ..destination.applier import Applier, ApplyResult
from ..destination.indexes import IndexBuilder
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn, pg_now
from ..schema import MirrorTable
from ..source.connection import TEXT_MODE_OPTIONS, ReplicationConnection, protocol_for
from .backfill import Backfill, CopyStopped
from .handoff import Handoff, Shared
from .preflight import (
    check_destination_server,
    check_replication_role,
    check_slot,
    check_timeline,
    discover_tables,
)
from .receiver import Receiver
from .stream_apply import apply_finishing

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass
class Synced:
    """What the destination's state says of the mirrors when the session starts."""
    tables: dict[str, tuple[str, int, str]]   # source table -> (state, sync LSN, mirror)
    identities: dict[str, str | None]          # source table -> its recorded identity
    applied: int | None                        # the applied position, None before the first

    @property
    def reached(self) -> int | None:
        """How far into the source's WAL the mirror reflects it: the applied position, or a
        copied table's snapshot if that is later (None: nothing yet)."""
        copied = [lsn for st, lsn, _m in self.tables.values()
                  if lsn and st in (state.COPIED, state.STREAMING)]
        if self.applied is None and not copied:
            return None
        return max([self.applied or 0, *copied])

    def continues(self, t: MirrorTable) -> bool:
        """Whether the table's mirror holds its rows and the stream only has to go on.

        Not if the source table or its publication membership is another one than
        the rows came from (dropped and created again, or dropped from the
        publication and added back, while stopped): the stream has a gap there.
        An identity not recorded yet (state from an older version) is trusted.
        """
        st, _lsn, mirror = self.tables.get(t.source.qualname, (state.PENDING, 0, ""))
        identity = self.identities.get(t.source.qualname)
        return st in (state.COPIED, state.STREAMING) and mirror == t.qualname \
            and (identity is None or identity == t.source.membership)


def make_applier(config: Config, shared: Shared, *, pipeline: bool) -> Applier:
    """The pipeline's applier (``pipeline``), or one for a streamed transaction's worker.

    The pipeline's records commit times (the session sets up their table before the first
    batch), commits without waiting for the WAL flush (the receiver confirms a batch only
    once it is durable), and reads the source for rows moving into a [mappings] filter.
    """
    src, dst = config.source, config.destination
    return Applier(dst.conninfo(), dst.state_schema, src.slot, dst.on_error,
                   deadline.BatchLimits.of(dst), dst.analytics_roles,
                   source_conninfo=src.conninfo() if pipeline else None, fence=shared.fence,
                   commit_times=pipeline, defer_flush=pipeline)


class Session:
    """One session of the pipeline; run() returns when it stops, catches up or fails."""

    def __init__(self, shared: Shared, until_caught_up: bool) -> None:
        self.shared = shared
        self.cfg = shared.config
        self.until_caught_up = until_caught_up
        # Learnt from the slot's server (_slot): the cluster and its timeline, and where
        # catching up ends.
        self.source: state.SourceServer | None = None
        self.target: int | None = None

    def run(self) -> None:
        src = self.cfg.source
        try:
            catalog = deadline.connect(src.conninfo(), src.receive_timeout, side="source",
                                       setting="[source] receive_timeout", autocommit=True)
        except psycopg.OperationalError as exc:
            raise classify_connect(exc, src.conninfo(), settings=src) from exc
        applier = make_applier(self.cfg, self.shared, pipeline=True)
        try:
            mirrors, binary = self._tables(catalog)
            dest = self._destination(applier)
            synced = Synced(state.table_sync(dest, self.cfg.destination.state_schema, src.slot),
                            state.source_identities(dest, self.cfg.destination.state_schema,
                                                    src.slot),
                            state.applied_lsn(dest, self.cfg.destination.state_schema,
                                              src.slot))
            self._slot(catalog, dest, mirrors, synced)
            self._forget_gone(dest, mirrors, synced)
            states = self._copy(mirrors, synced)
            if states is None:
                return
            self._mark_streaming(applier, dest, mirrors, synced, states)
            sync_lsns = {key: states[t.source.qualname][1] for key, t in mirrors.items()}
            self._stream(catalog, applier, mirrors, sync_lsns, binary, synced.applied or 0)
        finally:
            applier.close()
            catalog.close()

    # -- before streaming ---------------------------------------------------

    def _tables(self, catalog: psycopg.Connection) -> tuple[dict[Key, MirrorTable], bool]:
        """The mirrors of the published, mapped tables; binary unless a type needs text."""
        cfg, dst = self.cfg, self.cfg.destination
        tables = discover_tables(catalog, cfg)
        # Before the walsender refuses it with a startup error that looks like any other
        # failed connection (and would be retried as one).
        check_replication_role(catalog, cfg.source.user)
        binary = all(c.builtin for t in tables for c in t.columns)
        mirrors = {(t.schema, t.name): MirrorTable(
            t, *cfg.target(t.schema, t.name), state_schema=dst.state_schema,
            binary=binary, options=cfg.options(t.schema, t.name))
            for t in tables}
        return mirrors, binary

    def _destination(self, applier: Applier) -> psycopg.Connection:
        """The applier's connection, with the state schema and its components set up."""
        dst = self.cfg.destination
        dest = applier.connect()
        try:
            check_destination_server(dest)
            state.setup(dest, dst.state_schema)
        except psycopg.Error as exc:
            # Named as the destination's, so the hint says whose grant is missing.
            raise classify(exc, settings=dst) from exc
        state.setup_component(dest, dst.state_schema, "freshness")
        missing = sorted(set(dst.analytics_roles)
                         - set(access.existing_roles(dest, dst.analytics_roles)))
        if missing:
            log.warning("analytics roles missing: mirror tables created now get no "
                        "policy or grant for them", extra={
                            "roles": missing, "hint": "create them, then run "
                            "`replicator init` (or fix [destination] analytics_roles)"})
        return dest

    def _slot(self, catalog: psycopg.Connection, dest: psycopg.Connection,
              mirrors: dict[Key, MirrorTable], synced: Synced) -> None:
        """The slot of this pipeline, on the cluster the mirror was synced from."""
        src, dst, fence = self.cfg.source, self.cfg.destination, self.shared.fence
        slot = src.slot
        repl = ReplicationConnection(src.conninfo(replication="database"), src.receive_timeout)
        try:
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
            check_timeline(repl, sysinfo.timeline,
                           state.source_timeline(dest, dst.state_schema, slot), synced.reached)
            # Tables never copied, whose copy did not finish (a crash or stop
            # mid-copy lands here again), that left the publication and came
            # back, or that are now mapped to another mirror table, are copied
            # before streaming starts; the others continue from the slot.
            continuing = [t.source.qualname for t in mirrors.values() if synced.continues(t)]
            found = check_slot(catalog, slot, synced.applied, continuing)
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
            self.source = state.SourceServer(sysinfo.system_id, sysinfo.timeline)
            self.target = sysinfo.xlogpos if self.until_caught_up else None
        finally:
            repl.close()

    def _forget_gone(self, dest: psycopg.Connection, mirrors: dict[Key, MirrorTable],
                     synced: Synced) -> None:
        """Tables no longer replicated: their mirrors keep their rows."""
        dst, fence = self.cfg.destination, self.shared.fence
        gone = [name for name in synced.tables
                if name not in {t.source.qualname for t in mirrors.values()}]
        with dest.transaction():
            if fence is not None:
                fence.check(dest)
            removed = state.mark_removed(dest, dst.state_schema, self.cfg.source.slot, gone)
        for name in removed:
            log.info("table no longer replicated: its mirror keeps its rows; if it comes "
                     "back it is copied again", extra={"table": name})

    def _copy(self, mirrors: dict[Key, MirrorTable],
              synced: Synced) -> dict[str, tuple[str, int]] | None:
        """Copy the tables that need it; each table's state and sync LSN (None: stopped)."""
        shared = self.shared
        states = {name: (st, lsn) for name, (st, lsn, _m) in synced.tables.items()}
        to_copy = [t for t in mirrors.values() if not synced.continues(t)]
        if to_copy:
            shared.metrics.alive("copying")
            try:
                sync_lsn = Backfill(self.cfg, to_copy, self.cfg.source.slot, shared.stop,
                                    shared.metrics, fence=shared.fence).run()
            except CopyStopped:
                log.info("stopped during the initial copy: unfinished tables are copied "
                         "again on the next run")
                return None
            for t in to_copy:
                states[t.source.qualname] = (state.COPIED, sync_lsn)
            failpoints.hit(failpoints.STARTUP_COPIED)
        return states

    def _mark_streaming(self, applier: Applier, dest: psycopg.Connection,
                        mirrors: dict[Key, MirrorTable], synced: Synced,
                        states: dict[str, tuple[str, int]]) -> None:
        dst, fence, slot = self.cfg.destination, self.shared.fence, self.cfg.source.slot
        # Streaming mirrors keep their columns: the stream alters them in
        # order (a replayed older transaction must not see the newest catalog).
        applier.prepare_tables(list(mirrors.values()), alter=False)
        with dest.transaction():
            if fence is not None:
                fence.check(dest)
            for t in mirrors.values():
                st, lsn = states[t.source.qualname]
                if st != state.STREAMING or \
                        synced.identities.get(t.source.qualname) != t.source.membership:
                    state.set_table(dest, dst.state_schema, slot, t, state.STREAMING, lsn)

    # -- the stream -----------------------------------------------------------

    def _stream(self, catalog: psycopg.Connection, applier: Applier,
                mirrors: dict[Key, MirrorTable], sync_lsns: dict[Key, int], binary: bool,
                start: int) -> None:
        shared, src, dst = self.shared, self.cfg.source, self.cfg.destination
        options = [] if binary else [TEXT_MODE_OPTIONS]
        if src.logical_decoding_work_mem:
            options.append(f"-c logical_decoding_work_mem={src.logical_decoding_work_mem}")
        handoff = Handoff()
        repl = ReplicationConnection(src.conninfo(
            replication="database",
            **({"options": " ".join(options)} if options else {})), src.receive_timeout)
        applier_thread: threading.Thread | None = None
        builder: IndexBuilder | None = None
        try:
            repl.connect()
            # With several hosts this connection may reach another server than the one
            # _slot checked (a failover in between, during a copy perhaps): that one's
            # timeline has not been compared with the applied position yet.
            reached = repl.identify_system()
            if self.source is not None and (reached.system_id, reached.timeline) != (
                    self.source.system_id, self.source.timeline):
                raise ReplicatorError(
                    ErrorKind.SOURCE_CONNECT,
                    f"the source changed between the session's checks and its stream "
                    f"(timeline {self.source.timeline}, now {reached.timeline}): a failover",
                    "the replicator starts the session again, checking the new primary")
            protocol = protocol_for(repl.server_version)
            decoder = Decoder()
            decoder.skip_before = start
            repl.attach(decoder)
            repl.start(src.slot, start, src.publication, protocol, binary, src.streaming)
            shared.progress.applied_lsn = start
            shared.metrics.applied_to(start)
            shared.metrics.alive("streaming")
            for t in mirrors.values():
                shared.metrics.table_sync(t.qualname, state.STREAMING)
            log.info("streaming", extra={
                "slot": src.slot, "publication": src.publication,
                "from_lsn": format_lsn(start), "protocol": protocol,
                "mode": "binary" if binary else "text", "tables": len(mirrors),
                "target_lsn": format_lsn(self.target) if self.target is not None else None})

            # Secondary indexes of copied tables, built while the stream is applied; known to
            # the applier before its first batch, which holds the builds of a table it alters.
            indexes = IndexBuilder(dst, src.slot, shared.metrics, fence=shared.fence)
            applier.index_builds = indexes
            applier_thread = threading.Thread(
                target=apply_loop, args=(shared, applier, handoff, self.source),
                name="applier", daemon=True)
            applier_thread.start()
            builder = indexes.start()

            def stream_applier() -> Applier:
                return make_applier(self.cfg, shared, pipeline=False)

            Receiver(shared, repl, decoder, handoff, catalog, mirrors, sync_lsns, binary,
                     self.target, stream_applier if dst.max_streams else None).loop()
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
                _stop_applier(applier_thread, applier, shared.stop.is_set())
            repl.close()


# Seconds between "applied" summaries at info level; each batch is logged at debug.
SUMMARY_EVERY = 10.0


class _Summary:
    """What the batches applied since the last "applied" line add up to."""

    def __init__(self) -> None:
        self.since = time.monotonic()
        self.batches = self.txns = self.rows = self.inserts = self.updates = 0
        self.deletes = self.dead_letters = 0
        self.seconds = 0.0

    def add(self, txns: int, result: ApplyResult) -> None:
        self.batches += 1
        self.txns += txns
        self.rows += result.rows
        self.inserts += result.inserts
        self.updates += result.updates
        self.deletes += result.deletes
        self.dead_letters += result.dead_letters
        self.seconds += result.seconds

    def due(self) -> bool:
        return self.batches > 0 and time.monotonic() - self.since >= SUMMARY_EVERY

    def extra(self, lag: float, lsn: int) -> dict[str, object]:
        return {"batches": self.batches, "txns": self.txns, "rows": self.rows,
                "inserts": self.inserts, "updates": self.updates, "deletes": self.deletes,
                "dead_letters": self.dead_letters,
                "seconds": round(time.monotonic() - self.since, 1),
                "busy_s": round(self.seconds, 2), "lag_s": round(lag, 3),
                "lsn": format_lsn(lsn)}


def apply_loop(shared: Shared, applier: Applier, handoff: Handoff,
               source: state.SourceServer | None) -> None:
    """The applier thread: each batch the receiver hands over, one transaction each."""
    progress, metrics = shared.progress, shared.metrics
    summary = _Summary()
    lag, lsn = 0.0, 0
    while True:
        batch = handoff.take()
        if batch is None:
            if summary.batches:   # what the last seconds applied, said before stopping
                log.info("applied", extra=summary.extra(lag, lsn))
            return
        try:
            if batch.stream is not None:
                result = apply_finishing(batch, applier, source)
            else:
                result = applier.apply(batch, source=source)
        except BaseException as exc:  # handed to the receiver, which raises it
            handoff.fail(exc)
            return
        finally:
            batch.close()
        progress.applied(batch.end_lsn, result.wal_lsn, result.wal_flushed)
        if batch.last_commit_ts:
            progress.last_commit_ts = batch.last_commit_ts
        if batch.txns:
            lag, lsn = max(0.0, (pg_now() - batch.last_commit_ts) / 1e6), batch.end_lsn
            summary.add(batch.txns, result)
            if summary.due():
                log.info("applied", extra=summary.extra(lag, batch.end_lsn))
                summary = _Summary()
            log.debug("batch applied", extra={
                "txns": batch.txns, "rows": result.rows, "inserts": result.inserts,
                "updates": result.updates, "deletes": result.deletes,
                "dead_letters": result.dead_letters, "copies": result.copies,
                "memory_bytes": batch.memory_bytes, "seconds": round(result.seconds, 4),
                "lag_s": round(lag, 3), "lsn": format_lsn(batch.end_lsn),
                "tables": sorted(result.per_op)})
        metrics.batch_applied(batch, result)
        if batch.stream is not None:
            metrics.streamed_applied(batch.stream.committed)
        for op in batch.ops:
            if isinstance(op, SyncDone):
                metrics.table_sync(op.table.qualname, state.STREAMING)


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
