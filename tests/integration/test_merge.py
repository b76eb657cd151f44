"""The per-batch MERGE on a real destination, fed by hand-written pgoutput.

Each case is a stream the source can send; the mirror must end as the source
did. Unchanged-TOAST ('u') columns never become NULL: they keep the mirror's
value, take the latest earlier image in the batch, or follow a key change;
when nothing can supply them the row goes to the dead letter table.
"""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgwire import UNCHANGED as U
from pgwire import begin, commit, delete, insert, int4, truncate, update

from replicator._decode import Decoder
from replicator.batch import Batch, Truncate
from replicator.config.settings import MappingOptions
from replicator.destination import applier as applier_module
from replicator.destination import state
from replicator.destination.applier import Applier
from replicator.errors import ReplicatorError
from replicator.schema import Column, MirrorTable, SourceTable

RELID = 16500
COLS = (Column("id", "integer", 23, 4), Column("name", "text", 25, -1),
        Column("big", "text", 25, -1))
WIRE_COLS = [(1, "id", 23, -1), (0, "name", 25, -1), (0, "big", 25, -1)]


def B(s: str) -> bytes:
    return s.encode()


def connected(dest_db, table: MirrorTable, alter: bool = True) -> Applier:
    """An applier on the test's destination, the state and the table's mirror set up."""
    applier = Applier(dest_db.dsn, "replicator", "test_slot")
    applier.connect()
    state.setup(applier.conn, "replicator")
    applier.prepare_tables([table], alter=alter)
    return applier


def one_batch(table: MirrorTable, lsn: int, *messages: bytes) -> Batch:
    """Decode messages as one source transaction at `lsn` into a batch (a truncate among
    them splits the rows, as the receiver does)."""
    dec = Decoder()
    dec.define(RELID, len(table.columns), [0], True)
    batch = Batch()
    dec.feed(begin(lsn))
    for m in messages:
        dec.feed(m)
        if m[:1] == b"T":
            batch.add_rows(dec.take(), {RELID: table})
            batch.ops.append(Truncate([table], False, False))
    dec.feed(commit(lsn, lsn + 10))
    batch.add_rows(dec.take(), {RELID: table})
    batch.commit(lsn + 10, 0)
    return batch


@pytest.fixture
def mirror(dest_db):
    table = MirrorTable(SourceTable(RELID, "public", "t", COLS, ("id",), "d"),
                        "odoo_mirror", "t", "replicator", binary=True)
    applier = connected(dest_db, table)
    lsn = [100]

    def apply(*messages):
        """Decode one batch of messages (wrapped in one transaction) and apply it."""
        batch = one_batch(table, lsn[0], *messages)
        lsn[0] += 100
        return applier.apply(batch)

    def rows():
        return dest_db.fetchall("select id, name, big from odoo_mirror.t order by id")

    def dead():
        return dest_db.fetchall("select row_data from replicator.dead_letters order by id")

    apply.rows, apply.dead = rows, dead
    yield apply
    applier.close()


def row(i, name, big):
    return [int4(i), None if name is None else B(name), None if big is None else B(big)]


def key(i):
    return [int4(i), None, None]


def test_plain_insert_update_delete(mirror):
    mirror(insert(RELID, row(1, "a", "A")), insert(RELID, row(2, "b", "B")),
           insert(RELID, row(3, "c", "C")))
    mirror(update(RELID, row(1, "a2", "A2")), delete(RELID, key(2)))
    assert mirror.rows() == [(1, "a2", "A2"), (3, "c", "C")]


def test_last_change_per_key_wins_in_one_batch(mirror):
    mirror(insert(RELID, row(1, "a", "A")), update(RELID, row(1, "b", "B")),
           delete(RELID, key(1)),
           insert(RELID, row(2, "x", "X")), update(RELID, row(2, "y", "Y")),
           update(RELID, row(2, "z", "Z")),
           insert(RELID, row(3, "p", "P")), delete(RELID, key(3)), insert(RELID, row(3, "q", "Q")))
    assert mirror.rows() == [(2, "z", "Z"), (3, "q", "Q")]


def test_unchanged_toast_keeps_the_mirror_value(mirror):
    mirror(insert(RELID, row(1, "a", "BIG1")))
    mirror(update(RELID, [int4(1), B("b"), U]))
    assert mirror.rows() == [(1, "b", "BIG1")]
    assert mirror.dead() == []


def test_unchanged_toast_after_insert_in_the_same_batch(mirror):
    mirror(insert(RELID, row(1, "a", "BIG1")), update(RELID, [int4(1), B("b"), U]),
           update(RELID, [int4(1), B("c"), U]))
    assert mirror.rows() == [(1, "c", "BIG1")]


def test_unchanged_toast_takes_the_latest_earlier_image(mirror):
    mirror(insert(RELID, row(1, "a", "OLD")))
    mirror(update(RELID, [int4(1), B("b"), U]), update(RELID, row(1, "c", "NEW")),
           update(RELID, [int4(1), B("d"), U]))
    assert mirror.rows() == [(1, "d", "NEW")]


def test_unchanged_toast_after_delete_and_reinsert(mirror):
    mirror(insert(RELID, row(7, "a", "FIRST")))
    mirror(delete(RELID, key(7)), insert(RELID, row(7, "n", "SECOND")),
           update(RELID, [int4(7), B("m"), U]))
    assert mirror.rows() == [(7, "m", "SECOND")]


def test_primary_key_change_moves_unchanged_toast(mirror):
    mirror(insert(RELID, row(1, "a", "BIG1")))
    mirror(update(RELID, [int4(2), B("b"), U], old=key(1)))
    assert mirror.rows() == [(2, "b", "BIG1")]


def test_primary_key_change_after_insert_in_the_same_batch(mirror):
    mirror(insert(RELID, row(5, "x", "BIG5")), update(RELID, [int4(6), B("y"), U], old=key(5)))
    assert mirror.rows() == [(6, "y", "BIG5")]


def test_primary_key_change_without_toast(mirror):
    mirror(insert(RELID, row(1, "a", "A")), insert(RELID, row(2, "b", "B")))
    # swap-like sequence: 1 -> 3, 2 -> 1
    mirror(update(RELID, row(3, "a", "A"), old=key(1)), update(RELID, row(1, "b", "B"), old=key(2)))
    assert mirror.rows() == [(1, "b", "B"), (3, "a", "A")]


def test_replica_identity_full_fills_unchanged_from_the_old_image(mirror):
    mirror(insert(RELID, row(1, "a", "BIG")))
    # With REPLICA IDENTITY FULL the old tuple carries every value.
    mirror(update(RELID, [int4(1), B("b"), U], old=row(1, "a", "BIG"), old_kind="O"))
    assert mirror.rows() == [(1, "b", "BIG")]


def test_unchanged_toast_without_any_image_is_a_dead_letter(mirror):
    mirror(insert(RELID, row(1, "a", "A")))
    mirror(update(RELID, [int4(9), B("z"), U]), update(RELID, row(1, "b", "B")))
    assert mirror.rows() == [(1, "b", "B")]
    assert mirror.dead() == [({"id": 9},)]


def test_truncate_in_stream_order(mirror):
    mirror(insert(RELID, row(1, "a", "A")))
    mirror(insert(RELID, row(2, "b", "B")), truncate([RELID]), insert(RELID, row(3, "c", "C")),
           update(RELID, [int4(3), B("c2"), U]))
    assert mirror.rows() == [(3, "c2", "C")]


def test_null_values_are_written_as_null(mirror):
    mirror(insert(RELID, row(1, None, None)))
    mirror(insert(RELID, row(2, "x", "y")), update(RELID, row(2, None, None)))
    assert mirror.rows() == [(1, None, None), (2, None, None)]


def test_two_key_changes_of_one_row_in_one_batch(mirror):
    mirror(insert(RELID, row(2, "a", "BIG2")))
    mirror(update(RELID, [int4(12), B("b"), U], old=key(2)),
           update(RELID, [int4(22), B("c"), U], old=key(12)))
    assert mirror.rows() == [(22, "c", "BIG2")]
    assert mirror.dead() == []


def test_swap_of_two_keys_in_one_batch(mirror):
    mirror(insert(RELID, row(3, "three", "BIG3")), insert(RELID, row(4, "four", "BIG4")))
    mirror(update(RELID, [int4(-3), B("three"), U], old=key(3)),
           update(RELID, [int4(3), B("four"), U], old=key(4)),
           update(RELID, [int4(4), B("three"), U], old=key(-3)))
    assert mirror.rows() == [(3, "four", "BIG4"), (4, "three", "BIG3")]
    assert mirror.dead() == []


def test_chain_takes_the_latest_image_on_any_key(mirror):
    mirror(insert(RELID, row(1, "a", "OLD")))
    mirror(update(RELID, [int4(2), B("b"), U], old=key(1)),
           update(RELID, row(2, "c", "NEW")),
           update(RELID, [int4(3), B("d"), U], old=key(2)),
           update(RELID, [int4(4), B("e"), U], old=key(3)),
           insert(RELID, row(1, "again", "OTHER")))
    assert mirror.rows() == [(1, "again", "OTHER"), (4, "e", "NEW")]


def test_chain_back_to_a_reinserted_key(mirror):
    mirror(insert(RELID, row(1, "a", "FIRST")))
    # 1 is deleted and inserted anew before it moves: the move takes the new image.
    mirror(delete(RELID, key(1)), insert(RELID, row(1, "b", "SECOND")),
           update(RELID, [int4(2), B("c"), U], old=key(1)),
           update(RELID, [int4(3), B("d"), U], old=key(2)))
    assert mirror.rows() == [(3, "d", "SECOND")]


def test_chain_from_a_key_the_mirror_lacks_is_a_dead_letter(mirror):
    mirror(insert(RELID, row(1, "a", "A")))
    mirror(update(RELID, [int4(6), B("x"), U], old=key(5)),
           update(RELID, [int4(7), B("y"), U], old=key(6)))
    assert mirror.rows() == [(1, "a", "A")]
    assert mirror.dead() == [({"id": 7},)]



@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_changes_on_a_small_key_space(mirror, dest_db, data):
    """Inserts, updates (some with the big column unchanged), key changes and deletes on keys
    1..5, cut into batches at random: the mirror ends as a model of the source does."""
    dest_db.execute("truncate odoo_mirror.t, replicator.dead_letters")
    model: dict[int, tuple[str, str]] = {}
    counter = iter(range(10**6))

    def fresh(prefix):
        return f"{prefix}{next(counter)}"

    initial = data.draw(st.sets(st.integers(1, 5)), label="initial keys")
    msgs = []
    for k in sorted(initial):
        model[k] = (fresh("n"), fresh("BIG"))
        msgs.append(insert(RELID, row(k, *model[k])))
    if msgs:
        mirror(*msgs)
    for _ in range(data.draw(st.integers(1, 4), label="batches")):
        msgs = []
        for _ in range(data.draw(st.integers(1, 8), label="changes")):
            present = sorted(model)
            absent = [k for k in range(-1, 6) if k not in model]
            kinds = ["insert"] * bool(absent) + ["update", "delete"] * bool(present) \
                + ["move"] * 3 * bool(present and absent)
            kind = data.draw(st.sampled_from(kinds))
            if kind == "insert":
                k = data.draw(st.sampled_from(absent))
                model[k] = (fresh("n"), fresh("BIG"))
                msgs.append(insert(RELID, row(k, *model[k])))
                continue
            if kind == "delete":
                k = data.draw(st.sampled_from(present))
                del model[k]
                msgs.append(delete(RELID, key(k)))
                continue
            a = data.draw(st.sampled_from(present))
            b = data.draw(st.sampled_from(absent)) if kind == "move" else a
            name, big = model.pop(a)
            name = fresh("n")
            unchanged = data.draw(st.booleans())
            if not unchanged:
                big = fresh("BIG")
            model[b] = (name, big)
            new = [int4(b), B(name), U if unchanged else B(big)]
            msgs.append(update(RELID, new, old=key(a)) if a != b else update(RELID, new))
        mirror(*msgs)
    assert mirror.rows() == [(k, *model[k]) for k in sorted(model)]
    assert mirror.dead() == []


def _staging(dest_db):
    return dest_db.scalar("select c.oid::regclass::text from pg_class c where c.relnamespace = "
                          "'replicator'::regnamespace and c.relname like 'stage\\_t\\_%'")


def test_staging_is_empty_after_each_batch(mirror, dest_db):
    stage = _staging(dest_db)
    mirror(insert(RELID, row(1, "a", "A")), insert(RELID, row(2, "b", "B")))
    assert dest_db.scalar(f"select count(*) from {stage}") == 0
    mirror(update(RELID, [int4(1), B("a2"), U]), delete(RELID, key(2)), truncate([RELID]),
           insert(RELID, row(3, "c", "C")))
    assert dest_db.scalar(f"select count(*) from {stage}") == 0
    assert mirror.rows() == [(3, "c", "C")]


def test_staging_keeps_its_relfilenode_across_batches(mirror, dest_db):
    stage = _staging(dest_db)
    before = dest_db.scalar("select pg_relation_filenode(%s)", [stage])
    for i in range(3):
        mirror(insert(RELID, row(i, "a", "A")), update(RELID, [int4(i), B("b"), U]))
    mirror(update(RELID, row(0, "c", "C")))
    assert dest_db.scalar("select pg_relation_filenode(%s)", [stage]) == before
    assert mirror.rows() == [(0, "c", "C"), (1, "b", "A"), (2, "b", "A")]


def test_a_failed_batch_leaves_nothing_in_staging(mirror, dest_db):
    mirror(insert(RELID, row(1, "a", "A")))
    dest_db.execute("alter table odoo_mirror.t add constraint no_boom check (name <> 'boom')")
    with pytest.raises(ReplicatorError):
        mirror(insert(RELID, row(2, "x", "X")), update(RELID, row(1, "boom", "A")))
    dest_db.execute("alter table odoo_mirror.t drop constraint no_boom")
    mirror(insert(RELID, row(3, "c", "C")))
    assert mirror.rows() == [(1, "a", "A"), (3, "c", "C")]
    assert dest_db.scalar(f"select count(*) from {_staging(dest_db)}") == 0


def test_rows_left_in_staging_by_an_older_version_are_not_merged(mirror, dest_db):
    # A replicator that truncated staging before its COPY committed with rows in it.
    stage = _staging(dest_db)
    dest_db.execute(f"insert into {stage} (_r_seq, _r_lsn, _r_op, id, name, big) "
                    "values (1000000, 1, 'I', 9, 'stale', 'STALE')")
    # An update: a batch of inserts only goes into the mirror by COPY, not through staging.
    mirror(insert(RELID, row(1, "a", "A")), update(RELID, row(1, "a", "A1")))
    assert mirror.rows() == [(1, "a", "A1")]


def test_a_failed_first_batch_leaves_staging_to_be_cleared_by_the_next(mirror, dest_db):
    # Staging is cleared before COPY only until a batch that emptied it commits: one
    # that rolled back restored the stale row, and the next batch must clear it still.
    stage = _staging(dest_db)
    dest_db.execute(f"insert into {stage} (_r_seq, _r_lsn, _r_op, id, name, big) "
                    "values (1000000, 1, 'I', 9, 'stale', 'STALE')")
    dest_db.execute("alter table odoo_mirror.t add constraint no_boom check (name <> 'boom')")
    with pytest.raises(ReplicatorError):
        mirror(insert(RELID, row(1, "boom", "A")))
    dest_db.execute("alter table odoo_mirror.t drop constraint no_boom")
    assert dest_db.scalar(f"select count(*) from {stage}") == 1
    # Updates: a batch of inserts only goes into the mirror by COPY, not through staging.
    mirror(insert(RELID, row(1, "a", "A")), update(RELID, row(1, "a", "A")))
    mirror(insert(RELID, row(2, "b", "B")), update(RELID, row(2, "b", "B")))
    assert mirror.rows() == [(1, "a", "A"), (2, "b", "B")]
    assert dest_db.scalar(f"select count(*) from {stage}") == 0


def test_staging_is_vacuumed_after_enough_rows(mirror, dest_db, monkeypatch):
    # The deleted rows' pages are reused (or cut off) only after a VACUUM; without one,
    # every COPY appends pages that each batch's delete and MERGE scan again.
    monkeypatch.setattr(applier_module, "STAGING_VACUUM_ROWS", 300)
    stage = _staging(dest_db)
    for b in range(3):
        # Updates: inserts go into the mirror by COPY, not through staging.
        mirror(*(insert(RELID, row(b * 100 + i, "a" * 50, "A" * 50)) for i in range(100)))
        mirror(*(update(RELID, row(b * 100 + i, "b" * 50, "B" * 50)) for i in range(100)))
    assert dest_db.scalar("select pg_relation_size(%s)", [stage]) == 0
    assert len(mirror.rows()) == 300


# -- a batch of inserts only: COPY into the mirror, no staging, no MERGE -------------

def test_inserts_only_go_into_the_mirror_without_staging(mirror, dest_db):
    stage = _staging(dest_db)
    # Staging gone for the batch: one that used it would fail.
    dest_db.execute(f"alter table {stage} rename to gone")
    try:
        mirror(*(insert(RELID, row(i, f"n{i}", None if i % 2 else "B" * 3000))
                 for i in range(1, 6)))
    finally:
        dest_db.execute(f"alter table replicator.gone rename to {stage.split('.')[1]}")
    assert mirror.rows() == [(i, f"n{i}", None if i % 2 else "B" * 3000) for i in range(1, 6)]
    # The next batch with an update uses staging again, and leaves it empty.
    mirror(insert(RELID, row(6, "n6", "x")), update(RELID, row(1, "n1", "y")))
    assert mirror.rows()[0] == (1, "n1", "y")
    assert dest_db.scalar(f"select count(*) from {stage}") == 0


def test_an_insert_of_a_key_the_mirror_has_updates_it(mirror, dest_db, caplog):
    # `verify --repair` copied the source's row before the stream brought its insert.
    caplog.set_level("INFO", logger="replicator.destination.applier")
    dest_db.execute("insert into odoo_mirror.t values (2, 'repaired', 'R')")
    res = mirror(insert(RELID, row(1, "a", "A")), insert(RELID, row(2, "b", "B")))
    assert mirror.rows() == [(1, "a", "A"), (2, "b", "B")]
    assert res.inserts == 2
    assert "inserts a key the mirror has already" in caplog.text
    assert "rejected" not in caplog.text


def test_a_rejected_insert_is_still_found_and_stopped(mirror, dest_db):
    dest_db.execute("alter table odoo_mirror.t add constraint no_boom check (name <> 'boom')")
    with pytest.raises(ReplicatorError, match='key {"id": 2}'):
        mirror(insert(RELID, row(1, "a", "A")), insert(RELID, row(2, "boom", "B")))
    assert mirror.rows() == []


def test_inserts_into_a_mirror_column_retyped_by_hand_are_cast(dest_db):
    # timestamp -> timestamptz: COPY BINARY would take the same bytes for another instant;
    # the MERGE casts in the session's time zone, as it does for an update.
    cols = (Column("id", "integer", 23, 4),
            Column("at", "timestamp without time zone", 1114, 8))
    table = MirrorTable(SourceTable(RELID, "public", "ts", cols, ("id",), "d"),
                        "odoo_mirror", "ts", "replicator", binary=True)
    connected(dest_db, table).close()
    dest_db.execute("alter table odoo_mirror.ts alter column at type timestamptz")
    dest_db.execute(f"alter database {dest_db.name} set timezone = 'Asia/Tokyo'")
    applier = connected(dest_db, table, alter=False)   # a new session: the new time zone
    try:
        # 2026-01-01 00:00:00 as a timestamp: microseconds since 2000-01-01.
        micros = (date(2026, 1, 1) - date(2000, 1, 1)).days * 86_400_000_000
        applier.apply(one_batch(table, 100, insert(
            RELID, [int4(1), micros.to_bytes(8, "big", signed=True)])))
    finally:
        applier.close()
    assert dest_db.scalar("select at = timestamptz '2026-01-01 00:00:00+09' "
                          "from odoo_mirror.ts") is True


def test_inserts_leave_excluded_columns_out(dest_db):
    table = MirrorTable(SourceTable(RELID, "public", "t", COLS, ("id",), "d"),
                        "odoo_mirror", "t", "replicator", binary=True,
                        options=MappingOptions(exclude=frozenset({"name"})))
    applier = connected(dest_db, table)
    try:
        applier.apply(one_batch(table, 100, insert(RELID, row(1, "secret", "A")),
                                insert(RELID, row(2, "secret", None))))
    finally:
        applier.close()
    assert dest_db.fetchall("select * from odoo_mirror.t order by id") == [(1, "A"), (2, None)]


def test_inserts_by_copy_then_updates_of_them_by_merge(mirror, dest_db):
    # The inserts go in first, by COPY; the updates (one with an unchanged large value,
    # which the inserted row supplies) are staged and merged after them.
    mirror(insert(RELID, row(1, "a", "A")))
    mirror(insert(RELID, row(2, "b", "B" * 3000)), insert(RELID, row(3, "c", "C")),
           update(RELID, [int4(2), B("b2"), U]), update(RELID, row(1, "a1", "A1")),
           update(RELID, [int4(2), B("b3"), U]), insert(RELID, row(4, "d", None)))
    assert mirror.rows() == [(1, "a1", "A1"), (2, "b3", "B" * 3000), (3, "c", "C"),
                             (4, "d", None)]
    assert mirror.dead() == []
    assert dest_db.scalar(f"select count(*) from {_staging(dest_db)}") == 0


def test_a_user_trigger_sees_each_key_once_with_the_batch_last_values(dest_db):
    # As the memory trigger must (docs: What the mirror sees): an insert and an update of
    # one key in a batch reach an AFTER INSERT trigger as one insert with the updated values,
    # so a table with user triggers keeps the MERGE when updates follow its inserts. Inserts
    # alone still go by COPY, which fires the trigger once per row.
    table = MirrorTable(SourceTable(RELID, "public", "t", COLS, ("id",), "d"),
                        "odoo_mirror", "t", "replicator", binary=True)
    connected(dest_db, table).close()
    dest_db.execute("create table public.seen (id int, name text)")
    dest_db.execute("create function public.note() returns trigger language plpgsql as $$ "
                    "begin insert into public.seen values (new.id, new.name); return null; "
                    "end $$")
    dest_db.execute("create trigger noted after insert on odoo_mirror.t for each row "
                    "execute function public.note()")
    applier = connected(dest_db, table, alter=False)
    try:
        applier.apply(one_batch(table, 100, insert(RELID, row(1, "draft", "A")),
                                update(RELID, row(1, "posted", "A")),
                                insert(RELID, row(2, "other", "B"))))
        applier.apply(one_batch(table, 200, insert(RELID, row(3, "c", "C")),
                                insert(RELID, row(4, "d", None))))
    finally:
        applier.close()
    assert dest_db.fetchall("select id, name from public.seen order by id") == [
        (1, "posted"), (2, "other"), (3, "c"), (4, "d")]
