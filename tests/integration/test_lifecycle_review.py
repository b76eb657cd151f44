"""A second review of the table lifecycle, on real servers: schema changes in every
situation (running, stopped, during a live copy, in one transaction with rows), tables
dropped and recreated, tables leaving and rejoining the publication unseen, repeated
resyncs, a truncate across a copied and a streaming table, and many reconnects."""

from __future__ import annotations

import pytest
from plugins.replicator import (
    PUBLICATION,
    assert_same,
    catch_up,
    running,
    sync_state,
    table_rows,
    wait_for,
    wait_same,
)

from replicator import failpoints
from replicator.destination import state


def resync(dest_db, table: str = "t") -> None:
    with dest_db.connect() as conn:
        assert state.request_resync(conn, "replicator", PUBLICATION, [f"public.{table}"]) == 1


def streaming(pipeline) -> None:
    wait_for(lambda: pipeline.metrics.status == "streaming", what="streaming")


@pytest.fixture
def armed():
    yield failpoints.arm
    failpoints.disarm_all()


def make_tables(source_db, rows: int = 200) -> None:
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("create table u (id int primary key, v text)")
    source_db.execute(f"insert into t select g, 't' || g from generate_series(1, {rows}) g")
    source_db.execute(f"insert into u select g, 'u' || g from generate_series(1, {rows}) g")
    source_db.execute(f"create publication {PUBLICATION} for table t, u")


# -- the publication changes behind the replicator's back -------------------------------


def test_table_left_and_rejoined_the_publication_while_stopped(source_db, dest_db):
    make_tables(source_db)
    catch_up(source_db, dest_db)
    source_db.execute(f"alter publication {PUBLICATION} drop table t")
    source_db.execute("update t set v = 'unpublished' where id <= 10")
    source_db.execute("delete from t where id > 190")
    source_db.execute(f"alter publication {PUBLICATION} add table t")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert_same(source_db, dest_db, "u")


def test_table_left_and_rejoined_the_publication_between_polls(source_db, dest_db):
    make_tables(source_db)
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        source_db.execute(f"alter publication {PUBLICATION} drop table t")
        source_db.execute("update t set v = 'unpublished' where id <= 10")
        source_db.execute(f"alter publication {PUBLICATION} add table t")
        source_db.execute("insert into u values (1000, 'after')")
        # The running replicator sees it by itself (a new membership: t copied again),
        # not only the next start.
        wait_same(source_db, dest_db, "t", "u")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert_same(source_db, dest_db, "u")


def test_table_dropped_and_recreated_while_stopped(source_db, dest_db):
    make_tables(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("drop table t")
    source_db.execute("create table t (id int primary key, v text, w int)")
    source_db.execute("insert into t values (1, 'new', 1), (500, 'new', 2)")
    source_db.execute(f"alter publication {PUBLICATION} add table t")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    source_db.execute("update t set w = 3")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")


def test_table_dropped_and_recreated_while_running(source_db, dest_db):
    make_tables(source_db)
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        source_db.execute("drop table t")
        source_db.execute("create table t (id int primary key, v text)")
        source_db.execute("insert into t values (1, 'new'), (500, 'new')")
        source_db.execute(f"alter publication {PUBLICATION} add table t")
        source_db.execute("insert into t values (501, 'newer')")
        wait_same(source_db, dest_db, "t", "u")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert_same(source_db, dest_db, "u")


def test_left_the_publication_and_rejoined_while_a_resync_is_pending(source_db, dest_db):
    make_tables(source_db)
    catch_up(source_db, dest_db)
    resync(dest_db, "t")
    source_db.execute(f"alter publication {PUBLICATION} drop table t")
    source_db.execute("update t set v = 'unpublished' where id <= 10")
    catch_up(source_db, dest_db)
    assert sync_state(dest_db, "t") == "removed"
    source_db.execute(f"alter publication {PUBLICATION} add table t")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert sync_state(dest_db, "t") == "streaming"


# -- resyncs and truncates ------------------------------------------------------------------


def test_resync_requested_twice_quickly(source_db, dest_db, armed):
    make_tables(source_db)
    catch_up(source_db, dest_db)
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1")
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        resync(dest_db, "t")
        source_db.execute("update t set v = 'between' where id <= 5")
        resync(dest_db, "t")
        source_db.execute("update t set v = 'after' where id > 195")
        wait_for(lambda: sync_state(dest_db, "t") == "copying", what="the copy to start")
        wait_for(lambda: sync_state(dest_db, "t") == "streaming", what="the resync to end")
        source_db.execute("insert into t values (1000, 'later')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")


def test_truncate_of_two_tables_while_one_is_copied(source_db, dest_db, armed):
    make_tables(source_db)
    catch_up(source_db, dest_db)
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1.5")
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        resync(dest_db, "t")
        wait_for(lambda: sync_state(dest_db, "t") == "copying", what="the copy to start")
        source_db.execute("truncate t, u")
        source_db.execute("insert into t values (1, 'after'); insert into u values (2, 'after')")
        wait_for(lambda: sync_state(dest_db, "t") == "streaming", what="the resync to end")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert table_rows(source_db, "t") == [(1, "after")]
    assert_same(source_db, dest_db, "u")
    assert table_rows(source_db, "u") == [(2, "after")]


# -- column changes in every situation ----------------------------------------------------

CHANGES = {
    "add_then_update": ["alter table t add column n int", "update t set n = id * 2"],
    "add_default": ["alter table t add column n int default 7"],
    "not_null_later": ["alter table t add column n int", "update t set n = 1",
                       "alter table t alter column n set not null",
                       "alter table t alter column n set default 5"],
    "x_moved0": ["alter table t rename column v to x_moved0", "alter table t add column v int",
                 "update t set v = id"],
    "alter_type": ["alter table t alter column v type varchar(40)"],
    "drop_column": ["alter table t drop column v"],
}


def same_columns(source_db, dest_db, table: str = "t") -> None:
    """The mirror equals the source on the source's columns (a dropped column stays, by design)."""
    cols = ", ".join(f'"{c}"' for (c,) in source_db.fetchall(
        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
        "and not attisdropped order by attnum", [table]))
    src = source_db.fetchall(f"select {cols} from {table} order by id")
    assert dest_db.fetchall(f"select {cols} from odoo_mirror.{table} order by id") == src


def after_change(source_db):
    source_db.execute("insert into t (id) values (10000)")
    source_db.execute("update t set id = id + 20000 where id = 3")
    source_db.execute("delete from t where id = 4")


@pytest.mark.parametrize("change", CHANGES)
def test_column_change_while_running(source_db, dest_db, change):
    make_tables(source_db, rows=50)
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        for stmt in CHANGES[change]:
            source_db.execute(stmt)
        after_change(source_db)
    catch_up(source_db, dest_db)
    same_columns(source_db, dest_db)


@pytest.mark.parametrize("change", CHANGES)
def test_column_change_while_stopped(source_db, dest_db, change):
    make_tables(source_db, rows=50)
    catch_up(source_db, dest_db)
    source_db.execute("update t set v = 'before' where id = 1")
    for stmt in CHANGES[change]:
        source_db.execute(stmt)
    after_change(source_db)
    catch_up(source_db, dest_db)
    same_columns(source_db, dest_db)


@pytest.mark.parametrize("change", CHANGES)
def test_column_change_in_one_transaction_with_rows(source_db, dest_db, change):
    make_tables(source_db, rows=50)
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        source_db.execute("; ".join(["begin", "update t set v = 'same txn' where id = 1"]
                                    + CHANGES[change] + ["insert into t (id) values (9999)",
                                                         "commit"]))
        after_change(source_db)
    catch_up(source_db, dest_db)
    same_columns(source_db, dest_db)


@pytest.mark.parametrize("change", CHANGES)
def test_column_change_during_a_live_copy(source_db, dest_db, change, armed):
    make_tables(source_db, rows=50)
    catch_up(source_db, dest_db)
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1.5")
    with running(source_db, dest_db) as pipeline:
        streaming(pipeline)
        resync(dest_db, "t")
        wait_for(lambda: sync_state(dest_db, "t") == "copying", what="the copy to start")
        source_db.execute("update t set v = 'during' where id = 1")
        for stmt in CHANGES[change]:
            source_db.execute(stmt)
        after_change(source_db)
        wait_for(lambda: sync_state(dest_db, "t") == "streaming", timeout=90,
                 what="the resync to end")
    catch_up(source_db, dest_db)
    same_columns(source_db, dest_db)


# -- weeks of reconnects ------------------------------------------------------------------


def test_twenty_walsender_terminations_lose_and_duplicate_nothing(source_db, dest_db):
    source_db.execute("create table t (id int primary key, v text, n int not null default 0)")
    source_db.execute("create table log (id bigserial primary key, note text)")
    source_db.execute(f"create publication {PUBLICATION} for table t, log")
    with running(source_db, dest_db, flush_interval=0.05) as pipeline:
        streaming(pipeline)
        killed: list[int] = []

        def new_walsender() -> bool:
            # The slot names the terminated walsender until that process has exited: only
            # another pid is the stream back.
            pid = source_db.scalar("select active_pid from pg_replication_slots "
                                   "where slot_name = %s", [PUBLICATION])
            return pid is not None and pid not in killed

        for i in range(20):
            source_db.execute("insert into t values (%s, 'x', 0)", [i])
            source_db.execute("update t set n = n + 1")
            source_db.execute("insert into log (note) values (%s)", [f"round {i}"])
            # Killed only once the stream is back, so each round is a real reconnect.
            wait_for(new_walsender, what="the walsender to be back")
            pid = source_db.scalar("select active_pid from pg_replication_slots "
                                   "where slot_name = %s", [PUBLICATION])
            assert pid is not None and pid not in killed
            assert source_db.scalar("select pg_terminate_backend(%s)", [pid])
            killed.append(pid)
            source_db.execute("update t set v = v || %s", [str(i % 10)])
        wait_for(lambda: pipeline.metrics.restarts._value.get() >= 20, what="20 reconnects")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert_same(source_db, dest_db, "log")
    assert source_db.scalar("select sum(n) from t") == sum(20 - i for i in range(20))
