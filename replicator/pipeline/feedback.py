"""What the receiver tells the source: the durable position, replies, heartbeats; and silence.

Only what is on the destination's disk is confirmed: a destination crash loses commits
not yet flushed, and the source must send those again. The positions come from the
applier (Progress); this object decides when a status update goes out, makes committed
batches durable when no batch follows, and notices a walsender that went silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from ..classify import connection_lost
from ..config.settings import Config
from ..errors import ErrorKind, ReplicatorError
from ..lsn import parse_lsn
from ..source.catalog import emit_heartbeat
from ..source.connection import ReplicationConnection
from .handoff import Progress

log = logging.getLogger(__name__)

STATUS_INTERVAL = 5.0      # seconds between standby status updates when nothing changes
IDLE_PROBE_INTERVAL = 1.0  # how often an idle receiver asks the source where WAL ends
FLUSH_CHECK_INTERVAL = 0.1  # how often to ask whether committed batches are on the disk yet
FORCE_FLUSH_AFTER = 2.0     # seconds a commit may wait for the WAL writer before a forced flush


class Feedback:
    """The receiver's side of the conversation with the walsender, besides reading it.

    ``dest`` opens (or returns) the receiver's destination connection; ``idle`` says
    whether nothing is pending (no transaction open, nothing batched or being applied);
    ``probing``: catching up to a target, so an idle receiver asks where WAL ends.
    """

    def __init__(self, config: Config, repl: ReplicationConnection, progress: Progress,
                 catalog: psycopg.Connection, dest: Callable[[], psycopg.Connection],
                 idle: Callable[[], bool], probing: bool) -> None:
        self.cfg = config
        self.repl = repl
        self.progress = progress
        self.catalog = catalog
        self.dest = dest
        self.idle = idle
        self.probing = probing
        self.received = 0
        self.sent_flush = -1
        self.last_status = 0.0
        self.last_probe = 0.0
        self.last_flush_check = 0.0
        self.last_heartbeat = 0.0
        # Seconds spent waiting for the socket with nothing arriving, since the last message:
        # only time spent listening counts (not backpressure, not a slow catalog query).
        self.silent = 0.0
        self.pinged = False

    # -- silence ------------------------------------------------------------

    def heard(self) -> None:
        self.silent, self.pinged = 0.0, False

    def listened(self, seconds: float) -> None:
        self.silent += seconds

    def check_silence(self) -> None:
        """A walsender that sent nothing for receive_timeout is gone (wal_receiver_timeout).

        An idle walsender sends keepalives only when our status updates stop, which they
        never do; so at half the timeout we ask for a reply, which a live one sends at once.
        """
        limit = self.cfg.source.receive_timeout
        if self.silent >= limit:
            raise ReplicatorError(
                ErrorKind.SOURCE_CONNECT,
                f"nothing received from the source for {limit:g} s ([source] receive_timeout): "
                "the replication connection is dead",
                "the replicator reconnects and resumes from the last applied position")
        if self.silent >= limit / 2 and not self.pinged:
            self.pinged = True
            self.send(reply=True)

    # -- status updates -------------------------------------------------------

    def send(self, reply: bool = False) -> None:
        # Durable, not just committed: a destination crash loses commits not yet flushed,
        # and the source must send those again.
        flush = self.progress.durable_lsn
        self.repl.send_status(max(self.received, flush), flush, flush, reply)
        self.sent_flush = flush
        self.last_status = time.monotonic()

    def maybe_send(self) -> None:
        now = time.monotonic()
        if self.progress.undurable and now - self.last_flush_check >= FLUSH_CHECK_INTERVAL:
            self.check_flush()
        if self.progress.durable_lsn != self.sent_flush \
                or now - self.last_status >= STATUS_INTERVAL:
            self.send()
        if self.probing and self.idle() and now - self.last_probe >= IDLE_PROBE_INTERVAL:
            # Ask for a keepalive: it tells where the source's WAL ends, which
            # is how we learn that only unpublished tables changed since.
            self.last_probe = now
            self.send(reply=True)

    # -- the destination's WAL ------------------------------------------------

    def wal_position(self, function: str) -> int:
        # Server-wide: through a transaction-mode pooler any server connection answers.
        try:
            row = self.dest().execute(f"select {function}::text").fetchone()
        except psycopg.OperationalError as exc:
            raise connection_lost(exc, "destination") from exc
        assert row is not None  # a select without from: always one row
        return parse_lsn(row[0])

    def check_flush(self, force: bool = False) -> None:
        """Batches the applier committed whose commit records are flushed become durable.

        The applier learns it after each batch; this is for when no batch follows. The WAL
        writer flushes within a few wal_writer_delay, but the insert position read after a
        commit can lie past a page header no flush reaches until more WAL is written: so
        after FORCE_FLUSH_AFTER (or when forced: the receiver stops) a transaction that
        writes WAL commits synchronously, which flushes the WAL up to its own commit record
        (one that writes none, holding only an xid, does not wait for the flush). It locks
        the pipeline's row, skipped if a batch holds it: that batch's commit comes soon.
        """
        self.last_flush_check = time.monotonic()
        if force or self.progress.undurable_for() >= FORCE_FLUSH_AFTER:
            conn = self.dest()
            dst = self.cfg.destination
            try:
                with conn.transaction():
                    conn.execute("select set_config('synchronous_commit', 'on', true)")
                    conn.execute(sql.SQL("select from {}.pipelines where slot = %s "
                                         "for update skip locked").format(
                                             sql.Identifier(dst.state_schema)),
                                 [self.cfg.source.slot])
            except psycopg.OperationalError as exc:
                raise connection_lost(exc, "destination") from exc
        self.progress.flushed(self.wal_position("pg_current_wal_flush_lsn()"))

    # -- heartbeats -------------------------------------------------------------

    def maybe_heartbeat(self) -> None:
        interval = self.cfg.source.heartbeat_interval
        now = time.monotonic()
        if interval and now - self.last_heartbeat >= interval and self.idle():
            # Through the slot it becomes a keepalive's wal_end, which the applier
            # records and the next status confirms: the slot advances with no writes.
            self.last_heartbeat = now
            try:
                emit_heartbeat(self.catalog)
            except psycopg.errors.InsufficientPrivilege as exc:
                # Not worth stopping replication for: the slot only advances with writes.
                log.warning("heartbeat off for this session: the source role may not call "
                            "pg_logical_emit_message", extra={"error": str(exc).strip()})
                self.last_heartbeat = float("inf")
