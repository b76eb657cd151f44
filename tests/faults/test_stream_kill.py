"""SIGKILL while the source streams an in-progress transaction.

The replicator process is killed with chunks of an open source transaction received (and
spilled to its temporary files), again after more chunks and a rolled-back subtransaction,
and once more right after the commit, while small transactions commit in between. Each new
session is sent the open transaction again from its start; the mirror must end equal to the
source: nothing of the first sessions' chunks doubled, nothing of the rolled-back part kept.
"""

from __future__ import annotations

import time

from plugins.replicator import json_logging, table_rows, wait_for
from zoo import setup_zoo, zoo_rows

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
        rep.kill()
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
