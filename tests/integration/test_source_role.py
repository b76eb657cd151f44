"""The least-privilege source role (README "Source role: least privilege").

LOGIN REPLICATION and SELECT on the published tables is all the replicator needs on the
source, heartbeat included, and all it uses: after a copy, streaming and heartbeats, the
source holds nothing new but the replication slot. Every test of tests/plugins/replicator.py
connects as that role (SOURCE_ROLE); this file checks the role itself, and that a role
without REPLICATION is told so in one line.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid

import pytest
from plugins.replicator import (
    PASSWORD,
    PASSWORD_VAR,
    PUBLICATION,
    assert_same,
    json_logging,
    replicator_env,
    running,
    wait_for,
    write_config,
)
from plugins.servers import SOURCE_ROLE
from psycopg import sql

# Everything that could be created on the source, by anyone: relations, schemas, functions,
# types, publications, and who owns them.
SOURCE_OBJECTS = """
select 'relation', c.oid::regclass::text, c.relowner::regrole::text from pg_class c
  where c.relnamespace::regnamespace::text not in ('pg_catalog', 'information_schema', 'pg_toast')
union all select 'schema', nspname, nspowner::regrole::text from pg_namespace
union all select 'function', p.oid::regprocedure::text, p.proowner::regrole::text from pg_proc p
  where p.pronamespace::regnamespace::text not in ('pg_catalog', 'information_schema')
union all select 'type', t.oid::regtype::text, t.typowner::regrole::text from pg_type t
  where t.typnamespace::regnamespace::text not in ('pg_catalog', 'information_schema')
union all select 'publication', pubname, pubowner::regrole::text from pg_publication
order by 1, 2
"""

WRITE_PRIVILEGES = "insert, update, delete, truncate, references, trigger"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_replicator_writes_nothing_to_the_source_but_its_slot(source_db, dest_db):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t select g, 'row ' || g from generate_series(1, 100) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    before = source_db.fetchall(SOURCE_OBJECTS)

    def confirmed() -> int:
        return int(source_db.scalar(
            "select confirmed_flush_lsn - '0/0' from pg_replication_slots where slot_name = %s",
            [PUBLICATION]) or 0)

    warnings = _Warnings()
    logging.getLogger("replicator").addHandler(warnings)
    try:
        with running(source_db, dest_db, source_heartbeat_interval=0.2) as pipeline:
            source_db.execute("update t set v = 'changed' where id <= 10")
            wait_for(lambda: dest_db.scalar(
                "select count(*) from odoo_mirror.t where v = 'changed'") == 10, 60, "streaming")
            assert pipeline.config.source.user == SOURCE_ROLE
            # Nothing written on the source from here: only the heartbeat moves the slot.
            moves, last = 0, confirmed()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and moves < 3:
                if (now := confirmed()) > last:
                    moves, last = moves + 1, now
                time.sleep(0.1)
            assert moves >= 3, "the heartbeat did not advance the slot"
    finally:
        logging.getLogger("replicator").removeHandler(warnings)
    assert not [m for m in warnings.messages if "heartbeat" in m], warnings.messages
    assert_same(source_db, dest_db, "t")

    assert source_db.fetchall(SOURCE_OBJECTS) == before
    assert not [o for o in before if o[2] == SOURCE_ROLE]
    assert source_db.fetchall(
        "select slot_name, plugin from pg_replication_slots where database = current_database()"
    ) == [(PUBLICATION, "pgoutput")]
    # The role the tests run as is the README's: nothing beyond LOGIN REPLICATION and SELECT.
    assert source_db.fetchone(
        "select rolcanlogin, rolreplication, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls "
        "from pg_roles where rolname = %s", [SOURCE_ROLE]) == (True, True, False, False, False,
                                                               False)
    assert source_db.fetchone(
        "select has_table_privilege(%s, 't', 'select'), has_table_privilege(%s, 't', %s), "
        "has_schema_privilege(%s, 'public', 'create'), "
        "has_database_privilege(%s, current_database(), 'create')",
        [SOURCE_ROLE, SOURCE_ROLE, WRITE_PRIVILEGES, SOURCE_ROLE, SOURCE_ROLE],
    ) == (True, False, False, False)


@pytest.mark.parametrize("command", [["run", "--until-caught-up"], ["check"]],
                         ids=["run", "check"])
def test_a_role_without_replication_is_one_line(source_db, dest_db, tmp_path, command):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    role = "no_repl_" + uuid.uuid4().hex[:8]
    ident = sql.Identifier(role)
    source_db.execute(sql.SQL("create role {} login").format(ident))
    try:
        source_db.execute(sql.SQL("grant select on t to {}").format(ident))
        config = write_config(tmp_path, source_db, dest_db, password=f"${PASSWORD_VAR}",
                              logging=json_logging(), source={"user": role})
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "replicator", *command, "--config", str(config)],
            cwd=tmp_path, env=replicator_env(), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=60)
        # Refused before the walsender's refusal, which a run would retry like a lost
        # connection for retry_timeout.
        assert time.monotonic() - started < 20
        assert proc.returncode == 2, f"{proc.stderr}\n{proc.stdout[-3000:]}"
        assert proc.stderr.splitlines() == [
            f"error: [source] role {role} lacks the REPLICATION attribute — run on the source "
            f"as an administrator: alter role {role} replication"], proc.stderr
        assert "Traceback" not in proc.stdout and PASSWORD not in proc.stdout + proc.stderr
        assert source_db.scalar("select count(*) from pg_replication_slots "
                                "where database = current_database()") == 0
    finally:
        source_db.execute(sql.SQL("drop owned by {}").format(ident))
        source_db.execute(sql.SQL("drop role {}").format(ident))
