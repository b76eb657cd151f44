"""SIGKILL while the source streams an in-progress transaction.

The replicator process is killed with chunks of an open source transaction received (and
spilled to its temporary files), again after more chunks and a rolled-back subtransaction,
and once more right after the commit, while small transactions commit in between. Each new
session is sent the open transaction again from its start; the mirror must end equal to the
source: nothing of the first sessions' chunks doubled, nothing of the rolled-back part kept.
"""

from __future__ import annotations

import signal
import time

import pytest
from plugins.proxy import proxied
from plugins.replicator import json_logging, table_rows, wait_for
from plugins.servers import ONE_VERSION
from zoo import setup_zoo, zoo_rows

from replicator import failpoints

SETTINGS = {"batch_size": 1000, "flush_interval": 0.2,
            "source": {"logical_decoding_work_mem": "64kB"}}


def mirror_count(dest_db) -> int:
    return dest_db.scalar("select count(*) from odoo_mirror.zoo")


def test_sigkill_while_a_transaction_is_streamed(source_db, dest_db, replicator):
    setup_zoo(source_db)
    source_db.execute(zoo_rows(1000))
    rep = replicator(**SETTINGS, logging=json_logging("debug"))
    rep.start()
    wait_for(lambda: mirror_count(dest_db) == 1000, 60, what="the initial copy")
    small = source_db.connect(autocommit=True)
    with source_db.connect(autocommit=False) as big:
        big.execute(zoo_rows(8000, start=2000))
        small.execute("update zoo set code = 'small 1' where id = 1")
        wait_for(lambda: dest_db.scalar("select code from odoo_mirror.zoo where id = 1")
                 == "small 1", 30, what="a small transaction committed after the first chunks")
        rep.kill()                                   # chunks of `big` received, not committed
        rep.start()
        big.execute("savepoint s")
        big.execute(zoo_rows(20_000, start=12_000))
        big.execute("rollback to savepoint s")
        big.execute(zoo_rows(10_000, start=8001))
        small.execute("update zoo set code = 'small 2' where id = 2")
        wait_for(lambda: dest_db.scalar("select code from odoo_mirror.zoo where id = 2")
                 == "small 2", 30, what="the second session streaming")
        time.sleep(0.5)
        assert rep.kill(), rep.logs()
        rep.start()
        big.execute("update zoo set code = 'big' where id <= 500")
        big.commit()
    small.execute("update zoo set code = 'after big' where id <= 10")
    time.sleep(0.3)
    rep.kill()                                       # around the apply of the streamed commit
    code = rep.run_until_caught_up(timeout=90)
    small.close()
    assert code == 0, rep.logs()
    assert rep.kills == 3
    source, mirror = table_rows(source_db, "zoo"), table_rows(dest_db, "zoo", "odoo_mirror")
    assert len(source) == 1000 + 8000 - 2000 + 1 + 2000 and len(mirror) == len(source)
    assert source == mirror
    out = "".join(rep.output(run)[0] for run in range(1, rep.runs + 1))
    assert "streamed transaction committed" in out, "the source did not stream the transaction"


# Windows of the replicator's own commit protocol: one source version is enough.
@ONE_VERSION
@pytest.mark.parametrize("point", [failpoints.STREAM_CHUNK_APPLIED, failpoints.STREAM_BEFORE_COMMIT,
                                   failpoints.STREAM_COMMITTED])
def test_killed_in_each_window_of_a_transaction_applied_while_it_runs(
        source_db, dest_db, replicator, point):
    """The process dies with a chunk merged in the open destination transaction, with the
    transaction complete but not committed, and right after its commit (not yet confirmed to
    the source). The next run ends with the source's rows exactly once."""
    setup_zoo(source_db)
    source_db.execute(zoo_rows(1000))
    rep = replicator(**SETTINGS)
    assert rep.run_until_caught_up(timeout=60) == 0
    with source_db.connect(autocommit=False) as big:
        big.execute(zoo_rows(9000, start=2000))
        big.execute("update zoo set code = 'big' where id <= 300")
        big.execute("delete from zoo where id between 301 and 400")
        big.commit()
    source_db.execute("update zoo set code = 'after' where id <= 5")
    rep.start(env={failpoints.ENV: f"{point}=kill"})
    assert rep.wait_exit(60) == -signal.SIGKILL, rep.logs()
    assert rep.run_until_caught_up(timeout=90) == 0, rep.logs()
    assert table_rows(source_db, "zoo") == table_rows(dest_db, "zoo", "odoo_mirror")


@ONE_VERSION
def test_killed_after_a_subtransaction_rolled_back_in_the_open_transaction(
        source_db, dest_db, replicator):
    """Rolled back to its savepoint in the destination, then the process dies: the next
    session receives the transaction again from its start, savepoints and all."""
    setup_zoo(source_db)
    source_db.execute(zoo_rows(1000))
    rep = replicator(**SETTINGS)
    assert rep.run_until_caught_up(timeout=60) == 0
    with source_db.connect(autocommit=False) as big:
        big.execute(zoo_rows(5000, start=2000))
        big.execute("savepoint a")
        big.execute(zoo_rows(12_000, start=6000))
        big.execute("update zoo set code = 'undone' where id <= 100")
        big.execute("rollback to savepoint a")
        big.execute("savepoint b")
        big.execute(zoo_rows(9000, start=7000))
        big.execute("release savepoint b")
        big.execute("update zoo set code = 'big' where id <= 50")
        big.commit()
    rep.start(env={failpoints.ENV: f"{failpoints.STREAM_SAVEPOINT_ROLLED_BACK}=kill"})
    assert rep.wait_exit(60) == -signal.SIGKILL, rep.logs()
    assert rep.run_until_caught_up(timeout=90) == 0, rep.logs()
    source, mirror = table_rows(source_db, "zoo"), table_rows(dest_db, "zoo", "odoo_mirror")
    assert len(source) == 1000 + 3001 + 2001 and source == mirror


# Writing destination transactions left open: the replicator's, or its orphan's.
WRITING_IDLE = ("select count(*) from pg_stat_activity where datname = current_database() "
                "and state = 'idle in transaction' and backend_xid is not null")


@ONE_VERSION
def test_orphan_of_a_transaction_applied_while_it_ran_is_ended_by_the_server(
        source_db, dest_db, replicator, proxy):
    """Killed behind a pooler that keeps its server connection: the open destination
    transaction of a streamed source transaction, holding the mirror rows it merged, is ended
    by the server after idle_in_transaction_timeout, and the next run gets past its locks."""
    setup_zoo(source_db)
    source_db.execute(zoo_rows(1000))
    p = proxy(dest_db)
    p.keep_server_side()
    first = replicator(**{**SETTINGS, "destination": proxied(
        dest_db, p, idle_in_transaction_timeout=8, lease_timeout=3)})
    first.start()
    wait_for(lambda: mirror_count(dest_db) == 1000, 60, what="the initial copy")
    with source_db.connect(autocommit=False) as big:
        big.execute("update zoo set code = 'big' where id <= 100")
        big.execute(zoo_rows(8000, start=2000))
        wait_for(lambda: dest_db.scalar(WRITING_IDLE) == 1, 30,
                 what="the chunks merged into an open destination transaction")
        p.blackhole()
        assert first.kill(), first.logs()
        # The orphan, holding rows 1..100: idle in transaction once the statement the kill
        # may have caught running is done (a loaded machine: not at once). A batch the black
        # hole caught after its first write is one more.
        wait_for(lambda: dest_db.scalar(WRITING_IDLE) >= 1, 5, what="the orphan",
                 detail=lambda: "\n".join(map(str, dest_db.fetchall(
                     "select pid, state, backend_xid, now() - state_change, left(query, 100) "
                     "from pg_stat_activity where datname = current_database()"))))
        big.commit()
    source_db.execute("update zoo set code = 'after big' where id <= 10")
    second = replicator(**{**SETTINGS, "destination": {"lock_timeout": 1, "lease_timeout": 3}})
    code = second.run_until_caught_up(timeout=60)
    assert code == 0, second.logs()
    assert dest_db.scalar(WRITING_IDLE) == 0
    assert table_rows(source_db, "zoo") == table_rows(dest_db, "zoo", "odoo_mirror")
