"""The mirror's columns follow the source's through schema changes, on real servers.

A column is known by its attnum (a rename moves the values with it), its type
includes the typmod, a fast default reaches the rows the mirror already has,
a volatile one makes the table be copied again, and a Relation message of a
transaction that is not applied never alters the mirror.
"""

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
)

from replicator.destination import state
from replicator.errors import ReplicatorError, RetryPolicy


def mirror_types(dest_db, table: str = "t") -> dict[str, str]:
    return dict(dest_db.fetchall(
        "select attname, format_type(atttypid, atttypmod) from pg_attribute where attrelid = "
        "%s::regclass and attnum > 0 and not attisdropped", [f"odoo_mirror.{table}"]))


def slot_name(dest_db) -> str:
    return dest_db.scalar("select slot from replicator.pipelines")


def resync(dest_db, table: str = "t") -> None:
    with dest_db.connect() as conn:
        assert state.request_resync(conn, "replicator", slot_name(dest_db), [f"public.{table}"]) == 1


def make_table(source_db, columns: str = "a text") -> None:
    source_db.execute(f"create table t (id int primary key, {columns})")
    source_db.execute(f"create publication {PUBLICATION} for table t")


# -- 1. a copy into an existing mirror whose source columns changed ------------


def test_resync_after_a_column_was_added_while_stopped(source_db, dest_db):
    make_table(source_db)
    source_db.execute("insert into t select g, 'v' || g from generate_series(1, 50) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t add column c int")
    source_db.execute("update t set c = id * 2 where id <= 10")
    resync(dest_db)
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert sync_state(dest_db) == "streaming"


def test_resync_after_a_type_change_while_stopped(source_db, dest_db):
    # A changed type breaks the binary COPY unless the mirror is converted first.
    make_table(source_db, "a int, n numeric(10,2)")
    source_db.execute("insert into t select g, g, g / 3.0 from generate_series(1, 50) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t alter column a type bigint, alter column n type numeric(12,4)")
    source_db.execute("update t set a = a * 10000000000, n = n + 0.0001")
    resync(dest_db)
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert mirror_types(dest_db)["n"] == "numeric(12,4)"


# -- 2. typmod changes mid-stream ---------------------------------------------


def test_typmod_change_mid_stream(source_db, dest_db):
    make_table(source_db, "n numeric(10,2), s varchar(5)")
    with running(source_db, dest_db) as pipeline:
        source_db.execute("insert into t values (1, 1.25, 'abc')")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.t") == 1,
                 what="the first row")
        source_db.execute("alter table t alter column n type numeric(12,4)")
        source_db.execute("insert into t values (2, 1.2345, 'abcde')")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.t") == 2,
                 what="the row after the numeric change")
        assert dest_db.scalar("select n from odoo_mirror.t where id = 2") == \
            source_db.scalar("select n from t where id = 2")
        source_db.execute("alter table t alter column s type varchar(10)")
        source_db.execute("insert into t values (3, 1, 'abcdefgh')")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.t") == 3,
                 what="the row after the varchar change")
        # Applied by the stream as it came, not by a retry after a failed batch.
        assert pipeline.metrics.restarts._value.get() == 0
    assert_same(source_db, dest_db, "t")
    assert mirror_types(dest_db)["n"] == "numeric(12,4)"
    assert mirror_types(dest_db)["s"] == "character varying(10)"


# -- 3. ADD COLUMN with a default ---------------------------------------------


def test_add_column_with_a_constant_default(source_db, dest_db):
    make_table(source_db)
    source_db.execute("insert into t select g, 'v' || g from generate_series(1, 20) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t add column c int default 7, add column e text default 'x y'")
    source_db.execute("insert into t (id, a, c, e) values (100, 'new', 8, null)")
    source_db.execute("update t set a = 'touched' where id = 3")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    rows = table_rows(source_db, "t")
    assert rows[0][2:] == (7, "x y") and rows[-1][2:] == (8, None)
    # The mirror has no default of its own: a later row without a value stays NULL.
    assert dest_db.scalar("select count(*) from pg_attrdef where adrelid = "
                          "'odoo_mirror.t'::regclass") == 0


def test_add_column_with_a_constant_default_while_stopped(source_db, dest_db):
    make_table(source_db)
    source_db.execute("insert into t select g, 'v' || g from generate_series(1, 20) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t add column c int default 7")
    source_db.execute("insert into t (id, a) values (100, 'new')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")


def test_add_column_with_a_volatile_default_copies_the_table(source_db, dest_db):
    make_table(source_db)
    source_db.execute("insert into t select g, 'v' || g from generate_series(1, 200) g")
    with running(source_db, dest_db):
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.t") == 200,
                 what="the first copy")
        source_db.execute("alter table t add column d timestamptz default clock_timestamp(), "
                          "add column r float8 default random()")
        source_db.execute("insert into t (id, a) values (1000, 'after')")
        source_db.execute("update t set a = 'changed' where id = 5")

        def same():
            src = source_db.fetchall("select * from t order by id")
            return src == dest_db.fetchall("select * from odoo_mirror.t order by id")
        wait_for(same, what="the mirror to get the volatile defaults")
        wait_for(lambda: sync_state(dest_db) == "streaming", what="the copy to finish")
        source_db.execute("insert into t (id, a) values (1001, 'streams again')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")


def test_add_identity_column_copies_the_table(source_db, dest_db):
    make_table(source_db)
    source_db.execute("insert into t select g, 'v' || g from generate_series(1, 30) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t add column n int generated by default as identity")
    source_db.execute("insert into t (id, a) values (100, 'after')")
    catch_up(source_db, dest_db)
    # Marked for a copy by the batch that added the column; this run copies it
    # if the previous one caught up first.
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert sync_state(dest_db) == "streaming"


def test_odoo_add_column_then_update(source_db, dest_db):
    make_table(source_db)
    source_db.execute("insert into t select g, 'v' || g from generate_series(1, 20) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t add column c int")
    source_db.execute("update t set c = 7")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert sync_state(dest_db) == "streaming"


# -- 4. renames and type changes ----------------------------------------------


def odoo_type_change(source_db) -> None:
    """What Odoo does when a field's type changes (text -> integer)."""
    source_db.execute("alter table t rename column c to c_moved0")
    source_db.execute("alter table t add column c integer")
    source_db.execute("update t set c = id")


@pytest.mark.parametrize("restart", [False, True], ids=["streaming", "restarted"])
def test_odoo_type_change_moves_the_old_values(source_db, dest_db, restart):
    make_table(source_db, "c text")
    source_db.execute("insert into t select g, 'old ' || g from generate_series(1, 20) g")
    catch_up(source_db, dest_db)
    if restart:
        # The replicator was stopped through the change: state must say which is
        # which. The first transaction replayed describes the table before it.
        source_db.execute("insert into t values (99, 'before the change')")
        odoo_type_change(source_db)
        source_db.execute("insert into t values (100, 'new row', 100)")
        catch_up(source_db, dest_db)
    else:
        with running(source_db, dest_db):
            odoo_type_change(source_db)
            source_db.execute("insert into t values (100, 'new row', 100)")
            wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.t") == 21,
                     what="the new row")
    catch_up(source_db, dest_db)
    rows = dest_db.fetchall("select id, c_moved0, c from odoo_mirror.t order by id")
    assert rows == source_db.fetchall("select id, c_moved0, c from t order by id")
    assert rows[0] == (1, "old 1", 1)
    assert mirror_types(dest_db)["c"] == "integer"


def test_odoo_type_change_twice_across_restarts(source_db, dest_db):
    make_table(source_db, "c text")
    source_db.execute("insert into t select g, 'old ' || g from generate_series(1, 5) g")
    catch_up(source_db, dest_db)
    odoo_type_change(source_db)
    catch_up(source_db, dest_db)
    # Back to text: Odoo moves the integer column to c_moved1.
    source_db.execute("alter table t rename column c to c_moved1")
    source_db.execute("alter table t add column c text")
    source_db.execute("update t set c = 'third ' || id")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert set(mirror_types(dest_db)) == {"id", "c_moved0", "c_moved1", "c"}


def test_plain_rename_renames_the_mirror_column(source_db, dest_db):
    make_table(source_db, "a text, b int")
    source_db.execute("insert into t select g, 'v' || g, g from generate_series(1, 10) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t rename column a to name")
    source_db.execute("insert into t values (11, 'after', 11)")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert set(mirror_types(dest_db)) == {"id", "name", "b"}


def test_swapped_names(source_db, dest_db):
    make_table(source_db, "a text, b text")
    source_db.execute("insert into t values (1, 'was a', 'was b')")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t rename column a to tmp")
    source_db.execute("alter table t rename column b to a")
    source_db.execute("alter table t rename column tmp to b")
    source_db.execute("insert into t values (2, 'new a', 'new b')")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")


def test_column_dropped_and_added_again_under_its_name(source_db, dest_db):
    make_table(source_db, "c text")
    source_db.execute("insert into t select g, 'old ' || g from generate_series(1, 10) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t drop column c")
    source_db.execute("alter table t add column c integer")
    source_db.execute("insert into t values (11, 11)")
    catch_up(source_db, dest_db)
    assert dest_db.fetchall("select id, c from odoo_mirror.t order by id") == \
        source_db.fetchall("select id, c from t order by id")
    # The dropped column's history stays in the mirror, out of the new one's way.
    assert dest_db.scalar("select count(c_dropped) from odoo_mirror.t") == 10


def test_type_change_converts_the_mirror(source_db, dest_db):
    make_table(source_db, "c text")
    source_db.execute("insert into t select g, g::text from generate_series(1, 10) g")
    catch_up(source_db, dest_db)
    source_db.execute("alter table t alter column c type integer using c::integer")
    source_db.execute("insert into t values (11, 11)")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert mirror_types(dest_db)["c"] == "integer"


def test_type_change_the_mirror_cannot_cast_is_one_clear_line(source_db, dest_db, monkeypatch):
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt: 0.05)
    make_table(source_db, "c text")
    source_db.execute("insert into t values (1, '1')")
    catch_up(source_db, dest_db)
    # The mirror holds a value the source no longer has (drift): the cast fails there only.
    dest_db.execute("update odoo_mirror.t set c = 'not a number'")
    source_db.execute("alter table t alter column c type integer using c::integer")
    source_db.execute("insert into t values (2, 2)")
    with pytest.raises(ReplicatorError) as info:
        catch_up(source_db, dest_db)
    msg = info.value.message
    assert "\n" not in msg
    assert "odoo_mirror.t.c" in msg and "text" in msg and "integer" in msg
    assert info.value.kind.name != "INTERNAL"


# -- 5. Relation messages of transactions that are not applied ------------------


def test_replayed_older_relation_does_not_alter_a_copied_mirror_back(source_db, dest_db):
    make_table(source_db, "n numeric(10,2)")
    source_db.execute("insert into t select g, g / 4.0 from generate_series(1, 10) g")
    catch_up(source_db, dest_db)
    # Stopped: transactions before and after a type change, then a resync copies
    # the table at the new type; the older ones are replayed and dropped.
    source_db.execute("insert into t values (50, 1.25)")
    source_db.execute("alter table t alter column n type numeric(12,4)")
    source_db.execute("insert into t values (51, 1.2345)")
    source_db.execute("update t set n = n + 0.0001 where id <= 5")
    resync(dest_db)
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert mirror_types(dest_db)["n"] == "numeric(12,4)"
    source_db.execute("insert into t values (52, 2.3456)")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")


def test_restart_across_a_type_change(source_db, dest_db):
    make_table(source_db, "n numeric(10,2)")
    source_db.execute("insert into t select g, g / 4.0 from generate_series(1, 10) g")
    catch_up(source_db, dest_db)
    source_db.execute("insert into t values (50, 1.25)")
    source_db.execute("alter table t alter column n type numeric(12,4)")
    source_db.execute("insert into t values (51, 1.2345)")
    source_db.execute("update t set n = n + 0.0001 where id <= 5")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")
    assert mirror_types(dest_db)["n"] == "numeric(12,4)"
