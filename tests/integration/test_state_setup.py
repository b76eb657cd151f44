"""state.setup on a real destination: the versioned state schema.

It runs at every start, so it must be idempotent; it must take a deployment
made before the versions existed (its tables, no schema_migrations) as is; and
a later file must run once, after the earlier ones, in its own transaction.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from replicator.destination import state
from replicator.errors import ErrorKind, ReplicatorError

STATE_TABLES = {"pipelines", "tables", "columns", "dead_letters", "schema_migrations",
                "index_builds", "leases"}

# What state.setup ran before the state schema was versioned (its _SETUP list).
UNVERSIONED_SETUP = [
    "create schema if not exists {state}",
    """create table if not exists {state}.pipelines (
        slot text primary key,
        applied_lsn pg_lsn not null,
        source_system_id text,
        updated_at timestamptz not null default now()
    )""",
    """create table if not exists {state}.tables (
        slot text not null,
        source_table text not null,
        mirror_table text not null,
        state text not null,
        sync_lsn pg_lsn,
        rows_copied bigint not null default 0,
        updated_at timestamptz not null default now(),
        primary key (slot, source_table)
    )""",
    """create table if not exists {state}.columns (
        slot text not null,
        source_table text not null,
        attnum int not null,
        mirror_column text not null,
        primary key (slot, source_table, attnum)
    )""",
    """create table if not exists {state}.dead_letters (
        id bigserial primary key,
        slot text not null,
        mirror_table text not null,
        lsn pg_lsn not null,
        reason text not null,
        row_data jsonb,
        created_at timestamptz not null default now()
    )""",
]


def _tables(conn, schema: str) -> set[str]:
    return {r[0] for r in conn.execute(
        "select table_name from information_schema.tables where table_schema = %s",
        [schema]).fetchall()}


def _columns(conn, schema: str) -> list[tuple]:
    return conn.execute(
        "select table_name, column_name, data_type, is_nullable, column_default "
        "from information_schema.columns where table_schema = %s "
        "order by table_name, ordinal_position", [schema]).fetchall()


def _recorded(conn, schema: str) -> list[tuple]:
    return conn.execute(psycopg.sql.SQL(
        "select version, name, applied_at from {}.schema_migrations order by version").format(
        psycopg.sql.Identifier(schema))).fetchall()


PACKAGED = [(m.version, m.name) for m in state.migrations()]


def test_packaged_versions_start_at_1_without_gaps():
    assert [v for v, _n in PACKAGED] == list(range(1, len(PACKAGED) + 1))
    assert PACKAGED[:2] == [(1, "initial"), (2, "source_identity")]


def test_setup_twice_records_its_versions_once(dest_db):
    with dest_db.connect() as conn:
        assert state.setup(conn, "st") == [v for v, _n in PACKAGED]
        first = _recorded(conn, "st")
        assert [(v, n) for v, n, _t in first] == PACKAGED
        assert _tables(conn, "st") == STATE_TABLES
        state.record_applied(conn.cursor(), "st", "slot_a", 0x16B3748)
        layout = _columns(conn, "st")

        assert state.setup(conn, "st") == []
        assert _recorded(conn, "st") == first        # not run again: same applied_at
        assert _columns(conn, "st") == layout
        assert state.applied_lsn(conn, "st", "slot_a") == 0x16B3748


def test_setup_upgrades_an_unversioned_deployment(dest_db):
    schema = psycopg.sql.Identifier("Old State")   # quoting carried through the files
    with dest_db.connect() as conn:
        with conn.transaction():
            for stmt in UNVERSIONED_SETUP:
                conn.execute(psycopg.sql.SQL(stmt).format(state=schema))
        # As the replicator of then wrote it.
        conn.execute(psycopg.sql.SQL("insert into {}.pipelines (slot, applied_lsn) "
                                     "values ('slot_a', '0/2A')").format(schema))
        conn.execute(psycopg.sql.SQL("insert into {}.dead_letters (slot, mirror_table, lsn, reason) "
                                     "values ('slot_a', 'm.t', '0/2A', 'x')").format(schema))
        before = _columns(conn, "Old State")

        assert state.setup(conn, "Old State") == [v for v, _n in PACKAGED]
        assert [(v, n) for v, n, _t in _recorded(conn, "Old State")] == PACKAGED
        after = _columns(conn, "Old State")
        # Every old column is kept as it was; later versions only add.
        kept = [c for c in after if c[0] not in ("schema_migrations", "index_builds", "leases")]
        assert [c for c in kept if c in before] == before
        assert [c[:2] for c in kept if c not in before] == [
            *[("dead_letters", c) for c in ("op", "key_data", "old_key", "unchanged", "sqlstate",
                                            "retries", "retried_at")],
            ("pipelines", "source_timeline"), ("tables", "source_identity")]
        assert [c for c in after if c[0] == "schema_migrations"] == [
            ("schema_migrations", "version", "integer", "NO", None),
            ("schema_migrations", "name", "text", "NO", None),
            ("schema_migrations", "applied_at", "timestamp with time zone", "NO", "now()")]
        assert state.applied_lsn(conn, "Old State", "slot_a") == 42
        assert conn.execute(psycopg.sql.SQL("select count(*) from {}.dead_letters")
                            .format(schema)).fetchone()[0] == 1
        assert state.setup(conn, "Old State") == []


def test_later_files_run_once_in_order_one_transaction_each(dest_db):
    packaged = state.migrations()
    # 003 needs 002's table; 004 fails halfway: its first statement must not stay.
    later = packaged + [
        state.Migration(1003, "fill", "insert into {state}.extra (id) values (1);"
                                      "alter table {state}.extra add column note text"),
        state.Migration(1002, "extra", "create table {state}.extra (id int primary key)"),
    ]
    later.sort(key=lambda m: m.version)
    broken = state.Migration(1004, "broken", "create table {state}.half (id int);"
                                          "select no_such_function()")
    with dest_db.connect() as conn:
        assert state.setup(conn, "st", packaged) == [v for v, _n in PACKAGED]
        assert state.setup(conn, "st", later) == [1002, 1003]
        assert conn.execute("select id, note from st.extra").fetchall() == [(1, None)]
        assert state.setup(conn, "st", later) == []      # 003's insert would fail if rerun

        with pytest.raises(psycopg.errors.UndefinedFunction):
            state.setup(conn, "st", later + [broken])
        assert "half" not in _tables(conn, "st")
        assert [v for v, _n, _t in _recorded(conn, "st")] == [v for v, _n in PACKAGED] + [1002, 1003]


def test_concurrent_first_setups(dest_db):
    # Replicators started together on an empty destination: each must succeed, and
    # each file must run once. Which start runs which file is the lock's choice (each
    # file takes it anew): one may run 001 and another the rest.
    errors: list[BaseException] = []
    ran: list[list[int]] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            with dest_db.connect() as conn:
                barrier.wait()
                ran.append(state.setup(conn, "st"))
        except BaseException as exc:   # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v for versions in ran for v in versions) == [v for v, _n in PACKAGED]
    assert all(versions == sorted(versions) for versions in ran), ran
    with dest_db.connect() as conn:
        assert [v for v, _n, _t in _recorded(conn, "st")] == [v for v, _n in PACKAGED]


def test_a_migration_gives_up_on_a_table_in_use_instead_of_queueing_its_users(dest_db,
                                                                             monkeypatch):
    # A rolling update: the new process upgrades the state while the old one holds a table
    # in a long transaction. Waiting, its ALTER would queue the old process's own next
    # statements on that table behind it.
    packaged = state.migrations()
    with dest_db.connect() as conn:
        state.setup(conn, "upgrading", files=packaged[:-1])
    monkeypatch.setattr(state, "MIGRATION_LOCK_TIMEOUT", "300ms")
    with dest_db.connect(autocommit=False) as old, dest_db.connect() as new:
        old.execute("lock table upgrading.pipelines in access share mode")
        with pytest.raises(ReplicatorError) as info:
            state.setup(new, "upgrading")
        assert info.value.kind is ErrorKind.DESTINATION_CONNECT
        assert info.value.message.startswith(
            "[destination] cannot upgrade the state schema 'upgrading' "
            f"({packaged[-1].version:03d}_{packaged[-1].name}): a table it alters stayed in use")
        # Nothing of the file stayed, and the old process's session was never blocked.
        old.execute("select count(*) from upgrading.pipelines")
        old.rollback()
        assert state.setup(new, "upgrading") == [packaged[-1].version]
