"""In-progress transactions streamed by the source (protocol 2+, streaming on).

The source streams a transaction in chunks once its decoded changes pass
logical_decoding_work_mem; these tests set it to its minimum (64kB) so a few
thousand rows make several chunks. Chunks of different transactions interleave
with each other and with whole small transactions; a chunk may hold a
subtransaction that is rolled back later, DDL or a TRUNCATE. Whatever the
mixture, the mirror must end equal to the source, and each test checks that the
source really streamed (the receiver logs each streamed commit with its chunks).
"""

from __future__ import annotations

import gc
import random
import threading
import time

import psycopg
import pytest
from plugins.replicator import PUBLICATION, assert_same, catch_up, running, table_rows, wait_for
from zoo import setup_zoo, zoo_rows

from replicator import failpoints
from replicator.destination import dead_letters
from replicator.pipeline.receiver import Receiver
from replicator.pipeline.stream_apply import MAX_SAVEPOINTS

STREAMING = {"logical_decoding_work_mem": "64kB"}


def streamed_commits(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Chunks of each streamed transaction the receiver committed, in order."""
    return [r.chunks for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "streamed transaction committed"]


def gave_up(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why streamed transactions were applied at their commit rather than while they ran."""
    return [r.reason for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "streamed transaction applied at its commit instead"]


def applied_while_running(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Chunks of each streamed transaction committed from its open destination transaction."""
    return [r.chunks for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "streamed transaction applied while it ran"]


def savepoint_rollbacks(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage() == "subtransaction rolled back to its savepoint"
               for r in caplog.records)


@pytest.fixture
def zoo(source_db, dest_db):
    setup_zoo(source_db)
    source_db.execute(zoo_rows(1000))
    catch_up(source_db, dest_db, **STREAMING)
    return source_db


def caught_up(source_db, dest_db, caplog, **overrides) -> list[int]:
    with caplog.at_level("DEBUG", logger="replicator"):
        catch_up(source_db, dest_db, **{**STREAMING, **overrides})
    return streamed_commits(caplog)


def test_a_big_transaction_arrives_in_chunks(zoo, dest_db, caplog):
    with zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(20_000, start=1001))
        conn.execute("update zoo set code = 'big' where id % 3 = 0")      # body kept (TOAST)
        conn.execute("delete from zoo where id % 7 = 0")
        conn.execute("update zoo set id = id + 100000 where id % 11 = 0")  # key changes
        conn.commit()
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 1 and chunks[0] > 1, chunks
    assert_same(zoo, dest_db, "zoo")


def test_interleaved_streams_and_small_transactions_apply_in_commit_order(zoo, dest_db, caplog):
    a = zoo.connect(autocommit=False)
    b = zoo.connect(autocommit=False)
    small = zoo.connect(autocommit=True)
    try:
        for round_ in range(3):
            base = 10_000 + round_ * 10_000
            a.execute(zoo_rows(base + 2000, start=base))
            b.execute(zoo_rows(base + 7000, start=base + 5000))
            small.execute(f"update zoo set code = 'small {round_}' where id = {500 + round_}")
            small.execute(f"insert into zoo (id, code) values ({900_000 + round_}, 'small')")
        a.execute("update zoo set code = 'a' where id between 1 and 100")     # rows A now locks
        b.execute("delete from zoo where id between 101 and 150")
        b.commit()                       # B commits first: it started after A
        small.execute("update zoo set code = 'after b' where id between 200 and 210")
        a.execute("update zoo set code = 'a again' where id between 1 and 50")
        a.commit()
        small.execute("update zoo set code = 'after a' where id between 1 and 10")
    finally:
        for conn in (a, b, small):
            conn.close()
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 2 and min(chunks) > 1, chunks
    assert_same(zoo, dest_db, "zoo")
    rows = table_rows(zoo, "zoo")
    codes = {r[0]: r[4] for r in rows}
    assert codes[1] == "after a" and codes[20] == "a again" and codes[99] == "a"


def test_rolled_back_subtransactions_of_a_streamed_transaction_are_dropped(zoo, dest_db, caplog):
    with zoo.connect(autocommit=False) as conn:
        conn.execute("savepoint s1")
        conn.execute(zoo_rows(15_000, start=10_000))
        conn.execute("savepoint s2")
        conn.execute(zoo_rows(25_000, start=20_000))             # rolled back below
        conn.execute("update zoo set code = 'gone' where id <= 500")
        conn.execute("rollback to savepoint s2")
        conn.execute(zoo_rows(16_000, start=15_001))
        conn.execute("release savepoint s1")
        conn.execute("savepoint a")
        conn.execute("savepoint b")
        conn.execute(zoo_rows(35_000, start=30_000))
        conn.execute("release savepoint b")                      # b is now part of a
        conn.execute("delete from zoo where id <= 300")
        conn.execute("rollback to savepoint a")                   # a and b go
        conn.execute("update zoo set code = 'kept' where id <= 200")
        conn.commit()
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 1 and chunks[0] > 1, chunks
    # Applied while it ran: each rollback went back to the subtransaction's savepoint.
    assert gave_up(caplog) == []
    assert len(applied_while_running(caplog)) == 1
    assert savepoint_rollbacks(caplog) >= 2
    assert_same(zoo, dest_db, "zoo")
    rows = table_rows(zoo, "zoo")
    ids = {r[0] for r in rows}
    assert 20_000 not in ids and 30_000 not in ids and 12_000 in ids and 15_500 in ids
    assert rows[0][4] == "kept"


def test_a_relation_message_inside_a_chunk_does_not_give_the_transaction_up(zoo, dest_db,
                                                                          caplog):
    """The source sends a Relation message again in the middle of a streamed transaction:
    after an ANALYZE (a relcache invalidation) and for the first change of another table.
    Its frame says nothing of where the transaction is (its dataStart can be 0), so whether
    the chunk's rows may be applied early is decided from what the stream has delivered:
    the transaction stays applied while it runs, in the first session after a start."""
    zoo.execute("create table side (id integer primary key, note text)")
    zoo.execute(f"alter publication {PUBLICATION} add table side")
    zoo.execute("insert into side values (0, 'copied')")
    catch_up(zoo, dest_db, **STREAMING)      # side is copied: its changes may apply early
    other = zoo.connect(autocommit=True)
    try:
        with zoo.connect(autocommit=False) as conn:
            for step in range(4):
                base = 10_000 + step * 3000
                conn.execute(zoo_rows(base + 1000, start=base))
                other.execute("analyze zoo")      # the walsender describes zoo again
                conn.execute(zoo_rows(base + 2000, start=base + 1001))
            conn.execute("insert into side select g, 'n' || g from generate_series(1, 3000) g")
            conn.execute(zoo_rows(40_000, start=30_001))
            conn.commit()
    finally:
        other.close()
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 1 and chunks[0] > 4, chunks
    assert gave_up(caplog) == []
    assert len(applied_while_running(caplog)) == 1
    assert_same(zoo, dest_db, "zoo")
    assert_same(zoo, dest_db, "side")


@pytest.mark.parametrize("seed", [7, 11])
def test_random_savepoint_programs_end_equal(zoo, dest_db, caplog, seed):
    """Nested savepoints released and rolled back at random around inserts, updates and
    deletes of rows that earlier subtransactions wrote: whatever the program, the mirror
    ends equal, and the transaction stays applied while it runs."""
    rnd = random.Random(seed)
    names: list[str] = []
    next_id = 100_000
    with zoo.connect(autocommit=False) as conn:
        for step in range(70):
            r = rnd.random()
            if r < 0.25 and len(names) < 6:
                names.append(f"s{step}")
                conn.execute(f"savepoint {names[-1]}")
            elif r < 0.37 and names:
                conn.execute(f"release savepoint {names.pop()}")
            elif r < 0.52 and names:
                at = rnd.randrange(len(names))
                conn.execute(f"rollback to savepoint {names[at]}")
                del names[at + 1:]
            elif r < 0.8:
                n = rnd.randint(300, 2500)
                conn.execute(zoo_rows(next_id + n, start=next_id))
                next_id += n + 1
            elif r < 0.92:
                conn.execute(f"update zoo set code = 'u{step}' where id % 13 = {rnd.randrange(13)}")
            else:
                conn.execute(f"delete from zoo where id % 29 = {rnd.randrange(29)}")
        conn.commit()
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 1 and chunks[0] > 1, chunks
    assert gave_up(caplog) == []
    assert len(applied_while_running(caplog)) == 1
    assert savepoint_rollbacks(caplog) >= 2     # these seeds roll back streamed rows
    assert_same(zoo, dest_db, "zoo")


def test_an_aborted_streamed_transaction_leaves_nothing(zoo, dest_db, caplog):
    with zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(20_000, start=10_000))
        conn.execute("update zoo set code = 'never' where id <= 1000")
        conn.rollback()
    zoo.execute("update zoo set code = 'after the abort' where id = 5")
    chunks = caught_up(zoo, dest_db, caplog)
    assert chunks == []
    assert_same(zoo, dest_db, "zoo")
    rows = table_rows(zoo, "zoo")
    assert len(rows) == 1000


def test_ddl_and_truncate_inside_a_streamed_transaction(zoo, dest_db, caplog):
    with zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(12_000, start=2000))
        conn.execute("alter table zoo add column extra text")
        conn.execute("update zoo set extra = 'x' || id where id % 2 = 0")
        conn.execute("truncate zoo")
        conn.execute(zoo_rows(8000, start=1))
        conn.execute("update zoo set extra = 'after truncate' where id % 5 = 0")
        conn.commit()
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 1 and chunks[0] > 1, chunks
    assert gave_up(caplog) == ["DDL, TRUNCATE or a table copy inside it"]
    assert_same(zoo, dest_db, "zoo")
    rows = table_rows(zoo, "zoo")
    assert len(rows) == 8000 and rows[4][-1] == "after truncate"


def test_ddl_in_rolled_back_parts_of_streamed_transactions(zoo, dest_db, caplog):
    with zoo.connect(autocommit=False) as conn:
        conn.execute("savepoint s")
        conn.execute("alter table zoo add column gone_sub text")
        conn.execute(zoo_rows(12_000, start=2000))
        conn.execute("update zoo set gone_sub = 'x'")
        conn.execute("rollback to savepoint s")
        conn.execute(zoo_rows(14_000, start=2000))
        conn.commit()
    with zoo.connect(autocommit=False) as conn:
        conn.execute("alter table zoo add column gone_top integer")
        conn.execute(zoo_rows(30_000, start=20_000))
        conn.rollback()
    zoo.execute("update zoo set code = 'after both' where id <= 10")
    chunks = caught_up(zoo, dest_db, caplog)
    assert len(chunks) == 1, chunks
    assert_same(zoo, dest_db, "zoo")


def test_reconnect_in_the_middle_of_a_streamed_transaction(zoo, dest_db, caplog):
    """The session restarts while a transaction is half streamed: the source sends it again
    from its start, and what the first session received of it is dropped, not doubled."""
    with caplog.at_level("DEBUG", logger="replicator"), \
            running(zoo, dest_db, **STREAMING) as pipeline, \
            zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(15_000, start=10_000))
        wait_for(lambda: any(r.getMessage() == "replication started" for r in caplog.records),
                 what="streaming")
        conn.execute(zoo_rows(16_000, start=15_001))
        # Give the chunks time to arrive, then cut the replication connection.
        zoo.execute("select pg_sleep(1)")
        killed = zoo.scalar("select count(pg_terminate_backend(pid)) from pg_stat_replication "
                            "where application_name = 'odoo-replicator'")
        assert killed == 1
        conn.execute("update zoo set code = 'after the cut' where id between 10000 and 10100")
        conn.commit()
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.zoo") == 7001
                 and dest_db.scalar("select count(*) from odoo_mirror.zoo "
                                    "where code = 'after the cut'") == 101,
                 timeout=60, what="the streamed transaction in the mirror")
        assert not pipeline.stop_requested.is_set()
    # The cut restarted the session: replication started twice.
    assert sum(r.getMessage() == "replication started" for r in caplog.records) >= 2
    assert streamed_commits(caplog), "the transaction was not streamed"
    assert_same(zoo, dest_db, "zoo")


def test_history_and_soft_deletes_of_a_streamed_transaction(source_db, dest_db, caplog):
    """History rows and soft-delete times come from the commit: a streamed transaction's rows
    learn its commit LSN and time only at Stream Commit."""
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute("create table h (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table t, h")
    mappings = {"t": {"soft_delete": True}, "h": {"history": True}}
    catch_up(source_db, dest_db, mappings=mappings, **STREAMING)
    with source_db.connect(autocommit=False) as conn:
        conn.execute("insert into t select i, repeat('n', 50) from generate_series(1, 6000) i")
        conn.execute("insert into h select i, repeat('h', 50) from generate_series(1, 6000) i")
        conn.execute("savepoint s")
        conn.execute("update h set name = 'rolled back' where id <= 100")
        conn.execute("rollback to savepoint s")
        conn.execute("delete from t where id <= 10")
        conn.execute("update h set name = 'u' where id <= 5")
        conn.commit()
        committed = source_db.scalar("select now()")
    source_db.execute("update h set name = 'after' where id = 1")
    chunks = caught_up(source_db, dest_db, caplog, mappings=mappings)
    assert len(chunks) == 1 and chunks[0] > 1, chunks
    assert gave_up(caplog) == ["a table that only the applier handles (options, copy or letters)"]
    assert dest_db.scalar("select count(*) from odoo_mirror.t where _deleted_at is not null") == 10
    assert abs(dest_db.scalar("select extract(epoch from max(_deleted_at) - %s) "
                              "from odoo_mirror.t", [committed])) < 2
    history = dest_db.fetchall("select _op, id, name, _lsn from odoo_mirror.h_history "
                               "order by _lsn, _seq")
    assert len(history) == 6000 + 5 + 1
    assert [h[:3] for h in history[-6:]] == [("U", i, "u", ) for i in range(1, 6)] \
        + [("U", 1, "after")]
    assert len({h[3] for h in history}) == 2          # two source transactions
    assert not any(h[2] == "rolled back" for h in history)


def writing_replicator_transactions(dest_db) -> int:
    """Destination sessions of the replicator in an open transaction that has written."""
    return dest_db.scalar("select count(*) from pg_stat_activity where application_name = "
                          "'odoo-replicator' and state = 'idle in transaction' "
                          "and backend_xid is not null")


@pytest.mark.parametrize("streams", [2, 0])
def test_a_streamed_transaction_is_applied_while_it_runs(zoo, dest_db, caplog, streams):
    """With max_streams > 0 the chunks are merged into an open destination transaction before
    the source commits (nothing visible yet); with 0 they wait for the commit. Either way the
    mirror shows the whole transaction at once, and equals the source."""
    with caplog.at_level("DEBUG", logger="replicator"), \
            running(zoo, dest_db, max_streams=streams, **STREAMING) as pipeline, \
            zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(15_000, start=10_000))
        conn.execute("update zoo set code = 'in the big one' where id <= 100")
        zoo.execute("update zoo set code = 'small' where id = 900")
        wait_for(lambda: dest_db.scalar("select code from odoo_mirror.zoo where id = 900")
                 == "small", what="the small transaction committed after the chunks")
        if streams:
            wait_for(lambda: writing_replicator_transactions(dest_db) == 1,
                     what="a destination transaction holding the chunks")
        else:
            zoo.execute("select pg_sleep(0.5)")
            assert writing_replicator_transactions(dest_db) == 0
        assert dest_db.scalar("select count(*) from odoo_mirror.zoo") == 1000
        conn.execute("update zoo set code = 'last chunk' where id between 101 and 110")
        conn.commit()
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.zoo") == 6001,
                 what="the streamed transaction in the mirror")
    early = applied_while_running(caplog)
    if streams:
        assert len(early) == 1 and early[0] > 1, early
    else:
        assert early == []
    assert gave_up(caplog) == []
    # etl_streamed_transactions_total says which way it went.
    registry = pipeline.metrics.registry
    assert [registry.get_sample_value("etl_streamed_transactions_total", {"applied": how})
            for how in ("while_running", "at_commit")] == ([1.0, 0.0] if streams else [0.0, 1.0])
    assert_same(zoo, dest_db, "zoo")
    rows = table_rows(zoo, "zoo")
    assert rows[0][4] == "in the big one" and rows[100][4] == "last chunk"


class _Through:
    """The destination as the replicator reaches it through pgbouncer (transaction mode)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn


def test_streamed_transactions_through_pgbouncer(source_db, dest_db, owned_dest, pgbouncer,
                                                  roomy_pool, pool_neighbour, caplog):
    """Through a transaction-mode pooler, as a non-superuser owner: one transaction applied
    while it runs (its open transaction pins one server connection) next to one that falls
    back to its commit, and the small ones between them. The pool holds what README asks
    for (max_streams + 3): with two, a pinned connection left the batch waiting for the
    pooler while the streamed transaction waited for the batch, until the test's timeout."""
    setup_zoo(source_db)
    source_db.execute(zoo_rows(1000))
    writer = _Through(pgbouncer.dsn(dest_db.name))
    catch_up(source_db, writer, **STREAMING)
    a = source_db.connect(autocommit=False)
    b = source_db.connect(autocommit=False)
    try:
        a.execute(zoo_rows(8000, start=2000))
        # More subtransactions than savepoints, and the last one rolled back: applied
        # from its files at its commit.
        for i in range(MAX_SAVEPOINTS + 2):
            b.execute(f"savepoint s{i}")
            b.execute(zoo_rows(10_000 + 200 * i + 150, start=10_000 + 200 * i))
        b.execute(zoo_rows(30_000, start=20_000))
        b.execute(f"rollback to savepoint s{MAX_SAVEPOINTS + 1}")
        source_db.execute("update zoo set code = 'between' where id <= 10")
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()
    chunks = caught_up(source_db, writer, caplog)
    assert len(chunks) == 2, chunks
    early = applied_while_running(caplog)
    assert len(early) == 1 and early[0] > 1, early
    assert gave_up(caplog) == ["a subtransaction without a savepoint rolled back"]
    assert_same(source_db, dest_db, "zoo")


def letters(dest_db) -> list[tuple]:
    return dest_db.fetchall("select key_data, op, row_data->>'name' from replicator.dead_letters "
                            "order by id")


def test_a_streamed_change_of_a_lettered_key_queues_behind_its_letter(source_db, dest_db,
                                                                      caplog):
    """A small transaction's change of key 1 is lettered while a big one streams; the big one
    then writes key 1: that change queues behind the letter (it is not merged over it), and a
    retry applies both in order, so the mirror ends with the source's newest value."""
    source_db.execute("create table t (id integer primary key, name text)")
    source_db.execute("insert into t select i, 'a' from generate_series(1, 10) i")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    slot = catch_up(source_db, dest_db, on_error="dead_letter", **STREAMING).config.source.slot
    dest_db.execute("alter table odoo_mirror.t add constraint no_bad "
                    "check (name is distinct from 'bad')")
    with source_db.connect(autocommit=False) as big:
        # Streamed in chunks, the first ones before the small transaction commits: its
        # destination transaction is open before the letter exists.
        big.execute("insert into t select i, repeat('n', 50) from generate_series(1000, 7000) i")
        source_db.execute("update t set name = 'bad' where id = 1")   # the mirror rejects it
        big.execute("update t set name = 'newest' where id = 1")
        big.execute("insert into t select i, repeat('n', 50) from generate_series(8000, 14000) i")
        big.commit()
    chunks = caught_up(source_db, dest_db, caplog, on_error="dead_letter")
    assert len(chunks) == 1 and chunks[0] > 1, chunks
    assert gave_up(caplog) == ["a key with a waiting dead letter"]
    assert letters(dest_db) == [({"id": 1}, "U", "bad"), ({"id": 1}, "U", "newest")]
    assert dest_db.scalar("select name from odoo_mirror.t where id = 1") == "a"
    assert dest_db.scalar("select count(*) from odoo_mirror.t") == 10 + 6001 + 6001

    dest_db.execute("alter table odoo_mirror.t drop constraint no_bad")
    with psycopg.connect(dest_db.dsn, autocommit=True) as conn:
        out = dead_letters.retry(conn, "replicator", slot)
    assert (out.applied, out.failed) == (2, [])
    assert letters(dest_db) == []
    assert_same(source_db, dest_db, "t")


def test_a_session_keeps_no_finished_stream_worker(zoo, dest_db, caplog):
    """Each big transaction applied while it ran leaves its thread behind once committed:
    the receiver holds on to the ones still running only."""
    with caplog.at_level("DEBUG", logger="replicator"), \
            running(zoo, dest_db, **STREAMING) as pipeline:
        for i in range(4):
            start = 10_000 * (i + 1)
            zoo.execute(zoo_rows(start + 5000, start=start))
            wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.zoo")
                     == 1000 + 5001 * (i + 1), what=f"big transaction {i}")   # noqa: B023
        receivers = [o for o in gc.get_objects() if isinstance(o, Receiver)
                     and o.stop_requested is pipeline.stop_requested]
        assert len(receivers) == 1
        # The last one's thread may still be closing its connection.
        assert len(receivers[0].workers) <= 2, receivers[0].workers
    assert len(applied_while_running(caplog)) == 4


def test_a_streamed_transaction_outlives_the_idle_timeout_while_its_source_pauses(
        zoo, dest_db, caplog):
    """The server ends a destination transaction idle for idle_in_transaction_timeout (an
    orphan's bound): a live one waiting for its next chunk is kept busy, however long the
    source transaction pauses."""
    with caplog.at_level("DEBUG", logger="replicator"), \
            running(zoo, dest_db, idle_in_transaction_timeout=1, **STREAMING), \
            zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(15_000, start=10_000))
        wait_for(lambda: writing_replicator_transactions(dest_db) == 1,
                 what="a destination transaction holding the chunks")
        # The pause is the scenario (an Odoo worker busy elsewhere), not a synchronisation.
        conn.execute("select pg_sleep(3)")
        assert writing_replicator_transactions(dest_db) == 1
        conn.execute("update zoo set code = 'after the pause' where id <= 10")
        conn.commit()
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.zoo") == 6001,
                 what="the streamed transaction in the mirror")
    assert gave_up(caplog) == []
    assert len(applied_while_running(caplog)) == 1
    assert_same(zoo, dest_db, "zoo")


def test_a_source_ddl_while_a_streamed_transaction_holds_an_index_build(source_db, dest_db,
                                                                        replicator):
    """The suspected lock cycle: a transaction applied while it runs holds the mirror table
    (its open destination transaction wrote it), the table's secondary index build waits for
    that transaction (CREATE INDEX CONCURRENTLY waits for the table's writers), and a source
    DDL on the table then needs the mirror table exclusively. At the source the DDL waits for
    the big transaction; on the mirror the ALTER waits for the build, which may wait for the
    ALTER's own transaction (an older snapshot). Everything ends: the mirror equals the
    source, with the new column, the index is built, and nothing is given up or retried for
    ever (that deadlock was real: the server ended the batch, and the session restarted)."""
    setup_zoo(source_db)
    source_db.execute("create index zoo_code on zoo (code)")
    source_db.execute(zoo_rows(1000))
    rep = replicator(batch_size=1000, flush_interval=0.2,
                     source={"logical_decoding_work_mem": "64kB"},
                     destination={"lock_timeout": 2})
    # The index build starts once the big transaction's destination transaction is open.
    rep.start(env={failpoints.ENV: f"{failpoints.INDEX_BUILD}=sleep:6"})
    wait_for(rep.streaming, 60, "streaming")
    ddl_done = threading.Event()
    with source_db.connect(autocommit=False) as big:
        big.execute(zoo_rows(9000, start=2000))
        wait_for(lambda: writing_replicator_transactions(dest_db) == 1, 30,
                 "the big transaction applied while it runs")
        wait_for(lambda: dest_db.scalar(
            "select count(*) from pg_stat_activity where query ilike 'create index%'") == 1,
            30, "the index build waiting for it")

        def ddl() -> None:
            with source_db.connect(autocommit=True) as c:   # waits for `big` at the source
                c.execute("alter table zoo add column extra text")
                c.execute("update zoo set extra = 'after' where id <= 10")
            ddl_done.set()

        thread = threading.Thread(target=ddl)
        thread.start()
        time.sleep(1)
        big.execute(zoo_rows(12_000, start=9001))   # more chunks while the DDL waits
        time.sleep(1)
        big.commit()
    thread.join(30)
    assert ddl_done.is_set()
    wait_for(lambda: dest_db.scalar(
        "select count(*) from odoo_mirror.zoo where extra = 'after'") == 10, 90,
        "the DDL and the update after it")
    assert_same(source_db, dest_db, "zoo")
    wait_for(lambda: dest_db.scalar(
        "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid "
        "where c.relname = 'zoo_code' and i.indisvalid") == 1, 60, "the index built")
    out = rep.current()
    assert "index not created on the mirror" not in out, rep.logs()
    # Not ended by the server's deadlock detection either (a retried batch, a session
    # restarted, or a failed build counted against the index): the batch that alters the
    # table holds the table's index builds and cancels the one in flight.
    assert "retrying after an error" not in out and "deadlock" not in out, rep.logs()
    assert rep.alive, rep.logs()
    rep.stop()


def test_a_streamed_insert_of_a_key_the_mirror_has_is_applied_at_its_commit(zoo, dest_db,
                                                                             caplog):
    """A chunk's inserts go into the mirror by COPY; one of a key the mirror has already (a
    `verify --repair` got there before the stream) fails that COPY, and the transaction is
    applied at its commit instead, by MERGE, which updates the row."""
    dest_db.execute("insert into odoo_mirror.zoo (id, code) values (5000, 'repaired')")
    with caplog.at_level("DEBUG", logger="replicator"), \
            running(zoo, dest_db, max_streams=1, **STREAMING), \
            zoo.connect(autocommit=False) as conn:
        conn.execute(zoo_rows(8_000, start=1001))
        conn.commit()
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.zoo") == 8000,
                 what="the streamed transaction in the mirror")
    reasons = gave_up(caplog)
    assert reasons == ["an insert of a key the mirror has already (odoo_mirror.zoo, "
                       "constraint zoo_pkey)"], reasons
    assert_same(zoo, dest_db, "zoo")
