"""A table's sync lifecycle with the process killed before and after each of its commits.

The replicator runs as a real process; a failpoint (replicator/failpoints.py) makes it
SIGKILL itself at an exact point: after the batch that starts holding a table's changes,
after the copy's rows are in but before its state is written, before and after the batch
that merges the held changes and marks the table streaming, and, for a copy made before
streaming, after the table is marked copied and before streaming starts. A writer keeps
changing both tables all along, so every window holds changes that must not be lost or
applied twice. Each test ends with `run --until-caught-up` and a row-for-row comparison.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    ReplicatorProcess,
    assert_same,
    table_rows,
)
from plugins.servers import ONE_VERSION

from replicator import failpoints


@pytest.fixture
def proc(replicator) -> ReplicatorProcess:
    return replicator()


def until_caught_up(proc: ReplicatorProcess, timeout: float = 120) -> None:
    code = proc.run_until_caught_up(timeout)
    assert code == 0, proc.logs()


class Writer(threading.Thread):
    """Updates and inserts into both tables until stopped, one small transaction each."""

    def __init__(self, source_db) -> None:
        super().__init__(daemon=True, name="writer")
        self.source_db = source_db
        self.stop_event = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._write()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def _write(self) -> None:
        with self.source_db.connect() as conn:
            while not self.stop_event.is_set():
                self.count += 1
                i = self.count
                conn.execute("update b set v = %s where id = %s", [f"w{i}", i % 3000 + 1])
                conn.execute("insert into a values (%s, 'w') on conflict (id) do update "
                             "set v = excluded.v || a.v", [1000 + i % 500])
                if i % 7 == 0:
                    conn.execute("delete from b where id = %s", [3000 + i])
                    conn.execute("insert into b values (%s, 'new')", [1_000_000 + i])
                time.sleep(0.003)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert self.error is None, f"the writer failed: {self.error!r}"
        assert self.count > 50, "the writer hardly wrote"


def setup_tables(source_db, rows: int = 30000) -> None:
    source_db.execute("create table a (id int primary key, v text)")
    source_db.execute("create table b (id int primary key, v text)")
    source_db.execute(f"insert into b select g, 'b' || g from generate_series(1, {rows}) g")
    source_db.execute(f"create publication {PUBLICATION} for table a, b")


def state_of(dest_db, table: str) -> str | None:
    try:
        return dest_db.scalar("select state from replicator.tables where source_table = %s",
                              [f"public.{table}"])
    except psycopg.Error:
        return None


def wait_for(predicate, timeout: float, what: str, proc: ReplicatorProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}\n{proc.logs()}")


def finish_and_compare(proc: ReplicatorProcess, writer: Writer, source_db, dest_db) -> None:
    until_caught_up(proc)            # recover while the writer still writes
    writer.stop()
    until_caught_up(proc)
    assert_same(source_db, dest_db, "a")
    assert_same(source_db, dest_db, "b")
    assert state_of(dest_db, "b") == "streaming"


# The crash windows are the replicator's own, whatever the source's version: one version
# (ONE_VERSION) keeps the suite's time; the other tests here run on both.


LIVE_POINTS = [
    failpoints.SYNC_START_COMMITTED,
    failpoints.COPY_DONE_BEFORE_MARK,
    failpoints.SYNC_DONE_BEFORE_COMMIT,
    failpoints.SYNC_DONE_COMMITTED,
]


@ONE_VERSION
@pytest.mark.parametrize("point", LIVE_POINTS)
def test_kill_in_a_live_resync(point, proc, source_db, dest_db):
    setup_tables(source_db)
    until_caught_up(proc)

    def resync_b() -> None:
        wait_for(lambda: '"msg":"streaming"' in proc.current(), 60, "streaming", proc)
        dest_db.execute("update replicator.tables set state = 'pending' "
                        "where source_table = 'public.b'")

    killed_at_under_writes(point, proc, source_db, dest_db, started=resync_b)


STARTUP_POINTS = [
    failpoints.COPY_PLANNED,
    failpoints.COPY_DONE_BEFORE_MARK,
    failpoints.COPY_MARKED,
    failpoints.STARTUP_COPIED,
]


@ONE_VERSION
@pytest.mark.parametrize("point", STARTUP_POINTS)
def test_kill_in_a_copy_before_streaming(point, proc, source_db, dest_db):
    setup_tables(source_db)
    killed_at_under_writes(point, proc, source_db, dest_db)


def test_sigterm_during_a_live_resync_keeps_the_changes_made_during_the_copy(
        proc, source_db, dest_db):
    # Issue 10.1 as reported: the stopping worker finished its range and marked the table
    # copied; the restart streamed on and never merged the changes held during the copy.
    setup_tables(source_db)
    until_caught_up(proc)
    proc.start(env={failpoints.ENV: f"{failpoints.COPY_DONE_BEFORE_MARK}=sleep:4"})
    wait_for(lambda: '"msg":"streaming"' in proc.current(), 60, "streaming", proc)
    dest_db.execute("update replicator.tables set state = 'pending' where source_table = 'public.b'")
    wait_for(lambda: '"failpoint"' in proc.current(), 60, "the copy's rows to be in", proc)
    source_db.execute("update b set v = 'changed during the copy' where id in (1, 2)")
    time.sleep(1.0)                  # held by a batch of the running process
    assert proc.terminate(60) == 0, proc.logs()
    until_caught_up(proc)
    assert_same(source_db, dest_db, "b")
    rows = table_rows(source_db, "b")
    assert rows[:2] == [(1, "changed during the copy"), (2, "changed during the copy")]
    assert state_of(dest_db, "b") == "streaming"


@ONE_VERSION
def test_a_resync_killed_in_its_copy_leaves_the_mirror_as_it_was(proc, source_db, dest_db):
    # Killed with every row in the shadow and the mirror not yet brought to it: readers
    # still see the mirror as it was; the next start copies it again into a new shadow.
    setup_tables(source_db)
    until_caught_up(proc)
    mirror = f"select count(*), sum(length(v)) from {MIRROR_SCHEMA}.b"
    before = dest_db.fetchall(mirror)
    shadows = ("select count(*) from pg_class where relnamespace = 'replicator'::regnamespace "
               "and relname like 'shadow%'")
    proc.start(env={failpoints.ENV: f"{failpoints.COPY_DONE_BEFORE_MARK}=kill"})
    wait_for(lambda: '"msg":"streaming"' in proc.current(), 60, "streaming", proc)
    source_db.execute("update b set v = v || ' changed before the resync'")
    wait_for(lambda: dest_db.fetchall(mirror) != before, 60, "the update to stream", proc)
    streamed = dest_db.fetchall(mirror)
    dest_db.execute("update replicator.tables set state = 'pending' where source_table = 'public.b'")
    assert proc.wait_exit(90) == -signal.SIGKILL, proc.logs()
    assert dest_db.fetchall(mirror) == streamed
    assert dest_db.scalar(shadows) == 1
    writer = Writer(source_db)
    writer.start()
    finish_and_compare(proc, writer, source_db, dest_db)
    assert dest_db.scalar(shadows) == 0


def killed_at_under_writes(point: str, proc: ReplicatorProcess, source_db, dest_db,
                           started: Callable[[], None] | None = None) -> None:
    """Start a run that dies at ``point`` while a writer writes, then recover and compare.
    ``started``: what to do once the run is started (ask for the resync that reaches it)."""
    writer = Writer(source_db)
    writer.start()
    try:
        proc.start(env={failpoints.ENV: f"{point}=kill"})
        if started is not None:
            started()
        code = proc.wait_exit(90)
        assert code == -signal.SIGKILL, f"exit {code}, not killed at {point}\n{proc.logs()}"
        assert f'"failpoint":"{point}"' in proc.current()
        finish_and_compare(proc, writer, source_db, dest_db)
    finally:
        writer.stop()


BATCH_POINTS = [
    failpoints.BATCH_BEFORE_BEGIN,
    failpoints.BATCH_BEFORE_COMMIT,
    failpoints.BATCH_COMMITTED,
]


@ONE_VERSION
@pytest.mark.parametrize("point", BATCH_POINTS)
def test_kill_at_a_batch_of_plain_tables(point, proc, source_db, dest_db):
    """No mapping, no trigger: the batch's own crash windows, under writes."""
    setup_tables(source_db, rows=1000)
    until_caught_up(proc)
    killed_at_under_writes(point, proc, source_db, dest_db)


@ONE_VERSION
def test_kill_before_a_secondary_index_build(proc, source_db, dest_db):
    """Killed while streaming with a secondary index not built yet: the next run builds it,
    once, and nothing streamed meanwhile is lost."""
    setup_tables(source_db)
    source_db.execute("create index b_v on b (v)")
    killed_at_under_writes(failpoints.INDEX_BUILD, proc, source_db, dest_db)
    assert dest_db.scalar(
        "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid "
        "join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = 'odoo_mirror' and i.indisvalid and not i.indisprimary") == 1
