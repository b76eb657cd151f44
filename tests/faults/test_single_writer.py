"""One writer per pipeline: two processes of the same config, as a rolling update or a
second container makes them, never both write (replicator/destination/lease.py).

Two `run` processes started at once on an empty mirror used to copy at the same time and
lose rows for good. Now one holds the lease and the other waits as a standby, says so, and
takes over when the owner dies (at once when it was a process of this host that is gone,
after [destination] lease_timeout when it may still be alive) or stops. An owner frozen
past its lease and resumed after the takeover writes nothing: its transactions fail the
fence, whatever its clock says.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from plugins.faults import Workload, http_status, mirror_diff, seed_source
from plugins.pgbouncer import OWNER, ROLE_PASSWORD
from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    STATE_SCHEMA,
    assert_same,
    cli,
    wait_for,
)
from plugins.servers import ONE_VERSION

from replicator.devtools.localpg import free_port

# The lease is the replicator's own protocol, whatever the source's version.
pytestmark = ONE_VERSION

BATCHES = {"batch_size": 1000, "flush_interval": 0.2}
STANDBY = '"msg":"another replicator process writes for this pipeline: waiting as a standby"'
TOOK_OVER = '"msg":"took over the pipeline\'s lease"'
HOLDING = '"msg":"holding the pipeline\'s lease"'


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def _lease(dest_db: Any) -> tuple | None:
    return dest_db.fetchone(f"select owner_pid, generation from {STATE_SCHEMA}.leases "
                            "where slot = %s", [PUBLICATION])


def _locks(dest_db: Any) -> str:
    """The destination's sessions and what they wait for: why a takeover waits."""
    rows = dest_db.fetchall(
        "select pid, state, wait_event_type, wait_event, pg_blocking_pids(pid), "
        "now() - xact_start, left(query, 120) from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid()")
    return "--- destination sessions:\n" + "\n".join(map(str, rows))


def _owner_and_standby(a: Any, b: Any) -> tuple[Any, Any]:
    """Which of two started processes holds the lease and which waits, once both said so."""
    wait_for(lambda: (HOLDING in a.current() and STANDBY in b.current())
             or (HOLDING in b.current() and STANDBY in a.current())
             or not (a.alive and b.alive), 60, what="one owner and one standby")
    assert a.alive and b.alive, f"a process exited\n{a.logs()}\n{b.logs()}"
    owner, standby = (a, b) if HOLDING in a.current() else (b, a)
    # Exactly one took it: the standby never held it, and the owner never waited.
    assert HOLDING not in standby.current(), standby.logs()
    assert STANDBY not in owner.current(), owner.logs()
    return owner, standby


@pytest.mark.parametrize("kill", ["owner", "standby"])
def test_two_runs_started_together_under_writes(source_db, dest_db, replicator, kill):
    """The rolling update: both start at once on an empty mirror while Odoo writes; one of
    them is SIGKILLed; the mirror ends equal to the source (no row lost, none twice)."""
    seed_source(source_db, scale=0.3)
    a, b = replicator(**BATCHES), replicator(**BATCHES)
    workload = Workload(source_db.dsn, seed=7)
    workload.start()
    try:
        a.start()
        b.start()
        owner, standby = _owner_and_standby(a, b)
        # The owner copies (or already streams) while the standby waits: kill one of them
        # in the middle of it.
        wait_for(lambda: '"initial copy started"' in owner.current() or not owner.alive, 30,
                 what="the owner's initial copy")
        if kill == "owner":
            assert owner.kill(), f"the owner had exited by itself\n{owner.logs()}"
            survivor = standby
            # A process of this host that is gone: the standby need not wait out the lease.
            wait_for(lambda: TOOK_OVER in survivor.current() or not survivor.alive, 20,
                     what="the standby to take over")
        else:
            assert standby.kill(), f"the standby had exited by itself\n{standby.logs()}"
            survivor = owner
        assert survivor.alive, survivor.logs()
        wait_for(lambda: survivor.streaming() or not survivor.alive, 60,
                 what="the survivor to stream")
        time.sleep(1.0)
    finally:
        workload.stop()
    assert survivor.alive, survivor.logs()
    assert survivor.terminate(30) == 0, survivor.logs()
    # The last word goes to a one-shot run of the same config.
    final = replicator(**BATCHES)
    code = final.run_until_caught_up(timeout=120)
    assert code == 0, final.logs()
    problems, counts = mirror_diff(source_db, dest_db)
    assert not problems, "\n".join(problems) + f"\n{a.logs()}\n{b.logs()}"
    assert counts["account_move_line"] > 1000
    assert workload.transactions > 0


def _frozen_owner_writes_nothing(source_db, dest_db, replicator, **keys: Any) -> None:
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t values (1, 'a')")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    # A short lease, so the takeover of a process that is still there (frozen) comes soon.
    # A transaction another of its threads had open at the freeze holds the takeover up
    # until idle_in_transaction_timeout ends it: short too, so that the wait stays short.
    dest = {"lease_timeout": 3, "idle_in_transaction_timeout": 10,
            **keys.pop("destination", {})}
    a = replicator(destination=dest, **keys)
    b = replicator(destination=dest, **keys)
    # The owner stops itself with a batch in hand, before its transaction begins.
    a.start(env={"REPLICATOR_FAILPOINTS": "apply.batch_before_begin=stop"})
    wait_for(a.streaming, 60, what="the owner to stream")
    assert_same_eventually(source_db, dest_db)
    source_db.execute("update t set v = 'b' where id = 1")
    wait_for(lambda: _process_state(a.proc.pid) == "T", 30,
             what="the owner to freeze with the update in hand")
    try:
        # Its walsender lingers until wal_sender_timeout; the slot is free once it is gone.
        source_db.execute("select pg_terminate_backend(active_pid) from pg_replication_slots "
                          "where slot_name = %s and active_pid is not null", [PUBLICATION])
        gen_before = _lease(dest_db)[1]
        b.start()
        def detail() -> str:
            return f"{_locks(dest_db)}\n--- standby:\n{b.logs()}\n--- frozen owner:\n{a.logs()}"

        # It waits as a standby until the lease expires, or, started late on a busy
        # machine, finds it expired already: either way it holds it within seconds.
        wait_for(lambda: HOLDING in b.current() or not b.alive, 30,
                 what="the takeover once the frozen owner's lease expired", detail=detail)
        assert b.alive, b.logs()
        pid, gen_after = _lease(dest_db)
        assert pid == b.proc.pid and gen_after == gen_before + 1
        # The new owner applies the frozen one's update, and a newer one.
        source_db.execute("update t set v = 'c' where id = 1")
        wait_for(lambda: dest_db.scalar(f"select v from {MIRROR_SCHEMA}.t where id = 1") == "c",
                 60, what="the new owner to apply the newer update")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # Resumed, the old owner holds the batch with 'b': the fence stops it before it writes.
    code = a.wait_exit(30)
    out = a.current()
    assert code == 5, a.logs()
    assert "took over pipeline" in out or "took over the pipeline's lease" in out, a.logs()
    assert dest_db.scalar(f"select v from {MIRROR_SCHEMA}.t where id = 1") == "c", a.logs()
    # The new owner goes on.
    source_db.execute("update t set v = 'd' where id = 1")
    source_db.execute("insert into t values (2, 'x')")
    wait_for(lambda: dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.t where v in "
                                    "('d', 'x')") == 2, 60, what="the new owner to go on")
    assert b.terminate(30) == 0, b.logs()
    assert_same(source_db, dest_db, "t")


def assert_same_eventually(source_db, dest_db) -> None:
    wait_for(lambda: dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.t") == 1, 60,
             what="the initial copy")


def test_frozen_owner_resumed_after_takeover_writes_nothing(source_db, dest_db, replicator):
    _frozen_owner_writes_nothing(source_db, dest_db, replicator, **BATCHES)


def test_frozen_owner_writes_nothing_through_pgbouncer(source_db, owned_dest, pgbouncer,
                                                       pool_neighbour, replicator):
    """The same with the destination behind pgbouncer in transaction mode, where no
    session lock would survive from one transaction to the next."""
    _frozen_owner_writes_nothing(
        source_db, owned_dest, replicator, **BATCHES, password=ROLE_PASSWORD,
        destination={"host": pgbouncer.host, "port": pgbouncer.port, "user": OWNER})


def test_clean_stop_hands_over_at_once_and_status_shows_both(source_db, dest_db, replicator,
                                                             tmp_path: Path):
    """A standby takes over within a second or two of the owner's clean stop (not after
    lease_timeout), `/ready` answers 503 while it waits, and `status` names both."""
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    port = free_port()
    # A long lease: a takeover within seconds can only come from the release.
    a = replicator(destination={"lease_timeout": 120})
    b = replicator(destination={"lease_timeout": 120},
                   metrics={"enabled": True, "port": port})
    a.start()
    wait_for(a.streaming, 60, what="the owner to stream")
    b.start()
    wait_for(lambda: STANDBY in b.current() or not b.alive, 30, what="the standby")

    wait_for(lambda: http_status(port, "/ready", 5) == 503, 20,
             what="/ready 503 on the standby")
    # A standby is healthy: a supervisor must not restart it.
    assert http_status(port, "/health", 5) == 200
    config = a.config
    wait_for(lambda: "standby" in cli("status", "--config", str(config)).stdout, 20,
             what="status to show the standby")
    shown = cli("status", "--config", str(config)).stdout
    assert f"pid {a.proc.pid}" in shown and "holds the lease" in shown, shown
    assert f"pid {b.proc.pid}" in shown, shown
    assert a.terminate(30) == 0, a.logs()
    stopped = time.monotonic()
    wait_for(lambda: TOOK_OVER in b.current() or not b.alive, 20, what="the takeover")
    # Well inside the 120 s lease: the owner released it.
    assert time.monotonic() - stopped < 15, b.logs()
    wait_for(b.streaming, 60, what="the new owner to stream")
    source_db.execute("insert into t values (1, 'x')")
    wait_for(lambda: dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.t") == 1, 60,
             what="the new owner to apply")
    wait_for(lambda: http_status(port, "/ready", 5) == 200, 20, what="/ready 200 once it writes")
    assert b.terminate(30) == 0, b.logs()
    shown = cli("status", "--config", str(config)).stdout
    assert "stopped cleanly" in shown, shown


def test_one_shot_run_beside_a_live_writer_exits(source_db, dest_db, replicator):
    """`run --until-caught-up` beside a `run` that keeps renewing: it says who writes and
    exits 5 after one lease_timeout, writing nothing."""
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    a = replicator(destination={"lease_timeout": 3})
    one_shot = replicator(destination={"lease_timeout": 3})
    a.start()
    wait_for(a.streaming, 60, what="the owner to stream")
    code = one_shot.run_until_caught_up(timeout=60)
    assert code == 5, one_shot.logs()
    _out, err = one_shot.output()
    assert "another replicator process writes for pipeline" in err, one_shot.logs()
    assert "Traceback" not in err
    assert a.alive and a.terminate(30) == 0, a.logs()
