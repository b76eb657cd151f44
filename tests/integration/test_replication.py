"""End to end on real servers: source (PostgreSQL 15 and 18) -> replicator -> destination."""

from __future__ import annotations

import pytest
from plugins.replicator import PUBLICATION, assert_same, catch_up, make_config, table_rows, wait_for
from zoo import setup_zoo, zoo_rows

from replicator.errors import ErrorKind, ReplicatorError
from replicator.pipeline.supervisor import Pipeline


def test_every_type_round_trips(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)                       # creates the mirror, the slot
    source_db.execute(zoo_rows(200))
    source_db.execute("insert into zoo (id) values (1000)")        # all nulls
    source_db.execute("update zoo set amount = amount * 2, meta = meta || '{\"u\": 1}' where id % 3 = 0")
    source_db.execute("update zoo set code = 'toast-kept' where id % 4 = 0")  # body stays TOASTed
    source_db.execute("delete from zoo where id % 7 = 0")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")
    rows = table_rows(source_db, "zoo")
    assert any(r[5] and len(r[5]) > 2000 and r[4] == "toast-kept" for r in rows)


def test_mirror_table_has_source_types_and_key(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    q = ("select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull from pg_attribute a "
         "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum")
    src = source_db.fetchall(q, ["public.zoo"])
    dst = dest_db.fetchall(q, ["odoo_mirror.zoo"])
    assert [(n, t) for n, t, _ in src] == [(n, t) for n, t, _ in dst]
    assert [n for n, _, nn in dst if nn] == ["id"]            # only the key is NOT NULL
    pk = dest_db.scalar("select pg_get_constraintdef(oid) from pg_constraint "
                        "where conrelid = 'odoo_mirror.zoo'::regclass and contype = 'p'")
    assert pk == "PRIMARY KEY (id)"
    assert dest_db.scalar("select count(*) from pg_constraint where conrelid = "
                          "'odoo_mirror.zoo'::regclass and contype = 'f'") == 0


def test_same_key_changes_in_one_transaction(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    with source_db.connect(autocommit=False) as conn:
        conn.execute("insert into zoo (id, code) values (1, 'a')")
        conn.execute("update zoo set code = 'b' where id = 1")
        conn.execute("delete from zoo where id = 1")
        conn.execute("insert into zoo (id, code) values (2, 'a')")
        conn.execute("update zoo set code = 'b' where id = 2")
        conn.execute("update zoo set code = 'c', body = repeat('x', 5000) where id = 2")
        conn.execute("insert into zoo (id, code) values (3, 'a')")
        conn.execute("delete from zoo where id = 3")
        conn.execute("insert into zoo (id, code, body) values (3, 'again', repeat(md5('3'), 300))")
        conn.execute("update zoo set code = 'kept body' where id = 3")   # body sent as unchanged
        conn.commit()
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")
    rows = table_rows(source_db, "zoo")
    assert [r[0] for r in rows] == [2, 3]


def test_rolled_back_work_is_not_replicated(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    with source_db.connect(autocommit=False) as conn:
        conn.execute("insert into zoo (id, code) values (1, 'gone')")
        conn.rollback()
        conn.execute("insert into zoo (id, code) values (2, 'kept')")
        conn.execute("savepoint s")
        conn.execute("insert into zoo (id, code) values (3, 'savepoint rolled back')")
        conn.execute("update zoo set code = 'not this' where id = 2")
        conn.execute("rollback to savepoint s")
        conn.execute("insert into zoo (id, code) values (4, 'kept too')")
        conn.commit()
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")
    rows = table_rows(source_db, "zoo")
    assert [(r[0], r[4]) for r in rows] == [(2, "kept"), (4, "kept too")]


def test_truncate_applies_in_stream_order(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute(zoo_rows(50))
    with source_db.connect(autocommit=False) as conn:
        conn.execute("insert into zoo (id) values (100)")
        conn.execute("truncate zoo")
        conn.execute("insert into zoo (id, code) values (101, 'after')")
        conn.commit()
    source_db.execute("insert into zoo (id, code) values (102, 'later')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")
    rows = table_rows(source_db, "zoo")
    assert [r[0] for r in rows] == [101, 102]


def test_primary_key_update_deletes_the_old_key(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("insert into zoo (id, code, body) values (1, 'a', repeat(md5('a'), 500)), (2, 'b', 'small')")
    catch_up(source_db, dest_db)
    source_db.execute("update zoo set id = 10 where id = 1")        # body unchanged and TOASTed
    source_db.execute("update zoo set id = 20, code = 'bb' where id = 2")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")
    rows = table_rows(source_db, "zoo")
    assert [r[0] for r in rows] == [10, 20]
    assert len(rows[0][5]) == 16000


def test_large_transaction(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute(zoo_rows(100_000))
    catch_up(source_db, dest_db, batch_size=5000)
    assert dest_db.scalar("select count(*) from odoo_mirror.zoo") == 100_000
    assert_same(source_db, dest_db, "zoo")


def test_resumes_from_the_applied_position(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("insert into zoo (id, code) values (1, 'one')")
    catch_up(source_db, dest_db)
    applied = dest_db.scalar("select applied_lsn from replicator.pipelines")
    source_db.execute("update zoo set code = 'two' where id = 1")
    source_db.execute("insert into zoo (id, code) values (2, 'new')")
    catch_up(source_db, dest_db)
    # pg_lsn arrives as text ('0/FFFFFF' > '0/1000000'): compared on the server.
    assert dest_db.scalar("select applied_lsn > %s::pg_lsn from replicator.pipelines",
                          [applied])
    assert_same(source_db, dest_db, "zoo")
    # Nothing new: a restart applies nothing and changes nothing.
    before = dest_db.scalar("select xmin::text from odoo_mirror.zoo where id = 2")
    catch_up(source_db, dest_db)
    assert dest_db.scalar("select xmin::text from odoo_mirror.zoo where id = 2") == before


def test_slot_confirms_only_what_is_applied(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("insert into zoo (id) select generate_series(1, 1000)")
    catch_up(source_db, dest_db)
    confirmed = source_db.scalar("select confirmed_flush_lsn from pg_replication_slots "
                                 "where slot_name = %s", [PUBLICATION])
    applied = dest_db.scalar("select applied_lsn from replicator.pipelines")
    assert confirmed is not None
    assert source_db.scalar("select %s::pg_lsn <= %s::pg_lsn", [confirmed, applied]), \
        (confirmed, applied)


def test_unpublished_changes_do_not_hold_wal(source_db, dest_db):
    setup_zoo(source_db)
    source_db.execute("create table other (id int primary key, v text)")
    catch_up(source_db, dest_db)
    source_db.execute("insert into other select g, 'x' from generate_series(1, 5000) g")
    target = source_db.scalar("select pg_current_wal_lsn()")
    catch_up(source_db, dest_db)
    # The walsender takes our last status update when it next reads the socket: under load
    # that can be just after the replicator returned.
    wait_for(lambda: source_db.scalar(
        "select confirmed_flush_lsn >= %s::pg_lsn from pg_replication_slots "
        "where slot_name = %s", [target, PUBLICATION]), 10, what="the slot to confirm the target")
    assert dest_db.scalar("select to_regclass('odoo_mirror.other')") is None


def test_table_without_key_is_refused_with_the_fix(source_db, dest_db):
    source_db.execute("create table nokey (a int, b text)")
    source_db.execute(f"create publication {PUBLICATION} for table nokey")
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db)
    assert err.value.kind is ErrorKind.SOURCE_SETUP
    assert "ALTER TABLE" in err.value.hint and "nokey" in err.value.hint


def test_replica_identity_index_is_the_key(source_db, dest_db):
    source_db.execute("create table ri (code text not null, v int)")
    source_db.execute("create unique index ri_code on ri (code)")
    source_db.execute("alter table ri replica identity using index ri_code")
    source_db.execute(f"create publication {PUBLICATION} for table ri")
    catch_up(source_db, dest_db)
    source_db.execute("insert into ri values ('a', 1), ('b', 2)")
    source_db.execute("update ri set v = 3 where code = 'a'")
    source_db.execute("delete from ri where code = 'b'")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "ri", order="code")


def test_user_defined_types_switch_to_text_mode(source_db, dest_db):
    source_db.execute("create type mood as enum ('ok', 'sad')")
    source_db.execute("create table moods (id int primary key, m mood, amount numeric, at timestamptz, "
                      "d date, f float8, b bytea)")
    source_db.execute(f"create publication {PUBLICATION} for table moods")
    catch_up(source_db, dest_db)
    source_db.execute("insert into moods values (1, 'ok', 1.5, '2024-01-02 03:04:05.678+01', "
                      "'2024-02-29', 0.1, '\\x00ff'), (2, 'sad', null, null, null, 1e300, null)")
    source_db.execute("update moods set m = 'ok' where id = 2")
    catch_up(source_db, dest_db)
    src = source_db.fetchall("select id, m::text, amount, at, d, f, b from moods order by id")
    dst = dest_db.fetchall("select id, m, amount, at, d, f, b from odoo_mirror.moods order by id")
    assert src == dst


def test_new_column_at_the_source_reaches_the_mirror(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("insert into zoo (id, code) values (1, 'before')")
    source_db.execute("alter table zoo add column extra text")
    source_db.execute("insert into zoo (id, code, extra) values (2, 'after', 'new column')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "zoo")


def test_mappings_rename_and_the_publication_chooses_the_tables(source_db, dest_db):
    # A table the mappings do not name is replicated all the same, under its own name (it
    # used to be left out without a word).
    setup_zoo(source_db)
    source_db.execute("create table unmapped (id int primary key)")
    source_db.execute(f"alter publication {PUBLICATION} add table unmapped")
    catch_up(source_db, dest_db, mappings={"zoo": "analytics.zoo_copy"})
    source_db.execute("insert into zoo (id) values (1)")
    source_db.execute("insert into unmapped values (1)")
    catch_up(source_db, dest_db, mappings={"zoo": "analytics.zoo_copy"})
    assert dest_db.fetchall("select id from analytics.zoo_copy") == [(1,)]
    assert dest_db.fetchall("select id from odoo_mirror.unmapped") == [(1,)]
    assert dest_db.scalar("select to_regclass('odoo_mirror.zoo')") is None


def test_lost_slot_requires_a_resync(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    source_db.execute("select pg_drop_replication_slot(%s)", [PUBLICATION])
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db)
    assert err.value.kind is ErrorKind.RESYNC_REQUIRED


def test_missing_publication_is_a_setup_error(source_db, dest_db):
    with pytest.raises(ReplicatorError) as err:
        Pipeline(make_config(source_db, dest_db)).run()
    assert err.value.kind is ErrorKind.SOURCE_SETUP
    assert PUBLICATION in err.value.message


def test_odoo_tables(source_db, dest_db):
    from replicator.devtools import odoo
    from replicator.devtools.seed import seed
    from replicator.devtools.workload import workload

    # Streaming only (the initial copy of existing rows is the backfill's job):
    # the tables and the slot exist before the seed's rows are written.
    for stmt in odoo.create_tables_sql():
        source_db.execute(stmt)
    source_db.execute(f"create publication {PUBLICATION} for all tables")
    catch_up(source_db, dest_db)
    seed(source_db.dsn, scale=1, seed=7, publication=PUBLICATION)
    workload(source_db.dsn, transactions=150, seed=7)
    catch_up(source_db, dest_db)
    for table in odoo.TABLE_NAMES:
        assert_same(source_db, dest_db, table)
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 0


def test_transaction_larger_than_memory_spills_to_disk(source_db, dest_db, caplog):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    with source_db.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(30_000))
        conn.execute("update zoo set code = 'updated' where id % 10 = 0")   # body unchanged
        conn.execute("truncate zoo")                                        # a split mid-spill
        conn.execute(zoo_rows(20_000))
        conn.execute("update zoo set id = id + 100000 where id % 100 = 0")
        conn.commit()
    with caplog.at_level("INFO", logger="replicator"):
        catch_up(source_db, dest_db, max_memory_mb=1, batch_size=100_000)
    assert any(r.getMessage() == "batch spilled to disk" for r in caplog.records)
    assert_same(source_db, dest_db, "zoo")


def test_another_source_cluster_is_refused(source_db, dest_db):
    setup_zoo(source_db)
    catch_up(source_db, dest_db)
    dest_db.execute("update replicator.pipelines set source_system_id = '1234'")
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db)
    assert err.value.kind is ErrorKind.RESYNC_REQUIRED and "1234" in err.value.message
