"""Secondary indexes of copied mirror tables, built while the stream is applied.

A copy gives a table it creates its primary key (MERGE needs it) before the
table streams, and records the source's secondary indexes in
<state>.index_builds (state.record_index_builds). This thread builds them
once the table streams, one at a time, each as a single CREATE INDEX
CONCURRENTLY on an autocommit connection of its own: it holds no lock that
stops the applier's writes, and one autocommit statement is all a pooler in
transaction mode needs (no session setting, nothing prepared). The row goes
once the index is there.

A stop does not cancel the build in flight: its backend finishes it, and
the next session waits for it (a backend building an index whose client is
gone is doing the same work). A build cut short (the destination restarted,
the backend ended, a cancel) leaves an INVALID index behind, or none:
whichever session finds the row next drops an invalid one and builds it again.
An index the destination refuses (a missing operator class) or that fails
GIVE_UP_AFTER times in a row is given up with one warning, and the next built.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from psycopg import sql

from .. import failpoints
from ..config.settings import DestinationSettings
from ..errors import ReplicatorError
from ..telemetry.metrics import Metrics
from . import state, watchdog
from .lease import Fence

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0     # seconds between looks for tables that became ready
RETRY_MAX = 60.0        # seconds between attempts at most, after failures
# SQLSTATE classes of errors that a retry cannot fix (an operator class of an extension
# the destination lacks, a feature it does not have): the index is given up, with a warning.
HOPELESS = ("42", "0A")
# Failed attempts at one index after which it is given up like those: other errors may
# pass (a lock timeout, a deadlock with the applier), but not every time.
GIVE_UP_AFTER = 3
# Seconds a hold waits for the cancelled build to end.
HOLD_WAIT = 5.0

_INDEX_SQL = """
select i.indisvalid,
       exists (select 1 from pg_stat_progress_create_index p where p.index_relid = c.oid)
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_index i on i.indexrelid = c.oid
where n.nspname = %s and c.relname = %s
"""


class IndexBuilder:
    """The thread building recorded secondary indexes; start() it once streaming starts."""

    def __init__(self, dest: DestinationSettings, slot: str, metrics: Metrics | None = None,
                 fence: Fence | None = None):
        self.dest = dest
        self.slot = slot
        # The pipeline's lease. A CREATE INDEX CONCURRENTLY cannot run in a transaction, so
        # it is checked just before (a build that races a takeover only builds an index the
        # new owner wants too); the state row is deleted under it.
        self.fence = fence
        self.metrics = metrics
        self._stop = threading.Event()
        self.building: state.IndexBuild | None = None
        # Failed builds of each recorded index (schema, name) in a row: one that keeps
        # failing must not hold up the others (the first waiting is always built first).
        self._failures: dict[tuple[str, str], int] = {}
        # Mirror tables a batch transaction is altering (hold): no build starts on them,
        # and the one in flight is cancelled (see Applier._hold_index_builds).
        self._guard = threading.Lock()
        self._held: dict[str, int] = {}
        self._conn: psycopg.Connection | None = None
        self._yielded = False   # the build in flight was cancelled for a hold
        self._thread = threading.Thread(target=self._loop, name="index-builder", daemon=True)

    def start(self) -> IndexBuilder:
        self._thread.start()
        return self

    def hold(self, table: str) -> None:
        """Start no build on mirror ``table`` until release(); cancel the one in flight.

        Returns once no build of the table runs (or after HOLD_WAIT seconds: the caller's
        lock wait then ends by its lock_timeout, and its retry holds again)."""
        with self._guard:
            self._held[table] = self._held.get(table, 0) + 1
            b, conn = self.building, self._conn
            if b is None or b.mirror_table != table or conn is None:
                return
            self._yielded = True
        log.info("cancelling a mirror index build for a change of its table: it is built "
                 "again after the change", extra={"table": table, "index": b.index_name})
        try:
            conn.cancel_safe(timeout=HOLD_WAIT)
        except psycopg.Error as exc:
            log.warning("cannot cancel the mirror index build", extra={"error": str(exc)})
        until = time.monotonic() + HOLD_WAIT
        while self.building is b and time.monotonic() < until:
            time.sleep(0.01)

    def release(self, table: str) -> None:
        with self._guard:
            n = self._held.get(table, 0) - 1
            if n > 0:
                self._held[table] = n
            else:
                self._held.pop(table, None)

    def stop(self, timeout: float = 0.5) -> None:
        """End the thread without waiting for a build in flight.

        That build is left to finish on the destination: its backend goes on without its
        client (a CREATE INDEX CONCURRENTLY says nothing to it until done), and the next
        session waits for it instead of starting it again. So a short run (cron's `run
        --until-caught-up`) still gets a large index built, one per run at least.
        """
        self._stop.set()
        b = self.building
        if b is not None:
            log.info("mirror index build left to finish on the destination", extra={
                "table": b.mirror_table, "index": b.index_name})
            return      # nothing to wait for: the thread ends once the build returns
        self._thread.join(timeout)

    def _loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                # Watched (watchdog.py): no deadline bounds a build, a dead connection is shut.
                with watchdog.connect(self.dest.conninfo(), autocommit=True) as conn:
                    while not self._stop.is_set():
                        if not self._build_next(conn):
                            self._stop.wait(POLL_INTERVAL)
                        delay = 1.0
            except ReplicatorError as exc:
                # Superseded (the fence): the new owner builds what is left.
                log.warning("mirror index builds stopped", extra={"error": exc.message})
                return
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                log.warning("building a mirror index failed: retrying", extra={
                    "error": str(exc).strip(), "retry_in_s": delay})
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)

    def _build_next(self, conn: psycopg.Connection) -> bool:
        """Build the first recorded index of a streaming table; False if none is waiting."""
        schema = self.dest.state_schema
        ready = state.index_builds(conn, schema, self.slot, ready_only=True)
        if self.metrics is not None:
            self.metrics.index_builds.set(len(state.index_builds(conn, schema, self.slot)))
        with self._guard:
            ready = [r for r in ready if r.mirror_table not in self._held]
        if not ready:
            return False
        b = ready[0]
        name = sql.Identifier(b.index_schema, b.index_name)
        found = conn.execute(_INDEX_SQL, [b.index_schema, b.index_name]).fetchone()
        if found is not None and not found[0]:
            if found[1]:
                # A backend whose client is gone still builds it: let it finish.
                self._stop.wait(POLL_INTERVAL)
                return True
            log.info("dropping a mirror index left invalid by an interrupted build", extra={
                "table": b.mirror_table, "index": b.index_name})
            conn.execute(sql.SQL("drop index concurrently if exists {}").format(name))
            found = None
        if found is None:
            log.info("building mirror index", extra={
                "table": b.mirror_table, "index": b.index_name, "indexes_left": len(ready)})
            failpoints.hit(failpoints.INDEX_BUILD)
            if self._stop.is_set():
                return True
            if self.fence is not None:
                self.fence.check(conn)
            # An autocommit statement: through a transaction-mode pooler the backend read
            # just before is the likeliest to run it (the watchdog looks at that one).
            watchdog.note_backend(conn)
            started = time.monotonic()
            with self._guard:
                if b.mirror_table in self._held:
                    return True     # held since it was chosen: another, or later
                self.building, self._conn = b, conn
            try:
                conn.execute(b.statement)
            except psycopg.Error as exc:
                with self._guard:
                    self.building, self._conn = None, None
                    yielded, self._yielded = self._yielded, False
                if yielded and isinstance(exc, psycopg.errors.QueryCanceled):
                    # For a change of its table: no verdict on the index. The invalid
                    # index it leaves is dropped and built again once the change is in.
                    return True
                key = (b.index_schema, b.index_name)
                # Only the server's refusals count: a connection lost is no verdict on it.
                if exc.sqlstate is not None and not conn.closed:
                    self._failures[key] = self._failures.get(key, 0) + 1
                failures = self._failures.get(key, 0)
                hopeless = (exc.sqlstate or "").startswith(HOPELESS)
                if not hopeless and failures < GIVE_UP_AFTER:
                    raise
                # Not worth stopping replication for, nor the builds after it: the
                # mirror works without it.
                self._failures.pop(key, None)
                log.warning(
                    "index not created on the mirror" if hopeless else
                    f"index not created on the mirror: given up after {failures} failed "
                    "builds, going on with the next; fix the cause and create it by hand "
                    "(the sql field), or resync the table", extra={
                        "table": b.mirror_table, "index": b.index_name, "sql": b.statement,
                        "sqlstate": exc.sqlstate, "error": str(exc).strip()})
                conn.execute(sql.SQL("drop index concurrently if exists {}").format(name))
            else:
                with self._guard:
                    self.building, self._conn = None, None
                    self._yielded = False
                self._failures.pop((b.index_schema, b.index_name), None)
                log.info("mirror index built", extra={
                    "table": b.mirror_table, "index": b.index_name,
                    "seconds": round(time.monotonic() - started, 2),
                    "indexes_left": len(ready) - 1})
        with conn.transaction():
            if self.fence is not None:
                self.fence.check(conn)
            state.index_built(conn, schema, self.slot, b)
        return True
