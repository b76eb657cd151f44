"""kill -9 during the initial copy: a restart ends with the mirror equal to the source,
and a table whose copy had finished is not copied again."""

from __future__ import annotations

import random
import time

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
    rep.kill()
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
        rep.kill()
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
