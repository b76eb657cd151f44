"""A failover of the source: a PostgreSQL 18 primary with a physical standby, the replicator
configured with both hosts, writes going on, a big transaction open, the primary stopped
hard and the standby promoted.

With failover slots (the standby syncs the slot, the primary waits for it), the replicator
goes on from the standby's copy of the slot, killed once around the switch, and the mirror
ends equal to the new primary with no table copied again. Without slot sync it stops with
the lost-slot message and `resync --all` recovers. And when the new primary lacks what the
mirror applied (no synchronized_standby_slots, the standby behind), it refuses to go on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from plugins.replicator import (
    PASSWORD_VAR,
    PUBLICATION,
    ReplicatorProcess,
    assert_same,
    cli,
    error_line,
    json_logging,
    wait_for,
    write_config,
)
from plugins.servers import (
    ONE_VERSION,
    SOURCE_ROLE,
    TestDatabase,
    grant_source_role,
    start_cluster,
)

from replicator import failpoints
from replicator.devtools.localpg import LocalCluster, free_port
from replicator.errors import ExitCode

VERSION = 18
DATABASE = "odoo"
STANDBY_SLOT = "standby1"
# The slot sync worker naps up to 30 s between rounds when nothing changes.
SYNC_TIMEOUT = 90


@pytest.fixture
def primary(pg_base_dir: Path) -> Iterator[LocalCluster]:
    """A PostgreSQL 18 source of its own (the test stops it), with two published tables."""
    for cluster in start_cluster(VERSION, pg_base_dir):
        cluster.create_database(DATABASE)
        db = TestDatabase(cluster, DATABASE)
        grant_source_role(db)
        db.execute("create table a (id int primary key, v text)")
        db.execute("create table b (id int primary key, v text)")
        db.execute("insert into b select g, 'b' || g from generate_series(1, 2000) g")
        db.execute(f"create publication {PUBLICATION} for table a, b")
        yield cluster


def standby_of(primary: LocalCluster, sync: bool) -> LocalCluster:
    settings = {"sync_replication_slots": "on", "hot_standby_feedback": "on"} if sync else {}
    return primary.start_standby(slot=STANDBY_SLOT, dbname=DATABASE, settings=settings)


def wait_for_the_standby(primary: LocalCluster) -> None:
    """The primary's logical walsenders send nothing the standby has not confirmed."""
    with primary.connect() as conn:
        conn.execute(f"alter system set synchronized_standby_slots = '{STANDBY_SLOT}'")
        conn.execute("select pg_reload_conf()")


def wait_for_standby_slot(primary: TestDatabase, standby: TestDatabase) -> None:
    """Until the standby's copy of the slot is synced and persistent (made temporary, it
    becomes persistent once the primary's slot moved past where the copy started)."""
    def synced() -> bool:
        primary.execute("insert into a values (0, 'nudge') on conflict (id) do update "
                        "set v = a.v || '.'")
        row = standby.fetchone("select synced and not temporary from pg_replication_slots "
                               "where slot_name = %s", [PUBLICATION])
        return bool(row and row[0])

    wait_for(synced, SYNC_TIMEOUT, "the standby's synced copy of the slot")


def stream_until_the_standby_has_the_slot(proc: ReplicatorProcess, primary: TestDatabase,
                                          standby: TestDatabase) -> None:
    """A run that streams until the standby's copy of the slot is persistent, then stops."""
    proc.start()
    wait_for(proc.streaming, 60, "streaming", proc.logs)
    wait_for_standby_slot(primary, standby)
    assert proc.terminate(60) == 0, proc.logs()


class Writer(threading.Thread):
    """Small transactions through both hosts (libpq's read-write choice), reconnecting."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(daemon=True, name="writer")
        self.conninfo = conninfo
        self.stop_event = threading.Event()
        self.count = 0
        self.errors = 0

    def run(self) -> None:
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=2)
                self.count += 1
                i = self.count
                conn.execute("update b set v = %s where id = %s", [f"w{i}", i % 2000 + 1])
                conn.execute("insert into a values (%s, 'w') on conflict (id) do update "
                             "set v = excluded.v || a.v", [1000 + i % 300])
                if i % 5 == 0:
                    conn.execute("insert into b values (%s, 'new')", [100_000 + i])
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.2)
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)


def both_hosts(primary: LocalCluster, standby: LocalCluster) -> str:
    return f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"


def process(tmp_path: Path, dest_db, primary: LocalCluster, standby: LocalCluster,
            **source) -> ReplicatorProcess:
    workdir = tmp_path / "replicator"
    workdir.mkdir(exist_ok=True)
    config = write_config(workdir, None, dest_db, password=f"${PASSWORD_VAR}",
                          logging=json_logging(), source={
                              "host": both_hosts(primary, standby), "port": primary.port,
                              "database": DATABASE, "user": SOURCE_ROLE, **source})
    return ReplicatorProcess(config, workdir)


def copies_after_first_run(proc: ReplicatorProcess) -> list[int]:
    return [run for run in range(2, proc.runs + 1)
            if '"msg":"initial copy started"' in proc.output(run)[0]]


def test_failover_with_synced_slots_resumes_with_nothing_lost_or_twice(
        primary, dest_db, tmp_path):
    standby = standby_of(primary, sync=True)
    try:
        wait_for_the_standby(primary)
        old, new = TestDatabase(primary, DATABASE), TestDatabase(standby, DATABASE)
        proc = process(tmp_path, dest_db, primary, standby,
                       standby_host=f"127.0.0.1:{standby.port}")
        assert proc.run_until_caught_up() == 0, proc.logs()
        assert old.scalar("select failover from pg_replication_slots where slot_name = %s",
                          [PUBLICATION]) is True
        writer = Writer(f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} "
                        f"dbname={DATABASE} user=postgres target_session_attrs=read-write")
        writer.start()
        try:
            proc.start()
            wait_for(proc.streaming, 60, "streaming", proc.logs)
            wait_for_standby_slot(old, new)
            checked = cli("check", "--config", str(proc.config))
            assert checked.returncode == 0, checked.stderr
            assert "failover: ready: slot odoo_pub is a failover slot, synced to" in \
                checked.stdout, checked.stdout
            status = cli("status", "--config", str(proc.config), "--json")
            assert json.loads(status.stdout)["failover_ready"] is True, status.stdout

            # A big transaction open on the primary: streamed to the replicator in chunks,
            # never committed.
            big = psycopg.connect(old.dsn)
            big.execute("insert into b select g, repeat('x', 200) "
                        "from generate_series(500000, 560000) g")
            time.sleep(1.0)

            primary.stop(mode="immediate")
            big.close()
            switched = time.monotonic()
            standby.promote()
            # Killed around the switch: the next process finds the new primary itself.
            time.sleep(0.5)
            proc.kill()
            proc.start()
            new.execute("insert into a values (-1, 'after the switch')")
            wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.a where id = -1")
                     == 1, 90, "a change on the new primary in the mirror", proc.logs)
            took = time.monotonic() - switched
            print(f"\nfailover: a change on the new primary was in the mirror {took:.1f} s "
                  "after the primary stopped")
            time.sleep(1.0)
        finally:
            writer.stop()
        assert writer.errors > 0 and writer.count > 100, (writer.errors, writer.count)
        assert proc.terminate(60) == 0, proc.logs()
        assert proc.run_until_caught_up() == 0, proc.logs()
        for table in ("a", "b"):
            assert_same(new, dest_db, table)
        assert dest_db.scalar("select count(*) from odoo_mirror.b where id >= 500000") == 0
        assert copies_after_first_run(proc) == [], proc.logs()
        assert dest_db.scalar("select count(*) from replicator.tables "
                              "where state <> 'streaming'") == 0
        assert dest_db.scalar("select source_timeline from replicator.pipelines") == 2
    finally:
        standby.remove()


def test_a_failover_between_the_sessions_checks_and_its_stream(primary, dest_db, tmp_path):
    # The checks (system id, timeline, slot) ran on the old primary, then a copy made before
    # streaming took a while, and the stream connection reached the promoted standby: the
    # session starts over and checks the server it streams from.
    standby = standby_of(primary, sync=True)
    try:
        wait_for_the_standby(primary)
        old, new = TestDatabase(primary, DATABASE), TestDatabase(standby, DATABASE)
        proc = process(tmp_path, dest_db, primary, standby)
        stream_until_the_standby_has_the_slot(proc, old, new)
        dest_db.execute("update replicator.tables set state = 'pending' "
                        "where source_table = 'public.b'")
        proc.start(env={failpoints.ENV: f"{failpoints.STARTUP_COPIED}=sleep:6"})
        wait_for(lambda: '"failpoint"' in proc.current(), 60, "the copy", proc.logs)
        primary.stop(mode="immediate")
        standby.promote()
        new.execute("update b set v = 'after the switch' where id <= 3")
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.b "
                                        "where v = 'after the switch'") == 3,
                 90, "the change on the new primary", proc.logs)
        assert "the source changed between the session's checks and its stream" in \
            proc.current(), proc.logs()
        assert proc.terminate(60) == 0, proc.logs()
        for table in ("a", "b"):
            assert_same(new, dest_db, table, empty_ok=True)
        assert dest_db.scalar("select source_timeline from replicator.pipelines") == 2
    finally:
        standby.remove()


def test_failover_without_slot_sync_stops_with_the_lost_slot_and_resync_recovers(
        primary, dest_db, tmp_path):
    standby = standby_of(primary, sync=False)
    try:
        old, new = TestDatabase(primary, DATABASE), TestDatabase(standby, DATABASE)
        proc = process(tmp_path, dest_db, primary, standby)
        assert proc.run_until_caught_up() == 0, proc.logs()
        old.execute("update b set v = 'before the failover' where id <= 10")
        assert proc.run_until_caught_up() == 0, proc.logs()
        wait_for(lambda: new.scalar("select count(*) from b where v = 'before the failover'")
                 == 10, 30, "the standby to replay")
        primary.stop(mode="immediate")
        standby.promote()
        new.execute("update b set v = 'after the failover' where id <= 5")
        assert proc.run_until_caught_up() == ExitCode.FATAL, proc.logs()
        line = proc.output()[1].strip().splitlines()[-1]
        assert "no longer exists on the source" in line and "resync --config PATH --all" in line, line
        resync = cli("resync", "--config", str(proc.config), "--all")
        assert resync.returncode == 0, error_line(resync)
        assert proc.run_until_caught_up() == 0, proc.logs()
        assert_same(new, dest_db, "b")
        assert dest_db.scalar("select count(*) from odoo_mirror.b "
                              "where v = 'after the failover'") == 5
    finally:
        standby.remove()


def test_a_failover_to_a_standby_behind_the_mirror_is_refused(primary, dest_db, tmp_path):
    # Slot sync but no synchronized_standby_slots: the replicator is sent what the standby
    # has not received yet. Here the standby is stopped while the mirror applies more.
    standby = standby_of(primary, sync=True)
    try:
        old, new = TestDatabase(primary, DATABASE), TestDatabase(standby, DATABASE)
        proc = process(tmp_path, dest_db, primary, standby)
        stream_until_the_standby_has_the_slot(proc, old, new)
        standby.stop()
        old.execute("update b set v = 'only on the old primary' where id <= 10")
        assert proc.run_until_caught_up() == 0, proc.logs()
        primary.stop(mode="immediate")
        standby.start()
        standby.promote()
        assert proc.run_until_caught_up() == ExitCode.FATAL, proc.logs()
        line = proc.output()[1].strip().splitlines()[-1]
        assert "the source failed over" in line and "lost at the source" in line, line
        assert "synchronized_standby_slots" in line, line
        # The way out is the usual one.
        resync = cli("resync", "--config", str(proc.config), "--all")
        assert resync.returncode == 0, error_line(resync)
        assert proc.run_until_caught_up() == 0, proc.logs()
        assert_same(new, dest_db, "b")
    finally:
        standby.remove()


def test_check_names_what_a_failover_needs(primary, dest_db, tmp_path):
    # No standby_host, no synchronized_standby_slots, and a slot made without FAILOVER.
    with psycopg.connect(primary.dsn(DATABASE, replication="database"), autocommit=True) as r:
        r.execute(f"CREATE_REPLICATION_SLOT {PUBLICATION} LOGICAL pgoutput")
    standby = primary.start_standby()
    try:
        proc = process(tmp_path, dest_db, primary, standby)
        checked = cli("check", "--config", str(proc.config))
        assert checked.returncode == 0, checked.stderr
        warnings = [line for line in checked.stdout.splitlines()
                    if line.startswith("failover WARNING")]
        assert any("is not a failover slot" in w and "ALTER_REPLICATION_SLOT" in w
                   for w in warnings), checked.stdout
        assert any("synchronized_standby_slots is not set" in w for w in warnings), \
            checked.stdout
        # The step check names converts the slot.
        with psycopg.connect(primary.dsn(DATABASE, replication="database"),
                             autocommit=True) as r:
            r.execute(f"ALTER_REPLICATION_SLOT {PUBLICATION} (FAILOVER true)")
        checked = cli("check", "--config", str(proc.config))
        assert "is not a failover slot" not in checked.stdout, checked.stdout
        # A standby_host that does not answer: said, and the answer is "not known".
        unreachable = process(tmp_path, dest_db, primary, standby,
                              standby_host=f"127.0.0.1:{free_port()}")
        checked = cli("check", "--config", str(unreachable.config))
        assert checked.returncode == 0, checked.stderr
        assert "failover: whether a failover keeps the slot is not known" in checked.stdout
        assert "failover WARNING: cannot connect to [source] standby_host" in checked.stdout
    finally:
        standby.remove()
    with primary.connect() as conn:
        conn.execute("select pg_drop_replication_slot(%s)", [PUBLICATION])


@ONE_VERSION
def test_a_source_without_failover_slots_says_a_failover_needs_a_resync(source_db, dest_db,
                                                                        tmp_path):
    source_db.execute("create table t (id int primary key)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    checked = cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "failover: PostgreSQL 15 has no failover slots" in checked.stdout, checked.stdout
    assert "resync --all" in checked.stdout
