"""Deadlines on waiting for a server: a dead connection is noticed, never waited on for ever.

A dead tunnel or a stalled pooler keeps the TCP connection open and acknowledges what we
send, so TCP keepalives and ``tcp_user_timeout`` see nothing wrong; it just never answers.
A ``Connection`` from ``connect`` gives every wait for the server (one statement, one COPY
write, one commit) ``answer_timeout`` seconds; past that it closes the connection and raises
``NoAnswer``, an OperationalError like any lost connection, so the retry path reconnects.
The caller chooses a limit no live server exceeds (the destination's is its own
``statement_timeout`` plus a margin: see apply.py), so silence past it means dead, not slow.
"""

from __future__ import annotations

import os
import socket
import weakref
from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.errors import _WaitTimeout
from psycopg.rows import TupleRow

__all__ = ["Connection", "NoAnswer", "connect", "shut", "shut_all"]

RV = TypeVar("RV")

# Every connection ``connect`` made that is still referenced: ``shut_all`` ends their waits.
_made: weakref.WeakSet[Connection] = weakref.WeakSet()


class NoAnswer(psycopg.OperationalError):
    """The server sent nothing for ``answer_timeout`` seconds; the connection was closed."""

    def __init__(self, message: str, side: str) -> None:
        super().__init__(message)
        self.side = side


class Connection(psycopg.Connection[TupleRow]):
    """A psycopg connection whose waits for the server end after ``answer_timeout`` seconds."""

    answer_timeout: float | None = None
    side: str = "server"
    setting: str = ""  # the config key that sets the limit, for the message

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
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
    """``psycopg.connect`` with a deadline on every later wait (None: no deadline)."""
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
    try:
        fd = conn.pgconn.socket
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
    open_now = [c for c in list(_made) if not c.closed]
    for conn in open_now:
        shut(conn)
    return len(open_now)
