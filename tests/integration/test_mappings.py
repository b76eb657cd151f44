"""[mappings] beyond 1:1: another name, columns left out, a row filter, soft deletes, history.

The filter and the exclusion are the replicator's, not the publication's: a publication row
filter or column list on a column outside the replica identity makes Odoo's own UPDATEs fail
on the source. An UPDATE that moves a row out of the filter deletes it from the mirror; one
that moves it in inserts it, its unchanged large values read from the source.
"""

from __future__ import annotations

import pytest
from plugins.replicator import PUBLICATION, catch_up, cli, cli_config, error_line
from plugins.servers import ONE_VERSION

from replicator.errors import ErrorKind, ReplicatorError

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


BIG = "(select string_agg(md5(random()::text), '') from generate_series(1, 100))"
KEPT = "id, name, active, company_id, note"
FILTER = "active and company_id = 1"
PARTNERS = {"res_partner": {"target": "odoo_mirror.partners", "filter": FILTER,
                            "exclude": ["email", "phone", "iban"]}}


class _Through:
    """The test's destination database as the replicator reaches it through pgbouncer."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn


@pytest.fixture(params=["direct", "pgbouncer"])
def writer_dest(request, dest_db):
    """Where the replicator writes: the destination itself, or (as on Supabase) pgbouncer in
    transaction mode as a non-superuser owning the mirror schemas. Tests read dest_db."""
    if request.param == "direct":
        return dest_db
    request.getfixturevalue("owned_dest")
    request.getfixturevalue("pool_neighbour")
    return _Through(request.getfixturevalue("pgbouncer").dsn(dest_db.name))


@pytest.fixture
def partners(source_db, dest_db, writer_dest):
    """res_partner with a large note stored out of line (so an UPDATE leaves it 'u')."""
    source_db.execute("create table res_partner (id integer primary key, name text, "
                      "email text, phone text, active boolean, company_id integer, note text)")
    source_db.execute("alter table res_partner alter column note set storage external")
    source_db.execute(f"create publication {PUBLICATION} for table res_partner")

    def check():
        catch_up(source_db, writer_dest, mappings=PARTNERS)
        want = source_db.fetchall(f"select {KEPT} from res_partner where {FILTER} order by id")
        got = dest_db.fetchall(f"select {KEPT} from odoo_mirror.partners order by id")
        assert got == want
        assert dest_db.fetchall("select row_data from replicator.dead_letters") == []
        return got

    return check


def mirror_columns(dest_db, table="partners"):
    return [r[0] for r in dest_db.fetchall(
        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
        "and not attisdropped order by attnum", [f"odoo_mirror.{table}"])]


def test_filter_and_exclude_follow_updates_in_and_out(source_db, dest_db, partners):
    for i, (active, company) in enumerate([(True, 1), (False, 1), (True, 2), (True, 1),
                                           (False, 1), (True, 1)], start=1):
        source_db.execute(f"insert into res_partner values ({i}, 'p{i}', 'p{i}@x.com', "
                          f"'+1{i}', %s, %s, {BIG})", [active, company])
    rows = partners()          # the initial copy: filtered, without the excluded columns
    assert [r[0] for r in rows] == [1, 4, 6]
    assert mirror_columns(dest_db) == ["id", "name", "active", "company_id", "note"]
    assert dest_db.scalar("select to_regclass('odoo_mirror.res_partner')") is None

    note2 = source_db.scalar("select note from res_partner where id = 2")
    with source_db.connect() as conn:
        # Odoo's own UPDATEs on the filtered table succeed: no publication row filter.
        assert conn.execute("update res_partner set active = false where id = 1").rowcount == 1
        # Moves in, its large note unchanged: it must come from the source.
        assert conn.execute("update res_partner set active = true where id = 2").rowcount == 1
        conn.execute("update res_partner set name = 'renamed', email = 'new@x.com' where id = 4")
        conn.execute("delete from res_partner where id = 6")
        conn.execute(f"insert into res_partner values (7, 'p7', 'e', 'p', true, 1, {BIG}), "
                     f"(8, 'p8', 'e', 'p', true, 3, {BIG})")
        # Moves in and out again within one transaction: not in the mirror.
        conn.execute("update res_partner set active = true where id = 5")
        conn.execute("update res_partner set company_id = 2 where id = 5")
        # A key change that moves the row in, its note unchanged as well.
        conn.execute("update res_partner set id = 13, company_id = 1 where id = 3")
    assert source_db.fetchall(
        "select prqual, prattrs from pg_publication_rel") == [(None, None)]
    note3 = source_db.scalar("select note from res_partner where id = 13")
    rows = partners()
    assert [r[0] for r in rows] == [2, 4, 7, 13]
    assert rows[0][4] == note2 and len(note2) == 3200
    assert rows[3][4] == note3

    # A column the source adds under an excluded name stays out; an excluded one dropped
    # at the source is fine.
    source_db.execute("alter table res_partner add column iban text")
    source_db.execute("alter table res_partner drop column phone")
    source_db.execute(f"insert into res_partner values (9, 'p9', 'e', true, 1, {BIG}, 'DE00')")
    source_db.execute("update res_partner set iban = 'DE01', name = 'again' where id = 2")
    rows = partners()
    assert [r[0] for r in rows] == [2, 4, 7, 9, 13]
    assert mirror_columns(dest_db) == ["id", "name", "active", "company_id", "note"]


def test_soft_delete_keeps_rows_marked(source_db, dest_db, writer_dest):
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    source_db.execute("insert into t select i, 'n' || i from generate_series(1, 4) i")
    mappings = {"t": {"soft_delete": True}}
    catch_up(source_db, writer_dest, mappings=mappings)

    def mirror():
        return dest_db.fetchall("select id, name, _deleted_at is not null from odoo_mirror.t "
                                "order by id")

    assert mirror() == [(1, "n1", False), (2, "n2", False), (3, "n3", False), (4, "n4", False)]
    source_db.execute("delete from t where id = 2")
    deleted_at = source_db.scalar("select now()")
    source_db.execute("update t set name = 'x' where id = 3")
    catch_up(source_db, writer_dest, mappings=mappings)
    assert mirror() == [(1, "n1", False), (2, "n2", True), (3, "x", False), (4, "n4", False)]
    # The source's commit time, not the time of applying.
    assert abs(dest_db.scalar("select extract(epoch from _deleted_at - %s) from odoo_mirror.t "
                              "where id = 2", [deleted_at])) < 1
    source_db.execute("insert into t values (2, 'back')")
    catch_up(source_db, writer_dest, mappings=mappings)
    assert mirror()[1] == (2, "back", False)
    # A row inserted and deleted in one batch never was in the mirror: it is kept, marked.
    with source_db.connect(autocommit=False) as conn:
        conn.execute("insert into t values (6, 'brief')")
        conn.execute("update t set name = 'briefer' where id = 6")
        conn.execute("delete from t where id = 6")
        conn.commit()
    source_db.execute("truncate t")
    source_db.execute("insert into t values (5, 'after')")
    catch_up(source_db, writer_dest, mappings=mappings)
    assert mirror() == [(1, "n1", True), (2, "back", True), (3, "x", True), (4, "n4", True),
                        (5, "after", False), (6, "briefer", True)]


def test_history_logs_every_change(source_db, dest_db):
    source_db.execute("create table t (id integer primary key, name text, body text)")
    source_db.execute("alter table t alter column body set storage external")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    source_db.execute(f"insert into t values (1, 'before copy', {BIG})")
    mappings = {"t": {"history": True, "exclude": ["name"]}}
    catch_up(source_db, dest_db, mappings=mappings)
    body1 = source_db.scalar("select body from t where id = 1")
    with source_db.connect(autocommit=False) as conn:
        conn.execute("insert into t values (2, 'a', 'small')")
        conn.execute("update t set name = 'b' where id = 2")
        conn.execute("update t set name = 'c' where id = 1")   # body unchanged: from the mirror
        conn.commit()
    source_db.execute("delete from t where id = 2")
    source_db.execute("truncate t")
    catch_up(source_db, dest_db, mappings=mappings)
    rows = dest_db.fetchall("select _op, id, body, _commit_time is not null from "
                            "odoo_mirror.t_history order by _lsn, _seq")
    assert rows == [("I", 2, "small", True), ("U", 2, "small", True), ("U", 1, body1, True),
                    ("D", 2, None, True), ("T", None, None, True)]
    assert "name" not in mirror_columns(dest_db, "t_history")
    lsns = dest_db.fetchall("select distinct _lsn from odoo_mirror.t_history")
    assert len(lsns) == 3


def test_bad_filter_is_one_clear_line(source_db, dest_db):
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db, mappings={"t": {"filter": "nmae = 'x'"}})
    assert err.value.kind is ErrorKind.CONFIG
    assert "[mappings.public.t] filter" in err.value.message
    assert "nmae" in err.value.message and "\n" not in err.value.message


def test_excluding_a_key_column_is_refused(source_db, dest_db):
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db, mappings={"t": {"exclude": ["id"]}})
    assert err.value.kind is ErrorKind.CONFIG
    assert "id is part of the table's key" in err.value.message


def test_filter_is_checked_on_the_destination_before_the_copy(source_db, dest_db):
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    source_db.execute("create function kept(text) returns boolean language sql "
                      "as $$ select $1 not like '%skip%' $$")
    source_db.execute("insert into t values (1, 'a'), (2, 'skip me')")
    with pytest.raises(ReplicatorError) as err:
        catch_up(source_db, dest_db, mappings={"t": {"filter": "kept(name)"}})
    assert err.value.kind is ErrorKind.CONFIG
    assert err.value.message.startswith("[mappings.public.t] filter: the destination cannot")
    assert dest_db.scalar("select to_regclass('odoo_mirror.t')") is None  # nothing copied

    # A % in the filter is the filter's own (statements with parameters double it).
    mappings = {"t": {"filter": "name not like '%skip%'"}}
    catch_up(source_db, dest_db, mappings=mappings)
    source_db.execute("insert into t values (3, 'b'), (4, 'skip too')")
    source_db.execute("update t set name = 'fine now' where id = 2")
    catch_up(source_db, dest_db, mappings=mappings)
    assert dest_db.fetchall("select id from odoo_mirror.t order by id") == [(1,), (2,), (3,)]


def test_check_refuses_a_filter_the_source_cannot_run(tmp_path, source_db, dest_db):
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = cli_config(tmp_path, source_db, dest_db)
    with config.open("a") as f:
        f.write('\n[mappings.t]\nfilter = "nmae = 1"\n')
    proc = cli("check", "--config", str(config))
    assert proc.returncode != 0
    line = error_line(proc)
    assert "[mappings.public.t] filter: the source cannot run it" in line
    assert "nmae" in line
