"""kill -9 during the initial copy: a restart ends with the mirror equal to the source,
and a table whose copy had finished is not copied again."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from replicate import PUBLICATION, assert_same, write_config

from replicator.devtools.odoo import TABLE_NAMES
from replicator.devtools.seed import seed


def start(config, log):
    return subprocess.Popen([sys.executable, "-m", "replicator", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)


def states(dest_db) -> dict[str, str]:
    try:
        return dict(dest_db.fetchall("select source_table, state from replicator.tables"))
    except Exception:  # the state schema may not exist yet
        return {}


def test_kill_during_initial_copy(source_db, dest_db, tmp_path):
    seed(source_db.dsn, scale=4, seed=11, publication=PUBLICATION)
    config = tmp_path / "etl-config.toml"
    # One worker: tables copy one after another, so a kill finds some done, some not.
    write_config(config, source_db, dest_db, source_max_connections=3)
    log = open(tmp_path / "replicator.log", "ab")

    proc = start(config, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = states(dest_db)
        if "copied" in st.values() and "copying" in st.values():
            break
        assert proc.poll() is None, (tmp_path / "replicator.log").read_text()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = states(dest_db)
    done = [t for t, s in st.items() if s == "copied"]
    assert done and len(done) < len(TABLE_NAMES), st
    table = done[0].split(".")[1]
    before = dest_db.fetchall(f"select id, xmin::text from odoo_mirror.{table} order by id")

    # A few more kills at random moments, then let it finish.
    rnd = random.Random(3)
    kills = 1
    for _ in range(3):
        proc = start(config, log)
        time.sleep(rnd.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    done = subprocess.run([sys.executable, "-m", "replicator", "run", "--config", str(config),
                           "--until-caught-up"], stdout=log, stderr=subprocess.STDOUT, timeout=180)
    assert done.returncode == 0, (tmp_path / "replicator.log").read_text()[-3000:]

    for t in TABLE_NAMES:
        assert_same(source_db, dest_db, t)
    assert set(states(dest_db).values()) == {"streaming"}
    # The table copied before the first kill kept its rows: same tuples, not re-copied.
    after = dest_db.fetchall(f"select id, xmin::text from odoo_mirror.{table} order by id")
    assert after == before, f"{table} was copied again after {kills} kills"
    assert dest_db.scalar("select count(*) from pg_constraint where conrelid = "
                          "'odoo_mirror.account_move_line'::regclass and contype = 'p'") == 1
