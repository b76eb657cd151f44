"""A slot the source invalidated: seen coming, refused with the recovery, recovered end to end.

The source runs with a tiny max_slot_wal_keep_size so that WAL written while the
replicator is stopped pushes its slot to `unreserved` (about to lose WAL it needs)
and, after a checkpoint, to `lost`. Each version gets its own cluster: the setting
is cluster-wide and would invalidate the slots of every other test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from plugins.replicator import PUBLICATION, assert_same, replicator_env
from plugins.servers import SOURCE_VERSIONS, _fresh_database, grant_source_role, start_cluster

from replicator.devtools.localpg import LocalCluster
from replicator.errors import ExitCode
from replicator.pipeline.slot_monitor import SlotMonitor
from replicator.telemetry.metrics import SLOT_WAL_STATUS, Metrics

ROWS = 200


@pytest.fixture(scope="module", params=SOURCE_VERSIONS, ids=lambda v: f"pg{v}")
def lossy_cluster(request: pytest.FixtureRequest, pg_base_dir: Path) -> Iterator[LocalCluster]:
    gen = start_cluster(request.param, pg_base_dir, {"max_slot_wal_keep_size": "16MB"})
    yield next(gen)
    gen.close()

@pytest.fixture
def source_db(lossy_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator:
    for db in _fresh_database(lossy_cluster, "src", request.node.name):
        grant_source_role(db)
        yield db

def _wal_status(db, slot: str) -> str | None:
    return db.scalar("select wal_status from pg_replication_slots where slot_name = %s", [slot])

def _push_wal(db, segments: int = 4) -> None:
    """Write and switch past `segments` WAL segments (each 16 MB), with no checkpoint."""
    with db.connect() as conn:
        for _ in range(segments):
            conn.execute("insert into filler select from generate_series(1, 10)")
            conn.execute("select pg_switch_wal()")

def _cli(command: str, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "replicator", command, "--config", str(config), *extra],
        env=replicator_env(), capture_output=True, text=True, timeout=120)

def test_lost_slot_is_seen_coming_refused_and_recovered_by_resync_all(
        source_db, dest_db, replicator):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("create table filler ()")
    source_db.execute(f"insert into t select g, 'v' || g from generate_series(1, {ROWS}) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    proc = replicator()
    assert proc.run_until_caught_up() == 0, proc.logs()
    slot = PUBLICATION
    assert _wal_status(source_db, slot) == "reserved"

    # Stopped; the source changes and writes WAL past what the slot may keep.
    source_db.execute("update t set v = 'changed while stopped' where id <= 10")
    source_db.execute("delete from t where id between 11 and 20")
    _push_wal(source_db)
    assert _wal_status(source_db, slot) == "unreserved"

    # Seen coming: status says so (exit 1), and so does the metric.
    seen = _cli("status", proc.config, "--json")
    assert seen.returncode == 1, seen.stdout + seen.stderr
    assert any("unreserved" in p for p in json.loads(seen.stdout)["problems"])
    metrics = Metrics()
    monitor = SlotMonitor(metrics, source_db.dsn, dest_db.dsn, "replicator", slot, 60)
    monitor.poll()
    assert metrics.registry.get_sample_value(SLOT_WAL_STATUS, {"wal_status": "unreserved"}) == 1
    assert metrics.registry.get_sample_value(SLOT_WAL_STATUS, {"wal_status": "reserved"}) == 0
    for conn in monitor.conns.values():
        conn.close()

    # The checkpoint removes the WAL: the slot is lost.
    source_db.execute("checkpoint")
    assert _wal_status(source_db, slot) == "lost"

    # run refuses with one line that says what happened and the exact recovery.
    proc.start("--until-caught-up")
    code = proc.wait_exit(60)
    out, err = proc.output()
    assert code == ExitCode.FATAL, proc.logs()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "invalidated" in lines[0] and "replicator resync --config PATH --all" in lines[0]
    assert "max_slot_wal_keep_size" in lines[0]
    lost = _cli("status", proc.config, "--json")
    assert lost.returncode == 1
    assert any("lost" in p for p in json.loads(lost.stdout)["problems"])

    # The recovery the message names works end to end: every change made while the
    # slot was lost is in the mirror, and streaming goes on from the new slot.
    resync = _cli("resync", proc.config, "--all")
    assert resync.returncode == 0, resync.stderr
    assert proc.run_until_caught_up() == 0, proc.logs()
    assert _wal_status(source_db, slot) == "reserved"
    assert dest_db.scalar("select count(*) from odoo_mirror.t") == ROWS - 10
    assert_same(source_db, dest_db, "t")
    source_db.execute("update t set v = 'after recovery' where id > 100")
    source_db.execute("insert into t values (1000, 'new')")
    assert proc.run_until_caught_up() == 0, proc.logs()
    assert_same(source_db, dest_db, "t")
    # All is well again, but for the one-shot run having exited (status says so, exit 1).
    final = json.loads(_cli("status", proc.config, "--json").stdout)
    assert final["exit_reason"] == "caught up (run --until-caught-up) and exited", final
    assert [p for p in final["problems"] if "no replicator runs" not in p] == [], final

def test_a_missing_slot_with_copied_tables_is_refused_even_before_any_batch(
        source_db, dest_db, replicator):
    """Copied but never streamed (no applied position yet): a new slot would start after a
    gap, so a dropped slot needs the same resync as a lost one."""
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t values (1, 'a')")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    proc = replicator()
    assert proc.run_until_caught_up() == 0, proc.logs()
    assert dest_db.scalar("select count(*) from replicator.pipelines") in (0, 1)
    dest_db.execute("delete from replicator.pipelines")  # as if no batch had ever committed
    source_db.execute("select pg_drop_replication_slot(%s)", [PUBLICATION])
    source_db.execute("insert into t values (2, 'written while the slot was gone')")
    proc.start("--until-caught-up")
    assert proc.wait_exit(60) == ExitCode.FATAL
    err = proc.output()[1]
    assert "no longer exists" in err and "--all" in err, err
    assert _cli("resync", proc.config, "--all").returncode == 0
    assert proc.run_until_caught_up() == 0, proc.logs()
    assert_same(source_db, dest_db, "t")

def test_slot_query_reads_the_invalidation_on_every_version(source_db):
    """invalidation_reason is a column from 17 on; the one query must work before it too."""
    from replicator.source.catalog import replication_slot

    with psycopg.connect(source_db.dsn, autocommit=True) as conn:
        conn.execute("select pg_create_logical_replication_slot('probe', 'pgoutput')")
        try:
            slot = replication_slot(conn, "probe")
            assert slot is not None and not slot.invalidated
            assert slot.wal_status == "reserved" and slot.invalidation_reason is None
        finally:
            conn.execute("select pg_drop_replication_slot('probe')")
