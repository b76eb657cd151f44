"""The command line: help, exit codes, the one-line error, and error classification."""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import psycopg
import pytest
from plugins.replicator import minimal_config

from replicator.classify import classify
from replicator.commands.cli import main
from replicator.config.load import load_config
from replicator.config.settings import Config
from replicator.errors import ConfigError, ErrorKind, ExitCode, ReplicatorError

CONFIG = minimal_config(mappings={"account_move": "odoo_mirror.account_move"},
                        logging={"format": "json", "output": "stdout"})

SOURCE_PW = "src-Secret-1"
DEST_PW = "dst-Secret-2"




@pytest.fixture
def config_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "etl-config.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("ODOO_DB_PASSWORD", SOURCE_PW)
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", DEST_PW)
    return path


def stub(monkeypatch, name: str, **functions) -> types.ModuleType:
    """The command's module with these functions replaced (preflight: check() checks nothing
    unless given, so no test here needs a database)."""
    module = importlib.import_module(name)
    if name == "replicator.pipeline.preflight":
        functions.setdefault("check", lambda config: None)
    for attr, function in functions.items():
        monkeypatch.setattr(module, attr, function)
    return module


def assert_one_error_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    return err.rstrip("\n")


# --- help and usage -------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["check", "--help"], ["seed", "--help"], ["demo", "--help"]])
def test_help_for_every_command(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: replicator")
    assert "--help" in out


def test_top_level_help_lists_commands_and_exit_codes(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for word in ("run", "check", "seed", "demo", "--until-caught-up", "exit codes", "130"):
        assert word in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: replicator" in capsys.readouterr().err


def test_usage_error_exits_2(capsys):
    assert main(["seed"]) == 2  # --dsn is required
    assert "--dsn" in capsys.readouterr().err
    assert main(["demo", "--scale", "0"]) == 2


def test_python_dash_m_works():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "replicator", "check", "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: replicator check")


def test_the_data_path_does_not_import_the_dev_tooling():
    # `replicator run` must not pay for (or depend on) the generator and the test servers:
    # cli.py imports replicator.devtools only inside `seed` and `demo`.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = (
        "import sys\n"
        "from replicator import batch, schema\n"
        "from replicator.commands import cli\n"
        "from replicator.config import load\n"
        "from replicator.destination import applier, state\n"
        "from replicator.pipeline import backfill, handoff, preflight, receiver, supervisor\n"
        "from replicator.source import catalog, connection\n"
        "try:\n"
        "    cli.main(['run', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('loaded:', sorted(m for m in sys.modules if m.startswith('replicator.devtools')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("loaded: []\n"), result.stdout[-500:]


# --- check ----------------------------------------------------------------------------------


def test_check_prints_summary_without_secrets(config_path, monkeypatch, capsys):
    stub(monkeypatch, "replicator.pipeline.preflight")
    assert main(["check", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"config OK: {config_path}\n")
    assert "odoo@127.0.0.1:5432/odoo_core" in out
    assert "$ODOO_DB_PASSWORD in the environment" in out
    assert "public.account_move -> odoo_mirror.account_move" in out
    assert SOURCE_PW not in out and DEST_PW not in out


def _tls_config(path: Path, source: str, destination: str) -> Path:
    """CONFIG with these lines in place of each side's `host = "127.0.0.1"`."""
    src, dst = CONFIG.split("[destination]")
    path.write_text(src.replace('host = "127.0.0.1"', source) + "[destination]"
                    + dst.replace('host = "127.0.0.1"', destination))
    return path


LOCAL = 'host = "127.0.0.1"'
SUPABASE = 'host = "db.abcdefghijklmnop.supabase.co"'


@pytest.mark.parametrize(("source", "destination", "pgsslmode", "expected"), [
    (LOCAL, LOCAL, None, []),
    (LOCAL, SUPABASE, None, ['[destination] host db.abcdefghijklmnop.supabase.co is reached over '
                             'a network with sslmode "prefer" (libpq\'s default)',
                             'set [destination] sslmode = "verify-full" and sslrootcert',
                             "Supabase", "Download certificate"]),
    ('host = "odoo-db.internal"\nsslmode = "require"', LOCAL, None,
     ['[source] host odoo-db.internal is reached over a network with sslmode "require", which '
      "encrypts but accepts any certificate", 'set [source] sslmode = "verify-full"']),
    (LOCAL, SUPABASE, "disable", ['sslmode "disable" (from PGSSLMODE)', "unencrypted"]),
    (LOCAL, SUPABASE, "verify-full", []),
    ('host = "10.1.2.3"\nsslmode = "verify-ca"', SUPABASE + '\nsslmode = "verify-full"', None, []),
    ('host = "/var/run/postgresql"', 'host = "localhost"', None, []),
    ('host = "127.0.0.2"', 'host = "::1"', None, []),
    ('host = ""', 'host = "127.0.0.1,::1"', None, []),
    (LOCAL, 'host = "127.0.0.1,db.example.com"', None, ["[destination] host 127.0.0.1,db.example.com"]),
])
def test_check_warns_about_tls_that_does_not_verify_a_remote_server(
        source, destination, pgsslmode, expected, tmp_path, monkeypatch, capsys):
    """The default stays libpq's (prefer): `check` says, in one line per side, when a server
    across a network is not verified, and what to set. Nothing else changes."""
    stub(monkeypatch, "replicator.pipeline.preflight")
    monkeypatch.setenv("ODOO_DB_PASSWORD", SOURCE_PW)
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", DEST_PW)
    monkeypatch.delenv("PGHOST", raising=False)
    if pgsslmode is None:
        monkeypatch.delenv("PGSSLMODE", raising=False)
    else:
        monkeypatch.setenv("PGSSLMODE", pgsslmode)
    path = _tls_config(tmp_path / "etl-config.toml", source, destination)
    assert main(["check", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("config OK")
    lines = captured.err.splitlines()
    if not expected:
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith("warning: "), captured.err
    for part in expected:
        assert part in lines[0], lines[0]
    # Never a weaker mode as the way out.
    assert '= "require"' not in lines[0] and '= "prefer"' not in lines[0]


def test_check_calls_runtime_check_when_it_exists(config_path, monkeypatch, capsys):
    seen: list[Config] = []

    def check(config: Config) -> int:
        seen.append(config)
        return 3

    stub(monkeypatch, "replicator.pipeline.preflight", check=check)
    assert main(["check", "-c", str(config_path)]) == 3
    assert seen[0].source.publication == "odoo_pub_scout"


@pytest.mark.parametrize("compiled", ["replicator._decode", "replicator.pipeline._pipe"])
def test_a_missing_build_is_one_line(compiled):
    """Without the compiled extensions the command line cannot even be imported: the entry
    point says so in one line, with the way out, and exits 1."""
    code = (f"import sys\nsys.modules[{compiled!r}] = None  # as if never built\n"
            "from replicator.__main__ import main\nraise SystemExit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == ExitCode.INTERNAL
    line = assert_one_error_line(result.stderr)
    assert f"the compiled part {compiled} is not built" in line and "pip install -e ." in line


def test_config_from_environment_variable(config_path, monkeypatch, capsys):
    stub(monkeypatch, "replicator.pipeline.preflight")
    monkeypatch.setenv("REPLICATOR_CONFIG", str(config_path))
    assert main(["check"]) == 0


# --- run ------------------------------------------------------------------------------------


def test_run_passes_config_and_flag_to_runtime(config_path, monkeypatch, capsys):
    calls = []

    def run(config, *, until_caught_up):
        calls.append((config, until_caught_up))
        return 0

    stub(monkeypatch, "replicator.pipeline.supervisor", run=run)
    assert main(["run", "--config", str(config_path), "--until-caught-up"]) == 0
    assert main(["run", "--config", str(config_path)]) == 0
    (first, flag1), (_, flag2) = calls
    assert first == load_config(config_path)
    assert (flag1, flag2) == (True, False)
    # Logging was set up from [logging]: JSON on stdout.
    out = capsys.readouterr().out
    assert out.startswith("{") and SOURCE_PW not in out


def test_run_log_level_override(config_path, monkeypatch, capsys):
    def run(config, *, until_caught_up):
        logging.getLogger("replicator.pipeline.supervisor").debug("debug visible")
        return 0

    stub(monkeypatch, "replicator.pipeline.supervisor", run=run)
    assert main(["run", "-c", str(config_path), "--log-level", "debug"]) == 0
    assert "debug visible" in capsys.readouterr().out


def test_config_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "etl-config.toml"
    path.write_text(CONFIG)
    monkeypatch.delenv("ODOO_DB_PASSWORD", raising=False)
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", DEST_PW)
    assert main(["run", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    line = assert_one_error_line(captured.err)
    assert line == (
        "error: [source] password: $ODOO_DB_PASSWORD is not set — "
        f"add it to the environment or to {tmp_path / '.env'}"
    )
    assert captured.out == ""


def test_missing_config_file(tmp_path, capsys):
    assert main(["check", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in assert_one_error_line(capsys.readouterr().err)


def test_replicator_error_from_runtime_uses_its_exit_code_and_is_redacted(config_path, monkeypatch, capsys):
    def run(config, *, until_caught_up):
        raise ReplicatorError(
            ErrorKind.SOURCE_CONNECT,
            f"cannot connect with {config.source.conninfo()}\nsecond line",
            f"the password {SOURCE_PW} was refused",
        )

    stub(monkeypatch, "replicator.pipeline.supervisor", run=run)
    assert main(["run", "-c", str(config_path)]) == ExitCode.UNAVAILABLE == 3
    line = assert_one_error_line(capsys.readouterr().err)
    assert SOURCE_PW not in line
    assert "password=***" in line and "second line" in line and " — the password *** was refused" in line


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (ErrorKind.SOURCE_SETUP, 2),
        (ErrorKind.RESYNC_REQUIRED, 2),
        (ErrorKind.DESTINATION_CONNECT, 3),
        (ErrorKind.DESTINATION_APPLY, 4),
        (ErrorKind.PROTOCOL, 4),
        (ErrorKind.INTERNAL, 1),
    ],
)
def test_exit_code_per_kind(kind, code, config_path, monkeypatch, capsys):
    def run(config, *, until_caught_up):
        raise ReplicatorError(kind, "what went wrong")

    stub(monkeypatch, "replicator.pipeline.supervisor", run=run)
    assert main(["run", "-c", str(config_path)]) == code
    assert assert_one_error_line(capsys.readouterr().err) == f"error: what went wrong — {kind.default_hint}"


def test_unexpected_exception_is_logged_with_traceback_and_exit_1(config_path, monkeypatch, capsys):
    def run(config, *, until_caught_up):
        raise RuntimeError(f"bug near {SOURCE_PW}")

    stub(monkeypatch, "replicator.pipeline.supervisor", run=run)
    assert main(["run", "-c", str(config_path)]) == 1
    out = capsys.readouterr().out  # [logging] output = stdout
    assert "Traceback" in out and "RuntimeError: bug near ***" in out
    assert SOURCE_PW not in out


def test_unexpected_exception_before_logging_is_set_up(monkeypatch, capsys):
    def seed(dsn, *, scale, seed, publication):
        raise RuntimeError("seed bug")

    stub(monkeypatch, "replicator.devtools.seed", seed=seed,
         publication_exists=lambda dsn, name: False)
    assert main(["seed", "--dsn", "dbname=x"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" in err and "RuntimeError: seed bug" in err


def test_keyboard_interrupt_is_quiet_130(config_path, monkeypatch, capsys):
    def run(config, *, until_caught_up):
        raise KeyboardInterrupt

    stub(monkeypatch, "replicator.pipeline.supervisor", run=run)
    assert main(["run", "-c", str(config_path)]) == 130
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "Traceback" not in captured.out


# --- seed and demo --------------------------------------------------------------------------


def test_seed_passes_arguments(monkeypatch, capsys):
    calls = []

    def seed(dsn, *, scale, seed, publication):
        calls.append((dsn, scale, seed, publication))
        return {"res_partner": 10 * scale, "account_move": 20 * scale}

    stub(monkeypatch, "replicator.devtools.seed", seed=seed,
         publication_exists=lambda dsn, name: name == "mine")
    assert main(["seed", "--dsn", "dbname=odoo_core", "--scale", "3", "--seed", "7"]) == 0
    assert capsys.readouterr().out == (
        "seeded: res_partner 30, account_move 60\npublication odoo_pub_scout: created FOR "
        "TABLE res_partner, account_move (so skip `create publication` for it)\n")
    assert main(["seed", "--dsn", "dbname=odoo_core", "--publication", "mine"]) == 0
    assert capsys.readouterr().out.endswith("publication mine: exists already, left as it is\n")
    assert main(["seed", "--dsn", "dbname=odoo_core", "--publication", ""]) == 0
    assert "publication" not in capsys.readouterr().out
    assert calls == [("dbname=odoo_core", 3, 7, "odoo_pub_scout"),
                     ("dbname=odoo_core", 1, 42, "mine"), ("dbname=odoo_core", 1, 42, None)]


def test_seed_never_prints_the_dsn_password(monkeypatch, capsys):
    def seed(dsn, *, scale, seed, publication):
        raise psycopg.OperationalError("connection failed: FATAL:  password authentication failed for user \"odoo\"")

    stub(monkeypatch, "replicator.devtools.seed", seed=seed,
         publication_exists=lambda dsn, name: False)
    # An unclassified database error from a command is still a one-line operator error.
    assert main(["seed", "--dsn", "dbname=odoo_core password=Dsn-Secret-3"]) == 2
    line = assert_one_error_line(_without_dsn_warning(capsys.readouterr().err))
    assert 'password authentication failed for user "odoo"' in line
    assert "Dsn-Secret-3" not in line

    assert main(["seed", "--dsn", "dbname=odoo password=Dsn-Secret-3 bogus"]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --dsn: ") and "Dsn-Secret-3" not in line


def _without_dsn_warning(err: str) -> str:
    first, _, rest = err.partition("\n")
    assert first.startswith("warning: the --dsn password is visible"), err
    assert "process list (ps)" in first and "PGPASSWORD" in first, first
    return rest


@pytest.mark.parametrize("dsn", [
    "postgresql://odoo:Tr0ub%zz4dor@127.0.0.1/odoo_core",  # libpq quotes the bad token
    "host=127.0.0.1 password=Tr0ub4dorxkcd dbname",  # ... and the word without "="
    "host=Tr0ub4dorxkcd dbname",
])
def test_seed_dsn_parse_errors_quote_nothing_of_the_dsn(dsn, monkeypatch, capsys):
    stub(monkeypatch, "replicator.devtools.seed",
                seed=lambda *a, **k: pytest.fail("seeded with a DSN that does not parse"))
    assert main(["seed", "--dsn", dsn]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --dsn: "), line
    assert "Tr0ub" not in line and "4dor" not in line and "xkcd" not in line, line
    assert "PGPASSWORD" in line, line


def test_seed_warns_about_a_password_in_the_dsn(monkeypatch, capsys):
    """A password on the command line is in every user's `ps`: one warning line, and the
    way that keeps it out (PGPASSWORD, which libpq reads); the command still works."""
    seen = []
    stub(monkeypatch, "replicator.devtools.seed",
                seed=lambda dsn, *, scale, seed, publication: seen.append(
                    (dsn, os.environ.get("PGPASSWORD"))),
                publication_exists=lambda dsn, name: True)
    for dsn in ("dbname=odoo_core password=Dsn-Secret-3", "postgresql://odoo:Dsn-Secret-3@h/db"):
        assert main(["seed", "--dsn", dsn]) == 0
        err = capsys.readouterr().err
        assert _without_dsn_warning(err) == "" and "Dsn-Secret-3" not in err
    monkeypatch.setenv("PGPASSWORD", "Env-Secret-4")
    assert main(["seed", "--dsn", "dbname=odoo_core user=odoo"]) == 0
    assert capsys.readouterr().err == ""
    assert seen[-1] == ("dbname=odoo_core user=odoo", "Env-Secret-4")
    assert main(["seed", "--help"]) == 0
    assert "give the password in PGPASSWORD" in " ".join(capsys.readouterr().out.split())


def test_demo_passes_arguments(monkeypatch, tmp_path, capsys):
    calls = []
    stub(monkeypatch, "replicator.devtools.demo",
                main=lambda workdir, scale, keep, seconds, metrics_port: calls.append(
                    (workdir, scale, keep, seconds, metrics_port)))
    assert main(["demo", "--workdir", str(tmp_path), "--scale", "2", "--keep", "--seconds", "3",
                 "--port", "9191"]) == 0
    assert main(["demo"]) == 0
    assert calls == [(tmp_path, 2, True, 3.0, 9191), (None, 1, False, 10.0, None)]


# --- classify() -----------------------------------------------------------------------------


def settings(tmp_path, monkeypatch) -> Config:
    path = tmp_path / "etl-config.toml"
    path.write_text(CONFIG)
    (tmp_path / ".env").write_text(f"ODOO_DB_PASSWORD={SOURCE_PW}\nSUPABASE_DB_PASSWORD={DEST_PW}\n")
    monkeypatch.delenv("ODOO_DB_PASSWORD", raising=False)
    monkeypatch.delenv("SUPABASE_DB_PASSWORD", raising=False)
    return load_config(path)


AUTH = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for user "odoo"'
REFUSED = (
    'connection failed: connection to server at "127.0.0.1", port 5433 failed: Connection refused\n'
    "\tIs the server running on that host and accepting TCP/IP connections?"
)


def test_classify_auth_failure_points_at_the_variable(tmp_path, monkeypatch):
    config = settings(tmp_path, monkeypatch)
    exc = psycopg.OperationalError(AUTH)
    err = classify(exc, settings=config.source)
    assert isinstance(err, ConfigError) and err.exit_code == 2 and not err.retryable
    assert err.message == (
        '[source] connection to server at "127.0.0.1", port 5432 failed: '
        'password authentication failed for user "odoo"'
    )
    assert f"$ODOO_DB_PASSWORD in {tmp_path / '.env'}" in err.hint
    assert err.__cause__ is exc


def test_classify_destination_auth_failure_mentions_service_role_key():
    err = classify(psycopg.OperationalError(AUTH.replace('"odoo"', '"postgres"')), side="destination")
    assert err.kind is ErrorKind.CONFIG
    assert "SUPABASE_SERVICE_ROLE_KEY" in err.hint and "API key" in err.hint


@pytest.mark.parametrize(
    ("text", "side", "kind"),
    [
        (REFUSED, "destination", ErrorKind.DESTINATION_CONNECT),
        (REFUSED, "source", ErrorKind.SOURCE_CONNECT),
        ("connection timeout expired", "source", ErrorKind.SOURCE_CONNECT),
        ("failed to resolve host 'db.invalid': [Errno -2] Name or service not known", "source", ErrorKind.SOURCE_CONNECT),
        ('connection failed: FATAL:  database "odoo" does not exist', "source", ErrorKind.CONFIG),
        ('connection failed: FATAL:  role "x" does not exist', "destination", ErrorKind.CONFIG),
        ("connection failed: FATAL:  must be superuser or replication role to start walsender", "source", ErrorKind.SOURCE_SETUP),
        ("FATAL:  the database system is starting up", "destination", ErrorKind.DESTINATION_CONNECT),
        ("server closed the connection unexpectedly", "source", ErrorKind.SOURCE_CONNECT),
    ],
)
def test_classify_operational_errors(text, side, kind):
    err = classify(psycopg.OperationalError(text), side=side)
    assert err.kind is kind
    assert err.message.startswith(f"[{side}] ")
    assert "\n" not in err.message and "FATAL" not in err.message
    assert err.hint


def test_classify_server_errors_by_sqlstate_and_text():
    wal = psycopg.errors.ObjectNotInPrerequisiteState("logical decoding requires wal_level >= logical")
    assert classify(wal, side="source").kind is ErrorKind.SOURCE_SETUP
    assert "wal_level = logical" in classify(wal, side="source").hint

    gone = psycopg.errors.ObjectNotInPrerequisiteState('can no longer get changes from replication slot "s"')
    assert classify(gone, side="source").kind is ErrorKind.RESYNC_REQUIRED

    pub = psycopg.errors.UndefinedObject('publication "odoo_pub_scout" does not exist')
    assert "CREATE PUBLICATION" in classify(pub, side="source").hint

    apply = psycopg.errors.NotNullViolation('null value in column "id" violates not-null constraint')
    err = classify(apply, side="destination")
    assert err.kind is ErrorKind.DESTINATION_APPLY and err.exit_code == 4


HBA_REFUSED = ('connection failed: connection to server at "10.0.0.9", port 5432 failed: FATAL:  '
               'no pg_hba.conf entry for host "10.1.2.3", user "replicator_src", '
               'database "odoo_core", no encryption')


@pytest.mark.parametrize("sqlstate", ["28000", None])
def test_pg_hba_hint_gives_the_database_line_and_no_replication_line(sqlstate):
    """Logical replication matches pg_hba.conf by database name; a `replication` line is for
    physical replication only, and admits a copy of the whole cluster."""
    err = classify(psycopg.OperationalError(HBA_REFUSED), side="source", sqlstate=sqlstate)
    assert err.kind is ErrorKind.SOURCE_SETUP
    assert "add the line `host odoo_core replicator_src 10.1.2.3/32 scram-sha-256`" in err.hint
    assert "no `replication` line is needed" in err.hint, err.hint
    assert "physical replication" in err.hint and "pg_basebackup" in err.hint
    assert "database 'replication'" not in err.hint
    dest = classify(psycopg.OperationalError(HBA_REFUSED), side="destination", sqlstate=sqlstate)
    assert "`host odoo_core replicator_src 10.1.2.3/32 scram-sha-256`" in dest.hint
    assert "replication" not in dest.hint


@pytest.mark.parametrize("text", [
    "connection failed: server does not support SSL, but SSL was required",
    'connection failed: root certificate file "/home/x/.postgresql/root.crt" does not exist',
    "connection failed: SSL error: certificate verify failed",
])
def test_tls_hints_never_suggest_a_weaker_sslmode(text):
    for side in ("source", "destination"):
        err = classify(psycopg.OperationalError(text), side=side)
        assert err.kind is ErrorKind.CONFIG, err
        for weaker in ("disable", "allow", "prefer", "require"):
            assert f'"{weaker}"' not in err.hint, err.hint
        assert "encrypt without verifying" not in err.hint
    if "certificate" in text:  # where Supabase's CA comes from
        assert "Download certificate" in classify(psycopg.OperationalError(text),
                                                  side="destination").hint


def test_classify_other_exceptions():
    err = classify(ValueError("x"))
    assert err.kind is ErrorKind.INTERNAL and err.exit_code == 1
    assert err.message == "unexpected ValueError: x"
    assert classify(ConnectionResetError("reset by peer"), side="destination").kind is ErrorKind.DESTINATION_CONNECT
    original = ConfigError("already classified")
    assert classify(original) is original


def test_classify_redacts(tmp_path, monkeypatch):
    settings(tmp_path, monkeypatch)  # registers both passwords
    err = classify(psycopg.OperationalError(f"weird failure mentioning {SOURCE_PW} and password=abc"), side="source")
    assert SOURCE_PW not in str(err) and "abc" not in str(err)


# --- retry policy ---------------------------------------------------------------------------


def test_retry_policies():
    connect = ErrorKind.SOURCE_CONNECT.policy
    assert [connect.delay(n, jitter=False) for n in (1, 2, 3, 6, 7, 100)] == [1, 2, 4, 32, 60, 60]
    assert all(0.5 <= connect.delay(1) <= 1 for _ in range(20))
    assert connect.should_retry(10_000)
    assert ErrorKind.DESTINATION_APPLY.policy.should_retry(4)
    assert not ErrorKind.DESTINATION_APPLY.policy.should_retry(5)
    for kind in (ErrorKind.CONFIG, ErrorKind.SOURCE_SETUP, ErrorKind.RESYNC_REQUIRED, ErrorKind.INTERNAL):
        assert not kind.retryable and not kind.policy.should_retry(0)
    assert ErrorKind.CONFIG.exit_code == 2 and ErrorKind.INTERNAL.exit_code == 1


def test_errors_pickle_and_format():
    err = pickle.loads(pickle.dumps(ReplicatorError(ErrorKind.PROTOCOL, "bad message", "hint")))
    assert (err.kind, err.message, err.hint) == (ErrorKind.PROTOCOL, "bad message", "hint")
    assert str(err) == "bad message — hint"
    cfg = pickle.loads(pickle.dumps(ConfigError("m", "h")))
    assert isinstance(cfg, ConfigError) and cfg.kind is ErrorKind.CONFIG
    assert ConfigError("m", "a\n  b").one_line() == "m — a b"


def test_repo_config_check(monkeypatch, capsys):
    """The shipped etl-config.toml passes `check` with the two documented variables."""
    stub(monkeypatch, "replicator.pipeline.preflight")
    monkeypatch.setenv("ODOO_DB_PASSWORD", "x" * 12)
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", "y" * 12)
    repo_config = Path(__file__).resolve().parents[2] / "etl-config.toml"
    assert main(["check", "--config", str(repo_config)]) == 0
    captured = capsys.readouterr()
    assert "every table of the publication -> odoo_mirror.<same name>" in captured.out
    # Every key the shipped file sets does something.
    assert "has no effect" not in captured.err


def test_check_names_a_key_without_effect(tmp_path, monkeypatch, capsys):
    stub(monkeypatch, "replicator.pipeline.preflight")
    monkeypatch.setenv("ODOO_DB_PASSWORD", "x" * 12)
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", "y" * 12)
    path = tmp_path / "etl-config.toml"
    path.write_text(minimal_config().replace("[destination]", "idle_timeout = 300\n\n"
                                                               "[destination]", 1))
    assert main(["check", "--config", str(path)]) == 0
    assert ("[source] idle_timeout has no effect: the replicator holds each connection open "
            "for as long as it runs; remove it from the config") in capsys.readouterr().err
