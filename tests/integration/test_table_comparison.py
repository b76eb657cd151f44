"""The comparison every other test trusts: it tells a mirror apart from its source at one value.

`assert_same` compares md5 digests of the rows' text, not the rows as Python values. These
tests make sure that cannot hide a difference the mirror could have.
"""

from __future__ import annotations

import pytest
from plugins.replicator import PUBLICATION, assert_same, catch_up, same_rows
from plugins.servers import ONE_VERSION
from zoo import setup_zoo, zoo_rows

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


# One change each to a single mirror value of every kind of column, and to the set of rows.
TAMPERINGS = [
    "update odoo_mirror.zoo set body = body || '.' where id = 8",             # a TOASTed text
    "update odoo_mirror.zoo set ratio = ratio + 1e-15 where id = 3",          # one float bit
    "update odoo_mirror.zoo set atz = atz + interval '1 microsecond' where id = 5",
    "update odoo_mirror.zoo set meta = jsonb_set(meta, '{nested,x,1}', '0') where id = 7",
    "update odoo_mirror.zoo set tags[2] = '' where id = 9",                   # null -> empty
    "update odoo_mirror.zoo set blob = blob || '\\x00' where id = 2",
    "update odoo_mirror.zoo set span = span + interval '1 second' where id = 4",
    "update odoo_mirror.zoo set flag = null where id = 6",
    "delete from odoo_mirror.zoo where id = 10",
    "insert into odoo_mirror.zoo (id) values (11)",
]


@pytest.fixture
def mirrored_zoo(source_db, dest_db):
    setup_zoo(source_db)
    source_db.execute(zoo_rows(10))
    catch_up(source_db, dest_db)
    assert same_rows(source_db, dest_db, "zoo")
    return source_db


def test_one_changed_value_or_row_is_a_difference(mirrored_zoo, dest_db):
    dest_db.execute("create table public.zoo_saved as table odoo_mirror.zoo")
    for tampering in TAMPERINGS:
        dest_db.execute(tampering)
        assert not same_rows(mirrored_zoo, dest_db, "zoo"), tampering
        with pytest.raises(AssertionError):
            assert_same(mirrored_zoo, dest_db, "zoo")
        dest_db.execute("truncate odoo_mirror.zoo; "
                        "insert into odoo_mirror.zoo select * from public.zoo_saved")
        assert same_rows(mirrored_zoo, dest_db, "zoo")


def test_values_equal_in_python_but_changed_in_the_mirror_differ(mirrored_zoo, dest_db):
    """-0 and 0 are equal floats in Python; a mirror that lost the sign is still wrong."""
    mirrored_zoo.execute("update zoo set ratio = 0 where id = 1")
    catch_up(mirrored_zoo, dest_db)
    assert_same(mirrored_zoo, dest_db, "zoo")
    dest_db.execute("update odoo_mirror.zoo set ratio = '-0' where id = 1")
    with pytest.raises(pytest.fail.Exception, match="equal as Python values but not as text"):
        assert_same(mirrored_zoo, dest_db, "zoo")


# A mirror whose schema drifted from its source, each with the change that undoes it.
SCHEMA_CHANGES = [
    ("alter table odoo_mirror.typed rename column code to kode",
     "alter table odoo_mirror.typed rename column kode to code"),
    ("alter table odoo_mirror.typed alter column big type numeric",
     "alter table odoo_mirror.typed alter column big type bigint"),
    ("alter table odoo_mirror.typed alter column small type bigint",
     "alter table odoo_mirror.typed alter column small type integer"),
    ("alter table odoo_mirror.typed alter column code type text",
     "alter table odoo_mirror.typed alter column code type varchar(32)"),
    ("alter table odoo_mirror.typed drop constraint typed_pkey",
     "alter table odoo_mirror.typed add constraint typed_pkey primary key (id)"),
    ("alter table odoo_mirror.typed alter column name set not null",
     "alter table odoo_mirror.typed alter column name drop not null"),
]


def test_each_schema_difference_is_a_difference(source_db, dest_db):
    """Same rows, as text, in a mirror table whose names, types, key or nullability drifted:
    the comparison sees the schema, not only the rows' text."""
    source_db.execute("create table typed (id integer primary key, big bigint, "
                      "small integer, code varchar(32), name text)")
    source_db.execute("insert into typed select g, g * 1000000000::bigint, g, 'c' || g, 'n' || g "
                      "from generate_series(1, 5) g")
    source_db.execute(f"create publication {PUBLICATION} for table typed")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "typed")
    for change, undo in SCHEMA_CHANGES:
        dest_db.execute(change)
        assert not same_rows(source_db, dest_db, "typed"), change
        with pytest.raises(pytest.fail.Exception):
            assert_same(source_db, dest_db, "typed")
        dest_db.execute(undo)
        assert_same(source_db, dest_db, "typed")


def test_two_empty_tables_prove_nothing(source_db, dest_db):
    source_db.execute("create table typed (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table typed")
    catch_up(source_db, dest_db)
    with pytest.raises(pytest.fail.Exception, match="no rows at the source"):
        assert_same(source_db, dest_db, "typed")
    assert_same(source_db, dest_db, "typed", empty_ok=True)
