"""Primary-key changes on a real source, with a large column sent as unchanged TOAST.

Odoo rarely changes a key, but DBAs and imports do: renumbering, swaps
through a spare key, several moves of one row in one transaction. An UPDATE
that does not touch an out-of-line value sends it as unchanged ('u'); the
mirror must still end equal to the source, with nothing in the dead letters.
"""

from __future__ import annotations

import random

import pytest
from plugins.replicator import PUBLICATION, assert_same, catch_up, table_rows

BODY = "(select string_agg(md5(random()::text), '') from generate_series(1, 100))"


@pytest.fixture
def docs(source_db, dest_db):
    """Table t(id, name, body) with rows 1..6, mirrored; body stored out of line, uncompressed."""
    source_db.execute("create table t (id integer primary key, name text, body text)")
    source_db.execute("alter table t alter column body set storage external")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    for i in range(1, 7):
        source_db.execute(f"insert into t values ({i}, 'n{i}', {BODY})")
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "t")

    def check():
        catch_up(source_db, dest_db)
        assert_same(source_db, dest_db, "t")
        rows = table_rows(source_db, "t")
        assert dest_db.fetchall("select mirror_table, row_data from replicator.dead_letters") == []
        return rows

    def txn(*statements):
        with source_db.connect(autocommit=False) as conn:
            for s in statements:
                conn.execute(s)
            conn.commit()

    def body(i):
        return source_db.scalar("select body from t where id = %s", [i])

    check.txn, check.body = txn, body
    return check


def test_two_key_changes_in_one_transaction(docs):
    old = docs.body(2)
    docs.txn("update t set id = 12 where id = 2", "update t set id = 22 where id = 12")
    rows = docs()
    assert [r[0] for r in rows] == [1, 3, 4, 5, 6, 22]
    assert rows[-1][2] == old


def test_two_key_changes_in_two_transactions_of_one_batch(docs):
    docs.txn("update t set id = 12 where id = 2")
    docs.txn("update t set id = 22, name = 'moved twice' where id = 12")
    docs()


def test_swap_through_a_spare_key(docs):
    old3, old4 = docs.body(3), docs.body(4)
    docs.txn("update t set id = -3 where id = 3", "update t set id = 3 where id = 4",
             "update t set id = 4 where id = -3")
    rows = {r[0]: r for r in docs()}
    assert rows[4][2] == old3 and rows[3][2] == old4


def test_swap_in_three_transactions_of_one_batch(docs):
    docs.txn("update t set id = -3 where id = 3")
    docs.txn("update t set id = 3, name = 'was 4' where id = 4")
    docs.txn("update t set id = 4 where id = -3")
    docs()


def test_chain_of_moves_with_updates_between(docs):
    docs.txn("update t set id = 15 where id = 5",
             "update t set name = 'at 15' where id = 15",
             "update t set id = 25 where id = 15",
             f"update t set body = {BODY} where id = 25",          # a new image in the chain
             "update t set id = 35, name = 'at 35' where id = 25",
             "update t set id = 45 where id = 35",
             "update t set id = 5 where id = 1",                   # another row takes the first key
             "update t set id = 1 where id = 6")
    rows = docs()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 45]


def test_chain_across_batches(docs):
    old = docs.body(2)
    docs.txn("update t set id = 12 where id = 2")
    docs()
    docs.txn("update t set id = 22 where id = 12", "update t set id = 32 where id = 22")
    rows = docs()
    assert rows[-1][0] == 32 and rows[-1][2] == old


def test_move_then_delete_and_reuse_of_the_keys(docs):
    docs.txn("update t set id = 12 where id = 2", "update t set id = 22 where id = 12",
             "delete from t where id = 22",
             f"insert into t values (2, 'new 2', {BODY})",
             "update t set id = 12 where id = 3",
             "update t set name = 'still old 3' where id = 12")
    rows = docs()
    assert [r[0] for r in rows] == [1, 2, 4, 5, 6, 12]


def test_random_key_changes_match_the_source(docs):
    rng = random.Random(20240611)
    for _ in range(4):                                   # four batches
        statements = []
        for _ in range(25):
            a, b = rng.randrange(1, 10), rng.randrange(1, 10)
            kind = rng.choice(["move", "move", "name", "body", "insert", "delete"])
            if kind == "move":
                statements.append(f"update t set id = {b} where id = {a} "
                                  f"and not exists (select 1 from t where id = {b})")
            elif kind == "name":
                statements.append(f"update t set name = 'r{rng.random()}' where id = {a}")
            elif kind == "body":
                statements.append(f"update t set body = {BODY} where id = {a}")
            elif kind == "insert":
                statements.append(f"insert into t values ({a}, 'i', {BODY}) on conflict do nothing")
            else:
                statements.append(f"delete from t where id = {a}")
        # Some in one transaction, some in their own: both end up in one batch.
        cut = rng.randrange(len(statements))
        docs.txn(*statements[:cut])
        for s in statements[cut:]:
            docs.txn(s)
        docs()
