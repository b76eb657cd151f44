"""The watchdog: a dead destination connection told apart from a slow statement in seconds.

``[destination] stall_timeout`` (300 s by default) bounds a batch's statements on a live
server, so that a long MERGE is never cut short; but a connection that a stalled pooler or a
dead NAT entry black-holes is then waited on that long (deadline.py), and the copy workers'
and the index builder's, whose statements may rightly run for hours, for ever. TCP
keepalives and ``tcp_user_timeout`` (settings.ConnectionSettings.conninfo) do not see it
when a pooler or a tunnel acknowledges our bytes.

So the destination is asked, on a fresh connection: once a wait on a watched connection
(deadline.Connection: a statement, a COPY, a commit, the initial copy's C loop) has lasted
WATCH_AFTER seconds, the watchdog looks its backend (``Connection.backend_pid``) up in
pg_stat_activity, every LOOK_EVERY seconds while that wait lasts:

- active, not waiting to read from us: a slow statement (a long MERGE, a lock wait, an index
  build), left alone however long it runs;
- idle, idle in transaction, or gone: the server is not running what we wait for (our request
  or its answer was lost);
- active but waiting to read from us (ClientRead) while we wait for its answer, or while we
  stream COPY data that does not arrive (its pg_stat_progress_copy bytes stay put while we
  send more): our bytes are lost;
- no connection or no answer within PROBE_TIMEOUT: the way to the server is dead.

The source side of a copy (Pulled: the C loop reading COPY data from the source, which no
deadline bounds either) is watched the same way on the source: dead when its backend is gone
or idle, or when the copy waited for the source's data at two looks, nothing arrived between
them, and the backend was sending all the while (blocked on the socket, ClientWrite, or its
bytes counted as sent). A copy held up by a slow destination is not waiting for the source.

Two such looks in a row at the same wait, LOOK_EVERY apart (an answer on its way when the
first was taken has arrived by the second), shut the watched connection's socket
(deadline.shut): the wait fails as a lost connection and the retry path reconnects. A black
hole is noticed within about WATCH_AFTER + LOOK_EVERY + PROBE_TIMEOUT (15-20 s). A wait
shorter than WATCH_AFTER, every batch of the steady path, is never looked at and costs nothing.

The backend such a connection leaves behind may live on (a pooler keeps its server side
open): a batch's is ended by the server's own timeouts (deadline.BatchLimits), but a copy's
COPY FROM STDIN waits for data for ever, holding its lock on the mirror table that the next
copy's TRUNCATE needs. So the watchdog ends it (pg_terminate_backend, allowed on the
backends of one's own role) as soon as the server can be reached, if it is still the same
backend (pid and backend_start): its work was given up and is done again by the retry.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq

from .. import deadline
from ..deadline import Connection

__all__ = ["BACKEND_SQL", "LOOK_EVERY", "PROBE_TIMEOUT", "WATCH_AFTER", "connect",
           "note_backend", "watch"]

log = logging.getLogger(__name__)

WATCH_AFTER = 5.0     # seconds a wait lasts before its backend is looked up
LOOK_EVERY = 5.0      # seconds between looks at one wait
PROBE_TIMEOUT = 5     # seconds to connect and to answer (libpq's connect_timeout: whole seconds)
TICK = 1.0            # seconds between the watchdog's rounds

_ACTIVITY = """
select a.pid, a.state, a.wait_event, {progress}
from pg_stat_activity a {join}
where a.pid = any(%s)
"""
# pg_stat_progress_copy: PostgreSQL 14+.
_WITH_COPY = _ACTIVITY.format(progress="p.bytes_processed",
                              join="left join pg_stat_progress_copy p on p.pid = a.pid")
_WITHOUT_COPY = _ACTIVITY.format(progress="null::bigint", join="")
# backend_start in microseconds: an exact integer, the same whatever the session's settings.
BACKEND_SQL = ("select pid, (extract(epoch from backend_start) * 1000000)::bigint "
               "from pg_stat_activity where pid = pg_backend_pid()")
_TERMINATE = """
select pid, pg_terminate_backend(pid) from pg_stat_activity
where pid = %s and (extract(epoch from backend_start) * 1000000)::bigint = %s
"""


@dataclass
class _Look:
    wait_id: int
    at: float
    dead: str | None        # why this look found the connection dead; None: alive
    server_bytes: int | None
    pushed: int | None
    reading: bool = False   # a source copy waiting for the source's data at this look


class Pulled(deadline.Waits):
    """A bare libpq connection the initial copy reads COPY data from (the source side of a
    copy worker), watched as deadline.Connection is: while in blocking(), ``pushed`` counts
    the bytes that arrived and ``reading`` says whether the copy waits for the source (and
    not for a slow destination)."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self.pgconn = pgconn

    @property
    def closed(self) -> bool:
        return self.pgconn.status != pq.ConnStatus.OK


Watched = Connection | Pulled


class Watchdog:
    """Watches the connections to one server (one conninfo) from one thread."""

    def __init__(self, conninfo: str, side: str = "destination") -> None:
        self.conninfo = conninfo
        self.side = side
        self._lock = threading.Lock()
        self._watched: weakref.WeakKeyDictionary[Watched, _Look | None] = \
            weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None
        # Backends (pid, backend_start) of connections found dead, to end once reachable.
        self._orphans: set[tuple[int, int]] = set()
        self._next_reap = 0.0

    def watch(self, conn: Watched) -> None:
        with self._lock:
            self._watched[conn] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(TICK)
            with self._lock:
                watched = [c for c in list(self._watched) if not c.closed]
                if not watched and not self._orphans:
                    # Nothing left to watch: the next watch() starts a thread again.
                    self._thread = None
                    return
            now = time.monotonic()
            due = [c for c in watched if self._due(c, now)]
            if due:
                self._look(due)
            if self._orphans and time.monotonic() >= self._next_reap:
                self._reap()

    def _due(self, conn: Watched, now: float) -> bool:
        since = conn.waiting_since
        if since is None or conn.backend_pid is None or now - since < WATCH_AFTER:
            return False
        last = self._watched.get(conn)
        return last is None or last.wait_id != conn.wait_id or now - last.at >= LOOK_EVERY

    def _look(self, due: list[Watched]) -> None:
        started = time.monotonic()
        asked = {c: (c.wait_id, c.backend_pid, c.pushed() if c.pushed else None,
                     c.reading is not None and c.reading())
                 for c in due}
        rows: dict[int, tuple[Any, ...]] | None = None
        failure = ""
        try:
            with deadline.connect(self.conninfo, PROBE_TIMEOUT, side=self.side,
                                  autocommit=True, connect_timeout=PROBE_TIMEOUT) as probe:
                query = _WITH_COPY if probe.info.server_version >= 140000 else _WITHOUT_COPY
                pids = sorted({pid for _, pid, _, _ in asked.values() if pid is not None})
                rows = {r[0]: r for r in probe.execute(query, [pids]).fetchall()}
        except psycopg.Error as exc:
            failure = f"cannot ask the {self.side} about it ({str(exc).strip()})"
        for conn, (wait_id, pid, pushed, reading) in asked.items():
            if conn.wait_id != wait_id or conn.waiting_since is None:
                continue  # that wait ended while we asked: it was answered
            row = rows.get(pid) if rows is not None and pid is not None else None
            last = self._watched.get(conn)
            if last is not None and last.wait_id != wait_id:
                last = None
            dead = failure or (self._pull_verdict(pid, row, pushed, reading, last)
                               if isinstance(conn, Pulled) else
                               self._verdict(pid, row, pushed, last))
            if not dead and last is None and row is not None:
                waiting = conn.waiting_since
                log.info(f"waiting on a long {self.side} statement: its backend is running "
                         "it (a live connection)", extra={
                             "backend_pid": pid, "wait_event": row[2],
                             "waited_s": round(time.monotonic() - waiting, 1)
                             if waiting is not None else None})
            with self._lock:
                self._watched[conn] = _Look(wait_id, started, dead or None,
                                            row[3] if row else None, pushed, reading)
            if dead and last is not None and last.dead:
                waiting = conn.waiting_since
                log.warning(f"a {self.side} connection is dead: closing it so that it is "
                            "opened again", extra={
                                "reason": dead, "backend_pid": pid,
                                "waited_s": round(time.monotonic() - waiting, 1)
                                if waiting is not None else None})
                if not conn.closed:
                    deadline.shut_pgconn(conn.pgconn)
                if pid is not None and conn.backend_start is not None:
                    with self._lock:
                        self._orphans.add((pid, conn.backend_start))

    def _reap(self) -> None:
        """End the backends that dead connections left behind, if the server answers."""
        self._next_reap = time.monotonic() + LOOK_EVERY
        try:
            with deadline.connect(self.conninfo, PROBE_TIMEOUT, side=self.side,
                                  autocommit=True, connect_timeout=PROBE_TIMEOUT) as probe:
                for orphan in sorted(self._orphans):
                    ended = probe.execute(_TERMINATE, list(orphan)).fetchall()
                    if ended:
                        log.info(f"ended the {self.side} backend a dead connection left "
                                 "behind (its work is done again)",
                                 extra={"backend_pid": orphan[0]})
                    with self._lock:
                        self._orphans.discard(orphan)
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) == "42501":
                # Not allowed (another role's backend): the server's own timeouts end it.
                with self._lock:
                    self._orphans.clear()

    @staticmethod
    def _verdict(pid: int | None, row: tuple[Any, ...] | None, pushed: int | None,
                 last: _Look | None) -> str:
        """Why the connection is dead, or "" if what its backend does explains the wait."""
        if row is None:
            return f"its backend (pid {pid}) is gone"
        state, event, server_bytes = row[1], row[2], row[3]
        if state is None:
            return ""  # not ours to see (another role's): no verdict
        if state.startswith("idle"):
            return f"its backend (pid {pid}) is {state} while we wait for it"
        if state != "active" or event != "ClientRead":
            return ""
        if pushed is None:
            return f"its backend (pid {pid}) waits for us while we wait for it"
        if last is not None and last.pushed is not None and pushed > last.pushed \
                and server_bytes is not None and server_bytes == last.server_bytes:
            return (f"its backend (pid {pid}) received none of the "
                    f"{pushed - last.pushed} bytes of COPY data sent since the last look")
        return ""


    @staticmethod
    def _pull_verdict(pid: int | None, row: tuple[Any, ...] | None, pushed: int | None,
                      reading: bool, last: _Look | None) -> str:
        """For a copy reading from its source: dead if the backend is gone or idle, or if
        the copy waited for the source at both looks and nothing arrived between them
        while the backend was sending (blocked on it, or its bytes counted as sent)."""
        if row is None:
            return f"its backend (pid {pid}) is gone"
        state, event, server_bytes = row[1], row[2], row[3]
        if state is None:
            return ""
        if state.startswith("idle"):
            return f"its backend (pid {pid}) is {state} while we wait for its data"
        if state != "active" or not reading or last is None or not last.reading \
                or pushed is None or pushed != last.pushed:
            return ""
        if event == "ClientWrite" or (server_bytes is not None and last.server_bytes is not None
                                      and server_bytes > last.server_bytes):
            return (f"its backend (pid {pid}) sends COPY data of which none arrived since "
                    "the last look")
        return ""


_dogs: dict[tuple[str, str], Watchdog] = {}
_dogs_lock = threading.Lock()


def watch(conn: Watched, conninfo: str, side: str = "destination") -> Watched:
    """Watch ``conn`` (reached with ``conninfo``) until it is closed; reads its backend."""
    note_backend(conn)
    with _dogs_lock:
        dog = _dogs.get((conninfo, side))
        if dog is None:
            dog = _dogs[(conninfo, side)] = Watchdog(conninfo, side)
    dog.watch(conn)
    return conn


def connect(conninfo: str, answer_timeout: float | None = None, *, side: str = "destination",
            setting: str = "", **kwargs: Any) -> Connection:
    """``deadline.connect``, watched."""
    conn = deadline.connect(conninfo, answer_timeout, side=side, setting=setting, **kwargs)
    try:
        watch(conn, conninfo, side)
        return conn
    except BaseException:
        conn.close()
        raise


def note_backend(conn: psycopg.Connection[Any] | Pulled) -> None:
    """Read a watched connection's backend: at connect, and first in a transaction whose
    statements may run long (through a transaction-mode pooler it can change per
    transaction)."""
    if isinstance(conn, Connection):
        row = conn.execute(BACKEND_SQL).fetchone()
        conn.backend_pid, conn.backend_start = row if row is not None else (None, None)
