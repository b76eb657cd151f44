"""etl-config.toml loading: variables, .env, validation messages, defaults, mappings."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from plugins.replicator import minimal_config
from psycopg.conninfo import conninfo_to_dict

from replicator import redact
from replicator.config.load import from_dsns, load_config
from replicator.config.settings import (
    DestinationSettings,
    LoggingSettings,
    MetricsSettings,
    Secret,
    SourceSettings,
)
from replicator.errors import ConfigError, ErrorKind, ExitCode

REPO_CONFIG = Path(__file__).resolve().parents[2] / "etl-config.toml"

MINIMAL = minimal_config(dest_password="${SUPABASE_DB_PASSWORD}")

ENV = {"ODOO_DB_PASSWORD": "odoo-secret-1", "SUPABASE_DB_PASSWORD": "supa-secret-2"}


@pytest.fixture(autouse=True)
def _fresh_secrets():
    redact.clear_secrets()
    yield
    redact.clear_secrets()


def write(tmp_path: Path, text: str, dotenv: str | None = None) -> Path:
    path = tmp_path / "etl-config.toml"
    path.write_text(textwrap.dedent(text))
    if dotenv is not None:
        (tmp_path / ".env").write_text(textwrap.dedent(dotenv))
    return path


def load_error(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=ENV if environ is None else environ)
    return info.value


def with_source(extra: str) -> str:
    """MINIMAL with lines added at the end of [source]."""
    return MINIMAL.replace('publication = "odoo_pub_scout"\n', f'publication = "odoo_pub_scout"\n{extra}\n')


def with_destination(extra: str) -> str:
    return MINIMAL + extra + "\n"


# --- the repository's file ------------------------------------------------------------------


def test_repo_config_loads_with_the_two_variables(monkeypatch):
    monkeypatch.setenv("ODOO_DB_PASSWORD", "from-env-odoo")
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", "from-env-supa")
    config = load_config(REPO_CONFIG)

    assert config.path == REPO_CONFIG
    src, dst = config.source, config.destination
    assert (src.host, src.port, src.database, src.user) == (
        "127.0.0.1", 5432, "odoo_core", "replicator")
    assert src.password.reveal() == "from-env-odoo"
    assert (src.publication, src.slot) == ("odoo_pub_scout", "odoo_pub_scout")
    assert (dst.host, dst.port, dst.database, dst.user) == ("127.0.0.1", 5433, "postgres", "postgres")
    assert dst.password.reveal() == "from-env-supa"
    assert (dst.schema, dst.batch_size, dst.flush_interval) == ("odoo_mirror", 10000, 5.0)
    # No mapping: the publication's tables, each under its own name.
    assert config.mappings == {}
    assert config.logging == LoggingSettings(level="info", format="auto", output="stdout")
    assert config.metrics == MetricsSettings(enabled=True, port=9090, path="/metrics")


def test_repo_config_does_not_use_the_service_role_key():
    text = REPO_CONFIG.read_text()
    assignments = [line for line in text.splitlines() if line.strip().startswith("password")]
    assert assignments == ['password = "$ODOO_DB_PASSWORD"', 'password = "$SUPABASE_DB_PASSWORD"']


# --- variables and .env ---------------------------------------------------------------------


def test_dotenv_beside_the_config_supplies_variables(tmp_path):
    path = write(
        tmp_path,
        MINIMAL,
        dotenv="""\
        # secrets
        ODOO_DB_PASSWORD=plain
        export SUPABASE_DB_PASSWORD="quoted # not a comment"
        UNUSED='single $NOT_EXPANDED'
        WITH_COMMENT=value # a comment
        """,
    )
    config = load_config(path, environ={})
    assert config.source.password.reveal() == "plain"
    assert config.destination.password.reveal() == "quoted # not a comment"
    assert "in " + str(tmp_path / ".env") in config.source.password_source


def test_environment_overrides_dotenv(tmp_path):
    path = write(tmp_path, MINIMAL, dotenv="ODOO_DB_PASSWORD=from-file\nSUPABASE_DB_PASSWORD=x\n")
    config = load_config(path, environ={"ODOO_DB_PASSWORD": "from-env"})
    assert config.source.password.reveal() == "from-env"
    assert config.source.password_source == "$ODOO_DB_PASSWORD in the environment"
    assert config.destination.password.reveal() == "x"


def test_braced_and_embedded_variables(tmp_path):
    path = write(tmp_path, MINIMAL.replace('host = "127.0.0.1"\nport = 5432', 'host = "db-${ENV_NAME}.internal"\nport = 5432'))
    config = load_config(path, environ={**ENV, "ENV_NAME": "prod"})
    assert config.source.host == "db-prod.internal"
    assert config.destination.password.reveal() == "supa-secret-2"  # ${SUPABASE_DB_PASSWORD}


def test_substituted_values_are_not_expanded_again_and_dollar_dollar_is_literal(tmp_path):
    path = write(tmp_path, MINIMAL.replace('database = "odoo_core"', 'database = "odoo$$core"'))
    config = load_config(path, environ={**ENV, "ODOO_DB_PASSWORD": "pa$HOME$$word"})
    assert config.source.password.reveal() == "pa$HOME$$word"
    assert config.source.database == "odoo$core"


def test_missing_variable_names_key_variable_and_dotenv_path(tmp_path):
    err = load_error(write(tmp_path, MINIMAL), environ={"SUPABASE_DB_PASSWORD": "x"})
    assert err.message == "[source] password: $ODOO_DB_PASSWORD is not set"
    assert err.hint == f"add it to the environment or to {tmp_path / '.env'}"
    assert err.kind is ErrorKind.CONFIG and err.exit_code == ExitCode.FATAL == 2


def test_invalid_variable_reference(tmp_path):
    # A value that is not a secret is quoted, to show the mistake.
    err = load_error(write(tmp_path, MINIMAL.replace('"odoo_core"', '"${ODOO-DB}"')))
    assert "[source] database: invalid variable reference '${ODOO-DB}'" in err.message


@pytest.mark.parametrize("password", ["Tr0ub4dor${and 3}xkcd", "Tr0ub4dor${and 3xkcd",
                                      "Tr0ub4dor$xkcd", "${ODOO-PASS}"])
def test_a_password_with_a_dollar_is_never_echoed(tmp_path, password):
    """A literal password with a `$` in it fails before it is known, so redaction cannot mask
    it: the error names the key and the problem and quotes nothing of the value."""
    err = load_error(write(tmp_path, MINIMAL.replace("$ODOO_DB_PASSWORD", password)))
    assert err.message.startswith("[source] password: "), err.message
    text = str(err)
    for piece in ("Tr0ub4dor", "and 3", "xkcd", "ODOO-PASS"):
        assert piece not in err.message, err.message
    assert "$$" in err.hint, err.hint
    assert all(piece not in text for piece in ("Tr0ub4dor", "xkcd")), text


def test_a_password_made_of_variables_names_the_missing_one(tmp_path):
    err = load_error(write(tmp_path, MINIMAL.replace("$ODOO_DB_PASSWORD", "${PW_A}$PW_B")),
                     environ={**ENV, "PW_A": "x"})
    assert err.message == "[source] password: $PW_B is not set"


def test_numbers_and_booleans_from_variables_are_coerced(tmp_path):
    text = with_destination('batch_size = "$ETL_BATCH_SIZE"\nflush_interval = "${ETL_FLUSH_INTERVAL}"\ncopy_indexes = "$COPY"')
    text = text.replace("port = 5432", 'port = "$ODOO_DB_PORT"')
    env = {**ENV, "ETL_BATCH_SIZE": "500", "ETL_FLUSH_INTERVAL": "0.5", "COPY": "false", "ODOO_DB_PORT": " 6000 "}
    config = load_config(write(tmp_path, text), environ=env)
    assert config.destination.batch_size == 500
    assert config.destination.flush_interval == 0.5
    assert config.destination.copy_indexes is False
    assert config.source.port == 6000


def test_non_numeric_variable_for_a_number(tmp_path):
    text = with_destination('batch_size = "$ETL_BATCH_SIZE"')
    err = load_error(write(tmp_path, text), environ={**ENV, "ETL_BATCH_SIZE": "lots"})
    assert err.message == '[destination] batch_size: expected an integer, got string "lots" (from $ETL_BATCH_SIZE)'


def test_dotenv_syntax_error_names_line_without_quoting_it(tmp_path):
    path = write(tmp_path, MINIMAL, dotenv="OK=1\nthis line has no equals sign hunter2\n")
    err = load_error(path, environ={})
    assert err.message == f"{tmp_path / '.env'} line 2: expected KEY=VALUE"
    assert "hunter2" not in str(err)


def test_dotenv_empty_values_and_unterminated_quotes(tmp_path):
    path = write(tmp_path, MINIMAL, dotenv="ODOO_DB_PASSWORD=\nSUPABASE_DB_PASSWORD=''\nEMPTY=\n")
    config = load_config(path, environ={})
    assert not config.source.password and not config.destination.password
    assert "password" not in config.source.conninfo()

    path = write(tmp_path, MINIMAL, dotenv='OK=1\nODOO_DB_PASSWORD="hunter2 # no closing quote\n')
    err = load_error(path, environ={})
    assert err.message == f"{tmp_path / '.env'} line 2: ODOO_DB_PASSWORD: unterminated or misplaced quote"
    assert "hunter2" not in str(err)


# --- validation messages --------------------------------------------------------------------


def test_unknown_key_with_suggestion(tmp_path):
    err = load_error(write(tmp_path, with_source('publicaton = "x"')))
    assert err.message == "[source] unknown key: publicaton"
    assert "did you mean 'publication'" in err.hint


def test_key_in_the_wrong_section_says_where_it_belongs(tmp_path):
    err = load_error(write(tmp_path, with_source("batch_size = 10")))
    assert err.message == "[source] unknown key: batch_size"
    assert "batch_size belongs in [destination]" in err.hint


def test_unknown_section_with_suggestion(tmp_path):
    err = load_error(write(tmp_path, MINIMAL + "\n[mapping]\na = 'b'\n"))
    assert err.message == "unknown section: mapping"
    assert "did you mean 'mappings'" in err.hint


def test_wrong_type_names_section_key_expected_and_got(tmp_path):
    err = load_error(write(tmp_path, MINIMAL.replace("port = 5433", 'port = "5433"')))
    assert err.message == '[destination] port: expected an integer, got string "5433"'
    assert "without quotes" in err.hint

    err = load_error(write(tmp_path, with_destination("copy_indexes = 1")))
    assert err.message == "[destination] copy_indexes: expected true or false, got integer 1"


def test_wrong_type_for_a_password_does_not_echo_it(tmp_path):
    err = load_error(write(tmp_path, MINIMAL.replace('"$ODOO_DB_PASSWORD"', "8675309")))
    assert err.message == "[source] password: expected a string, got an integer"
    assert "8675309" not in str(err)


def test_missing_required_keys_are_all_named(tmp_path):
    text = MINIMAL.replace('publication = "odoo_pub_scout"\n', "").replace('user = "odoo"\n', "")
    err = load_error(write(tmp_path, text))
    assert err.message == "[source] missing required key(s): user, publication"


def test_missing_section(tmp_path):
    err = load_error(write(tmp_path, MINIMAL.split("[destination]")[0]))
    assert err.message == f"{tmp_path / 'etl-config.toml'}: missing section(s) [destination]"


def test_toml_syntax_error_names_path_and_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace('database = "odoo_core"', "database = odoo_core"))
    err = load_error(path)
    assert err.message.startswith(f"{path}: invalid TOML at line 4, column 12: ")


def test_missing_file(tmp_path):
    err = load_error(tmp_path / "nope.toml")
    assert err.message == f"config file {tmp_path / 'nope.toml'} not found"
    assert "--config" in err.hint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (with_destination("batch_size = 0"), "[destination] batch_size: must be >= 1, got 0"),
        (with_destination("flush_interval = 0"), "[destination] flush_interval: must be > 0, got 0.0"),
        (MINIMAL.replace("port = 5433", "port = 70000"), "[destination] port: must be between 1 and 65535, got 70000"),
        (with_source('type = "mysql"'), '[source] type: "mysql" is not supported'),
        (with_source('sslmode = "requre"'), "[source] sslmode: 'requre' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
        (MINIMAL + '[logging]\nlevel = "verbose"\n', "[logging] level: 'verbose' is not one of debug, info, warning, error"),
        (MINIMAL + '[metrics]\npath = "metrics"\n', "[metrics] path: must start with '/', got 'metrics'"),
        (with_destination('state_schema = "odoo_mirror"'), '[destination] state_schema: must differ from schema ("odoo_mirror")'),
        (with_source("retry_timeout = 0"), "[source] retry_timeout: must be > 0, got 0.0"),
        (with_destination("retry_timeout = -5"), "[destination] retry_timeout: must be > 0, got -5.0"),
        (with_source('retry_timeout = "30"'), '[source] retry_timeout: expected a number, got string "30"'),
        (with_destination('state_schema = "pg_state"'), "[destination] state_schema: schema name 'pg_state' is reserved by PostgreSQL (pg_*)"),
        (MINIMAL + '[mappings]\nres_partner = "PG_x.res_partner"\n', "[mappings] res_partner: schema name 'PG_x' is reserved by PostgreSQL (pg_*)"),
        (with_destination('on_error = "skip"'), "[destination] on_error: 'skip' is not one of stop, dead_letter"),
    ],
)
def test_value_checks(tmp_path, text, message):
    assert load_error(write(tmp_path, text)).message == message


def test_sslmode_suggestion(tmp_path):
    assert "did you mean 'require'" in load_error(write(tmp_path, with_source('sslmode = "requre"'))).hint


# --- defaults, slot names, mappings ---------------------------------------------------------


def test_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), environ=ENV)
    src, dst = config.source, config.destination
    assert (src.type, src.sslmode, src.sslrootcert, src.max_connections, src.idle_timeout) == (
        "postgres", None, None, 10, 300,
    )
    assert (src.retry_timeout, dst.retry_timeout) == (30.0, 30.0)
    assert load_config(write(tmp_path, with_source("retry_timeout = 2.5")), environ=ENV).source.retry_timeout == 2.5
    assert src.slot == "odoo_pub_scout"
    assert (dst.schema, dst.state_schema, dst.batch_size, dst.flush_interval) == (
        "odoo_mirror", "replicator", 10000, 5.0,
    )
    assert (dst.max_memory_mb, dst.copy_indexes, dst.on_error) == (256, True, "stop")
    dst = load_config(write(tmp_path, with_destination('on_error = "dead_letter"')), environ=ENV).destination
    assert dst.on_error == "dead_letter"
    assert config.logging == LoggingSettings()
    assert config.logging == LoggingSettings(level="info", format="auto", output="stdout")
    assert config.metrics == MetricsSettings(enabled=True, port=9090, path="/metrics")
    assert config.mappings == {}
    # No [mappings]: every published table keeps its name in the destination schema.
    assert config.target("public", "res_partner") == ("odoo_mirror", "res_partner")


def test_log_level_is_case_insensitive(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + '[logging]\nlevel = "WARN"\n'), environ=ENV)
    assert config.logging.level == "warning"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "src.crt", "src.key", "dst.crt", "dst.key"):
        (tmp_path / "certs" / name).write_text("x")
    tls = 'sslrootcert = "certs/ca.pem"\nsslcert = "certs/{0}.crt"\nsslkey = "certs/{0}.key"'
    text = with_source(tls.format("src")) + tls.format("dst") + '\n[logging]\noutput = "logs/replicator.log"\n'
    config = load_config(write(tmp_path, text.replace("[logging]", "\n[logging]")), environ=ENV)
    certs = tmp_path / "certs"
    for side, name in ((config.source, "src"), (config.destination, "dst")):
        assert (side.sslrootcert, side.sslcert, side.sslkey) == (
            str(certs / "ca.pem"), str(certs / f"{name}.crt"), str(certs / f"{name}.key"))
        params = conninfo_to_dict(side.conninfo())
        assert (params["sslrootcert"], params["sslcert"], params["sslkey"]) == (
            str(certs / "ca.pem"), str(certs / f"{name}.crt"), str(certs / f"{name}.key"))
    assert config.logging.output == str(tmp_path / "logs/replicator.log")


def test_a_missing_certificate_or_key_file_names_the_key_and_the_path(tmp_path):
    (tmp_path / "client.crt").write_text("x")
    text = with_destination('sslcert = "client.crt"\nsslkey = "keys/client.key"')
    err = load_error(write(tmp_path, text))
    assert err.message == f"[destination] sslkey: {tmp_path / 'keys/client.key'} does not exist"
    assert "relative to the config file's directory" in err.hint
    err = load_error(write(tmp_path, with_source(f'sslrootcert = "{tmp_path}"')))
    assert err.message == f"[source] sslrootcert: {tmp_path} is not a file"
    # libpq's keyword for the system's trust store is not a path.
    assert load_config(write(tmp_path, with_source('sslrootcert = "system"')), environ=ENV).source.sslrootcert == "system"
    with pytest.raises(ConfigError) as info:
        from_dsns("dbname=a sslrootcert=nowhere.pem", "dbname=b", "pub")
    assert info.value.message == "[source] sslrootcert: nowhere.pem does not exist"
    assert "relative to the working directory" in info.value.hint


def test_a_client_certificate_needs_its_key(tmp_path):
    (tmp_path / "client.crt").write_text("x")
    err = load_error(write(tmp_path, with_destination('sslcert = "client.crt"')))
    assert err.message == "[destination] sslcert is set but sslkey is not"
    assert "set both sslcert and sslkey in [destination]" in err.hint


def test_explicit_slot(tmp_path):
    config = load_config(write(tmp_path, with_source('slot = "mirror_1"')), environ=ENV)
    assert config.source.slot == "mirror_1"


@pytest.mark.parametrize("slot", ["Mirror", "odoo-pub", "x" * 64, "sp ace"])
def test_invalid_slot_name_says_so(tmp_path, slot):
    err = load_error(write(tmp_path, with_source(f'slot = "{slot}"')))
    assert err.message == f"[source] slot: {slot!r} is not a valid replication slot name"
    assert "lower-case letters, digits and underscores, at most 63" in err.hint


def test_publication_name_that_is_no_slot_name_needs_an_explicit_slot(tmp_path):
    err = load_error(write(tmp_path, MINIMAL.replace('"odoo_pub_scout"', '"Odoo-Pub"')))
    assert err.message == "[source] slot: 'Odoo-Pub' (taken from publication 'Odoo-Pub') is not a valid replication slot name"
    assert 'set slot = "odoo_pub"' in err.hint


def test_mapping_normalisation(tmp_path):
    text = MINIMAL + textwrap.dedent(
        """\
        [mappings]
        account_move = "odoo_mirror.account_move"
        res_partner = "partners"
        "sales.order" = "analytics.orders"
        billing.invoice = "${MIRROR}.invoice"
        """
    )
    config = load_config(write(tmp_path, text), environ={**ENV, "MIRROR": "finance"})
    assert config.mappings == {
        "public.account_move": "odoo_mirror.account_move",
        "public.res_partner": "odoo_mirror.partners",
        "sales.order": "analytics.orders",
        "billing.invoice": "finance.invoice",  # a bare dotted key is a nested table in TOML
    }
    assert config.target("public", "res_partner") == ("odoo_mirror", "partners")
    # Published, not mapped: replicated under its own name (mappings never choose tables).
    assert config.target("public", "hr_expense") == ("odoo_mirror", "hr_expense")


@pytest.mark.parametrize(
    ("mappings", "message"),
    [
        ('a = "x.b"\nb = "x.b"', "[mappings] b: public.a and public.b both map to x.b"),
        ('a = "x.y.z"', "[mappings] a: 'x.y.z' is not a valid destination table name"),
        ('a = "replicator.a"', "[mappings] a: replicator.a is in the state schema (replicator)"),
        ("a = 1", "[mappings] a: expected a string, got integer 1"),
        ('a = "b"\n"public.a" = "c"', "[mappings] public.a: public.a is mapped twice"),
    ],
)
def test_bad_mappings(tmp_path, mappings, message):
    assert load_error(write(tmp_path, MINIMAL + "[mappings]\n" + mappings + "\n")).message == message


# --- connection strings ---------------------------------------------------------------------


def test_conninfo_has_defaults_and_overrides(tmp_path):
    config = load_config(write(tmp_path, with_source('sslmode = "require"')), environ=ENV)
    params = conninfo_to_dict(config.source.conninfo(replication="database", connect_timeout=3))
    assert params == {
        "host": "127.0.0.1",
        "port": "5432",
        "dbname": "odoo_core",
        "user": "odoo",
        "password": "odoo-secret-1",
        "sslmode": "require",
        "application_name": "odoo-replicator",
        "connect_timeout": "3",
        "replication": "database",
        # A peer that stops acknowledging is noticed in about 30 s on every connection.
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }
    assert config.source.describe() == "odoo@127.0.0.1:5432/odoo_core"


def test_several_source_hosts_ask_libpq_for_the_primary(tmp_path):
    text = MINIMAL.replace('host = "127.0.0.1"', 'host = "db1, db2:6543,[::1]:5433"', 1)
    src = load_config(write(tmp_path, text), environ=ENV).source
    assert src.hosts == [("db1", 5432), ("db2", 6543), ("::1", 5433)]
    params = conninfo_to_dict(src.conninfo(replication="database"))
    assert (params["host"], params["port"]) == ("db1,db2,::1", "5432,6543,5433")
    # The walsender and every other connection go to the primary, also a session read-only
    # on purpose (status, verify), which "read-write" would refuse on every host.
    assert params["target_session_attrs"] == "primary"
    read_only = conninfo_to_dict(src.conninfo(options="-c default_transaction_read_only=on"))
    assert read_only["target_session_attrs"] == "primary"
    assert src.describe() == "odoo@db1:5432,db2:6543,::1:5433/odoo_core"
    # One host: as before, no target_session_attrs (a standby given on purpose still works).
    one = load_config(write(tmp_path, MINIMAL), environ=ENV).source
    assert "target_session_attrs" not in conninfo_to_dict(one.conninfo())


@pytest.mark.parametrize("host", ["db1:x", "db1,,db2", "db1:70000", "[::1]x"])
def test_a_bad_host_entry_is_one_line_naming_it(tmp_path, host):
    text = MINIMAL.replace('host = "127.0.0.1"', f'host = "{host}"', 1)
    err = load_error(write(tmp_path, text))
    assert err.message.startswith("[source] host: ") and "is not a host or host:port" in \
        err.message, err.message
    assert "db1:5432,db2:5432" in err.hint


def test_standby_host_is_one_host(tmp_path):
    src = load_config(write(tmp_path, with_source('standby_host = "db2:5433"')),
                      environ=ENV).source
    assert src.standby_hosts == [("db2", 5433)]
    err = load_error(write(tmp_path, with_source('standby_host = "db2,db3"')))
    assert err.message == "[source] standby_host: names one standby, not several"
    err = load_error(write(tmp_path, with_source('standby_host = "db2:x"')))
    assert err.message == "[source] standby_host: 'db2:x' is not a host or host:port"


def test_empty_password_is_left_to_libpq(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace('"$ODOO_DB_PASSWORD"', '""')), environ=ENV)
    assert "password" not in conninfo_to_dict(config.source.conninfo())


def test_from_dsns():
    config = from_dsns(
        "host=/tmp/pg port=5499 dbname=odoo user=odoo password='s3 cret'",
        "postgresql://postgres:p%40ss@localhost:5433/postgres?sslmode=disable",
        "pub",
        slot="slot_a",
        batch_size=10,
        flush_interval=0.1,
        destination_max_connections=2,
        mappings={"account_move": "account_move"},
        logging={"format": "text"},
    )
    assert (config.source.host, config.source.port, config.source.password.reveal()) == ("/tmp/pg", 5499, "s3 cret")
    assert (config.source.publication, config.source.slot) == ("pub", "slot_a")
    assert config.destination.password.reveal() == "p@ss"
    assert config.destination.sslmode == "disable"
    assert (config.destination.batch_size, config.destination.flush_interval) == (10, 0.1)
    assert config.destination.max_connections == 2
    assert config.mappings == {"public.account_move": "odoo_mirror.account_move"}
    assert config.logging.format == "text"
    assert config.metrics.enabled is False  # parallel tests must not share port 9090
    assert config.path is None
    assert "s3 cret" not in repr(config) and "p@ss" not in repr(config)


def test_from_dsns_rejects_unknown_override():
    with pytest.raises(ConfigError) as info:
        from_dsns("dbname=a", "dbname=b", "pub", bach_size=1)
    assert info.value.message == "from_dsns: unknown setting 'bach_size'"
    assert "did you mean 'batch_size'" in info.value.hint


def test_settings_are_frozen_and_validated_when_built_directly():
    dst = DestinationSettings(host="h", port=1, database="d", user="u", password="p")
    with pytest.raises(dataclasses.FrozenInstanceError):
        dst.batch_size = 5  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"\[destination\] batch_size"):
        dataclasses.replace(dst, batch_size=-1)
    with pytest.raises(ConfigError, match=r"\[source\] slot"):
        SourceSettings(host="h", port=1, database="d", user="u", password="p", publication="A-B")


# --- secrets --------------------------------------------------------------------------------


def test_passwords_never_in_repr_and_registered_for_redaction(tmp_path):
    path = write(tmp_path, MINIMAL, dotenv="SUPABASE_SERVICE_ROLE_KEY=eyJhbGciOiJIUzI1NiJ9.service\n")
    config = load_config(path, environ=ENV)
    text = repr(config) + str(config)
    assert "odoo-secret-1" not in text and "supa-secret-2" not in text
    # Registered: anything that later prints them gets them masked, even the unused API key.
    line = "odoo-secret-1 / supa-secret-2 / eyJhbGciOiJIUzI1NiJ9.service"
    assert redact.redact(line) == "*** / *** / ***"


def test_password_is_a_secret_whose_printed_forms_are_masked(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), environ=ENV)
    src, dst = config.source, config.destination
    assert isinstance(src.password, Secret) and isinstance(dst.password, Secret)
    printed = [
        repr(config), str(config), repr(src), str(dst),
        str(src.password), repr(dst.password), f"{src.password}", "%s %r" % (dst.password, src.password),
        repr(dataclasses.asdict(config)), str(vars(src)),
    ]
    for text in printed:
        assert "odoo-secret-1" not in text and "supa-secret-2" not in text, text
    assert "password=Secret('***')" in repr(src)
    # Only a conninfo carries the text, for libpq.
    assert conninfo_to_dict(src.conninfo())["password"] == "odoo-secret-1"
    assert conninfo_to_dict(dst.conninfo())["password"] == "supa-secret-2"
    assert src.password.reveal() == "odoo-secret-1"
    # A settings object built in code takes a plain str and wraps it; empty stays "no password".
    built = dataclasses.replace(dst, password="")
    assert built.password == Secret("") and not built.password and "password" not in built.conninfo()


def test_passwords_registered_before_other_errors_can_echo_them(tmp_path):
    text = with_destination('schema = "$ODOO_DB_PASSWORD"')  # a (silly) mistake echoing a secret
    err = load_error(write(tmp_path, text), environ={**ENV, "ODOO_DB_PASSWORD": "Secret-9"})
    assert "Secret-9" not in str(err)
    assert err.message == "[destination] schema: '***' is not a valid schema name"


def test_mappings_rename_and_never_choose_the_tables(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + '[mappings]\naccount_move = "x.moves"\n'),
                         environ=ENV)
    assert config.target("public", "account_move") == ("x", "moves")
    # A published table without a mapping is replicated under its own name.
    assert config.target("public", "res_partner") == ("odoo_mirror", "res_partner")
    assert config.target("sales", "orders") == ("odoo_mirror", "orders")


def test_two_tables_bound_for_one_mirror_table_are_found(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + '[mappings]\na = "odoo_mirror.b"\n'),
                         environ=ENV)
    assert config.target_owners([("public", "a"), ("public", "b"), ("public", "c"),
                                 ("sales", "c")]) == {
        "odoo_mirror.b": ["public.a", "public.b"], "odoo_mirror.c": ["public.c", "sales.c"]}


def test_the_shipped_file_sets_no_key_without_effect():
    config = load_config(REPO_CONFIG, environ={"ODOO_DB_PASSWORD": "x" * 12,
                                               "SUPABASE_DB_PASSWORD": "y" * 12})
    assert config.ignored == ()
    assert config.source.user == "replicator"
    assert config.mappings == {}


def test_a_variable_with_a_default(tmp_path):
    # ${NAME:-default}: the host of a local run, another one inside a container.
    text = MINIMAL.replace('host = "127.0.0.1"', 'host = "${ODOO_DB_HOST:-127.0.0.1}"', 1)
    assert load_config(write(tmp_path, text), environ=ENV).source.host == "127.0.0.1"
    assert load_config(write(tmp_path, text), environ={**ENV, "ODOO_DB_HOST": ""}
                       ).source.host == "127.0.0.1"
    assert load_config(write(tmp_path, text), environ={**ENV, "ODOO_DB_HOST": "odoo-db"}
                       ).source.host == "odoo-db"
    assert load_config(write(tmp_path, text, dotenv="ODOO_DB_HOST=from-dotenv\n"),
                       environ=ENV).source.host == "from-dotenv"
    bad = MINIMAL.replace('host = "127.0.0.1"', 'host = "${ODOO DB:-x}"', 1)
    assert "write $NAME, ${NAME} or ${NAME:-default}" in load_error(
        write(tmp_path, bad), ENV).hint
