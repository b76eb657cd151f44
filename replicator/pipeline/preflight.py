"""Whether a configuration can replicate: the checks `replicator check` and each session run.

Each check reads what it needs and returns what it found; a blocking problem
is raised as the usual one-line ReplicatorError, with the fix as its hint.
None of them changes anything (`run` creates a missing slot itself, after
check_slot said it may).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import psycopg

from ..classify import classify, read_grant
from ..config.settings import Config
from ..destination import access, state
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn, parse_lsn
from ..schema import (
    SourceTable,
    check_options,
    check_replicable,
    check_source_filter,
    read_table,
)
from ..source import failover
from ..source.catalog import (
    Slot,
    may_replicate,
    publication_exists,
    publication_members,
    publication_tables,
    replication_slot,
    unreadable_tables,
    wal_level,
)
from ..source.connection import ReplicationConnection, quote_literal
from ..telemetry.console import printable

log = logging.getLogger(__name__)

_LOST_HINT = ("the mirror misses changes: run `replicator resync --config PATH --all`, "
              "then `replicator run` copies every table again")


# pgoutput protocol 2 (streamed transactions) and the catalog queries need 14 on the
# source; MERGE needs 15 on the destination.
MIN_SOURCE_VERSION = 140000
MIN_DEST_VERSION = 150000


def _version_text(num: int) -> str:
    return f"{num // 10000}.{num % 10000}" if num >= 100000 else \
        f"{num // 10000}.{num // 100 % 100}"


def check_server_version(side: str, version_num: int) -> None:
    """Refuse a server older than the product supports, before anything fails obscurely."""
    least = MIN_SOURCE_VERSION if side == "source" else MIN_DEST_VERSION
    if version_num < least:
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP if side == "source" else ErrorKind.CONFIG,
            f"the {side} runs PostgreSQL {_version_text(version_num)}; odoo-replicator needs "
            f"{least // 10000} or newer there"
            + (" (MERGE)" if side == "destination" else " (pgoutput protocol 2)"),
            f"upgrade the {side} server, or point [{side}] at one running "
            f"PostgreSQL {least // 10000}+")


def check_destination_server(dest: psycopg.Connection) -> None:
    """A destination the mirror can be written to: new enough, and not a standby."""
    check_server_version("destination", dest.info.server_version)
    row = dest.execute("select pg_is_in_recovery()").fetchone()
    if row and row[0]:
        raise ReplicatorError(
            ErrorKind.CONFIG,
            f"[destination] {dest.info.host}:{dest.info.port} is a read-only standby "
            "(pg_is_in_recovery() is true)",
            "point [destination] host/port at the primary")


def discover_tables(catalog: psycopg.Connection, config: Config) -> list[SourceTable]:
    """The published tables that are replicated, read from the source catalog.

    Refuses a source older than 14, without wal_level=logical, a missing or empty
    publication, a [mappings] entry the publication lacks, a table without a key, an
    excluded key column and a filter the source cannot run.
    """
    src = config.source
    check_server_version("source", catalog.info.server_version)
    level = wal_level(catalog)
    if level != "logical":
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP, f"the source has wal_level={level}",
            "set wal_level = logical in the source's postgresql.conf and restart it")
    if not publication_exists(catalog, src.publication):
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP,
            f"publication {src.publication!r} does not exist in the source database",
            f"create it: CREATE PUBLICATION {src.publication} FOR TABLE account_move, "
            "account_move_line, res_partner, project_task, hr_expense, hr_expense_sheet")
    published = publication_tables(catalog, src.publication)
    if not published:
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP,
            f"publication {src.publication!r} has no tables: there is nothing to replicate",
            f"add them on the source: ALTER PUBLICATION {src.publication} ADD TABLE "
            "account_move, account_move_line, res_partner, ...")
    names = {f"{s}.{t}" for s, t in published}
    for source_name in config.mappings:
        if source_name not in names:
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP,
                f"[mappings] {source_name} is not in publication {src.publication!r}",
                f"add it on the source: ALTER PUBLICATION {src.publication} "
                f"ADD TABLE {source_name}; or remove the mapping")
    # Before the tables are read: their names, cast to regclass, need USAGE on the schema.
    check_read_privileges(catalog, config)
    members = publication_members(catalog, src.publication)
    for target, owners in config.target_owners(published).items():
        raise ReplicatorError(
            ErrorKind.CONFIG,
            f"{' and '.join(owners)} would both be mirrored to {target}",
            f"give one of them another name in [mappings], e.g. \"{owners[-1]}\" = "
            f"\"{target.split('.', 1)[0]}.{owners[-1].replace('.', '_')}\"")
    unnamed = [f"{s}.{t}" for s, t in published if f"{s}.{t}" not in config.mappings]
    if config.mappings and unnamed:
        # [mappings] used to choose the tables: a config written then replicates more now,
        # and says so at every start (check lists every table).
        log.warning("published tables that [mappings] does not name are replicated under "
                    "their own name", extra={
                        "tables": unnamed, "hint": "the publication chooses what is "
                        "replicated: take a table out of it to stop replicating it"})
    tables = [dataclasses.replace(read_table(catalog, s, t), membership=members.get((s, t), ""))
              for s, t in published]
    for t in tables:
        check_replicable(t)
        check_options(t, config.options(t.schema, t.name))
        check_source_filter(catalog, t, config.options(t.schema, t.name))
    return tables


def check_read_privileges(catalog: psycopg.Connection, config: Config,
                          only: Collection[str] | None = None) -> None:
    """Refuse replicated tables (of ``only``, "schema.name"s, if given) the source role
    cannot read, with the GRANT that fixes it: before a slot and a snapshot are made for a
    copy that would be refused."""
    missing = [row for row in unreadable_tables(catalog, config.source.publication)
               if only is None or f"{row[0]}.{row[1]}" in only]
    if not missing:
        return
    role = catalog.info.user
    schemas = sorted({s for s, _t, usage, _select in missing if not usage})
    selects = [(s, t) for s, t, _usage, select in missing if not select]
    names = ", ".join(f"{s}.{t}" for s, t, _u, _s in missing)
    raise ReplicatorError(
        ErrorKind.SOURCE_SETUP,
        f"[source] role {role} may not read {names}"
        + (f" (no usage on schema {', '.join(schemas)})" if schemas else "")
        + ": the initial copy and verify read them",
        "run on the source as the owner: " + read_grant(role, selects, schemas))


def check_slot(catalog: psycopg.Connection, slot: str, applied: int | None,
               synced: list[str] | None = None) -> Slot | None:
    """The replication slot, or None when it does not exist and may be created.

    ``applied`` is the position the mirror has applied (None: nothing yet) and
    ``synced`` the tables whose mirror holds rows the stream must continue from.
    A slot gone or invalidated while either says the mirror relies on it is
    refused: a new slot would start after a gap. An invalidated slot nothing
    relies on (every table is about to be copied, as after `resync --all`) is
    returned for the caller to drop and create again. A slot of another plugin
    or database, or ahead of the mirror, is refused.
    """
    found = replication_slot(catalog, slot)
    relied_on = applied is not None or bool(synced)
    where = (f"synced up to {format_lsn(applied)}" if applied is not None
             else f"holding copied tables ({', '.join(sorted(synced or [])[:3])}"
                  f"{', ...' if len(synced or []) > 3 else ''})")
    if found is None:
        if relied_on:
            raise ReplicatorError(
                ErrorKind.RESYNC_REQUIRED,
                f"slot {slot!r} no longer exists on the source but the mirror was {where}: "
                "changes made since may be lost",
                _LOST_HINT)
        return None
    check_slot_owner(found, slot, catalog.info.dbname)
    if found.invalidated and relied_on:
        raise ReplicatorError(
            ErrorKind.RESYNC_REQUIRED,
            f"slot {slot!r} was invalidated by the source ({found.why_invalidated()}) while "
            f"the mirror was {where}: the changes since are gone from the source's WAL",
            _LOST_HINT + "; to keep it from happening again raise max_slot_wal_keep_size "
            "(or idle_replication_slot_timeout) and alert on etl_slot_wal_status")
    if applied is not None and found.confirmed is not None \
            and parse_lsn(found.confirmed) > applied:
        raise ReplicatorError(
            ErrorKind.RESYNC_REQUIRED,
            f"slot {slot!r} has confirmed {found.confirmed} but the mirror only applied "
            f"{format_lsn(applied)} (restored or failed-over destination?)",
            _LOST_HINT)
    return found


def check_timeline(repl: ReplicationConnection, timeline: int, recorded: int | None,
                   applied: int | None) -> None:
    """Refuse to resume after a failover of the source that lost what the mirror applied.

    A promoted standby starts a new timeline, forked from the old one at the end of the WAL
    it had received. Transactions the mirror applied past that point were never on the new
    primary (the replicator was sent them before the standby had them: no
    synchronized_standby_slots): the mirror has rows its source does not. ``applied`` is
    how far the mirror reflects the source (the applied position, or a later copy's
    snapshot), ``recorded`` the timeline it was read on (None: not known yet, nothing to
    compare). A position only moved by keepalives past the fork is refused too: nothing
    tells it apart from one moved by transactions.
    """
    if recorded is None or applied is None or recorded == timeline:
        return
    if recorded > timeline:
        raise ReplicatorError(
            ErrorKind.RESYNC_REQUIRED,
            f"the source is on timeline {timeline}, older than the timeline {recorded} the "
            "mirror was synced on (restored from a backup?)", _LOST_HINT)
    forks = repl.timeline_history(timeline)
    if recorded not in forks:
        raise ReplicatorError(
            ErrorKind.RESYNC_REQUIRED,
            f"the source's timeline {timeline} does not descend from timeline {recorded}, the "
            "one the mirror was synced on", _LOST_HINT)
    fork = forks[recorded]
    if applied > fork:
        raise ReplicatorError(
            ErrorKind.RESYNC_REQUIRED,
            f"the source failed over: its timeline {timeline} forked from timeline {recorded} "
            f"at {format_lsn(fork)}, but the mirror is past it (at {format_lsn(applied)}): "
            "what the source committed in between may be in the mirror and is lost at the "
            "source",
            _LOST_HINT + "; to keep it from happening again set synchronized_standby_slots on "
            "the primary (`replicator check` says how)")
    log.info("the source failed over: resuming on its new timeline, from before the fork",
             extra={"timeline": timeline, "forked_from": recorded, "fork_lsn": format_lsn(fork),
                    "applied_lsn": format_lsn(applied)})


def check_slot_owner(found: Slot, slot: str, database: str) -> None:
    """Refuse a slot this pipeline cannot stream from: a physical one, another database's,
    or another output plugin's (pg_replication_slots.plugin and .database)."""
    fix = (f"set [source] slot to another name, or, if nothing uses that slot, drop it on "
           f"the source: select pg_drop_replication_slot({quote_literal(slot)})")
    if found.database != database:
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP,
            f"[source] slot {slot} belongs to "
            + (f"database {found.database}" if found.database else "no database (physical)")
            + f", not to {database}, which [source] database names", fix)
    if found.plugin != "pgoutput":
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP,
            f"[source] slot {slot} decodes with plugin {found.plugin}, not pgoutput", fix)


def check_replication_role(catalog: psycopg.Connection, user: str) -> None:
    """Refuse a source user without REPLICATION (and not a superuser)."""
    if not may_replicate(catalog):
        user = user or catalog.info.user  # empty in the config: libpq's default (PGUSER)
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP, f"[source] role {user} lacks the REPLICATION attribute",
            f"run on the source as an administrator: alter role {user} replication")


def check_destination(dest: psycopg.Connection, config: Config) -> int | None:
    """The position the mirror has applied (None: nothing yet); refuses a user who cannot
    create the mirror's schemas."""
    dst = config.destination
    check_destination_server(dest)
    row = dest.execute("select has_database_privilege(current_user, "
                       "current_database(), 'create')").fetchone()
    if not (row and row[0]):
        raise ReplicatorError(
            ErrorKind.SOURCE_SETUP,
            f"destination user {dst.user!r} cannot create schemas in {dst.database!r}",
            f"run on the destination: GRANT CREATE ON DATABASE {dst.database} TO {dst.user}")
    row = dest.execute("select to_regclass(%s) is not null",
                       [f"{dst.state_schema}.pipelines"]).fetchone()
    if not (row and row[0]):
        return None
    return state.applied_lsn(dest, dst.state_schema, config.source.slot)


def check(config: Config) -> int:
    """`replicator check`: can this configuration replicate? Changes nothing.

    Prints one line per finding; raises the first blocking problem as the
    usual one-line error, so the exit code says what kind it is.
    """
    src, dst = config.source, config.destination
    try:
        catalog = psycopg.connect(src.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=src) from None
    with catalog:
        tables = discover_tables(catalog, config)
        check_replication_role(catalog, src.user)
        # Only whether it exists: whether the mirror can resume from it is run's to judge,
        # against the applied position.
        slot = replication_slot(catalog, src.slot)
        if slot is not None:
            check_slot_owner(slot, src.slot, catalog.info.dbname)
        binary = all(c.builtin for t in tables for c in t.columns)
        # Names from the source catalog: printable() keeps their control characters from
        # reaching the terminal.
        print(printable(
            f"source OK: wal_level=logical, publication {src.publication} with "
            f"{len(tables)} replicated table(s), {'binary' if binary else 'text'} mode; slot "
            + (f"{src.slot} exists ({'active' if slot.active else 'inactive'})" if slot
               else f"{src.slot} will be created")))
        for t in tables:
            print(printable(f"  {t.qualname:40} key ({', '.join(t.key)}) -> "
                            f"{'.'.join(config.target(t.schema, t.name))}"))
        ready = failover.readiness(catalog, src)
        print(printable(f"failover: {ready.summary}"))
        for line in ready.findings:
            print(printable(f"failover WARNING: {line}"))
    try:
        dest = psycopg.connect(dst.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=dst) from None
    with dest:
        applied = check_destination(dest, config)
        print(printable(
            f"destination OK: mirror schema {dst.schema}, state schema {dst.state_schema}; "
            + (f"applied up to {format_lsn(applied)}" if applied is not None
               else "nothing replicated yet (the first run copies the existing rows)")))
        # Not blocking replication, but not the mirror's access model either: said, one
        # line each (init revokes the privileges, a trigger is for the operator to judge).
        targets = [config.target(t.schema, t.name) for t in tables]
        schemas = sorted({dst.schema, *(target[0] for target in targets)})
        for line in access.findings(dest, schemas,
                                    access.existing_roles(dest, dst.analytics_roles)):
            print(printable(f"destination WARNING: {line}"))
    return 0
