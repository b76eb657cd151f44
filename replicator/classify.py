"""Turning an exception (psycopg, socket, anything) into a ReplicatorError with a hint.

The SQLSTATE decides the kind: ``exc.sqlstate`` (``diag.sqlstate``) for an error the server
sent on an open connection, ``connect_sqlstate`` for a refused connection (psycopg does not
pass that code on). Servers translate messages per ``lc_messages``, never codes.

Message rules (English) have two jobs only:

- Without a SQLSTATE, that is a failure on the client side (connection refused, host not
  found, timeouts, TLS, a dropped connection, libpq's own "no password supplied"), or a
  server's refusal whose code could not be fetched, the first matching rule decides.
- With a SQLSTATE, a rule may only narrow the cause among those PostgreSQL reports under that
  same code (``codes`` of the rule, e.g. 55000 is both "wal_level too low" and "slot
  invalidated"), and only to a kind with the same retry behaviour as the code's.

Kinds, policies and default hints are in ``errors``; this module only picks among them.
"""

from __future__ import annotations

import re
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from . import libpq
from .errors import ConfigError, ErrorKind, ReplicatorError

__all__ = ["classify", "classify_connect", "connect_sqlstate", "is_connect_failure", "read_grant",
           "setup_error"]

_SIDES = ("source", "destination")


@dataclass(frozen=True)
class _Where:
    side: str | None
    settings: Any
    role: str | None = None  # the role the server refused, when the caller knows it
    table: tuple[str, str] | None = None  # (schema, name) of the table the statement read

    @property
    def section(self) -> str:
        return f"[{self.side}]" if self.side else "the connection's"

    def attr(self, name: str, default: str = "") -> str:
        value = getattr(self.settings, name, None)
        return default if value in (None, "") else str(value)

    @property
    def user(self) -> str:
        return self.role or self.attr("user", "<user>")

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


# --- hints per cause ---------------------------------------------------------------------


def _auth(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, w.password_hint()


def _no_password(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, (
        f"the server wants a password but {w.section} password is empty; "
        "set it (for example password = \"$ODOO_DB_PASSWORD\") and define the variable in .env"
    )


def _pooler_tenant(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, (
        f"through the Supabase pooler the user is postgres.<project-ref>: check {w.section} "
        "user and host"
    )


def _no_role(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, f"check {w.section} user"


def _no_database(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, f"check {w.section} database (list databases with psql -l)"


# 'no pg_hba.conf entry for host "10.0.0.5", user "replicator", database "odoo", SSL off'
# (and "pg_hba.conf rejects connection for host ..."): what a line must match.
_HBA_FIELDS = re.compile(r'host "(?P<host>[^"]*)", user "(?P<user>[^"]*)", '
                         r'database "(?P<database>[^"]*)"')


def _hba(w: _Where, text: str) -> tuple[ErrorKind, str]:
    kind = ErrorKind.SOURCE_SETUP if w.side == "source" else ErrorKind.CONFIG
    found = _HBA_FIELDS.search(text)
    user = found["user"] if found else w.user
    database = found["database"] if found else w.attr("database", "<database>")
    client = found["host"] if found else "<client address>"
    if client == "[local]":  # a Unix socket
        line = f"local {database} {user} scram-sha-256"
    else:
        mask = ("/128" if ":" in client else "/32") if found else ""
        line = f"host {database} {user} {client}{mask} scram-sha-256"
    where = " above the line that rejects it" if "rejects" in text else ""
    hint = (f"the server's pg_hba.conf does not admit {user} to database {database} from "
            f"this host: add the line `{line}`{where}, then reload the server "
            "(select pg_reload_conf())")
    if w.side != "destination":
        # Logical replication (replication=database) matches pg_hba.conf by database name
        # like any connection; the "replication" keyword is for physical replication only.
        hint += (". The replication connection matches that line too (logical replication "
                 "goes by the database name): no `replication` line is needed, and one would "
                 "admit physical replication, a copy of the whole cluster with pg_basebackup")
    return kind, hint


def _no_ssl(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, (
        f"{w.section} sslmode asks for TLS but the server does not offer it: turn it on in "
        "the server's postgresql.conf (ssl = on, with ssl_cert_file and ssl_key_file) and "
        "reload it; connecting without TLS would send the password and the data in clear"
    )


def _bad_cert(w: _Where, text: str) -> tuple[ErrorKind, str]:
    root = w.attr("sslrootcert")
    trusted = f"{w.section} sslrootcert ({root})" if root else \
        f"libpq's default CA file (~/.postgresql/root.crt: {w.section} sslrootcert is not set)"
    supabase = (" (for Supabase: the certificate from the dashboard, Database Settings > SSL "
                "Configuration > Download certificate)" if w.side == "destination" else "")
    return ErrorKind.CONFIG, (
        f"the server certificate could not be verified against {trusted}: point "
        f"{w.section} sslrootcert at the CA certificate that signed the server's{supabase}"
    )


def _cert_host(w: _Where, text: str) -> tuple[ErrorKind, str]:
    named = re.search(r'server certificate for "([^"]*)"', text)
    name = f' ("{named.group(1)}")' if named else ""
    return ErrorKind.CONFIG, (
        f"the server certificate was not issued for {w.section} host: set {w.section} host "
        f"to a name it is for{name}, or have the certificate reissued with this host in its "
        "subjectAltName"
    )


def _client_key(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, (
        f"check {w.section} sslcert and sslkey: both files must exist and be readable, and the "
        "key must be owned by the user running the replicator with mode 0600 (chmod 600)"
    )


def _client_cert_refused(w: _Where, text: str) -> tuple[ErrorKind, str]:
    user = w.attr("user", "<user>")
    return ErrorKind.CONFIG, (
        f"the server authenticates {user} by client certificate: set {w.section} sslcert and "
        f"sslkey to a certificate signed by the server's CA (ssl_ca_file) whose CN is {user}"
    )


def _replication_role(w: _Where, text: str) -> tuple[ErrorKind, str]:
    user = w.attr("user", "<user>")
    return ErrorKind.SOURCE_SETUP, (
        f"the source user needs the REPLICATION attribute: ALTER ROLE {user} WITH REPLICATION;"
    )


def _wal_level(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.SOURCE_SETUP, (
        "set wal_level = logical (and max_replication_slots, max_wal_senders >= 10) in the "
        "source's postgresql.conf and restart PostgreSQL"
    )


def _no_publication(w: _Where, text: str) -> tuple[ErrorKind, str]:
    pub = w.attr("publication", "<publication>")
    return ErrorKind.SOURCE_SETUP, (
        f"create it on the source: CREATE PUBLICATION {pub} FOR TABLE account_move, ...; "
        "or fix [source] publication"
    )


def _slot_lost(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.RESYNC_REQUIRED, (
        "the replication slot is gone or invalidated, so changes since the last applied "
        "position are lost: run `replicator resync --config PATH --all`, then run again "
        "to copy every table"
    )


def _slots_full(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.SOURCE_SETUP, (
        "raise max_replication_slots on the source, or drop unused slots "
        "(SELECT slot_name FROM pg_replication_slots WHERE NOT active)"
    )


def _slot_busy(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.SOURCE_CONNECT, (
        "another process is using the replication slot (a second replicator, or an old "
        "connection the server has not noticed is dead yet)"
    )


def _senders_full(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.SOURCE_CONNECT, (
        "the source has no free WAL sender: raise max_wal_senders or stop idle replication "
        "clients"
    )


def _too_many(w: _Where, text: str) -> tuple[ErrorKind, str]:
    # Only [source] max_connections bounds what the replicator opens (its copy workers).
    lower = "lower [source] max_connections, " if w.section == "[source]" else ""
    return _connect_kind(w), (
        f"the server is out of connection slots: {lower}use the pooler (port 6543 on "
        "Supabase), or raise max_connections on the server"
    )


def _server_not_ready(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return _connect_kind(w), "the server is starting, stopping or in recovery: wait for it"


def _dns(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return _connect_kind(w), f"check {w.section} host (the name does not resolve)"


def _refused(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return _connect_kind(w), (
        f"is PostgreSQL running and listening on that address? check {w.section} host and "
        "port"
    )


def _timeout(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return _connect_kind(w), (
        f"no answer from {w.section} host: check firewalls, the VPN or SSH tunnel, and host "
        "and port"
    )


def _lost(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return _connect_kind(w), (
        "the connection dropped (network, server restart, or a proxy's idle timeout); "
        "work resumes from the last applied position"
    )


def _read_only(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, f"{w.section} points at a read-only standby: use the primary"


def read_grant(role: str, tables: Sequence[tuple[str, str]] = (),
               schemas: Sequence[str] = ()) -> str:
    """The statements that let ``role`` read ``tables`` ((schema, name) pairs) and look
    into ``schemas``, for a hint: lower-case, every name quoted."""
    grantee = sql.Identifier(role).as_string()
    stmts = []
    if schemas:
        stmts.append(f"grant usage on schema "
                     f"{', '.join(sql.Identifier(s).as_string() for s in schemas)} to {grantee}")
    if tables:
        stmts.append(f"grant select on table "
                     f"{', '.join(sql.Identifier(*t).as_string() for t in tables)} to {grantee}")
    return "; ".join(stmts)


def _permission(w: _Where, text: str) -> tuple[ErrorKind, str]:
    user = w.user
    if w.side == "source" and w.table is not None:
        # 42501 for a statement reading one table: its SELECT, or USAGE on its schema.
        if "for schema" in text:
            return ErrorKind.SOURCE_SETUP, (
                "run on the source as the schema's owner: "
                + read_grant(user, schemas=[w.table[0]]))
        return ErrorKind.SOURCE_SETUP, (
            "run on the source as the table's owner: " + read_grant(user, tables=[w.table]))
    if w.side == "destination" and "for database" in text:
        database = w.attr("database", "<database>")
        return ErrorKind.CONFIG, (
            f"the replicator creates its schemas itself: run on the destination "
            f"GRANT CREATE ON DATABASE {database} TO {user}"
        )
    if w.side == "destination" and w.table is not None:
        table, grantee = sql.Identifier(*w.table).as_string(), sql.Identifier(user).as_string()
        if "must be owner" in text:
            return ErrorKind.CONFIG, (
                "the replicator alters the mirror tables it writes: run on the destination "
                f"as an administrator: alter table {table} owner to {grantee}")
        return ErrorKind.CONFIG, (
            f"run on the destination as the table's owner: grant all on table {table} "
            f"to {grantee}")
    if w.side == "destination":
        return ErrorKind.CONFIG, (
            f"grant the destination user what it needs: GRANT USAGE, CREATE ON SCHEMA "
            f"<schema> TO {user}; and ownership or ALL on the mirror tables"
        )
    if w.side == "source":
        return ErrorKind.SOURCE_SETUP, (
            f"{user} needs SELECT on every replicated table and USAGE on its schema: "
            "`replicator check` prints the GRANT to run on the source")
    # Whose refusal it is was not said: still a grant to make, never an outage to wait out.
    return ErrorKind.SOURCE_SETUP, (
        "grant the privilege the message names to the role that lacks it; for the source, "
        "`replicator check` prints the GRANT to run")


def _bad_user(w: _Where, text: str) -> tuple[ErrorKind, str]:
    return ErrorKind.CONFIG, (
        f"check {w.section} user, and that the server's pg_hba.conf admits it to that "
        "database from this host"
    )


# --- the tables -----------------------------------------------------------------------------

# SQLSTATE -> handler(where, text) -> (kind, hint), for codes that mean one thing to us.
_BY_SQLSTATE = {
    "3D000": _no_database,  # invalid_catalog_name
    "28000": _bad_user,  # invalid_authorization_specification: no such role, pg_hba.conf
    "28P01": _auth,  # invalid_password
    "25006": _read_only,  # read_only_sql_transaction
    "42501": _permission,  # insufficient_privilege
    "53300": _too_many,  # too_many_connections (also: no free WAL sender)
    "53400": _slots_full,  # configuration_limit_exceeded (max_replication_slots)
    "55006": _slot_busy,  # object_in_use: the slot is active for another process
    "57P01": _server_not_ready,  # admin_shutdown (also pg_terminate_backend)
    "57P02": _server_not_ready,  # crash_shutdown
    "57P03": _server_not_ready,  # cannot_connect_now
}

# Codes that mean the same setup error in any statement, whatever the caller was doing.
_SETUP_SQLSTATES = frozenset({"42501"})  # insufficient_privilege

_CLIENT_SIDE: tuple[str, ...] = ()  # libpq/OS messages: there is no SQLSTATE to go by


@dataclass(frozen=True)
class _Rule:
    """A message pattern (on the lower-cased text) and the codes the server sends it with.

    ``codes`` are SQLSTATEs or two-character classes; empty for client-side messages.
    """

    pattern: re.Pattern[str]
    handler: Any
    codes: tuple[str, ...]

    def admits(self, sqlstate: str | None) -> bool:
        return sqlstate is None or sqlstate in self.codes or sqlstate[:2] in self.codes


def _rule(pattern: str, handler: Any, codes: tuple[str, ...]) -> _Rule:
    return _Rule(re.compile(pattern), handler, codes)


# Order matters: the first admitted match wins, and specific causes precede generic ones.
_RULES = [
    # Before the password rule, whose pattern "authentication failed for user" it contains.
    _rule(r"certificate authentication failed|connection requires a valid client certificate",
          _client_cert_refused, ("28000",)),
    # 28P01 for password/md5/scram; peer, ident, PAM... failures come as 28000.
    _rule(r"password authentication failed|authentication failed for user", _auth,
          ("28P01", "28000")),
    _rule(r"no password supplied", _no_password, _CLIENT_SIDE),  # libpq's fe_sendauth
    # The Supabase pooler (Supavisor), not PostgreSQL: its own codes.
    _rule(r"tenant or user not found", _pooler_tenant, ("28000", "XX000")),
    _rule(r'role "[^"]*" does not exist', _no_role, ("28000", "42704")),
    _rule(r'database "[^"]*" does not exist', _no_database, ("3D000",)),
    _rule(r"pg_hba\.conf", _hba, ("28000",)),
    _rule(r"server does not support ssl", _no_ssl, _CLIENT_SIDE),
    _rule(r"certificate verify failed|root certificate file .* does not exist", _bad_cert,
          _CLIENT_SIDE),
    _rule(r"server certificate for .* does not match host name", _cert_host, _CLIENT_SIDE),
    _rule(r"certificate present, but not private key|private key file .* has group or world "
          r"access|could not (load|open|read) (private key|certificate) file", _client_key,
          _CLIENT_SIDE),
    _rule(r"must be superuser or replication role|permission denied to start wal sender|"
          r"must have the replication attribute|permission denied to (use|create) replication",
          _replication_role, ("42501",)),
    _rule(r"wal_level", _wal_level, ("55000",)),
    _rule(r'publication "[^"]*" does not exist', _no_publication, ("42704",)),
    # A missing slot is 42704 (undefined_object), an invalidated one 55000.
    _rule(r'replication slot "[^"]*" does not exist|can no longer get changes from replication'
          r' slot|slot has been invalidated', _slot_lost, ("42704", "55000")),
    _rule(r"all replication slots are in use", _slots_full, ("53400",)),
    _rule(r'replication slot "[^"]*" is active', _slot_busy, ("55006",)),
    _rule(r"number of requested standby connections exceeds|max_wal_senders", _senders_full,
          ("53300",)),
    _rule(r"too many clients|too many connections|remaining connection slots are reserved",
          _too_many, ("53300",)),
    _rule(r"the database system is (starting up|shutting down|in recovery|not yet accepting)|"
          r"terminating connection due to administrator command|cannot connect now",
          _server_not_ready, ("57P01", "57P02", "57P03")),
    _rule(r"could not translate host name|failed to resolve host|name or service not known|"
          r"temporary failure in name resolution|nodename nor servname", _dns, _CLIENT_SIDE),
    _rule(r"connection refused", _refused, _CLIENT_SIDE),
    _rule(r"timeout expired|timed out", _timeout, _CLIENT_SIDE),
    # Mostly libpq's; a pooler reports a dropped server connection as class 08 ("server conn
    # crashed?" from PgBouncer).
    _rule(r"server closed the connection|connection is lost|connection is closed|"
          r"could not receive data|could not send data|ssl syscall error|eof detected|"
          r"consuming input failed|connection reset|broken pipe|server conn crashed", _lost,
          ("08",)),
    _rule(r"read-only transaction", _read_only, ("25006",)),
    _rule(r"permission denied|must be owner of", _permission, ("42501",)),
]

# SQLSTATE classes that mean "the source is not set up the way we need" (syntax/access rules,
# insufficient resources, object not in prerequisite state) rather than a replicator bug.
_SOURCE_SETUP_CLASSES = ("42", "53", "55")


# --- classification -------------------------------------------------------------------------


def classify(
    exc: BaseException,
    *,
    side: str | None = None,
    settings: Any = None,
    sqlstate: str | None = None,
    role: str | None = None,
    table: tuple[str, str] | None = None,
) -> ReplicatorError:
    """Turn any exception into a ReplicatorError with a kind and an operator hint.

    ``side`` is "source" or "destination" (defaults to ``settings.section`` when ``settings``,
    a ``config.ConnectionSettings``, is given); it picks SOURCE_* or DESTINATION_* kinds and
    names the config section in hints. ``settings`` adds the user, publication and where the
    password came from. ``sqlstate`` stands in for an exception that carries none (a failed
    connect: see ``classify_connect``). ``role`` (the connected role) and ``table``
    ((schema, name) the failed statement read) make a missing grant's hint the exact GRANT.
    The SQLSTATE decides the kind; message text only where there is none. A
    ReplicatorError is returned unchanged; the original exception becomes ``__cause__`` of a
    new one, so tracebacks still show it.
    """
    if isinstance(exc, ReplicatorError):
        return exc
    if side is None and settings is not None:
        side = getattr(settings, "section", None)
    if side not in (None, *_SIDES):
        raise ValueError(f"side must be 'source', 'destination' or None, not {side!r}")
    where = _Where(side, settings, role, table)
    if sqlstate is None and isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
    err = _classify(exc, where, sqlstate)
    err.__cause__ = exc
    return err


def setup_error(
    exc: psycopg.Error,
    *,
    side: str,
    settings: Any = None,
    role: str | None = None,
    table: tuple[str, str] | None = None,
) -> ReplicatorError | None:
    """The error ``exc``'s SQLSTATE makes it when that code means a setup that no retry can
    fix (insufficient_privilege: a missing grant), else None.

    For callers that wrap a failed statement in a kind of their own (a batch's
    DESTINATION_APPLY, a copy's SOURCE_CONNECT), so that what such a code means stays
    decided here and a missing grant is neither waited out nor retried as bad data.
    """
    if exc.sqlstate not in _SETUP_SQLSTATES:
        return None
    err = classify(exc, side=side, settings=settings, role=role, table=table)
    return None if err.retryable else err


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


def connection_lost(exc: BaseException, side: str, doing: str = "",
                    hint: str = "the replicator reconnects and resumes from the last durable "
                    "position") -> ReplicatorError:
    """A connection that broke under a statement (not a refused connect): a connect kind,
    retried after reconnecting. ``doing``: what it was doing, as "while ..." or "after ..."."""
    kind = ErrorKind.SOURCE_CONNECT if side == "source" else ErrorKind.DESTINATION_CONNECT
    return ReplicatorError(kind, f"{side} connection lost{' ' + doing if doing else ''}: {exc}",
                           hint)


def is_connect_failure(exc: BaseException | None) -> bool:
    """True for psycopg's exception from connect() (not from a connection that later broke)."""
    return isinstance(exc, psycopg.OperationalError) and str(exc).startswith(
        ("connection failed:", "connection is bad:", "failed to resolve host"))


# libpq prints a server's error as "SEVERITY:  message" (two spaces, whatever the language);
# its own messages ("Connection refused", "fe_sendauth: no password supplied") never do.
_SERVER_ERROR = re.compile(r"\S:  \S")
# With verbose errors: "FATAL:  3D000: database "x" does not exist".
_VERBOSE_SQLSTATE = re.compile(r"\S:  ([0-9A-Z]{5}): ")


def connect_sqlstate(conninfo: str, timeout: float = 10.0) -> str | None:
    """The SQLSTATE with which the server refuses a connection, or None if it does not say.

    Only with psycopg's pure-Python libpq binding (what this project installs): the
    verbosity must be set on the connection before the server's answer arrives, which
    psycopg offers no call for (libpq.py reaches it).
    """
    if not libpq.reachable():
        return None  # a bundled libpq that ctypes cannot reach safely
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        if pgconn.status == pq.ConnStatus.BAD:
            return None
        libpq.set_error_verbosity(pgconn, libpq.PQERRORS_VERBOSE)
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


def _match_rule(
    exc: BaseException, where: _Where, sqlstate: str | None
) -> tuple[ErrorKind, str] | None:
    """The first rule that matches the message and may speak for ``sqlstate``."""
    text = str(exc)
    lowered = text.lower()
    for rule in _RULES:
        if rule.admits(sqlstate) and rule.pattern.search(lowered):
            return rule.handler(where, text)
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
    sqlstate = sqlstate or None
    matched = (
        _match_rule(exc, where, sqlstate) if isinstance(exc, psycopg.Error | OSError) else None
    )
    if sqlstate:
        handler = _BY_SQLSTATE.get(sqlstate)
        if handler is not None:
            kind, hint = handler(where, str(exc))
        else:
            kind, hint = _kind_by_class(sqlstate, where, exc), None
        if matched is not None and matched[0].retryable == kind.retryable:
            # A cause PostgreSQL reports under this same code, with the same policy: the
            # message names it more exactly.
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
