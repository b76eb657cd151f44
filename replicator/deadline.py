"""Deadlines on waiting for a server: a dead connection is noticed, never waited on for ever.

A dead tunnel or a stalled pooler keeps the TCP connection open and acknowledges what we
send, so TCP keepalives and ``tcp_user_timeout`` see nothing wrong; it just never answers.
A ``Connection`` from ``connect`` gives every wait for the server (one statement, one COPY
write, one commit) ``answer_timeout`` seconds; past that it closes the connection and raises
``NoAnswer``, an OperationalError like any lost connection, so the retry path reconnects.
The caller chooses a limit no live server exceeds (the destination's is its own
``statement_timeout`` plus a margin: ``BatchLimits``), so silence past it means dead, not
slow. ``BatchLimits`` also bounds lock waits and orphaned transactions of the batch.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql
from psycopg.abc import PQGen
from psycopg.errors import _WaitTimeout
from psycopg.rows import TupleRow

from .config.settings import DestinationSettings
from .errors import ErrorKind, ReplicatorError
from .lsn import format_lsn


class Guard(Protocol):
    """What a batch's first statement needs of the pipeline's lease (destination/lease.py's
    Fence): the statement that checks it, carrying the batch's settings, and its verdict."""

    def statement(self, columns: sql.Composable | None = None) -> sql.Composed: ...

    def passed(self, rows: list[Any] | None) -> None: ...

__all__ = ["STALL_GRACE", "BatchLimits", "Connection", "NoAnswer", "Waits", "connect", "shut",
           "shut_all", "shut_pgconn", "timed_out"]

RV = TypeVar("RV")

# Every connection ``connect`` made that is still referenced: ``shut_all`` ends their waits.
_made: weakref.WeakSet[Connection] = weakref.WeakSet()
# Set by shut_all: the errors that follow are of its making (the process is stopping).
shut_down = False


class NoAnswer(psycopg.OperationalError):
    """The server sent nothing for ``answer_timeout`` seconds; the connection was closed."""

    def __init__(self, message: str, side: str) -> None:
        super().__init__(message)
        self.side = side


class Waits:
    """What the watchdog (destination/watchdog.py) reads of a connection, from its thread:
    the server backend serving it, and whether and since when it waits for the server."""

    # pg_backend_pid() as last read: at connect, then in each batch transaction (through a
    # transaction-mode pooler the backend can change per transaction).
    backend_pid: int | None = None
    # Its backend_start in microseconds since 1970, when read with the pid: tells that backend
    # from a later one with the same pid (the watchdog ends a dead connection's backend).
    backend_start: int | None = None
    wait_id = 0  # counts waits: two looks at one wait see the same id
    waiting_since: float | None = None  # time.monotonic() when the wait began; None: not waiting
    # While the initial copy's C loop moves COPY data through it: the bytes moved so far;
    # None otherwise.
    pushed: Callable[[], int] | None = None
    # Meanwhile, on the source side of a copy: whether the loop waits for the source's data
    # (not for a slow destination); None otherwise.
    reading: Callable[[], bool] | None = None

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Count blocking libpq calls on the connection (outside psycopg's waits) as one
        wait."""
        self.wait_id += 1
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.waiting_since = None
            self.pushed = self.reading = None


class Connection(Waits, psycopg.Connection[TupleRow]):
    """A psycopg connection whose waits for the server end after ``answer_timeout`` seconds,
    and which the watchdog can watch (Waits)."""

    answer_timeout: float | None = None
    side: str = "server"
    setting: str = ""  # the config key that sets the limit, for the message

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        if self.waiting_since is not None:  # inside blocking(): that is the wait
            return self._wait(gen, interval, timeout)
        self.wait_id += 1
        self.waiting_since = time.monotonic()
        try:
            return self._wait(gen, interval, timeout)
        finally:
            self.waiting_since = None

    def _wait(self, gen: PQGen[RV], interval: float, timeout: float | None) -> RV:
        limit = self.answer_timeout
        if limit is None or (timeout is not None and timeout <= limit):
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, limit)
        except _WaitTimeout:
            # Half-way through a protocol exchange: the connection cannot be used again, and
            # a cancel request would go through the same dead path. The server rolls back
            # whatever transaction it had once it notices (or its own timeouts fire).
            self.pgconn.finish()
            where = f" ({self.setting})" if self.setting else ""
            raise NoAnswer(f"nothing received from the {self.side} for {limit:g} s{where}: the "
                           "connection is dead (closed it)", self.side) from None


def connect(conninfo: str, answer_timeout: float | None, *, side: str, setting: str = "",
            **kwargs: Any) -> Connection:
    """``psycopg.connect`` with a deadline on every later wait (None: no deadline).

    Never a prepared statement (unless asked): either side may be a transaction-mode
    pooler, where one would stay on a server connection another client then gets."""
    kwargs.setdefault("prepare_threshold", None)
    conn = Connection.connect(conninfo, **kwargs)
    conn.answer_timeout = answer_timeout
    conn.side = side
    conn.setting = setting
    _made.add(conn)
    return conn


def shut(conn: psycopg.Connection[Any] | None) -> None:
    """Shut the connection's socket down, from any thread: a wait on it returns at once.

    For a thread stuck waiting on a dead connection (the caller cannot close a connection
    another thread uses). The connection fails its current operation and is unusable after.
    """
    if conn is None or conn.closed:
        return
    shut_pgconn(conn.pgconn)


def shut_pgconn(pgconn: psycopg.pq.abc.PGconn) -> None:
    """``shut`` for a bare libpq connection."""
    try:
        fd = pgconn.socket
    except psycopg.OperationalError:
        return
    # A duplicate descriptor of the same socket: shutdown acts on the socket itself, and
    # closing the duplicate leaves psycopg's descriptor to psycopg.
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected
    finally:
        sock.close()


def shut_all() -> int:
    """Shut down every open connection ``connect`` made (a stop that must not wait on them).

    Returns how many were open. Their threads fail at once with a lost connection; nothing
    unapplied was confirmed, so leaving that way is as safe as a crash.
    """
    global shut_down
    shut_down = True
    open_now = [c for c in list(_made) if not c.closed]
    for conn in open_now:
        shut(conn)
    return len(open_now)


# -- the destination's batch transaction -------------------------------------------------

# Seconds past the server's statement_timeout (= stall_timeout) before a batch statement with
# no answer counts as a dead connection: a live server has cancelled it and said so by then.
STALL_GRACE = 2.0


@dataclass(frozen=True)
class BatchLimits:
    """The batch transaction's timeouts, set with SET LOCAL (pooler safe: nothing outlives it).

    A live server answers every statement within ``stall_timeout`` (it cancels its own
    statement then), so a connection silent for ``answer_timeout`` is dead (a stalled
    pooler, a dead tunnel), not a long MERGE. ``idle_in_transaction_timeout`` protects the
    next replicator from this one: if our client vanishes behind a pooler mid-batch, the
    server ends the orphaned transaction and its locks; the setting works only on the
    session that goes idle, which is why every batch sets it.
    """

    stall_timeout: float
    lock_timeout: float
    idle_in_transaction_timeout: float

    @classmethod
    def of(cls, dest: DestinationSettings) -> BatchLimits:
        return cls(dest.stall_timeout, dest.lock_timeout, dest.idle_in_transaction_timeout)

    @property
    def answer_timeout(self) -> float:
        return self.stall_timeout + STALL_GRACE

    def set_local(self, cur: psycopg.Cursor, synchronous_commit: str | None = None,
                  fence: Guard | None = None) -> None:
        """The limits, and the transaction's synchronous_commit if given: one round trip.

        With a fence, the same statement is the transaction's lease check (destination/lease.py), so
        the single-writer guarantee costs a batch no round trip of its own. It also reads
        the transaction's backend for the watchdog (Connection.backend_pid).
        """
        settings = sql.SQL(
            "set_config('statement_timeout', %s, true), "
            "set_config('lock_timeout', %s, true), "
            "set_config('idle_in_transaction_session_timeout', %s, true)"
            + (", set_config('synchronous_commit', %s, true)" if synchronous_commit else "")
            + ", pg_backend_pid()")
        params = [_ms(self.stall_timeout), _ms(self.lock_timeout),
                  _ms(self.idle_in_transaction_timeout)] \
            + ([synchronous_commit] if synchronous_commit else [])
        if fence is None:
            cur.execute(sql.SQL("select ") + settings, params)
            rows = cur.fetchall()
        else:
            cur.execute(fence.statement(settings), params)
            rows = cur.fetchall()
            fence.passed(rows)
        conn = cur.connection
        if rows and isinstance(conn, Connection) and conn.backend_pid != rows[0][-1]:
            conn.backend_pid, conn.backend_start = rows[0][-1], None


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def timed_out(exc: psycopg.Error, end_lsn: int, limits: BatchLimits | None) -> ReplicatorError:
    """A lock wait or a statement ended by the batch's own timeouts, or a deadlock: retried,
    said plainly."""
    where = f"the batch ending at {format_lsn(end_lsn)}"
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        waited = f" ({limits.lock_timeout:g} s)" if limits else ""
        return ReplicatorError(
            ErrorKind.DESTINATION_APPLY,
            f"{where} waited longer than [destination] lock_timeout{waited} for a lock: {exc}",
            "another session holds locks on the mirror or state tables (see pg_stat_activity); "
            "an orphaned batch of an earlier replicator is ended by the server after "
            "[destination] idle_in_transaction_timeout. The batch is retried")
    if isinstance(exc, psycopg.errors.DeadlockDetected):
        return ReplicatorError(
            ErrorKind.DESTINATION_APPLY,
            f"{where} was ended by the destination's deadlock detection: {exc}",
            "another session's locks on the mirror or state tables and this batch's waited "
            "for each other (see the destination's log for the other statement). The batch "
            "is retried")
    ran = f" ({limits.stall_timeout:g} s)" if limits else ""
    return ReplicatorError(
        ErrorKind.DESTINATION_APPLY,
        f"a statement of {where} ran longer than [destination] stall_timeout{ran} and the "
        f"destination cancelled it: {exc}",
        "the batch is retried; if batches this large legitimately take longer, raise "
        "[destination] stall_timeout (or lower batch_size)")
