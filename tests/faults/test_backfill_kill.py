"""kill -9 during the initial copy: a restart ends with the mirror equal to the source,
and a table whose copy had finished is not copied again."""

from __future__ import annotations

import random
import time

import psycopg
from plugins.replicator import PUBLICATION, assert_same

from replicator.devtools.odoo import TABLE_NAMES
from replicator.devtools.seed import seed


def states(dest_db) -> dict[str, str]:
    try:
        return dict(dest_db.fetchall("select source_table, state from replicator.tables"))
    except Exception:  # the state schema may not exist yet
        return {}


def test_kill_during_initial_copy(source_db, dest_db, replicator):
    seed(source_db.dsn, scale=4, seed=11, publication=PUBLICATION)
    # One worker: tables copy one after another, so a kill finds some done, some not.
    rep = replicator(source={"max_connections": 3})

    rep.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = states(dest_db)
        if "copied" in st.values() and "copying" in st.values():
            break
        assert rep.alive, rep.logs()
        time.sleep(0.01)
    assert rep.kill(), rep.logs()
    st = states(dest_db)
    done = [t for t, s in st.items() if s == "copied"]
    assert done and len(done) < len(TABLE_NAMES), st
    table = done[0].split(".")[1]
    before = dest_db.fetchall(f"select id, xmin::text from odoo_mirror.{table} order by id")

    # A few more kills at random moments, then let it finish.
    rnd = random.Random(3)
    for _ in range(3):
        rep.start()
        time.sleep(rnd.uniform(0.3, 1.5))
        assert rep.kill(), rep.logs()
    code = rep.run_until_caught_up(timeout=180)
    assert code == 0, rep.logs(60)

    for t in TABLE_NAMES:
        assert_same(source_db, dest_db, t)
    assert set(states(dest_db).values()) == {"streaming"}
    # The table copied before the first kill kept its rows: same tuples, not re-copied.
    after = dest_db.fetchall(f"select id, xmin::text from odoo_mirror.{table} order by id")
    assert after == before, f"{table} was copied again after {rep.runs - 1} kills"
    assert dest_db.scalar("select count(*) from pg_constraint where conrelid = "
                          "'odoo_mirror.account_move_line'::regclass and contype = 'p'") == 1


SECONDARY = ("select indexname from pg_indexes where schemaname = %s and tablename = "
             "'account_move_line' and indexname <> 'account_move_line_pkey' order by 1")


def test_kill_while_secondary_indexes_are_built(source_db, dest_db, replicator):
    """A build cut short leaves an INVALID index; the next start drops it and builds it again,
    and every index of every copied table ends up valid, the mirror equal to the source."""
    seed(source_db.dsn, scale=2, seed=11, publication=PUBLICATION)
    rep = replicator()
    # Each build waits 0.2 s first: time enough to take the lock before account_move_line's
    # (it has several: one of them at least is still to come).
    rep.start(env={"REPLICATOR_FAILPOINTS": "indexes.before_build=sleep:0.2"})
    deadline = time.monotonic() + 120
    while states(dest_db).get("public.account_move_line") != "streaming":
        assert rep.alive and time.monotonic() < deadline, rep.logs()
        time.sleep(0.01)
    source_db.execute("update account_move set ref = 'during the index builds'")
    blocker = psycopg.connect(dest_db.dsn)
    try:
        # A writer's lock: CREATE INDEX CONCURRENTLY waits for it with its index
        # already in the catalog, not yet valid.
        blocker.execute("lock table odoo_mirror.account_move_line in row exclusive mode")
        pid = None
        while pid is None:
            assert rep.alive and time.monotonic() < deadline, rep.logs()
            pid = dest_db.scalar(
                "select pid from pg_stat_progress_create_index where relid = "
                "'odoo_mirror.account_move_line'::regclass and phase like 'waiting%%'")
            time.sleep(0.01)
        assert rep.kill(), rep.logs()
        # Its client is dead and the build goes on (the next run would wait for it)...
        time.sleep(0.5)
        assert dest_db.scalar("select count(*) from pg_stat_progress_create_index "
                              "where pid = %s", [pid]) == 1
        # ...unless the backend ends too, as a restart of the destination would.
        dest_db.execute("select pg_terminate_backend(%s)", [pid])
    finally:
        blocker.rollback()
        blocker.close()
    invalid = dest_db.fetchall(
        "select indexrelid::regclass::text from pg_index where indrelid = "
        "'odoo_mirror.account_move_line'::regclass and not indisvalid")
    assert len(invalid) == 1, invalid
    assert dest_db.scalar("select count(*) from replicator.index_builds") > 0

    rep.start()
    while dest_db.scalar("select count(*) from replicator.index_builds") > 0:
        assert rep.alive and time.monotonic() < deadline, rep.logs(40)
        time.sleep(0.1)
    assert rep.kill(), rep.logs()
    assert "dropping a mirror index left invalid" in rep.output()[0] + rep.output()[1]
    code = rep.run_until_caught_up(timeout=120)
    assert code == 0, rep.logs(60)

    for t in TABLE_NAMES:
        assert_same(source_db, dest_db, t)
        # Every index the source has (unique ones as plain ones), valid; trigram ones
        # only where the destination has pg_trgm.
        trgm = dest_db.scalar("select count(*) from pg_extension where extname = 'pg_trgm'")
        query = SECONDARY.replace("'account_move_line'", "%s").replace(
            "'account_move_line_pkey'", "%s")
        src = {n for (n,) in source_db.fetchall(query, ["public", t, f"{t}_pkey"])}
        dst = {n for (n,) in dest_db.fetchall(query, ["odoo_mirror", t, f"{t}_pkey"])}
        assert dst == {n for n in src if trgm or "trgm" not in n}, t
        assert dest_db.scalar(
            "select count(*) from pg_index where indrelid = %s::regclass and not indisvalid",
            [f"odoo_mirror.{t}"]) == 0, t
