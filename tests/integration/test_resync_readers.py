"""A resync as analysts see it: the old rows until the new copy is complete, then the new ones.

A reader polls the mirror through a view the whole time; every answer must be the mirror as
it was before the resync or as the source is, never an empty or half-copied table. The copy
goes into a shadow table and one transaction brings the mirror to it (destination/shadow.py):
the mirror keeps its OID, its view, its policy and its grants.
"""

from __future__ import annotations

import threading
import time

import pytest
from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    assert_same,
    catch_up,
    running,
    sync_state,
    table_rows,
    wait_for,
)

from replicator import failpoints
from replicator.destination import state

ROWS = 5000


@pytest.fixture
def armed():
    yield failpoints.arm
    failpoints.disarm_all()


class Reader(threading.Thread):
    """Reads (count, sum of ids, sum of n) through a view until stopped, as fast as it can."""

    def __init__(self, dest_db, query: str) -> None:
        super().__init__(daemon=True, name="reader")
        self.dest_db, self.query = dest_db, query
        self.seen: list[tuple[float, tuple]] = []
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.dest_db.connect(autocommit=True) as conn:
                while not self.stop_event.is_set():
                    row = conn.execute(self.query).fetchone()
                    self.seen.append((time.monotonic(), tuple(row)))
                    time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> set[tuple]:
        self.stop_event.set()
        self.join(30)
        assert self.error is None, f"the reader failed: {self.error!r}"
        return {s for _, s in self.seen}


def drifted_mirror(source_db, dest_db) -> None:
    """b mirrored, then changed in the mirror by hand: rows lost, a value wrong, a stray row."""
    source_db.execute("create table b (id int primary key, n int, v text)")
    source_db.execute(f"insert into b select g, g % 97, 'b' || g "
                      f"from generate_series(1, {ROWS}) g")
    source_db.execute(f"create publication {PUBLICATION} for table b")
    catch_up(source_db, dest_db)
    dest_db.execute(f"create view {MIRROR_SCHEMA}.b_report as "
                    f"select count(*) as n, sum(id) as ids, sum(n) as ns from {MIRROR_SCHEMA}.b")
    dest_db.execute(f"delete from {MIRROR_SCHEMA}.b where id <= 100")
    dest_db.execute(f"update {MIRROR_SCHEMA}.b set n = -1, v = 'wrong' where id = 500")
    dest_db.execute(f"insert into {MIRROR_SCHEMA}.b values (999999, 1, 'stray')")


def report(db, schema: str) -> tuple:
    return tuple(db.fetchall(f"select count(*), sum(id), sum(n) from {schema}.b")[0])


def identity(dest_db) -> tuple:
    return tuple(dest_db.fetchall(
        "select c.oid, c.relrowsecurity, c.relacl::text, "
        "(select count(*) from pg_policy p where p.polrelid = c.oid) "
        f"from pg_class c where c.oid = '{MIRROR_SCHEMA}.b'::regclass")[0])


def resync_b(dest_db) -> None:
    with dest_db.connect() as conn:
        assert state.request_resync(conn, "replicator", PUBLICATION, ["public.b"]) == 1


def test_readers_see_the_old_rows_until_a_live_resync_is_complete(source_db, dest_db, armed):
    drifted_mirror(source_db, dest_db)
    before, who = report(dest_db, MIRROR_SCHEMA), identity(dest_db)
    # Windows a reader must not see into: the tables planned with no row copied yet, and
    # every row copied but not yet marked.
    armed(failpoints.COPY_PLANNED, "sleep:1")
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1")
    reader = Reader(dest_db, f"select n, ids, ns from {MIRROR_SCHEMA}.b_report")
    with running(source_db, dest_db) as pipeline:
        wait_for(lambda: pipeline.metrics.status == "streaming", what="streaming")
        reader.start()
        resync_b(dest_db)
        wait_for(lambda: sync_state(dest_db, "b") == "copying", what="the copy to start")
        # After the copy's snapshot: held, then applied on top of the new copy.
        source_db.execute("update b set n = n + 1000 where id = 1")
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="the resync to end",
                 timeout=90)
        wait_for(lambda: report(dest_db, MIRROR_SCHEMA) == report(source_db, "public"),
                 what="the held change")
    seen = reader.stop()
    after = report(source_db, "public")
    copied = (after[0], after[1], after[2] - 1000)    # the copy, before the held change
    assert before != copied != after
    assert seen <= {before, copied, after}, f"readers saw {seen - {before, copied, after}}"
    assert before in seen and after in seen
    # Polled while the copy ran (both sleeps), not only around it.
    assert len(reader.seen) > 100
    assert_same(source_db, dest_db, "b")
    assert identity(dest_db) == who
    assert dest_db.scalar("select count(*) from pg_class where relnamespace = "
                          "'replicator'::regnamespace and relname like 'shadow%'") == 0


def test_a_resync_converting_a_column_never_shows_the_table_empty(source_db, dest_db, armed):
    # A column retyped by hand cannot be converted back with its rows in: the swap empties
    # and refills the mirror in one transaction, so readers wait instead of reading.
    drifted_mirror(source_db, dest_db)
    dest_db.execute(f"drop view {MIRROR_SCHEMA}.b_report")
    dest_db.execute(f"alter table {MIRROR_SCHEMA}.b alter column n type text")
    dest_db.execute(f"update {MIRROR_SCHEMA}.b set n = 'x' where id = 300")
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1")
    reader = Reader(dest_db, f"select count(*) from {MIRROR_SCHEMA}.b")
    with running(source_db, dest_db) as pipeline:
        wait_for(lambda: pipeline.metrics.status == "streaming", what="streaming")
        reader.start()
        resync_b(dest_db)
        wait_for(lambda: sync_state(dest_db, "b") == "streaming", what="the resync to end",
                 timeout=90)
    seen = reader.stop()
    assert seen == {(ROWS - 100 + 1,), (ROWS,)}, seen
    assert_same(source_db, dest_db, "b")
    assert dest_db.scalar(
        f"select format_type(atttypid, atttypmod) from pg_attribute where attrelid = "
        f"'{MIRROR_SCHEMA}.b'::regclass and attname = 'n'") == "integer"


def test_a_copy_after_a_crash_keeps_the_old_rows_until_it_is_complete(source_db, dest_db,
                                                                     armed):
    # A resync interrupted (here: stopped in its copy) is done again at the next start,
    # before streaming: that copy goes into a shadow too.
    drifted_mirror(source_db, dest_db)
    before = report(dest_db, MIRROR_SCHEMA)
    dest_db.execute("update replicator.tables set state = 'copying' "
                    "where source_table = 'public.b'")
    armed(failpoints.COPY_DONE_BEFORE_MARK, "sleep:1")
    reader = Reader(dest_db, f"select n, ids, ns from {MIRROR_SCHEMA}.b_report")
    reader.start()
    catch_up(source_db, dest_db)
    seen = reader.stop()
    after = report(source_db, "public")
    assert seen <= {before, after} and before in seen, seen
    assert_same(source_db, dest_db, "b")
    assert sync_state(dest_db, "b") == "streaming"


def test_user_triggers_stay_as_the_operator_left_them(source_db, dest_db):
    drifted_mirror(source_db, dest_db)
    dest_db.execute("create table public.fired (id int)")
    dest_db.execute("create function public.note() returns trigger language plpgsql as "
                    "$$ begin insert into public.fired values (new.id); return new; end $$")
    modes = {"t_on": "enable", "t_off": "disable", "t_always": "enable always",
             "t_replica": "enable replica"}
    for name, mode in modes.items():
        dest_db.execute(f"create trigger {name} after insert or update on {MIRROR_SCHEMA}.b "
                        "for each row execute function public.note()")
        dest_db.execute(f"alter table {MIRROR_SCHEMA}.b {mode} trigger {name}")
    resync_b(dest_db)
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")
    # The copied rows are history: no trigger fired for them; the operator's choices stand.
    assert dest_db.scalar("select count(*) from public.fired") == 0
    assert dict(dest_db.fetchall(
        f"select tgname::text, tgenabled::text from pg_trigger where tgrelid = "
        f"'{MIRROR_SCHEMA}.b'::regclass and not tgisinternal")) == {
        "t_on": "O", "t_off": "D", "t_always": "A", "t_replica": "R"}
    source_db.execute("insert into b values (123456, 1, 'news')")
    catch_up(source_db, dest_db)
    # The replicator's sessions run as origin: t_on and t_always fire, t_replica does not.
    assert table_rows(dest_db, "fired", order="id") == [(123456,), (123456,)]


def test_a_soft_deleted_mirror_is_copied_afresh(source_db, dest_db):
    source_db.execute("create table b (id int primary key, n int, v text)")
    source_db.execute("insert into b select g, g, 'b' from generate_series(1, 50) g")
    source_db.execute(f"create publication {PUBLICATION} for table b")
    soft = {"mappings": {"b": {"soft_delete": True}}}
    catch_up(source_db, dest_db, **soft)
    source_db.execute("delete from b where id <= 5")
    catch_up(source_db, dest_db, **soft)
    assert dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.b "
                          "where _deleted_at is not null") == 5
    dest_db.execute(f"update {MIRROR_SCHEMA}.b set _deleted_at = now() where id = 10")
    resync_b(dest_db)
    catch_up(source_db, dest_db, **soft)
    rows = dest_db.fetchall(f"select id, _deleted_at is null from {MIRROR_SCHEMA}.b order by id")
    assert rows == [(i, True) for i in range(6, 51)]


def test_a_reader_holding_the_mirror_does_not_block_the_copy(source_db, dest_db):
    # A long report open on the mirror (ACCESS SHARE) while the table is copied: the copy
    # and the swap take no lock that waits for it.
    drifted_mirror(source_db, dest_db)
    with dest_db.connect(autocommit=False) as reader:
        # A transaction open on the mirror, holding its lock.
        old = reader.execute(f"select count(*) from {MIRROR_SCHEMA}.b").fetchone()
        resync_b(dest_db)
        catch_up(source_db, dest_db, timeout=60)
        assert sync_state(dest_db, "b") == "streaming"
        # Read committed: its next statement already sees the new copy.
        assert old == (ROWS - 100 + 1,)
        assert reader.execute(f"select count(*) from {MIRROR_SCHEMA}.b").fetchone() == (ROWS,)
        reader.rollback()
    assert_same(source_db, dest_db, "b")


def test_values_without_an_equality_operator_are_compared_as_text(source_db, dest_db):
    # json and point have no `=`, varchar borrows text's: a drift in any of them is found.
    source_db.execute("create table b (id int primary key, j json, p point, c varchar(10), "
                      "x numeric, a int[], ja json[])")
    source_db.execute("insert into b select g, json_build_object('g', g), point(g, g), 'c' || g, "
                      "g / 3.0, array[g], array[json_build_object('g', g)] "
                      "from generate_series(1, 20) g")
    source_db.execute(f"create publication {PUBLICATION} for table b")
    catch_up(source_db, dest_db)
    for column, value in (("j", "'{\"g\": 0}'"), ("p", "point(0, 0)"), ("c", "'drift'"),
                          ("x", "0"), ("a", "'{0}'"), ("ja", "array['{}'::json]")):
        dest_db.execute(f"update {MIRROR_SCHEMA}.b set {column} = {value} where id = 7")
    resync_b(dest_db)
    catch_up(source_db, dest_db)
    assert_same(source_db, dest_db, "b")


def test_a_resync_of_a_table_emptied_at_the_source_empties_the_mirror(source_db, dest_db):
    # Emptied by a DELETE the mirror missed (here: the mirror refilled by hand).
    source_db.execute("create table b (id int primary key, n int, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table b")
    catch_up(source_db, dest_db)
    dest_db.execute(f"insert into {MIRROR_SCHEMA}.b values (1, 1, 'stray'), (2, 2, 'stray')")
    resync_b(dest_db)
    catch_up(source_db, dest_db)
    assert dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.b") == 0
    assert sync_state(dest_db, "b") == "streaming"


def test_a_composite_key_an_excluded_column_and_a_filter(source_db, dest_db):
    source_db.execute("create table b (company int, id int, n numeric, secret text, "
                      "primary key (company, id))")
    source_db.execute("insert into b select g % 3, g, g / 4.0, 's' from generate_series(1, 60) g")
    source_db.execute(f"create publication {PUBLICATION} for table b")
    options = {"mappings": {"b": {"exclude": ["secret"], "filter": "company <> 2"}}}
    catch_up(source_db, dest_db, **options)
    # Drift: a lost row, a changed value the `=` of numeric calls equal (1.0 and 1.00), a
    # row outside the filter, a key of another company.
    dest_db.execute(f"delete from {MIRROR_SCHEMA}.b where (company, id) = (1, 4)")
    dest_db.execute(f"update {MIRROR_SCHEMA}.b set n = 2.00 where (company, id) = (2, 8)")
    dest_db.execute(f"update {MIRROR_SCHEMA}.b set n = 3.0 where (company, id) = (0, 12)")
    dest_db.execute(f"insert into {MIRROR_SCHEMA}.b values (2, 5, 1), (1, 6, 1)")
    resync_b(dest_db)
    catch_up(source_db, dest_db, **options)
    expected = [(c, i, n) for c, i, n, _s in table_rows(source_db, "b", order="company, id")
                if c != 2]
    assert table_rows(dest_db, "b", MIRROR_SCHEMA, order="company, id") == expected
    assert dest_db.scalar(f"select n::text from {MIRROR_SCHEMA}.b "
                          "where (company, id) = (0, 12)") == "3.0000000000000000"


def test_a_swap_that_cannot_get_its_lock_waits_with_the_shadow_kept(source_db, dest_db, caplog):
    # A session holding a lock the swap's writes conflict with (an operator's LOCK, a long
    # maintenance job): the swap gives up after lock_timeout, so readers do not queue behind
    # it, and tries again until it gets through.
    drifted_mirror(source_db, dest_db)
    resync_b(dest_db)
    with dest_db.connect(autocommit=False) as holder:
        holder.execute(f"lock table {MIRROR_SCHEMA}.b in share mode")
        releaser = threading.Timer(4.0, holder.rollback)
        releaser.start()
        try:
            catch_up(source_db, dest_db, lock_timeout=0.5)
        finally:
            releaser.cancel()
    assert "the mirror is busy" in caplog.text
    assert_same(source_db, dest_db, "b")
    assert sync_state(dest_db, "b") == "streaming"
