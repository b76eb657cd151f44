"""Operator mistakes on real servers: one clear line on stderr, a non-zero exit, no traceback,
no password (`cli` checks every output for it), and nothing written where it must not be.

The config-file mistakes (malformed, unknown key, missing $VAR, wrong type) are in
tests/unit/test_config.py and tests/unit/test_cli.py; the connection ones (unreachable,
wrong password, missing role or database) in test_errors.py; a missing publication and a
table without a key in test_cli.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from plugins.replicator import (
    PASSWORD,
    PUBLICATION,
    ReplicatorProcess,
    cli,
    cli_config,
    error_line,
    wait_for,
)
from plugins.servers import ONE_VERSION, _fresh_database, grant_source_role, start_cluster
from psycopg import sql

from replicator.devtools.localpg import LocalCluster
from replicator.errors import ExitCode, ReplicatorError
from replicator.pipeline.preflight import check_server_version

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


def _run(config: Path, cwd: Path, *extra: str) -> str:
    proc = cli("run", "--config", str(config), "--until-caught-up", *extra, cwd=cwd, timeout=60)
    line = error_line(proc)
    assert proc.returncode != 0, line
    return line


def _published_table(db) -> None:
    db.execute("create table res_partner (id integer primary key, name text)")
    db.execute("insert into res_partner values (1, 'Azure Interior')")
    db.execute(f"create publication {PUBLICATION} for table res_partner")


@pytest.fixture(scope="module")
def replica_level_cluster(pg_base_dir: Path) -> Iterator[LocalCluster]:
    gen = start_cluster(15, pg_base_dir, {"wal_level": "replica"})
    yield next(gen)
    gen.close()


@pytest.fixture
def replica_level_db(replica_level_cluster, request) -> Iterator:
    for db in _fresh_database(replica_level_cluster, "src", request.node.name):
        grant_source_role(db)
        yield db


def test_wal_level_not_logical(replica_level_db, dest_db, tmp_path):
    _published_table(replica_level_db)
    config = cli_config(tmp_path, replica_level_db, dest_db)
    for command in ("run", "check"):
        proc = cli(command, "--config", str(config), cwd=tmp_path, timeout=60)
        line = error_line(proc)
        assert proc.returncode == ExitCode.FATAL, line
        assert "wal_level=replica" in line and "wal_level = logical" in line, line
    assert dest_db.scalar("select count(*) from pg_namespace where nspname = 'odoo_mirror'") == 0


def test_empty_publication(source_db, dest_db, tmp_path):
    source_db.execute("create table res_partner (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION}")
    line = _run(cli_config(tmp_path, source_db, dest_db), tmp_path)
    assert f"publication {PUBLICATION!r} has no tables" in line, line
    assert f"ALTER PUBLICATION {PUBLICATION} ADD TABLE" in line, line


def test_slot_in_use_by_another_process(source_db, dest_db, tmp_path):
    """Another pipeline (its own state schema, so its own lease) configured with the same
    slot: the first keeps streaming, the second says who holds the slot and gives up after
    retry_timeout. (A second process of the same pipeline waits as a standby instead:
    tests/faults/test_single_writer.py.)"""
    _published_table(source_db)
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    first = ReplicatorProcess(cli_config(first_dir, source_db, dest_db), first_dir)
    first.start()
    try:
        wait_for(first.streaming, 60, "the first replicator streaming")
        config = cli_config(tmp_path, source_db, dest_db, source={"retry_timeout": 3},
                            destination={"state_schema": "other_pipeline"})
        line = _run(config, tmp_path)
        assert "another process is using the replication slot" in line, line
        assert PUBLICATION in line, line
        assert first.alive
    finally:
        first.stop()


def test_mapping_to_a_schema_that_cannot_be_created(source_db, dest_db, tmp_path):
    """The destination user may not create schemas: nothing is written, and the line says
    which GRANT fixes it."""
    _published_table(source_db)
    role = f"mirror_{uuid.uuid4().hex[:8]}"
    dest_db.execute(f"create role {role} login password 'pw-{role}'")
    dest_db.execute(f"revoke create on database {dest_db.name} from public")
    try:
        config = cli_config(tmp_path, source_db, dest_db,
                            destination={"user": role, "password": f"pw-{role}"})
        with config.open("a") as f:
            f.write('\n[mappings]\nres_partner = "analytics.partners"\n')
        line = _run(config, tmp_path)
        assert role in line and "GRANT" in line and "CREATE" in line, line
        assert dest_db.scalar(
            "select count(*) from pg_namespace where nspname in ('analytics', 'replicator')") == 0
    finally:
        dest_db.execute(f"drop owned by {role}")
        dest_db.execute(f"drop role {role}")


def test_mapping_to_a_reserved_schema_name(source_db, dest_db, tmp_path):
    _published_table(source_db)
    config = cli_config(tmp_path, source_db, dest_db)
    with config.open("a") as f:
        f.write('\n[mappings]\nres_partner = "pg_mirror.res_partner"\n')
    proc = cli("run", "--config", str(config), "--until-caught-up", cwd=tmp_path, timeout=60)
    line = error_line(proc)
    assert proc.returncode == ExitCode.FATAL, line
    assert "pg_mirror" in line and "[mappings]" in line, line


@pytest.fixture
def standby(dest_cluster) -> Iterator[LocalCluster]:
    cluster = dest_cluster.start_standby()
    try:
        yield cluster
    finally:
        cluster.remove()


def test_destination_that_is_a_read_only_standby(source_db, dest_db, standby, tmp_path):
    _published_table(source_db)

    class OnStandby:  # the test database, reached through the standby
        cluster, name = standby, dest_db.name

    wait_for(lambda: standby.connect(dest_db.name).close() is None, 30, "the standby")
    config = cli_config(tmp_path, source_db, OnStandby)
    for args in (["run", "--until-caught-up"], ["check"]):
        proc = cli(*args, "--config", str(config), cwd=tmp_path)
        line = error_line(proc)
        assert proc.returncode == ExitCode.FATAL, line
        assert "read-only standby" in line and "primary" in line, line
    assert source_db.scalar("select count(*) from pg_replication_slots "
                            "where slot_name = %s", [PUBLICATION]) == 0


@pytest.mark.parametrize("side,version,ok", [
    ("source", 130014, False), ("source", 140000, True), ("source", 180001, True),
    ("destination", 140012, False), ("destination", 150000, True),
])
def test_unsupported_server_versions(side, version, ok):
    """No server older than 15 is installed here: the judgement itself, on the numbers
    the servers report (server_version_num)."""
    if ok:
        check_server_version(side, version)
        return
    with pytest.raises(ReplicatorError) as info:
        check_server_version(side, version)
    text = str(info.value)
    assert info.value.exit_code == ExitCode.FATAL
    assert f"the {side} runs PostgreSQL {version // 10000}" in text and "or newer" in text
    assert "\n" not in text


def _use_hba(cluster, original: str, lines: str) -> None:
    (cluster.data_dir / "pg_hba.conf").write_text(lines + original)
    with cluster.connect() as conn:
        conn.execute("select pg_reload_conf()")
    time.sleep(0.5)  # the postmaster reloads asynchronously


def test_pg_hba_hint_gives_the_line_logical_replication_needs(source_db, dest_db, tmp_path):
    """Logical replication matches pg_hba.conf by database name, like any connection; the
    `replication` keyword is for physical replication (a copy of the whole cluster). The
    error line gives the database line, and that line alone lets `run` replicate while
    physical replication stays refused."""
    _published_table(source_db)
    role = f"hba_{uuid.uuid4().hex[:8]}"
    grant_source_role(source_db, role)  # LOGIN REPLICATION, SELECT
    source_db.execute(sql.SQL("alter role {} password {}").format(sql.Identifier(role),
                                                                   sql.Literal(PASSWORD)))
    cluster = source_db.cluster
    original = (cluster.data_dir / "pg_hba.conf").read_text()
    config = cli_config(tmp_path, source_db, dest_db, source={"user": role})
    wanted = f"host {source_db.name} {role} 127.0.0.1/32 scram-sha-256"
    try:
        # What the old hint said to add: a `replication` line. It admits neither connection.
        _use_hba(cluster, original, f"host replication {role} 127.0.0.1/32 scram-sha-256\n"
                                    f"host all {role} 127.0.0.1/32 reject\n")
        proc = cli("check", "--config", str(config), cwd=tmp_path)
        line = error_line(proc)
        assert proc.returncode == ExitCode.FATAL, line
        assert f"add the line `{wanted}` above the line that rejects it" in line, line
        assert "no `replication` line is needed" in line and "pg_basebackup" in line, line

        # The hint's line, with physical replication refused for the role.
        _use_hba(cluster, original, f"host replication {role} 127.0.0.1/32 reject\n"
                                    f"{wanted}\nhost all {role} 127.0.0.1/32 reject\n")
        proc = cli("run", "--config", str(config), "--until-caught-up", cwd=tmp_path)
        assert proc.returncode == 0, f"{proc.stderr}\n{proc.stdout[-3000:]}"
        assert dest_db.scalar("select count(*) from odoo_mirror.res_partner") == 1
        with pytest.raises(psycopg.OperationalError, match="rejects replication connection"):
            psycopg.connect(host=cluster.host, port=cluster.port, user=role, password=PASSWORD,
                            replication="true", connect_timeout=10).close()
    finally:
        _use_hba(cluster, original, "")
        source_db.execute(sql.SQL("drop owned by {}").format(sql.Identifier(role)))
        with cluster.connect() as conn:
            conn.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))
