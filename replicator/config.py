"""Settings: etl-config.toml plus $VARIABLES from the environment or .env, typed and validated.

The file format is the deployment runbook's (``[source]``, ``[destination]``, ``[mappings]``,
``[logging]``, ``[metrics]``), so existing configs keep working. Every problem is reported as a
ConfigError naming ``[section] key``, so an operator never has to guess which line is wrong.
Every password resolved here is registered with ``redact.register_secret`` before anything
else can print it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError
from .redact import register_secret

__all__ = [
    "APPLICATION_NAME",
    "Config",
    "ConnectionSettings",
    "DestinationSettings",
    "LoggingSettings",
    "MetricsSettings",
    "SourceSettings",
    "load_config",
]

APPLICATION_NAME = "odoo-replicator"  # shows in pg_stat_activity / pg_stat_replication
DEFAULT_CONNECT_TIMEOUT = 10
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")

# PostgreSQL's own rule for slot names (ReplicationSlotValidateName).
_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")
# Unquoted-identifier shape: it keeps "schema.table" unambiguous and needs no quoting rules.
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_RE = re.compile(
    r"\$(?:(?P<escape>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|(?P<open>\{))"
)
# .env names that hold secrets even if etl-config.toml does not use them (the service role
# key sits in the same .env): mask them in logs too. Short values would mask too much.
_SECRET_NAME_RE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|_KEY\b|PRIVATE", re.IGNORECASE)
_MIN_GUESSED_SECRET = 8

# Field metadata: the loader sets it, it is not a key of the file / never echo its value.
_NOT_A_KEY = {"key": False}
_SECRET = {"secret": True}


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConnectionSettings:
    """One PostgreSQL server. ``password`` never appears in repr()."""

    section: ClassVar[str] = "connection"

    host: str
    port: int
    database: str
    user: str
    # Empty means "no password here": libpq then falls back to PGPASSWORD or ~/.pgpass.
    password: str = field(repr=False, metadata=_SECRET)
    sslmode: str | None = None
    sslrootcert: str | None = None
    max_connections: int = 10
    idle_timeout: int = 300  # seconds
    # How long `run --until-caught-up` (a one-shot job) keeps retrying while this server is
    # unreachable before it exits 3; a long-running `run` retries for ever.
    retry_timeout: float = 30.0  # seconds
    type: str = "postgres"
    # Where the password came from ("$ODOO_DB_PASSWORD in /app/.env"), for error hints.
    password_source: str = field(default="", repr=False, compare=False, metadata=_NOT_A_KEY)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        s = self.section
        if self.type != "postgres":
            raise ConfigError(
                f'[{s}] type: "{self.type}" is not supported',
                'the only supported type is "postgres"',
            )
        _check_range(s, "port", self.port, 1, 65535)
        _check_range(s, "max_connections", self.max_connections, 1)
        _check_range(s, "idle_timeout", self.idle_timeout, 0)
        _check_range(s, "retry_timeout", self.retry_timeout, 0, exclusive_min=True)
        _check_choice(s, "sslmode", self.sslmode, SSLMODES, optional=True)
        register_secret(self.password)

    def conninfo(self, **extra: Any) -> str:
        """A libpq connection string; ``extra`` adds or overrides parameters (None drops one).

        For example ``conninfo(replication="database")`` for the walsender connection.
        """
        params: dict[str, Any] = {
            # Empty values are left out so libpq applies its defaults (socket, PG* variables).
            "host": self.host or None,
            "port": self.port,
            "dbname": self.database or None,
            "user": self.user or None,
            "password": self.password or None,
            "sslmode": self.sslmode,
            "sslrootcert": self.sslrootcert,
            "application_name": APPLICATION_NAME,
            "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        }
        params.update(extra)
        return make_conninfo("", **params)

    def describe(self) -> str:
        """``user@host:port/database``: for logs and messages, never with the password."""
        return f"{self.user}@{self.host or 'localhost'}:{self.port}/{self.database}"


@dataclass(frozen=True, kw_only=True)
class SourceSettings(ConnectionSettings):
    """The Odoo database: a publication to read and the replication slot to read it through."""

    section: ClassVar[str] = "source"

    publication: str
    slot: str = ""  # "" means: the publication's name (what the runbook's SQL assumes)

    def _validate(self) -> None:
        super()._validate()
        if not self.publication:
            raise ConfigError(
                "[source] publication: must not be empty",
                'name the publication created on the Odoo database, e.g. "odoo_pub_scout"',
            )
        defaulted = not self.slot
        if defaulted:
            object.__setattr__(self, "slot", self.publication)
        if not _SLOT_RE.fullmatch(self.slot):
            suggestion = re.sub(r"[^a-z0-9_]", "_", self.slot.lower())[:63] or "odoo_replicator"
            origin = f" (taken from publication {self.publication!r})" if defaulted else ""
            raise ConfigError(
                f"[source] slot: {self.slot!r}{origin} is not a valid replication slot name",
                "slot names use only lower-case letters, digits and underscores, at most 63 "
                f'characters: set slot = "{suggestion}" in [source]',
            )


@dataclass(frozen=True, kw_only=True)
class DestinationSettings(ConnectionSettings):
    """The Supabase database: where the mirror and the replicator's own state live."""

    section: ClassVar[str] = "destination"

    schema: str = "odoo_mirror"
    # Applied LSN, staging and dead-letter tables: kept apart from the mirror that Superset,
    # n8n and the RLS policies see.
    state_schema: str = "replicator"
    batch_size: int = 1000  # rows
    flush_interval: float = 5.0  # seconds: the longest a committed change waits
    max_memory_mb: int = 256
    copy_indexes: bool = True  # create the source's indexes on the mirror tables

    def _validate(self) -> None:
        super()._validate()
        _check_identifier("destination", "schema", self.schema)
        _check_identifier("destination", "state_schema", self.state_schema)
        if self.state_schema == self.schema:
            raise ConfigError(
                f'[destination] state_schema: must differ from schema ("{self.schema}")',
                "the replicator's state tables must not appear in the mirror schema",
            )
        _check_range("destination", "batch_size", self.batch_size, 1)
        _check_range("destination", "flush_interval", self.flush_interval, 0, exclusive_min=True)
        _check_range("destination", "max_memory_mb", self.max_memory_mb, 1)


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    section: ClassVar[str] = "logging"

    level: str = "info"  # debug | info | warning | error
    format: str = "json"  # json | text
    output: str = "stdout"  # stdout | stderr | a file path

    def __post_init__(self) -> None:
        # Accept what ETL_LOG_LEVEL-style variables usually hold ("INFO", "warn").
        level = self.level.lower() if isinstance(self.level, str) else self.level
        object.__setattr__(self, "level", "warning" if level == "warn" else level)
        _check_choice("logging", "level", self.level, LOG_LEVELS)
        _check_choice("logging", "format", self.format, LOG_FORMATS)
        if not self.output:
            raise ConfigError(
                "[logging] output: must not be empty", 'use "stdout", "stderr" or a file path'
            )


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    section: ClassVar[str] = "metrics"

    enabled: bool = True
    port: int = 9090
    path: str = "/metrics"

    def __post_init__(self) -> None:
        _check_range("metrics", "port", self.port, 1, 65535)
        if not self.path.startswith("/"):
            raise ConfigError(
                f"[metrics] path: must start with '/', got {self.path!r}",
                f'write path = "/{self.path}"',
            )


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything the replicator needs; build it with ``load_config`` or ``from_dsns``.

    ``mappings`` maps "schema.table" on the source to "schema.table" on the destination, both
    always qualified. Empty means: every table of the publication, same name, in
    ``destination.schema``. Use ``target()`` rather than reading it directly.
    """

    source: SourceSettings
    destination: DestinationSettings
    mappings: dict[str, str] = field(default_factory=dict)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    path: Path | None = None  # the config file; None when built from DSNs

    def __post_init__(self) -> None:
        object.__setattr__(self, "mappings", _normalise_mappings(self.mappings, self.destination))

    def target(self, schema: str, table: str) -> tuple[str, str] | None:
        """Destination (schema, table) for a source table, or None if it is not mapped."""
        if not self.mappings:
            return (self.destination.schema, table)
        dest = self.mappings.get(f"{schema}.{table}")
        if dest is None:
            return None
        dest_schema, dest_table = dest.split(".", 1)
        return (dest_schema, dest_table)

    @classmethod
    def from_dsns(
        cls, source_dsn: str, dest_dsn: str, publication: str, **overrides: Any
    ) -> Config:
        """A Config from two connection strings (tests, the demo).

        ``overrides`` are setting names: source-only (``slot``) and destination-only ones
        (``schema``, ``batch_size``, ...) by name; shared connection settings with a prefix
        (``source_max_connections``, ``destination_sslmode``); and ``mappings``, ``logging``,
        ``metrics`` (a settings object or a dict). Metrics are disabled unless overridden,
        so that parallel tests do not fight over port 9090.
        """
        source_table = {**_dsn_table("source", source_dsn), "publication": publication}
        dest_table = _dsn_table("destination", dest_dsn)
        extra: dict[str, Any] = {"metrics": MetricsSettings(enabled=False)}
        source_keys = _keys(SourceSettings)
        dest_keys = _keys(DestinationSettings)
        shared = _keys(ConnectionSettings)
        for name, value in overrides.items():
            if name in ("mappings", "logging", "metrics"):
                extra[name] = value
            elif name.startswith("source_") and name[7:] in source_keys:
                source_table[name[7:]] = value
            elif name.startswith("destination_") and name[12:] in dest_keys:
                dest_table[name[12:]] = value
            elif name in source_keys and name not in shared:
                source_table[name] = value
            elif name in dest_keys and name not in shared:
                dest_table[name] = value
            else:
                choices = (
                    ["mappings", "logging", "metrics"]
                    + [k for k in source_keys | dest_keys if k not in shared]
                    + [f"source_{k}" for k in shared]
                    + [f"destination_{k}" for k in shared]
                )
                raise ConfigError(
                    f"from_dsns: unknown setting {name!r}", _did_you_mean([name], sorted(choices))
                )
        for name in ("logging", "metrics"):
            if isinstance(extra.get(name), Mapping):
                settings_cls = LoggingSettings if name == "logging" else MetricsSettings
                extra[name] = _build(settings_cls, dict(extra[name]), _Resolver.none())
        return cls(
            source=_build(SourceSettings, source_table, _Resolver.none(), "the source DSN"),
            destination=_build(
                DestinationSettings, dest_table, _Resolver.none(), "the destination DSN"
            ),
            path=None,
            **extra,
        )


# --- loading --------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "source": SourceSettings,
    "destination": DestinationSettings,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
}
_ALL_SECTIONS = ["source", "destination", "mappings", "logging", "metrics"]


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, substitute and validate a config file; raise ConfigError on any problem.

    ``$NAME`` and ``${NAME}`` in string values come from ``environ`` (default: os.environ),
    then from ``.env`` beside the config file; ``$$`` is a literal ``$``. Substituted text is
    not substituted again, so a password may contain ``$``. Relative paths in the file
    (``sslrootcert``, ``[logging] output``) are relative to the config file's directory.
    """
    config_path = Path(path).absolute()
    doc = _read_toml(config_path)
    dotenv_path = config_path.parent / ".env"
    resolver = _Resolver(
        os.environ if environ is None else environ, _read_dotenv(dotenv_path), dotenv_path
    )

    unknown = [name for name in doc if name not in _ALL_SECTIONS]
    if unknown:
        raise _unknown_error("", unknown, _ALL_SECTIONS)
    for name, value in doc.items():
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name} must be a section ([{name}]), got {_describe_value(value)}",
                f"write [{name}] on a line of its own and put its keys below it",
            )
    missing = [name for name in ("source", "destination") if name not in doc]
    if missing:
        raise ConfigError(
            f"{config_path}: missing section(s) " + ", ".join(f"[{m}]" for m in missing),
            "see the deployment doc's etl-config.toml for the sections and their keys",
        )

    # Resolve and register both passwords before anything else can echo a value.
    for name in ("source", "destination"):
        raw = doc[name].get("password")
        if isinstance(raw, str):
            register_secret(resolver.substitute(f"[{name}] password", raw)[0])

    base_dir = config_path.parent
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _build(cls, doc.get(name, {}), resolver)
    sections["source"] = _with_relative_paths(sections["source"], base_dir)
    sections["destination"] = _with_relative_paths(sections["destination"], base_dir)
    output = sections["logging"].output
    if output not in ("stdout", "stderr") and not Path(output).is_absolute():
        sections["logging"] = dataclasses.replace(
            sections["logging"], output=str(base_dir / output)
        )

    mappings = _read_mappings(doc.get("mappings", {}), resolver)
    return Config(mappings=mappings, path=config_path, **sections)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found",
            "pass --config PATH, or copy the deployment doc's etl-config.toml there",
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})", "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}", "check the path and its permissions"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11 has no lineno attribute: the position is only in the message.
        reason = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)|\(at end of document\)", reason)
        if m and m.group(1):
            where = f"line {m.group(1)}, column {m.group(2)}"
        else:
            where = f"line {text.count(chr(10)) + 1} (end of file)"
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", reason)
        raise ConfigError(
            f"{path}: invalid TOML at {where}: {reason}",
            'check quotes and brackets on that line; strings need quotes: key = "value"',
        ) from None


def _read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose's env_file reads them (plus an optional `export `)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}", "check its permissions and encoding"
        ) from None

    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        # Never quote the line back: it may hold a secret.
        if not sep or not _VAR_NAME_RE.fullmatch(key):
            raise ConfigError(
                f"{path} line {lineno}: expected KEY=VALUE",
                "names are letters, digits and underscores; comment lines start with #",
            )
        values[key] = _dotenv_value(value.strip(), path, lineno, key)
        if _SECRET_NAME_RE.search(key) and len(values[key]) >= _MIN_GUESSED_SECRET:
            register_secret(values[key])
    return values


_DQ_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def _dotenv_value(raw: str, path: Path, lineno: int, key: str) -> str:
    if not raw or raw[0] not in "'\"":
        # An inline comment needs whitespace before '#', so "pa#ss" stays a password.
        return re.split(r"\s+#", raw, maxsplit=1)[0].rstrip()
    quote, out, i = raw[0], [], 1
    while i < len(raw):
        ch = raw[i]
        if ch == quote:
            rest = raw[i + 1 :].strip()
            if rest and not rest.startswith("#"):
                break
            return "".join(out)
        if ch == "\\" and quote == '"' and i + 1 < len(raw):
            out.append(_DQ_ESCAPES.get(raw[i + 1], "\\" + raw[i + 1]))
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ConfigError(
        f"{path} line {lineno}: {key}: unterminated or misplaced quote",
        f"write {key}=\"value\" with the closing quote at the end of the line",
    )


class _Resolver:
    """$NAME lookup: the environment first, then .env (so a deployment can override a file)."""

    def __init__(
        self, environ: Mapping[str, str] | None, dotenv: Mapping[str, str], dotenv_path: Path | None
    ) -> None:
        self.environ = environ
        self.dotenv = dotenv
        self.dotenv_path = dotenv_path

    @classmethod
    def none(cls) -> _Resolver:
        """No substitution at all (values from DSNs and Python code are taken literally)."""
        return cls(None, {}, None)

    def substitute(self, where: str, text: str) -> tuple[str, list[str]]:
        """``text`` with variables replaced, and descriptions of where each one came from."""
        if self.environ is None or "$" not in text:
            return text, []
        origins: list[str] = []

        def replace(m: re.Match[str]) -> str:
            if m["escape"]:
                return "$"
            name = m["braced"] if m["braced"] is not None else m["bare"]
            if m["open"] is not None or not _VAR_NAME_RE.fullmatch(name or ""):
                raise ConfigError(
                    f"{where}: invalid variable reference {m.group(0)!r}",
                    "write $NAME or ${NAME} (letters, digits, underscores), or $$ for a "
                    "literal $",
                )
            assert self.environ is not None
            if name in self.environ:
                origins.append(f"{m.group(0)} in the environment")
                return self.environ[name]
            if name in self.dotenv:
                origins.append(f"{m.group(0)} in {self.dotenv_path}")
                return self.dotenv[name]
            raise ConfigError(
                f"{where}: {m.group(0)} is not set",
                f"add it to the environment or to {self.dotenv_path}",
            )

        # One pass: substituted text is never scanned again.
        return _VAR_RE.sub(replace, text), origins


def _keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)}


def _build(
    cls: type[Any],
    table: Mapping[str, Any],
    resolver: _Resolver,
    literal_origin: str = "",
) -> Any:
    """One settings object from one TOML table: names, presence, types, then the class's checks.

    ``literal_origin`` says where a password written without variables came from.
    """
    section = cls.section
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("key", True)}
    unknown = [key for key in table if key not in fields]
    if unknown:
        raise _unknown_error(section, unknown, list(fields))
    missing = [
        name
        for name, f in fields.items()
        if name not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"[{section}] missing required key(s): {', '.join(missing)}",
            f"add {' and '.join(f'{m} = ...' for m in missing)} to the [{section}] section",
        )

    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        where = f"[{section}] {key}"
        value, origins = resolver.substitute(where, raw) if isinstance(raw, str) else (raw, [])
        secret = fields[key].metadata.get("secret", False)
        if secret:
            register_secret(value)
            if origins:
                values["password_source"] = ", ".join(origins)
            elif isinstance(value, str) and value:
                values["password_source"] = (
                    literal_origin or f"[{section}] password in the config file"
                )
        values[key] = _coerce(where, value, hints[key], origins, raw, secret)
    return cls(**values)


def _coerce(
    where: str, value: Any, hint: Any, origins: list[str], raw: Any, secret: bool
) -> Any:
    """Check a value's type; a string that came from a variable may stand for a number/bool."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    expected = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    from_var = bool(origins) and isinstance(value, str)
    via = f" (from {raw})" if from_var else ""

    if expected is str:
        if isinstance(value, str):
            return value
    elif expected is bool:
        if isinstance(value, bool):
            return value
        if from_var and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_var:
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_var:
            try:
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if number == number and abs(number) != float("inf"):  # no NaN / inf
                    return number
    else:  # pragma: no cover - a settings class declared a type this loader does not know
        raise TypeError(f"{where}: unsupported setting type {hint!r}")

    got = _describe_value(value, secret=secret)
    fix = ""
    if isinstance(value, str) and not from_var and expected is not str:
        fix = "write it without quotes"
    elif expected is str and not isinstance(value, str):
        fix = "put the value in double quotes"
    raise ConfigError(
        f"{where}: expected {_TYPE_NAMES[expected]}, got {got}{via}",
        fix or f"set {where.split('] ')[1]} to {_TYPE_NAMES[expected]}",
    )


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
          "on": True, "off": False}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe_value(value: Any, *, secret: bool = False) -> str:
    kind = {
        str: "string", bool: "boolean", int: "integer", float: "float", list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)
    if secret:
        return f"a{'n' if kind[0] in 'aeiou' else ''} {kind}"
    shown = repr(value) if not isinstance(value, str) else '"' + value + '"'
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def _with_relative_paths(settings: ConnectionSettings, base_dir: Path) -> ConnectionSettings:
    cert = settings.sslrootcert
    # "system" is libpq's keyword for the OS trust store, not a file.
    if cert and cert != "system" and not Path(cert).is_absolute():
        return dataclasses.replace(settings, sslrootcert=str(base_dir / cert))
    return settings


def _read_mappings(table: Mapping[str, Any], resolver: _Resolver) -> dict[str, str]:
    """Flatten [mappings] and substitute variables in its values.

    A bare dotted key (public.account_move = ...) is a nested table in TOML; accept it as if
    it had been quoted, since that is what the author meant.
    """
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if isinstance(sub_value, dict):
                    raise ConfigError(
                        f"[mappings] {key}.{sub_key}: too many dots",
                        'keys are "table" or "schema.table"',
                    )
                flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value
    return {
        key: resolver.substitute(f"[mappings] {key}", value)[0] if isinstance(value, str) else value
        for key, value in flat.items()
    }


def _normalise_mappings(raw: Mapping[str, Any], dest: DestinationSettings) -> dict[str, str]:
    """Qualify both sides: a bare source is in "public", a bare destination in dest.schema."""
    result: dict[str, str] = {}
    owner: dict[str, str] = {}
    for key, value in raw.items():
        where = f"[mappings] {key}"
        if not isinstance(value, str):
            raise ConfigError(
                f"{where}: expected a string, got {_describe_value(value)}",
                'write table = "schema.table" or table = "table"',
            )
        source = _qualify(where, "source table", key, "public")
        target = _qualify(where, "destination table", value, dest.schema)
        if source in result:
            raise ConfigError(f"{where}: {source} is mapped twice", "keep one of the two lines")
        if target in owner:
            raise ConfigError(
                f"{where}: {owner[target]} and {source} both map to {target}",
                "each mirror table has exactly one source table",
            )
        if target.split(".", 1)[0] == dest.state_schema:
            raise ConfigError(
                f"{where}: {target} is in the state schema ({dest.state_schema})",
                "map tables into the mirror schema; the state schema is the replicator's own",
            )
        result[source] = target
        owner[target] = source
    return result


def _qualify(where: str, what: str, name: str, default_schema: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        parts = [default_schema, parts[0]]
    if len(parts) != 2 or not all(_IDENT_RE.fullmatch(p) for p in parts):
        raise ConfigError(
            f"{where}: {name!r} is not a valid {what} name",
            'use "table" or "schema.table" with letters, digits and underscores',
        )
    return ".".join(parts)


def _dsn_table(section: str, dsn: str) -> dict[str, Any]:
    """The settings a connection string carries, named as etl-config.toml names them."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"{section} DSN: {exc}", "pass a libpq connection string or URI"
        ) from None
    register_secret(params.get("password"))
    renames = {"dbname": "database", "host": "host", "user": "user", "password": "password",
               "sslmode": "sslmode", "sslrootcert": "sslrootcert"}
    ignored = {"application_name", "connect_timeout"}  # conninfo() sets its own
    unsupported = sorted(k for k in params if k not in renames and k not in ignored and k != "port")
    if unsupported:
        raise ConfigError(
            f"{section} DSN: unsupported parameter(s) {', '.join(unsupported)}",
            "the replicator only takes host, port, dbname, user, password, sslmode, sslrootcert",
        )
    table: dict[str, Any] = {
        "host": "", "database": "", "user": "", "password": "",
        **{renames[k]: str(v) for k, v in params.items() if k in renames},
    }
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    try:
        table["port"] = int(str(port))
    except ValueError:
        raise ConfigError(f"{section} DSN: port {port!r} is not a number", "fix the DSN") from None
    return table


# --- validation helpers ---------------------------------------------------------------------


def _check_range(
    section: str,
    key: str,
    value: float,
    minimum: float,
    maximum: float | None = None,
    *,
    exclusive_min: bool = False,
) -> None:
    too_low = value <= minimum if exclusive_min else value < minimum
    if too_low or (maximum is not None and value > maximum):
        low = f"> {minimum:g}" if exclusive_min else f">= {minimum:g}"
        bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else low
        raise ConfigError(
            f"[{section}] {key}: must be {bound}, got {value!r}", f"fix {key} in [{section}]"
        )


def _check_choice(
    section: str, key: str, value: str | None, choices: tuple[str, ...], optional: bool = False
) -> None:
    if (value is None and optional) or value in choices:
        return
    raise ConfigError(
        f"[{section}] {key}: {value!r} is not one of {', '.join(choices)}",
        _did_you_mean([str(value)], list(choices)) if isinstance(value, str) else f"fix {key}",
    )


def _check_identifier(section: str, key: str, value: str) -> None:
    if not _IDENT_RE.fullmatch(value):
        raise ConfigError(
            f"[{section}] {key}: {value!r} is not a valid schema name",
            "use letters, digits and underscores, starting with a letter, at most 63 characters",
        )


def _unknown_error(section: str, unknown: list[str], known: list[str]) -> ConfigError:
    label = f"[{section}] unknown key" if section else "unknown section"
    label += "s" if len(unknown) > 1 else ""
    hint = _did_you_mean(unknown, known)
    # A key that belongs to another section is a more useful pointer than a spelling guess.
    homes = []
    for key in unknown:
        for name, cls in _SECTIONS.items():
            if name != section and key in _keys(cls) and key not in _keys(ConnectionSettings):
                homes.append(f"{key} belongs in [{name}]")
                break
    if homes:
        hint = "; ".join(homes)
    return ConfigError(f"{label}: {', '.join(unknown)}", hint)


def _did_you_mean(unknown: list[str], known: list[str]) -> str:
    guesses = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            guesses.append(f"did you mean {close[0]!r} instead of {name!r}?")
    # A guess is enough; the full list only helps when there is none.
    return " ".join(guesses) if guesses else f"known: {', '.join(known)}"
