"""Smoke test of the test servers: each source decodes with pgoutput, the
destination is a separate server, and per-test databases clean up after themselves."""

from __future__ import annotations

import subprocess
import time


def test_source_decodes_pgoutput(source_db):
    version = source_db.scalar("SELECT current_setting('server_version_num')::int") // 10000
    assert version == source_db.cluster.version
    assert source_db.scalar("SHOW wal_level") == "logical"

    source_db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source_db.execute("CREATE PUBLICATION pub FOR TABLE t")
    source_db.execute("SELECT pg_create_logical_replication_slot('smoke', 'pgoutput')")
    source_db.execute("INSERT INTO t VALUES (1, 'one')")

    rows = source_db.fetchall(
        "SELECT data FROM pg_logical_slot_peek_binary_changes("
        "'smoke', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub')"
    )
    kinds = [bytes(data)[:1] for (data,) in rows]
    assert kinds == [b"B", b"R", b"I", b"C"]
    assert b"one" in bytes(rows[2][0])


def test_destination_is_separate(dest_db, pg15, pg18):
    assert dest_db.scalar("SELECT current_setting('server_version_num')::int") // 10000 == 15
    assert dest_db.cluster.port not in (pg15.port, pg18.port)
    assert dest_db.fetchall("SELECT current_database()") == [(dest_db.name,)]


def test_teardown_drops_database_with_active_slot(source_cluster):
    # What the source_db teardown relies on: a slot blocks DROP DATABASE even
    # WITH (FORCE), and an active one must lose its walsender before it can go.
    name = "smoke_drop"
    source_cluster.create_database(name)
    with source_cluster.connect(name) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('left_behind', 'pgoutput')")
        conn.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    receiver = subprocess.Popen(
        [
            str(source_cluster.bin_dir / "pg_recvlogical"),
            "--dbname", source_cluster.dsn(name),
            "--slot", "left_behind",
            "--start", "--file", "/dev/null",
            "--option", "proto_version=1", "--option", "publication_names=pub",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with source_cluster.connect() as conn:
            deadline = time.monotonic() + 10
            while conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'left_behind'"
            ).fetchone() == (None,):
                assert time.monotonic() < deadline, "pg_recvlogical never became active"
                time.sleep(0.05)
        source_cluster.drop_database(name)
    finally:
        receiver.kill()
        receiver.wait()
    with source_cluster.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'left_behind'"
        ).fetchone() == (0,)
