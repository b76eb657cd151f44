"""Error kinds, their retry policy and operator hints, and secret redaction.

Every failure that reaches an operator passes through here, so that "what went wrong, where,
and what do I do about it" is decided in one place instead of in each module's except clause.
Modules raise ``ReplicatorError(kind, message, hint)`` for failures they understand and call
``classify(exc, side=...)`` on the ones they do not (psycopg errors, socket errors).

Redaction lives here too because errors and logs are the two ways a secret could escape.
"""

from __future__ import annotations

import enum
import random
import re
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

import psycopg

__all__ = [
    "ConfigError",
    "ErrorKind",
    "ExitCode",
    "ReplicatorError",
    "Retries",
    "RetryPolicy",
    "classify",
    "classify_connect",
    "connect_sqlstate",
    "is_connect_failure",
    "clear_secrets",
    "redact",
    "register_secret",
]


class ExitCode(enum.IntEnum):
    """Process exit codes; scripts and supervisors branch on these."""

    OK = 0
    INTERNAL = 1  # a bug in the replicator
    FATAL = 2  # the operator must change something: config, source setup, a resync
    UNAVAILABLE = 3  # a database stayed unreachable
    FAILED = 4  # applying or decoding kept failing on the same data
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


@dataclass(frozen=True)
class RetryPolicy:
    """How the runtime reacts to one kind of error.

    ``max_attempts`` counts consecutive failures (reset after progress); ``None`` retries for
    ever, which is right for a daemon waiting for a database to come back.
    """

    retryable: bool
    exit_code: ExitCode
    initial_delay: float = 1.0
    max_delay: float = 60.0
    max_attempts: int | None = None

    def should_retry(self, failures: int) -> bool:
        """True if another attempt is allowed after ``failures`` consecutive failures."""
        if not self.retryable:
            return False
        return self.max_attempts is None or failures < self.max_attempts

    def delay(self, failures: int, *, jitter: bool = True) -> float:
        """Seconds to wait after ``failures`` (>= 1) consecutive failures.

        Exponential, capped at ``max_delay``. Jitter keeps several replicators (or the
        source and destination loops) from reconnecting in lock step after an outage.
        """
        exponent = min(max(failures, 1) - 1, 30)  # 2**30 s is far past any cap
        seconds = min(self.max_delay, self.initial_delay * 2**exponent)
        return random.uniform(seconds / 2, seconds) if jitter else seconds


class ErrorKind(enum.Enum):
    CONFIG = "config"
    SOURCE_CONNECT = "source_connect"
    SOURCE_SETUP = "source_setup"
    DESTINATION_CONNECT = "destination_connect"
    DESTINATION_APPLY = "destination_apply"
    PROTOCOL = "protocol"
    RESYNC_REQUIRED = "resync_required"
    INTERNAL = "internal"

    @property
    def policy(self) -> RetryPolicy:
        return _POLICIES[self]

    @property
    def retryable(self) -> bool:
        return _POLICIES[self].retryable

    @property
    def exit_code(self) -> ExitCode:
        return _POLICIES[self].exit_code

    @property
    def default_hint(self) -> str:
        return _DEFAULT_HINTS[self]


_FATAL = RetryPolicy(retryable=False, exit_code=ExitCode.FATAL)
# Databases restart, poolers fail over, VPNs drop: a daemon waits for them indefinitely
# (`run --until-caught-up` gives up after [source]/[destination] retry_timeout instead).
_WAIT = RetryPolicy(True, ExitCode.UNAVAILABLE, 1.0, 60.0, None)

# kind -> (retry policy, what the operator should do). Attempts count failures of one kind in
# a row: they start again from 1 (a retry within about a second) after progress.
_TABLE: dict[ErrorKind, tuple[RetryPolicy, str]] = {
    ErrorKind.CONFIG: (
        _FATAL,
        "fix etl-config.toml or .env, then run `replicator check --config PATH`",
    ),
    ErrorKind.SOURCE_SETUP: (
        _FATAL,
        "fix the source database setup (wal_level = logical, the publication, replication "
        "privileges); `replicator check` lists what is missing",
    ),
    ErrorKind.RESYNC_REQUIRED: (
        _FATAL,
        "the mirror cannot continue from its stored position: drop the replication slot and the "
        "mirror's state, then run again to copy the tables afresh",
    ),
    ErrorKind.SOURCE_CONNECT: (
        _WAIT,
        "check that the Odoo database is running and reachable from this host "
        "([source] host and port)",
    ),
    ErrorKind.DESTINATION_CONNECT: (
        _WAIT,
        "check that the Supabase database is reachable from this host ([destination] host and "
        "port)",
    ),
    # A batch is replayed from the last applied LSN; if the same data keeps failing, looping
    # for ever only hides it, so give up after a few tries in a row and say so.
    ErrorKind.DESTINATION_APPLY: (
        RetryPolicy(True, ExitCode.FAILED, 1.0, 60.0, 5),
        "the batch is retried from the last applied position; if it keeps failing, compare the "
        "mirror table with the source table and look at the dead letters in the state schema",
    ),
    ErrorKind.PROTOCOL: (
        RetryPolicy(True, ExitCode.FAILED, 1.0, 60.0, 3),
        "the replication stream could not be decoded; it is re-read from the last applied "
        "position. If this persists, report it with the log",
    ),
    ErrorKind.INTERNAL: (
        RetryPolicy(retryable=False, exit_code=ExitCode.INTERNAL),
        "this is a bug in odoo-replicator: please report it with the log",
    ),
}
_POLICIES = {kind: policy for kind, (policy, _hint) in _TABLE.items()}
_DEFAULT_HINTS = {kind: hint for kind, (_policy, hint) in _TABLE.items()}


class Retries:
    """Failures in a row, per error kind, since the last progress.

    Each kind counts on its own, so weeks of occasional reconnects do not use up the few
    attempts an apply error gets, and a reconnect after progress waits about a second, not
    the backoff cap. ``progress(connected=True)`` (a session reached streaming) resets only
    the connection kinds: it proves the servers are reachable, but not that the batch or
    message that failed last time gets through; ``progress()`` (the applied position moved)
    resets every kind.
    """

    _CONNECT = (ErrorKind.SOURCE_CONNECT, ErrorKind.DESTINATION_CONNECT)

    def __init__(self) -> None:
        self._failures: dict[ErrorKind, int] = {}
        self._since: dict[ErrorKind, float] = {}

    def failed(self, kind: ErrorKind, now: float) -> int:
        """Record a failure; returns how many of this kind came in a row (1 after progress)."""
        self._failures[kind] = self._failures.get(kind, 0) + 1
        self._since.setdefault(kind, now)
        return self._failures[kind]

    def failing_for(self, kind: ErrorKind, now: float) -> float:
        """Seconds since the first of this kind's failures in a row."""
        return now - self._since.get(kind, now)

    def progress(self, *, connected: bool = False) -> None:
        for kind in self._CONNECT if connected else list(self._failures):
            self._failures.pop(kind, None)
            self._since.pop(kind, None)


class ReplicatorError(Exception):
    """A failure an operator can act on: ``message`` says what and where, ``hint`` what to do.

    Both are redacted on construction, so the exception can be logged or printed anywhere.
    """

    def __init__(self, kind: ErrorKind, message: str, hint: str | None = None) -> None:
        self.kind = kind
        self.message = redact(message)
        self.hint = redact(kind.default_hint if hint is None else hint)
        super().__init__(self.message)

    @property
    def policy(self) -> RetryPolicy:
        return self.kind.policy

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    @property
    def exit_code(self) -> ExitCode:
        return self.kind.exit_code

    def one_line(self) -> str:
        """``message — hint`` on a single line (server errors often carry DETAIL lines)."""
        text = f"{self.message} — {self.hint}" if self.hint else self.message
        return " ".join(text.split())

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.name}, {self.message!r}, hint={self.hint!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickling replays self.args into __init__, which does not match our
        # signature; rebuild explicitly so errors survive multiprocessing and copy.
        return (_rebuild, (type(self), self.kind, self.message, self.hint))


class ConfigError(ReplicatorError):
    """The configuration (etl-config.toml, .env, command line) is wrong. Exit code 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(ErrorKind.CONFIG, message, hint)


def _rebuild(cls: type[ReplicatorError], kind: ErrorKind, message: str, hint: str) -> Any:
    err = cls.__new__(cls)
    ReplicatorError.__init__(err, kind, message, hint)
    return err


# --- redaction ------------------------------------------------------------------------------

_MASK = "***"

# conninfo keyword form (password=secret, password = 'se cret'), a TOML line
# (password = "x"), and a URI query (?password=x&...)
_KV_PASSWORD = re.compile(
    r"""(?P<key>\bpassword\s*=\s*)(?P<val>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&'"]+)""",
    re.IGNORECASE,
)
# dict or JSON form: 'password': 'x' / "password": "x"
_DICT_PASSWORD = re.compile(
    r"""(?P<key>['"]password['"]\s*:\s*)(?P<q>['"])(?:(?!(?P=q))[^\\]|\\.)*(?P=q)""",
    re.IGNORECASE,
)
# URI userinfo: postgresql://user:secret@host
_URI_PASSWORD = re.compile(r"(?P<key>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<val>[^@\s/]+)(?=@)")

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None


def register_secret(value: object) -> None:
    """Make ``redact`` mask ``value`` (and its URL-encoded forms) wherever it appears.

    A secret shorter than 8 characters is masked only where it stands alone (not inside a
    longer word): masking every "odoo" in "odoo_core", or every "x", would make logs and
    error lines unreadable, and inside a longer word a short string gives nothing away.
    ``password=...`` in conninfo strings and URIs is masked whatever its length.
    """
    global _secrets_re
    if value is None or value == "":
        return
    value = str(value)  # a TOML password written as a number is still a secret
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    with _secrets_lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(map(_secret_pattern, ordered)))


_WORD = r"[A-Za-z0-9_]"
_SHORT_SECRET = 8


def _secret_pattern(secret: str) -> str:
    if len(secret) >= _SHORT_SECRET:
        return re.escape(secret)
    return rf"(?<!{_WORD}){re.escape(secret)}(?!{_WORD})"


def clear_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secrets_re
    with _secrets_lock:
        _secrets.clear()
        _secrets_re = None


def redact(text: str) -> str:
    """``text`` with passwords in conninfo strings and URIs and all registered secrets masked."""
    if not text:
        return text
    text = _KV_PASSWORD.sub(rf"\g<key>{_MASK}", text)
    text = _DICT_PASSWORD.sub(rf"\g<key>\g<q>{_MASK}\g<q>", text)
    text = _URI_PASSWORD.sub(rf"\g<key>{_MASK}", text)
    pattern = _secrets_re  # one read: register_secret may swap it concurrently
    if pattern is not None:
        text = pattern.sub(_MASK, text)
    return text


# --- classification -------------------------------------------------------------------------

_SIDES = ("source", "destination")


@dataclass(frozen=True)
class _Where:
    side: str | None
    settings: Any

    @property
    def section(self) -> str:
        return f"[{self.side}]" if self.side else "the connection's"

    def attr(self, name: str, default: str = "") -> str:
        value = getattr(self.settings, name, None)
        return default if value in (None, "") else str(value)

    def password_hint(self) -> str:
        origin = self.attr("password_source")
        if origin:
            hint = f"the password comes from {origin}: check it there"
        else:
            hint = (
                f"check the variable that {self.section} password names, in .env beside the "
                "config file or in the environment"
            )
        hint += " (a variable set in the environment overrides .env)"
        if self.side == "destination":
            hint += (
                ". Use the Supabase *database* password (Project Settings > Database), "
                "not SUPABASE_SERVICE_ROLE_KEY, which is an API key"
            )
        return hint


def _connect_kind(where: _Where) -> ErrorKind:
    if where.side == "destination":
        return ErrorKind.DESTINATION_CONNECT
    return ErrorKind.SOURCE_CONNECT


def _first_line(exc: BaseException) -> str:
    """psycopg's connection message, minus libpq's boilerplate, on one line."""
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    line = re.sub(r"^connection failed:\s*", "", line)
    line = re.sub(r"\b(FATAL|ERROR):\s+", "", line)
    return " ".join(line.split())


# (pattern on the lower-cased message, handler(where, text) -> (kind, hint)).
# Order matters: the first match wins, and specific causes precede generic ones.
def _rules() -> list[tuple[re.Pattern[str], Any]]:
    def r(pattern: str) -> re.Pattern[str]:
        return re.compile(pattern)

    def auth(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, w.password_hint()

    def no_password(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, (
            f"the server wants a password but {w.section} password is empty; "
            "set it (for example password = \"$ODOO_DB_PASSWORD\") and define the variable in .env"
        )

    def pooler_tenant(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, (
            f"through the Supabase pooler the user is postgres.<project-ref>: check {w.section} "
            "user and host"
        )

    def no_role(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, f"check {w.section} user"

    def no_database(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, f"check {w.section} database (list databases with psql -l)"

    def hba(w: _Where, text: str) -> tuple[ErrorKind, str]:
        kind = ErrorKind.SOURCE_SETUP if w.side == "source" else ErrorKind.CONFIG
        return kind, (
            "the server's pg_hba.conf does not admit this host/user/database"
            + (" for replication connections" if "replication" in text else "")
            + ": add a matching line (for replication use database 'replication' on PostgreSQL "
            "< 16 with host-based rules) and reload the server"
        )

    def no_ssl(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, (
            f'the server has no TLS: set {w.section} sslmode = "disable" or "prefer", '
            "or enable ssl on the server"
        )

    def bad_cert(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, (
            f"the server certificate did not verify: point {w.section} sslrootcert at the CA "
            "certificate, or use sslmode = \"require\" to encrypt without verifying"
        )

    def replication_role(w: _Where, text: str) -> tuple[ErrorKind, str]:
        user = w.attr("user", "<user>")
        return ErrorKind.SOURCE_SETUP, (
            f"the source user needs the REPLICATION attribute: ALTER ROLE {user} WITH REPLICATION;"
        )

    def wal_level(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.SOURCE_SETUP, (
            "set wal_level = logical (and max_replication_slots, max_wal_senders >= 10) in the "
            "source's postgresql.conf and restart PostgreSQL"
        )

    def no_publication(w: _Where, text: str) -> tuple[ErrorKind, str]:
        pub = w.attr("publication", "<publication>")
        return ErrorKind.SOURCE_SETUP, (
            f"create it on the source: CREATE PUBLICATION {pub} FOR TABLE account_move, ...; "
            "or fix [source] publication"
        )

    def slot_lost(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.RESYNC_REQUIRED, (
            "the replication slot is gone or invalidated, so changes since the last applied "
            "position are lost: run `replicator resync --config PATH --all`, then run again "
            "to copy every table"
        )

    def slots_full(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.SOURCE_SETUP, (
            "raise max_replication_slots on the source, or drop unused slots "
            "(SELECT slot_name FROM pg_replication_slots WHERE NOT active)"
        )

    def slot_busy(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.SOURCE_CONNECT, (
            "another process is using the replication slot (a second replicator, or an old "
            "connection the server has not noticed is dead yet)"
        )

    def senders_full(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.SOURCE_CONNECT, (
            "the source has no free WAL sender: raise max_wal_senders or stop idle replication "
            "clients"
        )

    def too_many(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return _connect_kind(w), (
            f"the server is out of connection slots: lower {w.section} max_connections, use the "
            "pooler (port 6543 on Supabase), or raise max_connections on the server"
        )

    def server_not_ready(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return _connect_kind(w), "the server is starting, stopping or in recovery: wait for it"

    def dns(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return _connect_kind(w), f"check {w.section} host (the name does not resolve)"

    def refused(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return _connect_kind(w), (
            f"is PostgreSQL running and listening on that address? check {w.section} host and "
            "port"
        )

    def timeout(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return _connect_kind(w), (
            f"no answer from {w.section} host: check firewalls, the VPN or SSH tunnel, and host "
            "and port"
        )

    def lost(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return _connect_kind(w), (
            "the connection dropped (network, server restart, or a proxy's idle timeout); "
            "work resumes from the last applied position"
        )

    def read_only(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, f"{w.section} points at a read-only standby: use the primary"

    def permission(w: _Where, text: str) -> tuple[ErrorKind, str]:
        user = w.attr("user", "<user>")
        if w.side == "destination":
            return ErrorKind.CONFIG, (
                f"grant the destination user what it needs: GRANT USAGE, CREATE ON SCHEMA "
                f"<schema> TO {user}; and ownership or ALL on the mirror tables"
            )
        return ErrorKind.SOURCE_SETUP, (
            f"grant read access on the published tables: GRANT SELECT ON ... TO {user};"
        )

    def bad_user(w: _Where, text: str) -> tuple[ErrorKind, str]:
        return ErrorKind.CONFIG, (
            f"check {w.section} user, and that the server's pg_hba.conf admits it to that "
            "database from this host"
        )

    by_sqlstate = {
        "3D000": no_database,  # invalid_catalog_name
        "28000": bad_user,  # invalid_authorization_specification: no such role, pg_hba.conf
        "28P01": auth,  # invalid_password
        "25006": read_only,  # read_only_sql_transaction
        "42501": permission,  # insufficient_privilege
        "53300": too_many,  # too_many_connections (also: no free WAL sender)
        "53400": slots_full,  # configuration_limit_exceeded (max_replication_slots)
        "55006": slot_busy,  # object_in_use: the slot is active for another process
        "57P01": server_not_ready,  # admin_shutdown (also pg_terminate_backend)
        "57P02": server_not_ready,  # crash_shutdown
        "57P03": server_not_ready,  # cannot_connect_now
    }
    rules = [
        (r(r"password authentication failed|authentication failed for user"), auth),
        (r(r"no password supplied"), no_password),
        (r(r"tenant or user not found"), pooler_tenant),
        (r(r'role "[^"]*" does not exist'), no_role),
        (r(r'database "[^"]*" does not exist'), no_database),
        (r(r"pg_hba\.conf"), hba),
        (r(r"server does not support ssl"), no_ssl),
        (r(r"certificate verify failed|root certificate file .* does not exist"), bad_cert),
        (r(r"must be superuser or replication role|permission denied to start wal sender|"
           r"must have the replication attribute|permission denied to (use|create) replication"),
         replication_role),
        (r(r"wal_level"), wal_level),
        (r(r'publication "[^"]*" does not exist'), no_publication),
        (r(r'replication slot "[^"]*" does not exist|can no longer get changes from replication'
           r' slot|slot has been invalidated'), slot_lost),
        (r(r"all replication slots are in use"), slots_full),
        (r(r'replication slot "[^"]*" is active'), slot_busy),
        (r(r"number of requested standby connections exceeds|max_wal_senders"), senders_full),
        (r(r"too many clients|too many connections|remaining connection slots are reserved"),
         too_many),
        (r(r"the database system is (starting up|shutting down|in recovery|not yet accepting)|"
           r"terminating connection due to administrator command|cannot connect now"),
         server_not_ready),
        (r(r"could not translate host name|failed to resolve host|name or service not known|"
           r"temporary failure in name resolution|nodename nor servname"), dns),
        (r(r"connection refused"), refused),
        (r(r"timeout expired|timed out"), timeout),
        (r(r"server closed the connection|connection is lost|connection is closed|"
           r"could not receive data|could not send data|ssl syscall error|eof detected|"
           r"consuming input failed|connection reset|broken pipe|server conn crashed"), lost),
        (r(r"read-only transaction"), read_only),
        (r(r"permission denied|must be owner of"), permission),
    ]
    return rules, by_sqlstate


# Message rules are English; the kind comes from the SQLSTATE whenever there is one (servers
# translate messages per lc_messages, never codes), and the rules then only pick a more
# specific hint. Without a SQLSTATE (client-side failures: connection refused, host not found,
# timeouts, TLS) the rules decide.
_RULES, _BY_SQLSTATE = _rules()

# SQLSTATE classes that mean "the source is not set up the way we need" (syntax/access rules,
# insufficient resources, object not in prerequisite state) rather than a replicator bug.
_SOURCE_SETUP_CLASSES = ("42", "53", "55")


def classify(
    exc: BaseException,
    *,
    side: str | None = None,
    settings: Any = None,
    sqlstate: str | None = None,
) -> ReplicatorError:
    """Turn any exception into a ReplicatorError with a kind and an operator hint.

    ``side`` is "source" or "destination" (defaults to ``settings.section`` when ``settings``,
    a ``config.ConnectionSettings``, is given); it picks SOURCE_* or DESTINATION_* kinds and
    names the config section in hints. ``settings`` adds the user, publication and where the
    password came from. ``sqlstate`` stands in for an exception that carries none (a failed
    connect: see ``classify_connect``). The SQLSTATE decides the kind; message text only
    where there is none. A ReplicatorError is returned unchanged; the original exception
    becomes ``__cause__`` of a new one, so tracebacks still show it.
    """
    if isinstance(exc, ReplicatorError):
        return exc
    if side is None and settings is not None:
        side = getattr(settings, "section", None)
    if side not in (None, *_SIDES):
        raise ValueError(f"side must be 'source', 'destination' or None, not {side!r}")
    where = _Where(side, settings)
    if sqlstate is None and isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
    err = _classify(exc, where, sqlstate)
    err.__cause__ = exc
    return err


def classify_connect(
    exc: BaseException, conninfo: str, *, side: str | None = None, settings: Any = None
) -> ReplicatorError:
    """``classify`` for an exception from connecting with ``conninfo``.

    psycopg raises a refused connection without its SQLSTATE (libpq keeps the server's
    error fields to itself during startup), so when the server answered with an error, this
    connects once more asking libpq for verbose errors, which carry the code. A missing
    database, an unknown role or a wrong password are then setup errors to fix, not
    connection errors to wait out, whatever language the server speaks.
    """
    sqlstate = getattr(exc, "sqlstate", None) if isinstance(exc, psycopg.Error) else None
    if sqlstate is None and isinstance(exc, psycopg.OperationalError) \
            and _SERVER_ERROR.search(str(exc)):
        sqlstate = connect_sqlstate(conninfo)
    return classify(exc, side=side, settings=settings, sqlstate=sqlstate)


def is_connect_failure(exc: BaseException | None) -> bool:
    """True for psycopg's exception from connect() (not from a connection that later broke)."""
    return isinstance(exc, psycopg.OperationalError) and str(exc).startswith(
        ("connection failed:", "connection is bad:", "failed to resolve host"))


# libpq prints a server's error as "SEVERITY:  message" (two spaces, whatever the language);
# its own messages ("Connection refused", "fe_sendauth: no password supplied") never do.
_SERVER_ERROR = re.compile(r"\S:  \S")
# With verbose errors: "FATAL:  3D000: database "x" does not exist".
_VERBOSE_SQLSTATE = re.compile(r"\S:  ([0-9A-Z]{5}): ")
_PQERRORS_VERBOSE = 2


def connect_sqlstate(conninfo: str, timeout: float = 10.0) -> str | None:
    """The SQLSTATE with which the server refuses a connection, or None if it does not say.

    Only with psycopg's pure-Python libpq binding (what this project installs): the
    verbosity must be set on the connection before the server's answer arrives, which
    psycopg offers no call for, so it goes through the same libpq via ctypes.
    """
    from psycopg import pq

    if pq.__impl__ != "python":
        return None  # a bundled libpq that ctypes cannot reach safely
    import ctypes
    import select
    import time

    from psycopg.pq import _pq_ctypes

    set_verbosity = _pq_ctypes.pq.PQsetErrorVerbosity
    set_verbosity.argtypes = [ctypes.c_void_p, ctypes.c_int]
    set_verbosity.restype = ctypes.c_int
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        if pgconn.status == pq.ConnStatus.BAD:
            return None
        set_verbosity(pgconn.pgconn_ptr, _PQERRORS_VERBOSE)
        # PQconnectPoll does not apply connect_timeout: bound the wait here.
        deadline = time.monotonic() + timeout
        status = pq.PollingStatus.WRITING
        while status in (pq.PollingStatus.READING, pq.PollingStatus.WRITING):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            fd = pgconn.socket  # may change between polls (several hosts, TLS retry)
            if status == pq.PollingStatus.READING:
                select.select([fd], [], [], remaining)
            else:
                select.select([], [fd], [], remaining)
            status = pgconn.connect_poll()
        if status == pq.PollingStatus.OK:
            return None
        found = _VERBOSE_SQLSTATE.search(pgconn.error_message.decode("utf-8", "replace"))
        return found.group(1) if found else None
    except (OSError, psycopg.Error):
        return None
    finally:
        pgconn.finish()


def _match_rule(exc: BaseException, where: _Where) -> tuple[ErrorKind, str] | None:
    text = str(exc)
    lowered = text.lower()
    for pattern, handler in _RULES:
        if pattern.search(lowered):
            return handler(where, text)
    return None


def _kind_by_class(sqlstate: str, where: _Where, exc: BaseException) -> ErrorKind:
    if sqlstate.startswith("08"):  # connection_exception
        return _connect_kind(where)
    if where.side == "destination":
        # The server rejected a statement: the batch is retried, then reported.
        return ErrorKind.DESTINATION_APPLY
    if where.side == "source":
        if sqlstate[:2] in _SOURCE_SETUP_CLASSES:
            return ErrorKind.SOURCE_SETUP
        # Any other walsender error ends the stream; reconnecting resumes it.
        return ErrorKind.SOURCE_CONNECT
    if isinstance(exc, psycopg.OperationalError):
        return _connect_kind(where)
    return ErrorKind.INTERNAL


def _error(kind: ErrorKind, message: str, hint: str | None) -> ReplicatorError:
    if kind is ErrorKind.CONFIG:
        return ConfigError(message, hint)
    return ReplicatorError(kind, message, hint)


def _classify(exc: BaseException, where: _Where, sqlstate: str | None) -> ReplicatorError:
    prefix = f"[{where.side}] " if where.side else ""
    message = prefix + _first_line(exc)
    matched = _match_rule(exc, where) if isinstance(exc, psycopg.Error | OSError) else None
    if sqlstate:
        handler = _BY_SQLSTATE.get(sqlstate)
        if handler is not None:
            kind, hint = handler(where, str(exc))
        else:
            kind, hint = _kind_by_class(sqlstate, where, exc), None
        if matched is not None and matched[0].retryable == kind.retryable:
            # Same policy, and an English message names the cause more exactly.
            kind, hint = matched
        if kind is ErrorKind.INTERNAL:
            message = f"{prefix}unexpected {type(exc).__name__}: {_first_line(exc)}"
        return _error(kind, message, hint)
    if matched is not None:
        return _error(matched[0], message, matched[1])
    if isinstance(exc, psycopg.OperationalError | ConnectionError | TimeoutError):
        return ReplicatorError(_connect_kind(where), message, None)
    # psycopg errors without a SQLSTATE are client-side misuse; everything else is a bug too.
    return ReplicatorError(
        ErrorKind.INTERNAL, f"{prefix}unexpected {type(exc).__name__}: {_first_line(exc)}", None
    )
