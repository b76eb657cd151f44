"""A source set up short of what the replicator needs: a missing grant, a slot not its own.

A role with REPLICATION but without SELECT on one published table (or USAGE on its schema)
is a setup error like a missing publication: `check` names the table and the GRANT to run,
and `run` stops with that line (exit 2) instead of retrying "permission denied" as a lost
connection. A slot of the configured name that belongs to another database or decodes with
another plugin is `check`'s to report too, before `run` meets it.
"""

from __future__ import annotations

import uuid

import pytest
from plugins.replicator import (
    PUBLICATION,
    catch_up,
    cli,
    cli_config,
    error_line,
    sync_state,
    wait_for,
)
from plugins.servers import ONE_VERSION, SOURCE_ROLE
from psycopg import sql

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


ROLE = sql.Identifier(SOURCE_ROLE)


def _publish(source_db, *tables: str) -> None:
    source_db.execute(sql.SQL("create publication {} for table {}").format(
        sql.Identifier(PUBLICATION), sql.SQL(", ").join(sql.SQL(t) for t in tables)))


# How each missing privilege is made, what check says, and the GRANT that fixes it.
UNREADABLE = {
    "select": (
        ['create table "Res Partner" (id int primary key)',
         'revoke select on "Res Partner" from {role}'],
        ['"Res Partner"'],
        f'[source] role {SOURCE_ROLE} may not read public.Res Partner: the initial copy and '
        f'verify read them — run on the source as the owner: grant select on table '
        f'"public"."Res Partner" to "{SOURCE_ROLE}"'),
    "usage": (
        ["create schema sales", "create table sales.orders (id int primary key)",
         "revoke usage on schema sales from {role}"],
        ["sales.orders"],
        f"[source] role {SOURCE_ROLE} may not read sales.orders (no usage on schema sales): "
        f"the initial copy and verify read them — run on the source as the owner: "
        f'grant usage on schema "sales" to "{SOURCE_ROLE}"'),
}


@pytest.mark.parametrize("privilege", sorted(UNREADABLE))
def test_check_names_a_table_the_role_cannot_read_and_the_grant(source_db, dest_db, tmp_path,
                                                                privilege):
    setup, published, line = UNREADABLE[privilege]
    source_db.execute("create table t (id int primary key)")
    for stmt in setup:
        source_db.execute(sql.SQL(stmt).format(role=ROLE))
    _publish(source_db, "t", *published)
    config = cli_config(tmp_path, source_db, dest_db)
    proc = cli("check", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == f"error: {line}"
    # The GRANT is exactly what is missing: run as printed, check passes.
    source_db.execute(line.rsplit("the owner: ", 1)[1])
    proc = cli("check", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "source OK" in proc.stdout


def test_run_until_caught_up_stops_at_a_missing_grant(source_db, dest_db, replicator):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("create table u (id int primary key, v text)")
    source_db.execute("insert into u values (1, 'unreadable')")
    source_db.execute(sql.SQL("revoke select on u from {}").format(ROLE))
    _publish(source_db, "t", "u")
    # Ten minutes of retries if it were taken for an outage: the run must not wait for them.
    proc = replicator(source={"retry_timeout": 600})
    assert proc.run_until_caught_up(timeout=60) == 2, proc.logs()
    out, err = proc.output()
    assert err.splitlines() == [
        f"error: [source] role {SOURCE_ROLE} may not read public.u: the initial copy and "
        f"verify read them — run on the source as the owner: grant select on table "
        f'"public"."u" to "{SOURCE_ROLE}"'], err
    assert "Traceback" not in out + err and "retrying" not in out
    # Refused before a slot was made for a copy that could not run.
    assert source_db.scalar("select count(*) from pg_replication_slots "
                            "where database = current_database()") == 0


def test_a_table_added_without_a_grant_stops_a_running_replicator(source_db, dest_db,
                                                                  replicator):
    # The session's checks passed: the copy of the added table is what meets the refusal.
    source_db.execute("create table t (id int primary key, v text)")
    _publish(source_db, "t")
    proc = replicator()
    proc.start()
    wait_for(lambda: sync_state(dest_db, "t") == "streaming", 60, "t to stream")
    source_db.execute("create table u (id int primary key, v text)")
    source_db.execute("insert into u values (1, 'unreadable')")
    source_db.execute(sql.SQL("revoke select on u from {}").format(ROLE))
    source_db.execute(f"alter publication {PUBLICATION} add table u")
    assert proc.wait_exit(60) == 2, proc.logs()
    out, err = proc.output()
    assert err.splitlines() == [
        "error: [source] copy from public.u: permission denied for table u — run on the "
        f'source as the table\'s owner: grant select on table "public"."u" to "{SOURCE_ROLE}"'
    ], err
    assert "Traceback" not in out + err and "retrying" not in out


def test_verify_names_a_table_the_role_cannot_read(source_db, dest_db, tmp_path):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t values (1, 'a')")
    _publish(source_db, "t")
    catch_up(source_db, dest_db)
    source_db.execute(sql.SQL("revoke select on t from {}").format(ROLE))
    proc = cli("verify", "--config", str(cli_config(tmp_path, source_db, dest_db)))
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == (
        f"error: [source] role {SOURCE_ROLE} may not read public.t: the initial copy and "
        f"verify read them — run on the source as the owner: grant select on table "
        f'"public"."t" to "{SOURCE_ROLE}"')


@pytest.fixture
def slot_name(source_db):
    """A slot name of this test's own, and whatever slot of that name is left, dropped."""
    name = "grants_" + uuid.uuid4().hex[:8]
    yield name
    with source_db.cluster.connect() as conn:
        conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                     "where slot_name = %s", [name])


def test_check_reports_a_slot_of_another_database(source_db, dest_db, tmp_path, slot_name):
    source_db.execute("create table t (id int primary key)")
    _publish(source_db, "t")
    with source_db.cluster.connect() as conn:  # the cluster's postgres database
        conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", [slot_name])
    proc = cli("check", "--config", str(cli_config(tmp_path, source_db, dest_db,
                                                    source={"slot": slot_name})))
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == (
        f"error: [source] slot {slot_name} belongs to database postgres, not to "
        f"{source_db.name}, which [source] database names — set [source] slot to another "
        f"name, or, if nothing uses that slot, drop it on the source: "
        f"select pg_drop_replication_slot('{slot_name}')")


def test_check_reports_a_slot_of_another_plugin(source_db, dest_db, tmp_path, slot_name):
    source_db.execute("create table t (id int primary key)")
    _publish(source_db, "t")
    source_db.execute("select pg_create_logical_replication_slot(%s, 'test_decoding')",
                      [slot_name])
    proc = cli("check", "--config", str(cli_config(tmp_path, source_db, dest_db,
                                                    source={"slot": slot_name})))
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == (
        f"error: [source] slot {slot_name} decodes with plugin test_decoding, not pgoutput — "
        f"set [source] slot to another name, or, if nothing uses that slot, drop it on the "
        f"source: select pg_drop_replication_slot('{slot_name}')")


@pytest.fixture
def mirror_role(dest_db):
    """A destination role that owns the destination database (so it creates the mirror's
    schemas and tables) and is no superuser."""
    name = "mirror_" + uuid.uuid4().hex[:8]
    role, database = sql.Identifier(name), sql.Identifier(dest_db.name)
    dest_db.execute(sql.SQL("create role {} login").format(role))
    dest_db.execute(sql.SQL("alter database {} owner to {}").format(database, role))
    yield name
    dest_db.execute(sql.SQL("alter database {} owner to postgres").format(database))
    dest_db.execute(sql.SQL("drop owned by {}").format(role))
    dest_db.execute(sql.SQL("drop role {}").format(role))


def test_a_mirror_table_the_destination_user_may_not_write_stops_the_run(
        source_db, dest_db, replicator, mirror_role):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t values (1, 'a')")
    _publish(source_db, "t")
    proc = replicator(destination={"user": mirror_role})
    assert proc.run_until_caught_up() == 0, proc.logs()
    dest_db.execute(sql.SQL("revoke insert, update, delete on odoo_mirror.t from {}").format(
        sql.Identifier(mirror_role)))
    source_db.execute("insert into t values (2, 'b')")
    # Not retried as a batch the mirror keeps rejecting (exit 4 after five attempts).
    assert proc.run_until_caught_up() == 2, proc.logs()
    out, err = proc.output()
    assert err.splitlines() == [
        "error: [destination] permission denied for table t — grant the destination user what "
        f"it needs: GRANT USAGE, CREATE ON SCHEMA <schema> TO {mirror_role}; and ownership or "
        "ALL on the mirror tables"], err
    assert "Traceback" not in out + err and "retrying" not in proc.output()[0]


def test_a_mirror_table_of_another_owner_is_named_with_the_fix(source_db, dest_db, replicator,
                                                               mirror_role):
    # Created by an administrator (an `init` run as another user): the copy must alter it.
    source_db.execute("create table t (id int primary key, v text)")
    _publish(source_db, "t")
    dest_db.execute("create schema odoo_mirror")
    dest_db.execute(sql.SQL("grant usage, create on schema odoo_mirror to {}").format(
        sql.Identifier(mirror_role)))
    dest_db.execute("create table odoo_mirror.t (id int primary key, v text)")
    proc = replicator(destination={"user": mirror_role})
    assert proc.run_until_caught_up() == 2, proc.logs()
    out, err = proc.output()
    assert err.splitlines() == [
        "error: [destination] must be owner of table t — the replicator alters the mirror "
        "tables it writes: run on the destination as an administrator: alter table "
        f'"odoo_mirror"."t" owner to "{mirror_role}"'], err
    assert "Traceback" not in out + err
