"""The initial copy and table sync on real servers: existing rows, then the stream."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from plugins.replicator import (
    PUBLICATION,
    assert_same,
    catch_up,
    make_config,
    running,
    sync_state,
    table_rows,
    wait_for,
    write_config,
)
from zoo import setup_zoo, zoo_rows

from replicator import failpoints
from replicator.commands import status
from replicator.commands.cli import main as cli_main
from replicator.destination import state
from replicator.devtools.odoo import TABLE_NAMES
from replicator.devtools.seed import seed
from replicator.devtools.workload import workload


def test_existing_rows_of_every_type_are_copied(source_db, dest_db):
    setup_zoo(source_db)
    source_db.execute(zoo_rows(3000))
    source_db.execute("insert into zoo (id) values (100000)")      # all nulls
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")
    assert sync_state(dest_db, "zoo") == "streaming"
    # and the stream takes over from the copy
    source_db.execute("update zoo set code = 'after copy' where id <= 10")
    source_db.execute("delete from zoo where id between 11 and 20")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")


SECONDARY = ("select indexname from pg_indexes where schemaname = %s and tablename = "
             "'account_move_line' and indexname <> 'account_move_line_pkey' order by 1")


def pending_indexes(dest_db) -> int:
    return dest_db.scalar("select count(*) from replicator.index_builds")


def assert_indexes_like_source(source_db, dest_db) -> None:
    """The source's secondary indexes exist on the mirror, valid, none unique, plus the key
    (trigram ones only where the destination has pg_trgm)."""
    src_idx = source_db.fetchall(SECONDARY, ["public"])
    dst_idx = dest_db.fetchall(SECONDARY, ["odoo_mirror"])
    trgm = dest_db.scalar("select count(*) from pg_extension where extname = 'pg_trgm'")
    assert src_idx and set(dst_idx) == {(n,) for (n,) in src_idx if trgm or "trgm" not in n}
    assert dest_db.scalar(
        "select count(*) from pg_index where indrelid = 'odoo_mirror.account_move_line'::regclass "
        "and (indisunique and not indisprimary or not indisvalid)") == 0


def test_odoo_tables_with_indexes(source_db, dest_db):
    seed(source_db.dsn, scale=0.5, seed=3, publication=PUBLICATION)
    # run --until-caught-up does not wait for secondary indexes: the key is there, the
    # others are owed, built by the next run while it streams.
    catch_up(source_db, dest_db)
    for table in TABLE_NAMES:
        assert_same(source_db, dest_db, table)
    assert dest_db.scalar(
        "select count(*) from pg_constraint where conrelid = 'odoo_mirror.account_move'::regclass "
        "and contype = 'p'") == 1
    with running(source_db, dest_db):
        wait_for(lambda: pending_indexes(dest_db) == 0, what="secondary indexes built")
    assert_indexes_like_source(source_db, dest_db)


def test_stream_is_applied_while_secondary_indexes_wait(source_db, dest_db, tmp_path):
    seed(source_db.dsn, scale=0.5, seed=3, publication=PUBLICATION)
    gate = failpoints.hold(failpoints.INDEX_BUILD)
    try:
        with running(source_db, dest_db) as pipeline:
            wait_for(lambda: sync_state(dest_db, "account_move_line") == "streaming",
                     what="account_move_line streaming")
            source_db.execute("update account_move_line set name = 'after the copy' "
                              "where id = (select min(id) from account_move_line)")
            wait_for(lambda: dest_db.scalar(
                "select count(*) from odoo_mirror.account_move_line "
                "where name = 'after the copy'") == 1, what="the change streamed")
            # Applied while not one secondary index is built yet (the build is held).
            assert dest_db.fetchall(SECONDARY, ["odoo_mirror"]) == []
            owed = pending_indexes(dest_db)
            assert owed >= len(source_db.fetchall(SECONDARY, ["public"]))
            assert pipeline.metrics.index_builds._value.get() == owed
            st = status.collect(make_config(source_db, dest_db), max_lag_seconds=60)
            assert len(st.indexes_pending) == owed
            assert "indexes to build" in status.render(st)
            gate.set()
            wait_for(lambda: pending_indexes(dest_db) == 0, what="secondary indexes built")
    finally:
        failpoints.disarm_all()
    assert_indexes_like_source(source_db, dest_db)
    for table in TABLE_NAMES:
        assert_same(source_db, dest_db, table)


BUILDING = ("select index_relid::regclass::text from pg_stat_progress_create_index where "
            "relid = 'odoo_mirror.account_move_line'::regclass and phase like 'waiting%%'")


def test_a_stop_leaves_the_index_build_in_flight_to_finish(source_db, dest_db):
    seed(source_db.dsn, scale=0.5, seed=3, publication=PUBLICATION)
    blocker = psycopg.connect(dest_db.dsn)
    try:
        # Armed inside the try: its finally disarms it, whatever fails (no leak into others).
        failpoints.arm(failpoints.INDEX_BUILD, "sleep:0.5")    # time to take the lock below
        with running(source_db, dest_db):
            wait_for(lambda: sync_state(dest_db, "account_move_line") == "streaming",
                     what="account_move_line streaming")
            # A writer's lock: CREATE INDEX CONCURRENTLY waits for it.
            blocker.execute("lock table odoo_mirror.account_move_line in row exclusive mode")
            failpoints.disarm_all()
            wait_for(lambda: dest_db.scalar(BUILDING) is not None, what="a build waiting")
        # Stopped, and the build goes on.
        index = dest_db.scalar(BUILDING)
        assert index is not None
    finally:
        failpoints.disarm_all()
        blocker.rollback()
        blocker.close()
    wait_for(lambda: dest_db.scalar("select indisvalid from pg_index where indexrelid = "
                                    "%s::regclass", [index]), what="the build left finished")
    with running(source_db, dest_db):
        wait_for(lambda: pending_indexes(dest_db) == 0, what="secondary indexes built")
    assert_indexes_like_source(source_db, dest_db)


def test_without_copy_indexes(source_db, dest_db):
    seed(source_db.dsn, scale=0.1, seed=3, publication=PUBLICATION)
    catch_up(source_db, dest_db, copy_indexes=False)
    assert dest_db.scalar(
        "select count(*) from pg_indexes where schemaname = 'odoo_mirror' "
        "and indexname not like '%%_pkey'") == 0
    assert_same(source_db, dest_db, "account_move")


def test_changes_during_the_copy_end_up_right(source_db, dest_db):
    seed(source_db.dsn, scale=3, seed=5, publication=PUBLICATION)
    stop = threading.Event()
    done: list = []
    worker = threading.Thread(target=lambda: done.append(
        workload(source_db.dsn, seconds=8, seed=9, stop=stop)), daemon=True)
    worker.start()
    try:
        time.sleep(0.3)
        catch_up(source_db, dest_db)       # the copy runs while the workload writes
    finally:
        stop.set()
        worker.join()
    catch_up(source_db, dest_db)
    assert done and done[0]["transactions"] > 0
    for table in TABLE_NAMES:
        assert_same(source_db, dest_db, table)
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 0


def test_large_table_is_split_into_ctid_ranges(source_db, dest_db, monkeypatch):
    from replicator.pipeline import backfill

    monkeypatch.setattr(backfill, "PAGES_PER_RANGE", 16)
    source_db.execute("create table big (id int primary key, pad text)")
    source_db.execute("insert into big select g, repeat('x', 200) from generate_series(1, 20000) g")
    source_db.execute("analyze big")
    source_db.execute(f"create publication {PUBLICATION} for table big")
    pages = source_db.scalar("select relpages from pg_class where relname = 'big'")
    assert pages > 64
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "big")


def test_table_added_while_running_is_copied_then_streamed(source_db, dest_db):
    source_db.execute("create table a (id int primary key, v text)")
    source_db.execute("create table b (id int primary key, v text)")
    source_db.execute("insert into b select g, 'old ' || g from generate_series(1, 5000) g")
    source_db.execute(f"create publication {PUBLICATION} for table a")
    with running(source_db, dest_db):
        source_db.execute("insert into a values (1, 'streamed')")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.a") == 1,
                 what="a streams")
        source_db.execute(f"alter publication {PUBLICATION} add table b")
        source_db.execute("update b set v = 'changed after add' where id <= 100")
        source_db.execute("insert into a values (2, 'a keeps streaming')")
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="b to be copied")
        source_db.execute("delete from b where id > 4900")
        source_db.execute("insert into b values (9999, 'new')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "a")
    assert_same(source_db, dest_db, "b")
    rows = table_rows(source_db, "b")
    assert len(rows) == 4901


def test_resync_one_table_while_others_stream(source_db, dest_db, tmp_path, monkeypatch):
    source_db.execute("create table a (id int primary key, v text)")
    source_db.execute("create table b (id int primary key, v text)")
    source_db.execute("insert into b select g, 'v' || g from generate_series(1, 20000) g")
    source_db.execute(f"create publication {PUBLICATION} for table a, b")
    catch_up(source_db, dest_db)
    # The mirror drifts (someone wrote into it): a resync repairs it.
    dest_db.execute("delete from odoo_mirror.b where id <= 1000")
    dest_db.execute("update odoo_mirror.b set v = 'drift' where id between 2000 and 2100")
    config = write_config(tmp_path, source_db, dest_db)
    with running(source_db, dest_db):
        stop = threading.Event()
        writer = threading.Thread(target=_write_loop, args=(source_db, stop), daemon=True)
        writer.start()
        try:
            assert cli_main(["resync", "--config", str(config), "--table", "b"]) == 0
            wait_for(lambda: sync_state(dest_db, "b") == "pending", 10, "the request")
            wait_for(lambda: sync_state(dest_db, "b") == "streaming", 60, "the resync")
        finally:
            stop.set()
            writer.join()
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "a")
    assert_same(source_db, dest_db, "b")


def _write_loop(source_db, stop: threading.Event) -> None:
    i = 0
    with source_db.connect() as conn:
        while not stop.is_set():
            i += 1
            conn.execute("insert into a values (%s, 'during resync') on conflict (id) do update "
                         "set v = excluded.v", [i])
            conn.execute("update b set v = %s where id = %s", [f"w{i}", i % 20000 + 1])
            time.sleep(0.01)


def test_resync_of_unknown_table_is_one_clear_line(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table a (id int primary key)")
    source_db.execute(f"create publication {PUBLICATION} for table a")
    catch_up(source_db, dest_db)
    config = write_config(tmp_path, source_db, dest_db)
    capsys.readouterr()
    assert cli_main(["resync", "--config", str(config), "--table", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "public.nope" in err[0] and "public.a" in err[0]


def test_resync_before_any_run_is_refused_and_creates_nothing(source_db, dest_db, tmp_path,
                                                               capsys):
    source_db.execute("create table a (id int primary key)")
    source_db.execute(f"create publication {PUBLICATION} for table a")
    config = write_config(tmp_path, source_db, dest_db)
    for which in (["--table", "a"], ["--all"]):
        assert cli_main(["resync", "--config", str(config), *which]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: nothing to resync: no pipeline has run against this destination "
                       "yet (no state schema 'replicator') — the first `replicator run` copies "
                       "every table"], err
    assert dest_db.scalar("select to_regnamespace('replicator') is null") is True
    catch_up(source_db, dest_db)
    capsys.readouterr()
    assert cli_main(["resync", "--config", str(config), "--all"]) == 0
    assert capsys.readouterr().out.strip() == (
        "resync requested for every table (1): a running replicator starts copying them "
        "within seconds, otherwise the next run does")


# -- secondary indexes from the catalog, not from parsed text --------------------------------

INDEXES = [
    # Names that read as SQL: each must stay a name.
    ('create index {} on t (name)', "k USING hash (name) WITH (fillfactor=11) WHERE (id > 0)--"),
    ('create index {} on t (code)', "x USING btree (id); drop table odoo_mirror.t; --"),
    ('create index {} on t (n)', 'k"; drop table x'),
    # Every catalog field the statement is built from.
    ("create unique index {} on t (code desc nulls last, n nulls first) include (name) "
     "where n > 10", "t_unique_desc"),
    ("create index {} on t using btree (lower(name) text_pattern_ops, (n + 1) desc) "
     "with (fillfactor = 70, deduplicate_items = off)", "t_expr"),
    ("create index {} on t using hash (code) with (fillfactor = 60)", "t_hash"),
    ('create index {} on t (name collate "C", code collate "POSIX" desc)', "t_collate"),
    ("create index {} on t using gin (to_tsvector('simple'::regconfig, name))", "t_gin"),
]


def _indexdefs(db, schema: str) -> dict[str, str]:
    return dict(db.fetchall(
        "select c.relname, pg_get_indexdef(c.oid) from pg_index i join pg_class c "
        "on c.oid = i.indexrelid where i.indrelid = %s::regclass and not i.indisprimary",
        [f"{schema}.t"]))


def test_index_names_that_read_as_sql_are_names(source_db, dest_db):
    source_db.execute("create table t (id int primary key, name text, code text, n int)")
    source_db.execute("insert into t select i, 'n' || i, 'c' || i, i "
                      "from generate_series(1, 200) i")
    for stmt, name in INDEXES:
        source_db.execute(psycopg.sql.SQL(stmt).format(psycopg.sql.Identifier(name)))
    source_db.execute(f"create publication {PUBLICATION} for table t")
    catch_up(source_db, dest_db)
    with running(source_db, dest_db):
        wait_for(lambda: pending_indexes(dest_db) == 0, what="secondary indexes built")
    # The mirror's indexes are the source's, on the mirror table, none unique.
    want = {n: d.replace(" ON public.t USING ", " ON odoo_mirror.t USING ", 1)
            .replace("CREATE UNIQUE INDEX ", "CREATE INDEX ", 1)
            for n, d in _indexdefs(source_db, "public").items()}
    assert len(want) == len(INDEXES)
    assert _indexdefs(dest_db, "odoo_mirror") == want
    assert_same(source_db, dest_db, "t")


def test_an_index_that_keeps_failing_is_given_up_and_the_next_built(source_db, dest_db,
                                                                     caplog):
    source_db.execute("create table t (id int primary key, name text, n int)")
    source_db.execute("insert into t select i, 'n' || i, i from generate_series(1, 200) i")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    catch_up(source_db, dest_db)
    # As an earlier version recorded a source index whose name held " USING ": a
    # statement the destination refuses every time (CONCURRENTLY in a multi-statement
    # string), first in line.
    slot = dest_db.scalar("select slot from replicator.tables")
    bad = ('create index concurrently if not exists "x" on "odoo_mirror"."t" using btree (id); '
           'drop table odoo_mirror.t; --" ON public.t USING btree (name)')
    good = 'create index concurrently if not exists "t_n" on "odoo_mirror"."t" using btree (n)'
    with dest_db.connect() as conn:
        state.record_index_builds(conn, "replicator", slot, "odoo_mirror.t", [
            state.IndexBuild("odoo_mirror.t", "odoo_mirror", "x", bad),
            state.IndexBuild("odoo_mirror.t", "odoo_mirror", "t_n", good)])
    caplog.set_level(logging.INFO, logger="replicator")
    with running(source_db, dest_db):
        wait_for(lambda: pending_indexes(dest_db) == 0, what="the index builds done or given up")
    given_up = [r for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 1, [r.getMessage() for r in caplog.records]
    assert given_up[0].index == "x" and given_up[0].sqlstate == "25001"
    assert dest_db.scalar("select indisvalid from pg_index "
                          "where indexrelid = 'odoo_mirror.t_n'::regclass")
    assert dest_db.scalar("select to_regclass('odoo_mirror.x')") is None
    assert_same(source_db, dest_db, "t")
