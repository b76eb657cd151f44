"""The `replicator` command as an operator runs it: a subprocess, a TOML file, a password in
an environment variable, real source and destination servers.

What an operator must get: help that names the options; exit 0 and an equal mirror from
`run --until-caught-up`; for their own mistakes a non-zero exit and exactly one line on
stderr that names what to fix (no traceback); and never a password in any output.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from plugins.replicator import (
    CLI_UNSET_VAR,
    PASSWORD,
    PUBLICATION,
    ReplicatorProcess,
    assert_no_password,
    cli,
    cli_config,
    error_line,
    table_difference,
    wait_for,
)
from plugins.servers import ONE_VERSION

from replicator.devtools.odoo import TABLES, create_table_statement

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


MISSING_VAR = CLI_UNSET_VAR


def create_odoo_tables(source_db) -> None:
    with source_db.connect() as conn:
        for table in TABLES:
            conn.execute(create_table_statement(table))
        conn.execute(f"create publication {PUBLICATION} for table {', '.join(TABLES)}")


def mirror_problems(source_db, dest_db) -> tuple[list[str], dict[str, int]]:
    problems, counts = [], {}
    with source_db.connect() as src, dest_db.connect() as dst:
        for table in TABLES:
            counts[table] = src.execute(f'select count(*) from "public"."{table}"').fetchone()[0]
            problem = table_difference(src, dst, table)
            if problem is not None:
                problems.append(problem)
    return problems, counts


# -- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]], ids=["replicator", "run"])
def test_help_names_config_and_until_caught_up(args):
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    for option in ("--config", "--until-caught-up"):
        assert option in proc.stdout, f"`replicator {' '.join(args)}` does not mention {option}:\n{proc.stdout}"


# -- a seeded source, replicated by the command --------------------------------------------


def test_run_until_caught_up_mirrors_seeded_source(source_db, dest_db, tmp_path):
    """The first run copies the seeded rows; a second one streams what the workload changed."""
    from replicator.devtools.seed import seed
    from replicator.devtools.workload import workload

    seed(source_db.dsn, scale=0.3, publication=PUBLICATION)
    config = cli_config(tmp_path, source_db, dest_db)
    first = cli("run", "--config", str(config), "--until-caught-up", cwd=tmp_path)
    assert first.returncode == 0, f"{first.stderr}\n{first.stdout[-3000:]}"
    assert first.stderr == "", first.stderr
    problems, counts = mirror_problems(source_db, dest_db)
    assert not problems, f"after the initial copy: rows per table: {counts}\n" + "\n".join(problems)

    workload(source_db.dsn, transactions=150, seed=7)
    proc = cli("run", "--config", str(config), "--until-caught-up", "--log-level", "debug", cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stderr}\n{proc.stdout[-3000:]}"
    assert proc.stderr == "", proc.stderr
    problems, counts = mirror_problems(source_db, dest_db)
    assert not problems, f"after the workload: rows per table: {counts}\n" + "\n".join(problems)
    assert counts["account_move_line"] > 1000
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 0
    # The applied position is the slot's confirmed one: nothing confirmed that is not applied.
    applied = dest_db.scalar("select applied_lsn::text from replicator.pipelines")
    confirmed = source_db.scalar(
        "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
        (PUBLICATION,),
    )
    assert source_db.scalar("select %s::pg_lsn <= %s::pg_lsn", (confirmed, applied)), (confirmed, applied)


# -- operator mistakes: a non-zero exit and one line naming the fix ----------------------------


def test_missing_password_variable(tmp_path):
    config = cli_config(tmp_path, destination={"password": f"${MISSING_VAR}"})
    proc = cli("run", "--config", str(config), "--until-caught-up", cwd=tmp_path)
    line = error_line(proc)
    assert proc.returncode == 2, f"exit {proc.returncode}: {line}"
    assert "[destination] password" in line and MISSING_VAR in line, line
    assert proc.stdout == ""


def test_missing_publication(source_db, dest_db, tmp_path):
    source_db.execute("create table res_partner (id integer primary key, name text)")
    config = cli_config(tmp_path, source_db, dest_db, publication="no_such_pub")
    proc = cli("run", "--config", str(config), "--until-caught-up", cwd=tmp_path, timeout=30)
    line = error_line(proc)
    assert proc.returncode != 0, line
    assert "no_such_pub" in line and "publication" in line, line
    assert "Traceback" not in proc.stderr


def test_table_without_primary_key_is_refused(source_db, dest_db, tmp_path):
    source_db.execute("create table res_partner (id integer primary key, name text)")
    source_db.execute("create table mail_tracking_note (res_id integer, note text)")
    source_db.execute(f"create publication {PUBLICATION} for table res_partner, mail_tracking_note")
    config = cli_config(tmp_path, source_db, dest_db)
    proc = cli("run", "--config", str(config), "--until-caught-up", cwd=tmp_path, timeout=30)
    line = error_line(proc)
    assert proc.returncode == 2, f"exit {proc.returncode}: {line}"
    assert "ALTER TABLE" in line and "mail_tracking_note" in line, line
    # Refused before anything was created in the destination.
    assert dest_db.scalar("select count(*) from pg_tables where schemaname = 'odoo_mirror'") == 0


# -- the password is never printed -------------------------------------------------------------


def test_password_never_printed(source_db, dest_db, tmp_path):
    """`check`, a debug-level run, and connection errors that carry connection details."""
    create_odoo_tables(source_db)
    good = cli_config(tmp_path, source_db, dest_db, log_level="debug")
    outputs = []
    for args in (["check", "--config", str(good)],
                 ["run", "--config", str(good), "--until-caught-up"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, f"{args}: {proc.stderr}\n{proc.stdout[-2000:]}"
        outputs.append(proc.stdout + proc.stderr)

    # A source database that does not exist: the replicator retries (connection errors are
    # retried) and logs libpq's message; stop it after a few attempts.
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = cli_config(bad_dir, source_db, dest_db, source={"database": "no_such_db"}, log_level="debug")
    bad_run = ReplicatorProcess(bad, bad_dir)
    try:
        bad_run.start()
        # Until it said why (a loaded machine takes seconds to get there), then stopped.
        wait_for(lambda: "no_such_db" in "".join(bad_run.output()) or not bad_run.alive, 30,
                 what="the connection error to be logged")
        if bad_run.alive and bad_run.terminate(10) is None:
            pytest.fail("the replicator did not stop on SIGTERM while retrying a connection")
    finally:
        bad_run.stop()
    text = "".join(bad_run.output())
    assert "no_such_db" in text, f"the connection error was not reported:\n{text[-2000:]}"
    outputs.append(text)

    # A password written literally in a DSN: the seed command must not echo it either.
    proc = cli("seed", "--dsn", f"host=127.0.0.1 port=1 dbname=x password={PASSWORD}",
               cwd=tmp_path, timeout=30)
    assert proc.returncode != 0
    outputs.append(proc.stdout + proc.stderr)
    assert_no_password(*outputs)


def test_seed_says_whether_it_created_the_publication(source_db, dest_db, tmp_path):
    proc = cli("seed", "--dsn", source_db.dsn, "--publication", PUBLICATION, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"publication {PUBLICATION}: created FOR TABLE account_move, account_move_line, " \
        "res_partner, " in proc.stdout
    assert "(so skip `create publication` for it)" in proc.stdout
    assert source_db.scalar("select count(*) from pg_publication_tables where pubname = %s",
                            [PUBLICATION]) == 6
    other = dest_db   # an empty database, with the publication made first
    other.execute(f"create publication {PUBLICATION}")
    proc = cli("seed", "--dsn", other.dsn, "--publication", PUBLICATION, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"publication {PUBLICATION}: exists already, left as it is" in proc.stdout


def test_until_caught_up_finishes_while_the_source_keeps_writing(source_db, dest_db, replicator):
    """The target is the source's WAL end at the start: changes committed after it need not
    be waited for. It used to wait until nothing at all was pending, which a source writing
    without pause never grants."""
    import threading

    source_db.execute("create table res_partner (id integer primary key, name text)")
    source_db.execute(f"create publication {PUBLICATION} for table res_partner")
    proc = replicator(batch_size=50, flush_interval=0.05)
    assert proc.run_until_caught_up(60) == 0, proc.logs()
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(source_db.dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                conn.execute("insert into res_partner values (%s, 'p')", [n])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        before = source_db.scalar("select max(id) from res_partner")
        for _ in range(3):
            assert proc.run_until_caught_up(30) == 0, proc.logs()
            # Everything committed before the run started is in the mirror.
            assert dest_db.scalar("select count(*) from odoo_mirror.res_partner "
                                  "where id <= %s", [before]) == before
            before = source_db.scalar("select max(id) from res_partner")
    finally:
        stop.set()
        writer.join(10)


# -- names with terminal escapes ---------------------------------------------------------------

# A table name anyone who may create a table on the source chooses: an OSC sequence that sets
# the terminal's title, and a CSI one that erases the line printed before.
HOSTILE_TABLE = "res_partner\x1b]0;pwned\x07\x1b[1A\x1b[2K"


def test_check_prints_no_terminal_escapes_from_table_names(source_db, dest_db, tmp_path):
    source_db.execute(f'create table "{HOSTILE_TABLE}" (id integer primary key, name text)')
    source_db.execute(f'create publication {PUBLICATION} for table "{HOSTILE_TABLE}"')
    config = cli_config(tmp_path, source_db, dest_db)
    proc = cli("check", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stderr}\n{proc.stdout[-3000:]}"
    for text in (proc.stdout, proc.stderr):
        assert not [c for c in text if ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) <= 0x9f], \
            repr(text)
    # Still there, readable: escaped the way Python's repr() writes it.
    assert "res_partner\\x1b]0;pwned\\x07\\x1b[1A\\x1b[2K" in proc.stdout, proc.stdout
