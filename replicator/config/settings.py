"""Settings types: what etl-config.toml describes, as frozen dataclasses that check themselves.

Each class validates its values on construction and raises a ConfigError naming
``[section] key``, what is wrong and how to fix it. Reading the file, ``$VAR`` substitution,
``.env`` and type coercion are ``config``'s job (``config.load_config``); these types know
nothing about where their values came from except ``password_source``, for hints.
Passwords are ``Secret``s, registered with ``redact.register_secret`` when a settings
object is built.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from psycopg.conninfo import make_conninfo

from ..errors import ConfigError
from ..redact import MASK, register_secret

__all__ = [
    "APPLICATION_NAME",
    "Config",
    "ConnectionSettings",
    "DestinationSettings",
    "LoggingSettings",
    "MappingOptions",
    "MetricsSettings",
    "Secret",
    "SourceSettings",
]

APPLICATION_NAME = "odoo-replicator"  # shows in pg_stat_activity / pg_stat_replication
DEFAULT_CONNECT_TIMEOUT = 10
# Every connection: a peer that stopped acknowledging (a crashed host, a cable pulled, a NAT
# entry dropped without a reset) is noticed within about 30 s, idle (keepalive probes after
# 10 s, every 5 s, 3 unanswered) or sending (tcp_user_timeout, ms). A pooler or a tunnel that
# acknowledges but forwards nothing is the watchdog's to notice (destination/watchdog.py).
# Ignored on Unix sockets.
TCP_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                 "keepalives_count": 3, "tcp_user_timeout": 30000}
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")
# [destination] on_error: what a change the mirror rejects (a constraint, a value out of range)
# does: stop the pipeline, or go to the dead-letter table while the rest is applied.
ON_ERROR = ("stop", "dead_letter")

# PostgreSQL's own rule for slot names (ReplicationSlotValidateName).
_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")
# Unquoted-identifier shape: it keeps "schema.table" unambiguous and needs no quoting rules.
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
# Role names as CREATE ROLE takes them unquoted, plus the dashes some hosted roles have.
_ROLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")

# A PostgreSQL memory setting as we pass it on: a positive number and a unit.
_MEMORY_RE = re.compile(r"[1-9][0-9]*(kB|MB|GB)")

# Field metadata: the loader sets it, it is not a key of the file / never echo its value.
_NOT_A_KEY = {"key": False}
_SECRET = {"secret": True}


class Secret:
    """A password: ``repr()`` and ``str()`` show ``***``, ``reveal()`` gives the text.

    Call ``reveal()`` only where a connection string is built, so that printing or logging a
    settings object (or ``dataclasses.asdict`` of one) never shows the password. An empty
    Secret means "no password here" and is false.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __str__(self) -> str:
        return MASK if self._value else ""

    def __repr__(self) -> str:
        return f"Secret({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value,))


@dataclass(frozen=True, kw_only=True)
class ConnectionSettings:
    """One PostgreSQL server. ``password`` is a Secret (a plain str given here is wrapped)."""

    section: ClassVar[str] = "connection"

    host: str
    port: int
    database: str
    user: str
    # Empty means "no password here": libpq then falls back to PGPASSWORD or ~/.pgpass.
    password: Secret = field(metadata=_SECRET)
    sslmode: str | None = None
    # File paths (relative ones are relative to the config file's directory): the CA that
    # signed the server's certificate, and a client certificate and its key for servers
    # that authenticate by certificate (pg_hba.conf "cert").
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    max_connections: int = 10
    # The deployment runbook's, for a connection pool the replicator does not have (it holds
    # each connection for as long as it runs): accepted, and named by `check` and `run` as
    # having no effect (Config.ignored).
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
        if isinstance(self.password, str):
            object.__setattr__(self, "password", Secret(self.password))
        s = self.section
        if self.type != "postgres":
            raise ConfigError(
                f'[{s}] type: "{self.type}" is not supported',
                'the only supported type is "postgres"',
            )
        _check_range(s, "port", self.port, 1, 65535)
        self.hosts  # noqa: B018 - parsed here, so that a bad entry is refused at load
        _check_range(s, "max_connections", self.max_connections, 1)
        _check_range(s, "idle_timeout", self.idle_timeout, 0)
        _check_range(s, "retry_timeout", self.retry_timeout, 0, exclusive_min=True)
        _check_choice(s, "sslmode", self.sslmode, SSLMODES, optional=True)
        # libpq pairs them: a certificate alone makes it look for ~/.postgresql's key, a key
        # alone is silently ignored.
        if bool(self.sslcert) != bool(self.sslkey):
            have, lack = ("sslcert", "sslkey") if self.sslcert else ("sslkey", "sslcert")
            raise ConfigError(
                f"[{s}] {have} is set but {lack} is not",
                f"a client certificate needs its private key: set both {have} and {lack} "
                f"in [{s}], or neither",
            )
        register_secret(self.password.reveal())

    def conninfo(self, **extra: Any) -> str:
        """A libpq connection string; ``extra`` adds or overrides parameters (None drops one).

        The one place connection parameters are assembled: every connection the replicator
        opens (catalog, walsender, copy workers, applier, monitor, status) goes through it,
        so each gets the same TLS settings and the same TCP liveness checks (TCP_KEEPALIVE).

        For example ``conninfo(replication="database")`` for the walsender connection.
        """
        hosts = self.hosts
        params: dict[str, Any] = {
            # Empty values are left out so libpq applies its defaults (socket, PG* variables).
            "host": ",".join(h for h, _p in hosts) or None,
            "port": ",".join(str(p) for _h, p in hosts),
            "dbname": self.database or None,
            "user": self.user or None,
            "password": self.password.reveal() or None,
            "sslmode": self.sslmode,
            "sslrootcert": self.sslrootcert,
            "sslcert": self.sslcert,
            "sslkey": self.sslkey,
            "application_name": APPLICATION_NAME,
            "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
            **TCP_KEEPALIVE,
        }
        if len(hosts) > 1:
            # libpq tries the hosts in order and keeps the first that is not a standby: the
            # primary, before and after a failover (for the walsender connection too).
            # "primary", not "read-write": that one also refuses a session read-only by
            # choice (status and verify make theirs so, and a hardened role may have
            # default_transaction_read_only), on every host.
            params["target_session_attrs"] = "primary"
        params.update(extra)
        return make_conninfo("", **params)

    @property
    def hosts(self) -> list[tuple[str, int]]:
        """(host, port) of each server ``host`` names: ``a``, ``a:5433``, ``[::1]:5433``, or
        several of them separated by commas (a primary and its standbys); ``port`` is the
        port of an entry that names none."""
        return parse_hosts(self.section, "host", self.host, self.port)

    def describe(self) -> str:
        """``user@host:port/database``: for logs and messages, never with the password."""
        where = ",".join(f"{h or 'localhost'}:{p}" for h, p in self.hosts)
        return f"{self.user}@{where}/{self.database}"


@dataclass(frozen=True, kw_only=True)
class SourceSettings(ConnectionSettings):
    """The Odoo database: a publication to read and the replication slot to read it through."""

    section: ClassVar[str] = "source"

    publication: str
    slot: str = ""  # "" means: the publication's name (what the runbook's SQL assumes)
    # Seconds between pg_logical_emit_message calls while idle (0: off), so that the slot
    # and the lag stay current on a source with no writes.
    heartbeat_interval: float = 0.0
    # Seconds without a byte from the walsender before the replication connection counts as
    # dead and is opened again (PostgreSQL's wal_receiver_timeout); a status update asking for
    # a reply goes out at half of it, so an idle but live source always answers in time.
    receive_timeout: float = 60.0
    # Ask the source to send a transaction while it runs, in chunks, once its decoded
    # changes pass logical_decoding_work_mem (protocol 2+, PostgreSQL 14+): a big
    # transaction then arrives while it runs instead of after its commit.
    streaming: bool = True
    # The walsender's logical_decoding_work_mem for our connection ("" = the server's, 64MB
    # by default): the size of a streamed chunk. Small chunks let a big transaction be applied
    # while it runs with little left for its commit, and keep memory low (the measured
    # choice: BENCHMARKS.md, "The defaults, and why").
    logical_decoding_work_mem: str = "8MB"
    # A standby of the source ("host" or "host:port"), reached with the source's user and
    # password, for `check` and `status` to say whether it holds a usable copy of the slot
    # (failover slots, PostgreSQL 17+). Only read; "" = none to ask.
    standby_host: str = ""

    @property
    def standby_hosts(self) -> list[tuple[str, int]]:
        return (parse_hosts("source", "standby_host", self.standby_host, self.port)
                if self.standby_host else [])

    def _validate(self) -> None:
        super()._validate()
        if len(self.standby_hosts) > 1:
            raise ConfigError("[source] standby_host: names one standby, not several",
                              'write one host or host:port, e.g. standby_host = "db2:5432"')
        if self.logical_decoding_work_mem and not _MEMORY_RE.fullmatch(
                self.logical_decoding_work_mem):
            raise ConfigError(
                f"[source] logical_decoding_work_mem: {self.logical_decoding_work_mem!r} is not "
                "a memory size", 'write a number with kB, MB or GB, e.g. "64MB" (at least 64kB), '
                "or leave it out to use the server's setting")
        _check_range("source", "heartbeat_interval", self.heartbeat_interval, 0)
        _check_range("source", "receive_timeout", self.receive_timeout, 0, exclusive_min=True)
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
    # Rows a batch may gather while the one before is being applied (an idle applier takes
    # what has committed at once): batches grow with the load, up to this.
    batch_size: int = 10000  # rows
    flush_interval: float = 5.0  # seconds: the longest a committed change waits
    max_memory_mb: int = 256
    # Streamed source transactions applied while they run, each in its own destination
    # transaction on its own connection (0: none; the others are applied at their commit).
    max_streams: int = 2
    copy_indexes: bool = True  # create the source's indexes on the mirror tables
    # Parallel COPY streams of an initial copy; unset: from the CPUs this process may use
    # (backfill.default_copy_workers). Never more than [source] max_connections - 2.
    copy_workers: int | None = None
    on_error: str = "stop"  # stop | dead_letter (see ON_ERROR)
    # The longest one statement of a batch may run (the server's statement_timeout, set per
    # batch); no answer STALL_GRACE seconds after that means the connection is dead.
    stall_timeout: float = 300.0
    # A batch waiting this long for a lock fails and is retried (SET LOCAL lock_timeout).
    lock_timeout: float = 30.0
    # A batch transaction left idle this long (its client gone behind a pooler) is ended by
    # the server, releasing its locks (SET LOCAL idle_in_transaction_session_timeout).
    idle_in_transaction_timeout: float = 60.0
    # Seconds a pipeline's writer may go without renewing its lease (every third of it)
    # before a second process of the same pipeline, waiting as a standby, takes over.
    lease_timeout: float = 30.0
    # Who may read the mirror (`replicator init`): the row-level security policy, SELECT on
    # the mirror tables and views, EXECUTE on its functions, the freshness view.
    analytics_roles: tuple[str, ...] = ("superset_readonly", "service_role")
    # `replicator init` installs ipai_memory and the invoice-to-memory trigger.
    memory_triggers: bool = False

    def _validate(self) -> None:
        super()._validate()
        if isinstance(self.analytics_roles, list):
            object.__setattr__(self, "analytics_roles", tuple(self.analytics_roles))
        for role in self.analytics_roles:
            if not isinstance(role, str) or not _ROLE_RE.fullmatch(role):
                raise ConfigError(
                    f"[destination] analytics_roles: {role!r} is not a valid role name",
                    'list role names as strings: analytics_roles = ["superset_readonly"]')
        if self.copy_workers is not None:
            _check_range("destination", "copy_workers", self.copy_workers, 1)
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
        _check_range("destination", "max_streams", self.max_streams, 0, 32)
        _check_choice("destination", "on_error", self.on_error, ON_ERROR)
        _check_range("destination", "lease_timeout", self.lease_timeout, 3)
        for key in ("stall_timeout", "lock_timeout", "idle_in_transaction_timeout"):
            _check_range("destination", key, getattr(self, key), 0, exclusive_min=True)
        if self.lock_timeout >= self.stall_timeout:
            raise ConfigError(
                f"[destination] lock_timeout: must be less than stall_timeout "
                f"({self.stall_timeout:g}), got {self.lock_timeout:g}",
                "a lock wait longer than stall_timeout would be taken for a dead connection: "
                "lower lock_timeout or raise stall_timeout")


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    section: ClassVar[str] = "logging"

    level: str = "info"  # debug | info | warning | error
    # auto: readable text when the output is a terminal, JSON otherwise (a container).
    format: str = "auto"  # auto | json | text
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
    # The address the metrics server listens on: only this host by default (the metrics
    # and /health carry no authentication). The container listens on every interface
    # (`run --metrics-host 0.0.0.0` in the image) for Prometheus on its network.
    host: str = "127.0.0.1"
    port: int = 9090
    path: str = "/metrics"
    # Seconds between reads of the source's slot and WAL position (and the dead letters).
    slot_poll_interval: float = 5.0

    def __post_init__(self) -> None:
        _check_range("metrics", "port", self.port, 1, 65535)
        if not self.host.strip():
            raise ConfigError("[metrics] host: must not be empty",
                              'write host = "127.0.0.1" (this host only) or "0.0.0.0" '
                              "(every interface)")
        _check_range("metrics", "slot_poll_interval", self.slot_poll_interval, 0,
                     exclusive_min=True)
        if not self.path.startswith("/"):
            raise ConfigError(
                f"[metrics] path: must start with '/', got {self.path!r}",
                f'write path = "/{self.path}"',
            )


# The keys of a table-form mapping ([mappings.res_partner]).
MAPPING_KEYS = ("target", "exclude", "filter", "soft_delete", "history")


@dataclass(frozen=True)
class MappingOptions:
    """What a table-form mapping adds to "source -> target": columns left out, a row filter
    (trusted SQL over the source's column names), soft deletes and a change history."""

    exclude: frozenset[str] = frozenset()
    filter: str | None = None
    soft_delete: bool = False
    history: bool = False


NO_OPTIONS = MappingOptions()


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything the replicator needs; build it with ``config.load_config`` or
    ``config.from_dsns``.

    ``mappings`` maps "schema.table" on the source to "schema.table" on the destination, both
    always qualified. Every table of the publication is replicated: one without a mapping
    goes to the same name in ``destination.schema``; a mapping renames it or adds options,
    it never chooses which tables are replicated (the publication does). Use ``target()``
    rather than reading it directly. A value may be
    a table (the table form: target, exclude, filter, soft_delete, history); its options end
    up in ``mapping_options`` (read them with ``options()``).
    """

    source: SourceSettings
    destination: DestinationSettings
    mappings: dict[str, str] = field(default_factory=dict)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    path: Path | None = None  # the config file; None when built from DSNs
    mapping_options: dict[str, MappingOptions] = field(default_factory=dict,
                                                       metadata=_NOT_A_KEY)
    # Keys the file sets that do nothing ("[source] idle_timeout"): said, not refused, so a
    # file written for the runbook still loads.
    ignored: tuple[str, ...] = field(default=(), metadata=_NOT_A_KEY)

    def __post_init__(self) -> None:
        targets, options = _normalise_mappings(self.mappings, self.destination)
        object.__setattr__(self, "mappings", targets)
        object.__setattr__(self, "mapping_options", options)

    def options(self, schema: str, table: str) -> MappingOptions:
        """The table-form options of a source table's mapping (none for the string form)."""
        return self.mapping_options.get(f"{schema}.{table}", NO_OPTIONS)

    def target(self, schema: str, table: str) -> tuple[str, str]:
        """Destination (schema, table) of a published source table."""
        dest = self.mappings.get(f"{schema}.{table}")
        if dest is None:
            return (self.destination.schema, table)
        dest_schema, dest_table = dest.split(".", 1)
        return (dest_schema, dest_table)

    def target_owners(self, tables: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        """Mirror tables ("schema.table") that more than one of the source tables (schema,
        table) would go to, with those tables: two schemas' tables of one name, or a
        mapping onto the name of a table that has none."""
        owners: dict[str, list[str]] = {}
        for schema, table in tables:
            owners.setdefault(".".join(self.target(schema, table)), []).append(
                f"{schema}.{table}")
        return {target: sorted(names) for target, names in owners.items() if len(names) > 1}


def _normalise_mappings(
    raw: Mapping[str, Any], dest: DestinationSettings
) -> tuple[dict[str, str], dict[str, MappingOptions]]:
    """Qualify both sides: a bare source is in "public", a bare destination in dest.schema."""
    result: dict[str, str] = {}
    owner: dict[str, str] = {}
    options: dict[str, MappingOptions] = {}
    for key, value in raw.items():
        where = f"[mappings] {key}"
        source = _qualify(where, "source table", key, "public")
        if isinstance(value, MappingOptions):
            raise ConfigError(f"{where}: expected a string or a table",
                              "see docs/configuration.md, [mappings]")
        if isinstance(value, Mapping):
            value, options[source] = _table_mapping(f"[mappings.{key}]", value, source)
            where = f"[mappings.{key}] target"
        elif not isinstance(value, str):
            raise ConfigError(
                f"{where}: expected a string, got {describe_value(value)}",
                'write table = "schema.table" or table = "table"',
            )
        target = _qualify(where, "destination table", value, dest.schema)
        if source in result:
            raise ConfigError(f"{where}: {source} is mapped twice", "keep one of the two lines")
        if target in owner:
            raise ConfigError(
                f"{where}: {owner[target]} and {source} both map to {target}",
                "each mirror table has exactly one source table",
            )
        _check_not_reserved(where, target.split(".", 1)[0])
        if target.split(".", 1)[0] == dest.state_schema:
            raise ConfigError(
                f"{where}: {target} is in the state schema ({dest.state_schema})",
                "map tables into the mirror schema; the state schema is the replicator's own",
            )
        result[source] = target
        owner[target] = source
    return result, options


def _table_mapping(where: str, table: Mapping[str, Any], source: str) -> tuple[str, MappingOptions]:
    """(target, options) of a table-form mapping; the target defaults to the source's name."""
    unknown = [k for k in table if k not in MAPPING_KEYS]
    if unknown:
        raise ConfigError(f"{where} unknown key{'s' if len(unknown) > 1 else ''}: "
                          f"{', '.join(unknown)}", did_you_mean(unknown, list(MAPPING_KEYS)))
    target = table.get("target", source.split(".", 1)[1])
    if not isinstance(target, str):
        raise ConfigError(f"{where} target: expected a string, got {describe_value(target)}",
                          'write target = "schema.table" or target = "table"')
    exclude = table.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
        raise ConfigError(f"{where} exclude: expected a list of column names, got "
                          f"{describe_value(exclude)}", 'write exclude = ["email", "phone"]')
    for col in exclude:
        if not _IDENT_RE.fullmatch(col):
            raise ConfigError(f"{where} exclude: {col!r} is not a valid column name",
                              "use the source's column names: letters, digits and underscores")
    filt = table.get("filter")
    if filt is not None and (not isinstance(filt, str) or not filt.strip()):
        raise ConfigError(f"{where} filter: expected a SQL condition as a string, got "
                          f"{describe_value(filt)}", 'write filter = "active and company_id = 1"')
    flags = {}
    for name in ("soft_delete", "history"):
        flag = table.get(name, False)
        if not isinstance(flag, bool):
            raise ConfigError(f"{where} {name}: expected true or false, got "
                              f"{describe_value(flag)}", f"write {name} = true")
        flags[name] = flag
    return target, MappingOptions(frozenset(exclude), filt, **flags)


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


def describe_value(value: Any, *, secret: bool = False) -> str:
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


# --- validation helpers ---------------------------------------------------------------------


def parse_hosts(section: str, key: str, text: str, default_port: int) -> list[tuple[str, int]]:
    """``host`` as (name, port) pairs; see ConnectionSettings.hosts."""
    if not text.strip():
        return [("", default_port)]
    out = []
    for entry in text.split(","):
        entry = entry.strip()
        name, port = entry, str(default_port)
        if entry.startswith("["):               # [IPv6]:port or [IPv6]
            name, _, rest = entry[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    name = ""
                port = rest[1:]
        elif entry.count(":") == 1:             # name:port (more colons: a bare IPv6)
            name, port = entry.split(":")
        if not name or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(
                f"[{section}] {key}: {entry!r} is not a host or host:port",
                f'write one server, or several separated by commas (a primary and its '
                f'standbys), e.g. {key} = "db1:5432,db2:5432"; [{section}] port is the port '
                f"of an entry without one")
        out.append((name, int(port)))
    return out


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
        did_you_mean([str(value)], list(choices)) if isinstance(value, str) else f"fix {key}",
    )


def _check_identifier(section: str, key: str, value: str) -> None:
    if not _IDENT_RE.fullmatch(value):
        raise ConfigError(
            f"[{section}] {key}: {value!r} is not a valid schema name",
            "use letters, digits and underscores, starting with a letter, at most 63 characters",
        )
    _check_not_reserved(f"[{section}] {key}", value)


def _check_not_reserved(where: str, schema: str) -> None:
    # PostgreSQL refuses to create a schema named pg_* (they are the system's).
    if schema.lower().startswith("pg_"):
        raise ConfigError(f"{where}: schema name {schema!r} is reserved by PostgreSQL (pg_*)",
                          "choose a schema name that does not start with pg_")


def did_you_mean(unknown: list[str], known: list[str]) -> str:
    guesses = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            guesses.append(f"did you mean {close[0]!r} instead of {name!r}?")
    # A guess is enough; the full list only helps when there is none.
    return " ".join(guesses) if guesses else f"known: {', '.join(known)}"
