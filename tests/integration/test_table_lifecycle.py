"""What operators do around the stream, on real servers: resyncs, truncates before a copy,
tables leaving and rejoining the publication, a mapping moved to another mirror table, a
busy applier, and the stored position."""

from __future__ import annotations

import logging
import time

import psycopg
import pytest
from plugins.replicator import (
    PUBLICATION,
    assert_same,
    catch_up,
    running,
    sync_state,
    table_rows,
    wait_for,
)

from replicator import failpoints
from replicator.batch import Batch
from replicator.destination import state
from replicator.destination.applier import Applier
from replicator.errors import ReplicatorError


def two_tables(source_db, rows: int = 2000) -> None:
    source_db.execute("create table a (id int primary key, v text)")
    source_db.execute("create table b (id int primary key, v text)")
    source_db.execute("insert into a select g, 'a' || g from generate_series(1, 100) g")
    source_db.execute(f"insert into b select g, 'b' || g from generate_series(1, {rows}) g")
    source_db.execute(f"create publication {PUBLICATION} for table a, b")


def resync(dest_db, table: str, pipeline=None) -> None:
    """Ask for a new copy of the table (with a pipeline: once it streams, so the copy is live)."""
    if pipeline is not None:
        wait_for(lambda: pipeline.metrics.status == "streaming", what="streaming")
    with dest_db.connect() as conn:
        assert state.request_resync(conn, "replicator", PUBLICATION,
                                    [f"public.{table}"]) == 1


@pytest.fixture
def armed():
    """Failpoints armed in this process for one test."""
    yield failpoints.arm
    failpoints.disarm_all()


# -- a live copy and the changes held during it ------------------------------------------


def test_connection_loss_in_the_batch_that_ends_a_live_resync_loses_no_held_change(
        source_db, dest_db, armed):
    # Issue 10.1: the table was marked copied on its own; when the batch merging the changes
    # held during the copy failed, the restart streamed on and those changes never arrived.
    two_tables(source_db)
    catch_up(source_db, dest_db)
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:2")   # room to write during the copy
    armed(failpoints.SYNC_DONE_BEFORE_COMMIT, "error")
    with running(source_db, dest_db) as pipeline:
        resync(dest_db, "b", pipeline)
        wait_for(lambda: sync_state(dest_db, "b") == "copying", what="the copy to start")
        # After the copy's snapshot: these are held, then merged by the batch that fails.
        source_db.execute("update b set v = 'held ' || id where id in (1, 2, 3)")
        wait_for(lambda: pipeline.metrics.restarts._value.get() >= 1, what="the injected failure")
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="the resync to end")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")
    rows = table_rows(source_db, "b")
    assert rows[:3] == [(1, "held 1"), (2, "held 2"), (3, "held 3")]


def test_truncate_committed_before_the_copy_snapshot_is_not_replayed(source_db, dest_db):
    # Issue 10.2: rows of transactions before a table's sync LSN were dropped, its TRUNCATE
    # was not: the copy (2 rows) was emptied by the replayed truncate.
    two_tables(source_db)
    catch_up(source_db, dest_db)
    resync(dest_db, "b")
    source_db.execute("truncate b")
    source_db.execute("insert into b values (1, 'after truncate'), (2, 'after truncate')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")
    assert len(table_rows(source_db, "b")) == 2
    assert sync_state(dest_db, "b") == "streaming"
    # A truncate after the copy still applies.
    source_db.execute("truncate b")
    source_db.execute("insert into b values (3, 'later')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")
    assert table_rows(source_db, "b") == [(3, "later")]


def test_truncate_during_a_live_copy(source_db, dest_db, armed):
    two_tables(source_db)
    catch_up(source_db, dest_db)
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1.5")
    with running(source_db, dest_db) as pipeline:
        resync(dest_db, "b", pipeline)
        wait_for(lambda: sync_state(dest_db, "b") == "copying", what="the copy to start")
        source_db.execute("update b set v = 'before truncate'")
        source_db.execute("truncate b")
        source_db.execute("insert into b values (7, 'after truncate')")
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="the resync to end")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")
    assert table_rows(source_db, "b") == [(7, "after truncate")]


# -- the stored position --------------------------------------------------------------


def test_the_stored_applied_lsn_never_moves_backwards(source_db, dest_db):
    # Issue 10.7: a batch holding only table-sync steps carried an older position than one
    # already stored, and record_applied overwrote it.
    source_db.execute("select 1")
    applier = Applier(dest_db.dsn, "replicator", PUBLICATION)
    applier.connect()
    try:
        state.setup(applier.conn, "replicator")
        applier.apply(Batch(end_lsn=0x3000000))
        applier.apply(Batch(end_lsn=0x2000000))
        assert state.applied_lsn(applier.conn, "replicator", PUBLICATION) == 0x3000000
        applier.apply(Batch(end_lsn=0x4000000))
        assert state.applied_lsn(applier.conn, "replicator", PUBLICATION) == 0x4000000
    finally:
        applier.close()


# -- tables leaving and rejoining the publication; mappings that move --------------------


def test_table_dropped_from_the_publication_and_added_back_while_stopped(source_db, dest_db):
    two_tables(source_db)
    catch_up(source_db, dest_db)
    source_db.execute(f"alter publication {PUBLICATION} drop table b")
    source_db.execute("update b set v = 'while unpublished' where id <= 10")
    source_db.execute("insert into b values (5000, 'while unpublished')")
    catch_up(source_db, dest_db)
    assert sync_state(dest_db, "b") == "removed"
    assert dest_db.scalar("select count(*) from odoo_mirror.b where v = 'while unpublished'") == 0
    source_db.execute(f"alter publication {PUBLICATION} add table b")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")
    assert_same(source_db, dest_db, "a")
    assert sync_state(dest_db, "b") == "streaming"


def test_table_dropped_from_the_publication_and_added_back_while_running(source_db, dest_db):
    two_tables(source_db)
    with running(source_db, dest_db):
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="the initial copy")
        source_db.execute(f"alter publication {PUBLICATION} drop table b")
        wait_for(lambda: sync_state(dest_db, "b") == "removed", what="b to be noticed gone")
        source_db.execute("update b set v = 'while unpublished' where id <= 10")
        source_db.execute("insert into a values (1000, 'a streams on')")
        source_db.execute(f"alter publication {PUBLICATION} add table b")
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="b to be copied again")
        source_db.execute("update b set v = 'after rejoining' where id > 1990")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "a")
    assert_same(source_db, dest_db, "b")
    rows = table_rows(source_db, "b")
    assert rows[0] == (1, "while unpublished")


def test_mapping_moved_to_another_mirror_table_is_copied_there(source_db, dest_db):
    # The sync state is kept per source table: a new target used to start empty, streamed
    # from then on and was never copied.
    two_tables(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("update b set v = 'before the move' where id <= 5")
    mappings = {"public.a": "odoo_mirror.a", "public.b": "odoo_mirror.b_moved"}
    catch_up(source_db, dest_db, mappings=mappings)
    src = source_db.fetchall("select * from b order by id")
    assert dest_db.fetchall("select * from odoo_mirror.b_moved order by id") == src
    source_db.execute("delete from b where id > 1000")
    catch_up(source_db, dest_db, mappings=mappings)
    assert dest_db.fetchall("select * from odoo_mirror.b_moved order by id") == \
        source_db.fetchall("select * from b order by id")
    assert dest_db.scalar("select mirror_table from replicator.tables "
                          "where source_table = 'public.b'") == "odoo_mirror.b_moved"


def test_a_mapping_renames_and_the_publication_chooses_the_tables(source_db, dest_db,
                                                                   caplog):
    # A [mappings] line for a alone used to leave b, published, out without a word; and a
    # table added to the publication while running must be copied, mapped or not.
    two_tables(source_db, rows=300)
    mappings = {"public.a": "odoo_mirror.a_renamed"}
    caplog.set_level(logging.INFO, logger="replicator")
    with running(source_db, dest_db, mappings=mappings):
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="b copied")
        source_db.execute("create table c (id int primary key, v text)")
        source_db.execute("insert into c values (1, 'seventh table')")
        source_db.execute(f"alter publication {PUBLICATION} add table c")
        source_db.execute("insert into c values (2, 'after it joined')")
        wait_for(lambda: sync_state(dest_db, "c") == "streaming", what="c copied")
    catch_up(source_db, dest_db, mappings=mappings)
    assert dest_db.fetchall("select * from odoo_mirror.a_renamed order by id") == \
        source_db.fetchall("select * from a order by id")
    assert_same(source_db, dest_db, "b")
    assert_same(source_db, dest_db, "c")
    assert dest_db.scalar("select to_regclass('odoo_mirror.a') is null") is True
    # Said at the start: a config whose [mappings] once chose the tables replicates more now.
    [said] = [r for r in caplog.records if r.getMessage().startswith(
        "published tables that [mappings] does not name")][:1]
    assert said.tables == ["public.b"]
    # What the batches applied, summed up at info level (each batch's line is at debug).
    assert [r for r in caplog.records if r.getMessage() == "applied"]


def test_two_tables_bound_for_one_mirror_table_are_refused(source_db, dest_db):
    two_tables(source_db, rows=10)
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db, mappings={"public.a": "odoo_mirror.b"})
    assert err.value.message == "public.a and public.b would both be mirrored to odoo_mirror.b"
    assert err.value.hint == ('give one of them another name in [mappings], e.g. "public.b" = '
                              '"odoo_mirror.public_b"')
    assert dest_db.scalar("select to_regclass('odoo_mirror.b') is null") is True


def test_destination_schema_changed_copies_every_table_into_it(source_db, dest_db):
    two_tables(source_db, rows=300)
    catch_up(source_db, dest_db)
    catch_up(source_db, dest_db, schema="mirror2")
    for table in ("a", "b"):
        assert dest_db.fetchall(f"select * from mirror2.{table} order by id") == \
            source_db.fetchall(f"select * from {table} order by id")


# -- batches while the applier is busy -------------------------------------------------


def test_busy_applier_does_not_fragment_batches_or_escape_the_memory_limit(
        source_db, dest_db, caplog):
    # Issue 10.9: while the applier was busy, each attempt to close the batch moved the
    # decoder's rows into the batch: one more COPY and MERGE per table each time, and bytes
    # outside the spill accounting (2.9 MB held against a 256 kB limit).
    source_db.execute("create table a (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table a")
    catch_up(source_db, dest_db)
    caplog.set_level(logging.DEBUG, logger="replicator")   # each batch's line
    limit = (1 << 20) // 4      # max_memory_mb = 1: a quarter of it for decoded rows
    with running(source_db, dest_db, max_memory_mb=1, batch_size=1_000_000,
                 flush_interval=0.1) as pipeline:
        source_db.execute("insert into a values (0, 'first')")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.a") == 1,
                 what="streaming")
        caplog.clear()
        # Hold the applier up inside its next batch, while 300 transactions arrive.
        blocker = dest_db.connect(autocommit=False)
        blocker.execute("lock table odoo_mirror.a in access exclusive mode")
        source_db.execute("insert into a values (1, 'blocked')")
        time.sleep(0.5)
        with source_db.connect() as conn:
            for i in range(2, 302):
                conn.execute("insert into a values (%s, repeat('x', 3000))", [i])
                if i % 10 == 0:
                    time.sleep(0.05)   # several flush intervals pass while the applier waits
        time.sleep(0.5)
        blocker.rollback()
        blocker.close()
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.a") == 302,
                 what="the backlog to be applied")
        assert pipeline.progress.applied_lsn
    batches = [r for r in caplog.records if r.getMessage() == "batch applied"]
    assert batches
    for r in batches:
        assert r.copies <= 1, f"a batch of {r.txns} transactions made {r.copies} COPYs"
        # The limit is checked after each transaction, so one transaction may overshoot it.
        assert r.memory_bytes <= limit + 16_384, f"{r.memory_bytes} bytes in memory, limit {limit}"
    assert sum(r.txns for r in batches) >= 301
    # 300 rows of 3 kB went past the limit: they were spilled, not held in memory.
    assert any(r.getMessage() == "batch spilled to disk" for r in caplog.records)
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "a")


def test_a_session_ends_only_after_the_batch_in_flight(dest_db):
    # The session used to close the applier's connection after a 30 s join, while a batch
    # could still be running on it (and commit after the next session read the position).
    import threading

    from replicator.pipeline.session import _stop_applier

    applier = Applier(dest_db.dsn, "replicator", PUBLICATION)
    applier.connect()
    errors: list = []

    def long_batch():
        try:
            applier.conn.execute("select pg_sleep(600)")
        except psycopg.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=long_batch, daemon=True)
    thread.start()
    wait_for(lambda: dest_db.scalar("select count(*) from pg_stat_activity "
                                    "where query = 'select pg_sleep(600)'") == 1, 10, "the batch")
    started = time.monotonic()
    _stop_applier(thread, applier, stopping=False)
    assert not thread.is_alive()
    assert time.monotonic() - started < 30
    assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled)
    applier.close()
