"""pytest plugin: the replicator as tests run it, and comparing tables.

- `write_config`: the one etl-config.toml builder; every test that needs a config file uses it.
- `make_config`, `catch_up`, `running`: the replicator in-process (a thread of the test).
- `ReplicatorProcess` and the `replicator` fixture: `python -m replicator run` as a real
  process, started, signalled, killed and restarted by the fault and command-line tests.
- `assert_same`, `same_rows`, `row_digests`, `table_columns`, `table_rows`: a mirror table
  against its source table.

Test files import what they use from this module (`from plugins.replicator import ...`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from plugins.servers import SOURCE_ROLE
from replicator import failpoints
from replicator.config.load import from_dsns
from replicator.config.settings import Config
from replicator.devtools import config_file
from replicator.pipeline.supervisor import Pipeline

PUBLICATION = "odoo_pub"
MIRROR_SCHEMA = "odoo_mirror"
STATE_SCHEMA = "replicator"
REPO = Path(__file__).resolve().parents[2]
PASSWORD_VAR = "REPLICATOR_TEST_DB_PASSWORD"
# Distinctive, so that finding it anywhere in an output is never a coincidence. The test
# servers use trust auth: any password works, so it only exercises the $VAR path and redaction.
PASSWORD = "Test-Pw-5e1f9a7c-never-print-me"
# What the config file says when a test passes no password: run in-process, where a $VAR
# would have to be set in the test process's own environment.
PLACEHOLDER_PASSWORD = "unused"


# -- the config file -------------------------------------------------------------------------


def _side(db: Any, placeholder: tuple[str, int, str], user: str = "postgres") -> dict[str, Any]:
    if db is None:
        host, port, database = placeholder
    else:
        host, port, database = db.cluster.host, db.cluster.port, db.name
    return {"host": host, "port": port, "database": database, "user": user}


def write_config(
    directory: Path,
    source_db: Any = None,
    dest_db: Any = None,
    *,
    password: str = PLACEHOLDER_PASSWORD,
    publication: str = PUBLICATION,
    batch_size: int | None = None,
    flush_interval: float | None = None,
    source: Mapping[str, Any] | None = None,
    destination: Mapping[str, Any] | None = None,
    logging: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    name: str = "etl-config.toml",
) -> Path:
    """Write `directory/name`, an etl-config.toml for the two test databases; returns its path.

    The source user is SOURCE_ROLE (LOGIN REPLICATION, SELECT only: see servers.py), so
    every test shows the replicator needs no more; `source={"user": "postgres"}` for one
    that does something only a superuser may. `password` goes to both sides
    (`f"${PASSWORD_VAR}"` for the variable path, with the environment of `replicator_env`).
    `source` and `destination` add or override keys of their section (a value of None drops
    the key); a database not given gets a placeholder server, for tests that never connect.
    `logging` writes a [logging] section (none by default: the product's defaults); `metrics`
    replaces the default `enabled = false`.
    """
    src = {**_side(source_db, ("127.0.0.1", 5432, "odoo_core"), SOURCE_ROLE), "password": password,
           "publication": publication}
    dst = {**_side(dest_db, ("127.0.0.1", 5433, "postgres")), "password": password,
           "schema": MIRROR_SCHEMA, "state_schema": STATE_SCHEMA,
           "batch_size": batch_size, "flush_interval": flush_interval}
    src.update(source or {})
    dst.update(destination or {})
    sections: dict[str, Mapping[str, Any]] = {"source": {"type": "postgres", **src},
                                               "destination": {"type": "postgres", **dst}}
    if logging is not None:
        sections["logging"] = logging
    sections["metrics"] = {"enabled": False} if metrics is None else metrics
    return config_file.write_config(directory / name, sections)


def minimal_config(source_password: str = "$ODOO_DB_PASSWORD",
                   dest_password: str = "$SUPABASE_DB_PASSWORD",
                   **sections: Mapping[str, Any]) -> str:
    """The smallest valid etl-config.toml text, for tests that load it without servers
    (placeholder servers, the source role `odoo`); `sections` adds more, in order."""
    return config_file.config_text({
        "source": {"host": "127.0.0.1", "port": 5432, "database": "odoo_core", "user": "odoo",
                   "password": source_password, "publication": "odoo_pub_scout"},
        "destination": {"host": "127.0.0.1", "port": 5433, "database": "postgres",
                        "user": "postgres", "password": dest_password},
        **sections})


JSON_STDOUT = {"level": "info", "format": "json", "output": "stdout"}


def json_logging(level: str = "info") -> dict[str, str]:
    """A [logging] section: JSON lines on stdout, which the process tests read back."""
    return {**JSON_STDOUT, "level": level}


def replicator_env(**extra: str) -> dict[str, str]:
    """The environment of a replicator process: no PG* variable and no failpoint of the
    caller (the config decides every connection setting), $PASSWORD_VAR set, this checkout
    importable; `extra` adds or overrides variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop(failpoints.ENV, None)  # a failpoint is set by the test that means it, per run
    env[PASSWORD_VAR] = PASSWORD
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- in-process ------------------------------------------------------------------------------


def make_config(source_db: Any, dest_db: Any, **overrides: Any) -> Config:
    """A Config for the two databases; the source user is SOURCE_ROLE, as in write_config
    (`source_user="postgres"` overrides it)."""
    overrides.setdefault("flush_interval", 0.2)
    overrides.setdefault("source_user", SOURCE_ROLE)
    return from_dsns(source_db.dsn, dest_db.dsn, PUBLICATION, **overrides)


def catch_up(source_db: Any, dest_db: Any, timeout: float = 120, **overrides: Any) -> Pipeline:
    """Run the replicator in-process until everything committed so far is applied."""
    pipeline = Pipeline(make_config(source_db, dest_db, **overrides), until_caught_up=True)
    result: list = []

    def target() -> None:
        try:
            result.append(pipeline.run())
        except BaseException as exc:  # re-raised in the test's thread
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pipeline.stop_requested.set()
        thread.join(30)
        pytest.fail(f"replicator did not catch up within {timeout} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    assert result[0] == 0
    return pipeline


@contextlib.contextmanager
def running(source_db: Any, dest_db: Any, **overrides: Any) -> Iterator[Pipeline]:
    """The replicator running in a thread for the block; stopped (like SIGTERM) after it."""
    pipeline = Pipeline(make_config(source_db, dest_db, **overrides))
    errors: list = []

    def target() -> None:
        try:
            pipeline.run()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield pipeline
    finally:
        pipeline.stop_requested.set()
        thread.join(60)
    if thread.is_alive():
        pytest.fail("replicator did not stop within 60 s")
    if errors:
        raise errors[0]


# -- comparing tables ------------------------------------------------------------------------


def table_rows(db: Any, table: str, schema: str = "public", order: str = "id") -> list[tuple]:
    return db.fetchall(f'select * from "{schema}"."{table}" order by {order}')


# Under fixed output settings a row's text is exact for every type the tests use (floats print
# shortest-exact since PostgreSQL 12, numerics keep their scale), so equal digests mean equal
# rows, and stricter than equal Python values (1.25 and 1.250, 0 and -0 differ). One short string
# a row instead of every value loaded into Python: a 100k-row zoo compares in a second, not 20.
_TEXT_SETTINGS = ("set timezone = 'UTC'; set datestyle = 'ISO, YMD'; "
                  "set intervalstyle = 'postgres'; set extra_float_digits = 1; "
                  "set bytea_output = 'hex'")


# What a digest mismatch with equal Python values means, wherever tables are compared.
TEXT_ONLY_DIFFERENCE = ("rows equal as Python values but not as text: the mirror changed a type, "
                        "a scale or a precision")


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    cur = conn.execute(f'select * from "{schema}"."{table}" limit 0')
    return [d.name for d in cur.description]


def row_digests(conn: psycopg.Connection, schema: str, table: str,
                order: str = "id") -> list[tuple[Any, str]]:
    """(order key, md5 of the row's text) for each row of a table, in key order."""
    conn.execute(_TEXT_SETTINGS)
    # The alias no column is likely to be named: a column called like it would shadow the row.
    return conn.execute(f'select {order}, md5(row_of_table_::text) '
                        f'from "{schema}"."{table}" row_of_table_ order by {order}').fetchall()


_SCHEMA = """
select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       coalesce(a.attnum = any(i.indkey), false)
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
left join lateral (
    -- The key pgoutput sends, which the mirror makes its primary key: the replica identity
    -- index if the table has one, else the primary key.
    select x.indkey from pg_index x
    where x.indrelid = c.oid and (x.indisprimary or (x.indisreplident and c.relreplident = 'i'))
    order by x.indisreplident and c.relreplident = 'i' desc limit 1) i on true
where n.nspname = %s and c.relname = %s
order by a.attnum
"""


def table_schema(conn: psycopg.Connection, schema: str, table: str) -> list[tuple]:
    """(name, format_type, not null, in the key) of each column, in order."""
    return conn.execute(_SCHEMA, [schema, table]).fetchall()


def schema_difference(src: list[tuple], dst: list[tuple]) -> str | None:
    """How a mirror table's columns break what the mirror promises: the source's names and
    types in order, its primary key, and NOT NULL on no other column."""
    if not dst:
        return "no mirror table"
    if [c[:2] for c in src] != [c[:2] for c in dst]:
        return (f"columns differ: source {[c[:2] for c in src]}, "
                f"mirror {[c[:2] for c in dst]}")
    src_key, dst_key = [c[0] for c in src if c[3]], [c[0] for c in dst if c[3]]
    if src_key != dst_key:
        return f"primary key differs: source {src_key}, mirror {dst_key}"
    extra = [c[0] for c in dst if c[2] and not c[3]]
    if extra:
        return f"mirror columns NOT NULL outside the key: {extra}"
    return None


def table_difference(src: psycopg.Connection, dst: psycopg.Connection, table: str,
                     order: str = "id", empty_ok: bool = True) -> str | None:
    """What differs between a source table and its mirror (schema, then rows), or None.

    The one comparison the tests make; ``empty_ok=False``: a source without rows is a
    difference too (nothing would have been compared).
    """
    problem = schema_difference(table_schema(src, "public", table),
                                table_schema(dst, MIRROR_SCHEMA, table))
    if problem:
        return f"{table}: {problem}"
    a, b = row_digests(src, "public", table, order), row_digests(dst, MIRROR_SCHEMA, table, order)
    if not a and not empty_ok:
        return f"{table}: no rows at the source, so nothing was compared"
    if a == b:
        return None
    da, db_ = dict(a), dict(b)
    only = sorted(da.keys() ^ db_.keys())
    differ = sorted(k for k in da.keys() & db_.keys() if da[k] != db_[k])
    return (f"{table}: {len(a)} source rows, {len(b)} mirror rows; keys on one side only: "
            f"{only[:10]}; rows that differ: {differ[:10]}")


def same_rows(source_db: Any, dest_db: Any, table: str, order: str = "id") -> bool:
    """Whether the mirror table has the source table's schema and exactly its rows."""
    with source_db.connect() as src, dest_db.connect() as dst:
        return table_difference(src, dst, table, order) is None


def wait_same(source_db: Any, dest_db: Any, *tables: str, timeout: float = 60,
              what: str = "") -> None:
    """Until each mirror table equals its source table (as assert_same: schema and rows,
    none empty): for a running replicator that must get there by itself."""
    problems: list[str] = []

    def same() -> bool:
        problems.clear()
        with source_db.connect() as src, dest_db.connect() as dst:
            for table in tables:
                problem = table_difference(src, dst, table, empty_ok=False)
                if problem is not None:
                    problems.append(f"{table}: {problem}")
        return not problems

    wait_for(same, timeout, what or f"the mirror of {', '.join(tables)} to equal the source",
             detail=lambda: "\n".join(problems))


def assert_same(source_db: Any, dest_db: Any, table: str, order: str = "id",
                empty_ok: bool = False) -> None:
    """The mirror table equals the source table: schema, then row for row. An empty source
    table fails unless ``empty_ok`` (a comparison of nothing proves nothing)."""
    with source_db.connect() as src, dest_db.connect() as dst:
        problem = table_difference(src, dst, table, order, empty_ok)
    if problem is None:
        return
    if "source rows" not in problem:     # the schema, or nothing compared
        pytest.fail(problem)
    # Different rows: compare them as values, for pytest's account of what differs.
    src_rows = table_rows(source_db, table, order=order)
    dst_rows = table_rows(dest_db, table, MIRROR_SCHEMA, order=order)
    assert len(src_rows) == len(dst_rows), problem
    assert src_rows == dst_rows, problem
    pytest.fail(f"{table}: {TEXT_ONLY_DIFFERENCE}")


# -- as a process ----------------------------------------------------------------------------


class ReplicatorProcess:
    """Starts, signals, kills and restarts `python -m replicator run` processes for one config.

    Each run writes its stdout and stderr to its own files in `workdir`.
    """

    def __init__(self, config: Path, workdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.kills = 0
        self.exits: list[tuple[int, int | None]] = []  # (run number, exit code) per run

    # -- processes ---------------------------------------------------------

    def _paths(self, run: int) -> tuple[Path, Path]:
        return self.workdir / f"run{run}.out", self.workdir / f"run{run}.err"

    def start(self, *extra: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """`run --config CONFIG EXTRA...`; `env` adds variables for this run only."""
        assert not self.alive, "a replicator is already running"
        self.runs += 1
        out, err = self._paths(self.runs)
        with out.open("wb") as fout, err.open("wb") as ferr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replicator", "run", "--config", str(self.config), *extra],
                cwd=self.workdir,
                env=replicator_env(**self.env, **(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=fout,
                stderr=ferr,
            )
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reap(self, timeout: float | None) -> int | None:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exits.append((self.runs, code))
        return code

    def kill(self) -> bool:
        """SIGKILL the running process; False if it had already exited on its own."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.exits.append((self.runs, self.proc.returncode))
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.exits.append((self.runs, self.proc.returncode))
        self.kills += 1
        return True

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait up to `timeout`; the exit code, or None if it is still running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after `timeout`."""
        return self._reap(timeout)

    def wait_exit(self, timeout: float = 60) -> int:
        """The exit code; fails the test (and kills the process) if it runs past `timeout`."""
        code = self._reap(timeout)
        if code is None:
            self.stop()
            pytest.fail(f"the replicator did not exit within {timeout} s\n{self.logs()}")
        return code

    def run_until_caught_up(self, timeout: float = 60) -> int:
        """One `run --until-caught-up` to completion; its exit code (fails on timeout)."""
        self.start("--until-caught-up")
        code = self._reap(timeout)
        if code is None:
            self.stop()
            pytest.fail(f"run --until-caught-up did not finish within {timeout} s\n{self.logs()}")
        return code

    def stop(self) -> None:
        """Teardown: leave no process behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # -- what they said ----------------------------------------------------

    def output(self, run: int | None = None) -> tuple[str, str]:
        """(stdout, stderr) of one run, the current one by default."""
        out, err = self._paths(run or self.runs)

        def read(p: Path) -> str:
            return p.read_text(errors="replace") if p.exists() else ""

        return read(out), read(err)

    def current(self) -> str:
        """Everything the current run has written, stdout then stderr."""
        return "".join(self.output())

    def logs(self, lines: int = 80) -> str:
        """The tail of every run's stdout and stderr, for assertion messages."""
        parts = []
        for run in range(1, self.runs + 1):
            out, err = self.output(run)
            code = dict(self.exits).get(run, "running")
            parts.append(f"--- run {run} (exit {code}) stdout ---")
            parts.extend(out.splitlines()[-lines:])
            if err.strip():
                parts.append(f"--- run {run} stderr ---")
                parts.extend(err.splitlines()[-lines:])
        return "\n".join(parts)

    def streaming(self) -> bool:
        """The current run has logged that it streams from the slot."""
        return '"msg":"streaming"' in self.output()[0]

    def batches(self, run: int) -> list[dict]:
        """The "batch applied" log records of one run (logged at debug level)."""
        records = []
        for line in self.output(run)[0].splitlines():
            if '"batch applied"' in line:
                try:
                    records.append(json.loads(line))
                except ValueError:  # the last line of a killed run may be cut short
                    pass
        return records


@pytest.fixture
def replicator(tmp_path: Path, source_db: Any, dest_db: Any) -> Iterator[Any]:
    """A factory: `replicator(**write_config_keywords)` -> ReplicatorProcess for the test's
    databases, with the password through $PASSWORD_VAR and JSON logs on stdout unless the
    keywords say otherwise. Every process is killed at teardown, before the databases are
    dropped."""
    made: list[ReplicatorProcess] = []

    def make(**overrides: Any) -> ReplicatorProcess:
        workdir = tmp_path / f"replicator{len(made)}"
        workdir.mkdir()
        overrides.setdefault("password", f"${PASSWORD_VAR}")
        overrides.setdefault("logging", json_logging())
        process = ReplicatorProcess(write_config(workdir, source_db, dest_db, **overrides), workdir)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


def wait_for(predicate: Any, timeout: float = 60, what: str = "condition",
             detail: Any = None) -> None:
    """Poll until predicate() is true; a psycopg error counts as not yet (a table not there).

    detail: a callable whose text (processes' logs) a timeout shows, read only then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except psycopg.Error:
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}" + (f"\n{detail()}" if detail else ""))


def sync_state(dest_db: Any, table: str = "t") -> str | None:
    """The sync state of public.<table> in the state schema."""
    return dest_db.scalar("select state from replicator.tables where source_table = %s",
                          [f"public.{table}"])


# -- the CLI as an operator runs it ----------------------------------------------------------

# A variable no test environment sets: a config referring to it is missing a secret.
CLI_UNSET_VAR = "REPLICATOR_CLI_UNSET_PASSWORD"


def cli_env() -> dict[str, str]:
    env = replicator_env()
    env.pop(CLI_UNSET_VAR, None)
    return env


def assert_no_password(*outputs: str) -> None:
    for text in outputs:
        assert PASSWORD not in text, f"the password appears in the output:\n{text[-3000:]}"


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m replicator ARGS`; every output is checked for the password."""
    proc = subprocess.run(
        [sys.executable, "-m", "replicator", *args],
        cwd=cwd or REPO,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert_no_password(proc.stdout, proc.stderr)
    return proc


def cli_config(directory: Path, source_db: Any = None, dest_db: Any = None, *,
               log_level: str = "info", **keywords: Any) -> Path:
    """etl-config.toml as an operator writes it: passwords through $PASSWORD_VAR, JSON logs
    on stdout (placeholder servers where a test needs none)."""
    return write_config(directory, source_db, dest_db, password=f"${PASSWORD_VAR}",
                        batch_size=1000, flush_interval=0.2, logging=json_logging(log_level),
                        **keywords)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failed command (fails if there are more or none)."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, (
        f"expected exactly one line on stderr, got {len(lines)} (exit {proc.returncode}):\n"
        f"{proc.stderr[-3000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
    )
    assert "Traceback" not in proc.stdout and '"exc"' not in proc.stdout, proc.stdout[-3000:]
    return lines[0]
