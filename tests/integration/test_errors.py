"""Retries and setup errors against real servers.

A replicator that runs for weeks reconnects now and then; each reconnect after progress must be
a first attempt again (about a second), not a step towards a lifetime limit. And a database,
role or password that is wrong is a setup error (exit 2, one line), not a connection problem
to wait out; a one-shot `run --until-caught-up` gives up on an unreachable server after
`retry_timeout` (exit 3).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from plugins.replicator import (
    PASSWORD,
    PASSWORD_VAR,
    PUBLICATION,
    ReplicatorProcess,
    json_logging,
    replicator_env,
    running,
    write_config,
)
from plugins.servers import ONE_VERSION
from psycopg import sql

from replicator.devtools.localpg import free_port

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


# -- retries reset after progress ---------------------------------------------------------------


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "retrying after an error":
            self.records.append(record)


def _wait_for_row(dest_db, row_id: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if dest_db.scalar("select count(*) from odoo_mirror.t where id = %s", (row_id,)):
                return time.monotonic() - started
        except Exception:  # the mirror table may not exist yet
            pass
        time.sleep(0.05)
    pytest.fail(f"row {row_id} did not reach the mirror within {timeout} s")


def test_retries_reset_after_progress(source_db, dest_db):
    """Source connections killed and an apply failing once, round after round, with progress in
    between: more failures than any lifetime limit (apply: 5), each retried as a first attempt."""
    source_db.execute("create table t (id integer primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    source_db.execute("insert into t values (0, 'before')")
    handler = _Retries()
    logger = logging.getLogger("replicator")
    logger.addHandler(handler)
    rounds = 7
    try:
        with running(source_db, dest_db) as pipeline:
            _wait_for_row(dest_db, 0, 60)
            # Every other apply of a row fails (a sequence is not rolled back with the batch):
            # each row's batch fails once, then applies on the retry.
            dest_db.execute("create sequence boom")
            dest_db.execute("""
                create function boom() returns trigger language plpgsql as $$
                begin
                    if nextval('boom') % 2 = 1 then
                        raise exception 'boom on row %', new.id;
                    end if;
                    return new;
                end $$""")
            dest_db.execute("create trigger boom before insert on odoo_mirror.t "
                            "for each row execute function boom()")
            for i in range(1, rounds + 1):
                source_db.execute("insert into t values (%s, 'x')", (i,))
                # < 10 s: generous, but far below the backoff an unreset counter reaches.
                _wait_for_row(dest_db, i, 10)
                killed = source_db.scalar(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                    "where application_name = 'odoo-replicator' and datname = current_database()")
                assert killed >= 1
            source_db.execute("insert into t values (%s, 'last')", (rounds + 1,))
            _wait_for_row(dest_db, rounds + 1, 10)
            assert not pipeline.stop_requested.is_set()
    finally:
        logger.removeHandler(handler)

    kinds = [r.kind for r in handler.records]
    assert kinds.count("destination_apply") >= rounds, kinds
    assert kinds.count("source_connect") >= rounds, kinds
    # Each failure came after progress: a first attempt, retried within about a second.
    assert {r.attempt for r in handler.records} == {1}, [(r.kind, r.attempt) for r in handler.records]
    assert all(r.retry_in_s <= 1.0 for r in handler.records), [r.retry_in_s for r in handler.records]


# -- setup errors and unreachable servers, through the command -------------------------------


def _config(directory: Path, source_db: Any = None, dest_db: Any = None, *,
            source: dict | None = None, destination: dict | None = None) -> Path:
    """Passwords through $PASSWORD_VAR; `source` and `destination` override keys."""
    return write_config(directory, source_db, dest_db, password=f"${PASSWORD_VAR}",
                        flush_interval=0.2, logging=json_logging(), source=source,
                        destination=destination)


def _run(config: Path, *args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "replicator", "run", "--config", str(config), *args],
        cwd=config.parent, env=replicator_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


def _one_line(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert PASSWORD not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    return lines[0]


@pytest.fixture
def published(source_db):
    source_db.execute("create table res_partner (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table res_partner")
    return source_db


@pytest.mark.parametrize("side", ["source", "destination"])
def test_missing_database_is_a_setup_error(published, dest_db, tmp_path, side):
    config = _config(tmp_path, published, dest_db, **{side: {"database": "no_such_db_3d000"}})
    proc, _ = _run(config, timeout=20)
    line = _one_line(proc)
    assert proc.returncode == 2, line
    assert f"[{side}]" in line and "no_such_db_3d000" in line and "database" in line, line


@pytest.mark.parametrize("side", ["source", "destination"])
def test_missing_role_is_a_setup_error(published, dest_db, tmp_path, side):
    config = _config(tmp_path, published, dest_db, **{side: {"user": "no_such_role_28000"}})
    proc, _ = _run(config, timeout=20)
    line = _one_line(proc)
    assert proc.returncode == 2, line
    assert f"[{side}] user" in line and "no_such_role_28000" in line, line


@pytest.fixture
def password_role(dest_db):
    """A role on the destination cluster that must log in with a scram password."""
    role = f"pw_{dest_db.name[-8:]}"
    hba = dest_db.cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    dest_db.execute(sql.SQL("create role {} login password 'the-right-one'").format(sql.Identifier(role)))
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    dest_db.execute("select pg_reload_conf()")
    # The postmaster reloads asynchronously: loaded once a wrong password is refused.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            psycopg.connect(host=dest_db.cluster.host, port=dest_db.cluster.port,
                            dbname=dest_db.name, user=role, password="wrong").close()
        except psycopg.OperationalError:
            break
        time.sleep(0.05)
    try:
        yield role
    finally:
        hba.write_text(original)
        dest_db.execute("select pg_reload_conf()")
        dest_db.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))


def test_wrong_password_is_a_setup_error(published, dest_db, tmp_path, password_role):
    config = _config(tmp_path, published, dest_db, destination={"user": password_role})
    proc, _ = _run(config, timeout=20)
    line = _one_line(proc)
    assert proc.returncode == 2, line
    assert "[destination]" in line and "password" in line and password_role in line, line
    assert PASSWORD_VAR in line, line  # where the password came from, not what it is


def test_until_caught_up_gives_up_on_unreachable_server(dest_db, tmp_path):
    source = {"host": "127.0.0.1", "port": free_port(), "database": "odoo", "retry_timeout": 3}
    config = _config(tmp_path, None, dest_db, source=source)
    proc, seconds = _run(config, "--until-caught-up", timeout=60)
    line = _one_line(proc)
    assert proc.returncode == 3, line
    assert "[source]" in line and "retry_timeout" in line, line
    assert 2.5 <= seconds < 20, seconds
    retried = [x for x in proc.stdout.splitlines() if "retrying after an error" in x]
    assert len(retried) >= 2, proc.stdout[-2000:]


def test_run_keeps_retrying_an_unreachable_server(dest_db, tmp_path):
    source = {"host": "127.0.0.1", "port": free_port(), "database": "odoo", "retry_timeout": 1}
    run = ReplicatorProcess(_config(tmp_path, None, dest_db, source=source), tmp_path)
    try:
        run.start()

        def retries() -> list[str]:
            return [x for x in run.output()[0].splitlines() if "retrying after an error" in x]

        # Past retry_timeout (1 s): that bound is for --until-caught-up only. Three retries
        # take 3.5 s at the least (backoff from 1 s with jitter), more on a busy machine.
        deadline = time.monotonic() + 30
        while len(retries()) < 3 and time.monotonic() < deadline and run.alive:
            time.sleep(0.2)
        assert run.alive, "run exited while the server was unreachable"
    finally:
        run.terminate(15)
        run.stop()
    lines = retries()
    assert len(lines) >= 3, lines
    for line in lines:
        assert '"attempt"' in line and '"retry_in_s"' in line and '"hint"' in line, line


# -- the SQLSTATE decides, not words in the data --------------------------------------------------


@pytest.mark.parametrize("value", ["connection refused", "timed out", "server closed the connection"])
def test_a_rejected_row_is_an_apply_error_whatever_its_values_say(dest_db, value):
    """A server error carries its SQLSTATE; row values quoted in its DETAIL must not make a
    unique violation look like a dropped connection (retried for ever instead of 5 times)."""
    from replicator.classify import classify
    from replicator.errors import ErrorKind, ExitCode

    dest_db.execute("create table t (name text primary key)")
    dest_db.execute("insert into t values (%s)", (value,))
    with dest_db.connect() as conn, pytest.raises(psycopg.errors.UniqueViolation) as info:
        conn.execute("insert into t values (%s)", (value,))
    assert value in str(info.value)  # the server quotes the key in the error's DETAIL
    err = classify(info.value, side="destination")
    assert err.kind is ErrorKind.DESTINATION_APPLY and err.exit_code == ExitCode.FAILED
    assert err.policy.max_attempts == 5
