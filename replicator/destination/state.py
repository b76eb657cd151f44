"""The state schema in the destination: applied LSN, table sync state, column identities,
dead letters.

It sits outside the mirror schema (analysts never see it) and is written in
the same transaction as the data it describes. Its tables are defined by the
versioned files in replicator/sql/state/, applied by setup().
"""

from __future__ import annotations

import importlib.resources
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from ..errors import ConfigError, ErrorKind, ReplicatorError
from ..lsn import format_lsn, parse_lsn

if TYPE_CHECKING:  # schema.py does not import state.py, but the type is all this needs
    from ..schema import MirrorTable

# The state schema's versions: replicator/sql/state/NNN_name.sql, run in NNN order,
# each once per state schema. A file is never edited once released (deployments
# recorded it as run): a change to the state tables is a new file.
MIGRATIONS = ("sql", "state")
_MIGRATION_NAME = re.compile(r"(\d+)_(\w+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str    # SQL with {state} for the schema's name (literal braces doubled)


def migrations(parts: tuple[str, ...] = MIGRATIONS) -> list[Migration]:
    """The packaged migration files (of the state schema by default), in version order."""
    folder = importlib.resources.files("replicator").joinpath(*parts)
    found = []
    for entry in folder.iterdir():
        m = _MIGRATION_NAME.fullmatch(entry.name)
        if m:
            found.append(Migration(int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mg: mg.version)
    versions = [mg.version for mg in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two state migrations share a version in {folder}: {versions}")
    return found


def setup(conn: psycopg.Connection, state_schema: str,
          files: list[Migration] | None = None) -> list[int]:
    """Bring the state schema up to date; returns the versions it ran now.

    Every migration not yet recorded in <state>.schema_migrations runs, in
    version order, in a transaction of its own that also records it: a file
    that fails leaves the ones before it applied and itself not at all, and
    the next start retries it. A second call runs nothing. A schema created
    before the versions existed (its tables there, no schema_migrations) gets
    001 recorded without change, as 001 is all "if not exists". Replicators
    starting together take turns on an advisory lock per state schema.
    files: the migrations (tests); by default the packaged ones.
    """
    schema = sql.Identifier(state_schema)
    ran = []
    with conn.transaction():
        _lock(conn, state_schema)
        conn.execute(sql.SQL("create schema if not exists {}").format(schema))
        conn.execute(sql.SQL(
            "create table if not exists {}.schema_migrations (version int primary key, "
            "name text not null, applied_at timestamptz not null default now())").format(schema))
    for mg in migrations() if files is None else files:
        try:
            with conn.transaction():
                _lock(conn, state_schema)
                done = conn.execute(sql.SQL(
                    "select 1 from {}.schema_migrations where version = %s").format(schema),
                    [mg.version]).fetchone()
                if done:
                    continue
                # An ALTER waiting for a table a running replicator holds (a long streamed
                # transaction, during a rolling update) would queue that replicator's own
                # next statements on the table behind it, lease renewals included: it gives
                # up instead, and the caller tries again later.
                conn.execute("select set_config('lock_timeout', %s, true)",
                             [MIGRATION_LOCK_TIMEOUT])
                # One execute for the whole file (several statements): no parameters,
                # so psycopg sends it as a simple query; never prepared.
                conn.execute(sql.SQL(mg.text).format(state=schema), prepare=False)
                conn.execute(sql.SQL(
                    "insert into {}.schema_migrations (version, name) values (%s, %s)")
                    .format(schema), [mg.version, mg.name])
        except psycopg.errors.LockNotAvailable:
            raise ReplicatorError(
                ErrorKind.DESTINATION_CONNECT,
                f"[destination] cannot upgrade the state schema {state_schema!r} "
                f"({mg.version:03d}_{mg.name}): a table it alters stayed in use for "
                f"{MIGRATION_LOCK_TIMEOUT} (by a running replicator's transaction)",
                "nothing was changed; the upgrade runs once that transaction ends "
                "(`run` retries by itself)") from None
        ran.append(mg.version)
    return ran


# Other components' versions: replicator/sql/<component>/NNN_name.sql, numbered
# from 001 per component and recorded in <state>.component_migrations by
# (component, version), apart from the state schema's own schema_migrations, so
# that neither sequence can take a number the other needs. Components: the
# freshness table `run` writes (freshness), the mirror's views and functions
# (mirror) and the AI memory schema and trigger (memory), the last two applied
# by `replicator init`. Their files see {state} and the names passed as
# identifiers ({mirror}).
COMPONENTS = ("freshness", "mirror", "memory")


# How long a state migration waits for a table's lock before it gives up (and is retried).
MIGRATION_LOCK_TIMEOUT = "5s"
MIGRATION_ATTEMPTS = 5      # a migration file rolled back by a deadlock with a batch runs again


def setup_component(conn: psycopg.Connection, state_schema: str, component: str,
                    names: dict[str, str] | None = None,
                    files: list[Migration] | None = None) -> list[int]:
    """Run the component's migrations not yet recorded; returns the versions it ran now.

    Each file runs in a transaction of its own that records it, under the
    state schema's advisory lock (as setup()). The state schema must exist
    (setup() first). names: placeholder -> identifier, for the files' text.
    """
    assert component in COMPONENTS, component
    schema = sql.Identifier(state_schema)
    idents = {k: sql.Identifier(v) for k, v in (names or {}).items()}
    ran = []
    with conn.transaction():
        _lock(conn, state_schema)
        conn.execute(sql.SQL(
            "create table if not exists {}.component_migrations (component text not null, "
            "version int not null, name text not null, "
            "applied_at timestamptz not null default now(), "
            "primary key (component, version))").format(schema))
    for mg in migrations(("sql", component)) if files is None else files:
        for attempt in range(MIGRATION_ATTEMPTS):
            try:
                with conn.transaction():
                    _lock(conn, state_schema)
                    done = conn.execute(sql.SQL(
                        "select 1 from {}.component_migrations "
                        "where component = %s and version = %s")
                        .format(schema), [component, mg.version]).fetchone()
                    if not done:
                        conn.execute(sql.SQL(mg.text).format(state=schema, **idents),
                                     prepare=False)
                        conn.execute(sql.SQL(
                            "insert into {}.component_migrations (component, version, name) "
                            "values (%s, %s, %s)").format(schema),
                            [component, mg.version, mg.name])
                        ran.append(mg.version)
                break
            except psycopg.errors.DeadlockDetected:
                # A file that locks several mirror tables (a trigger, views) while `run`
                # merges into them: the server rolled this one back; the batch goes on,
                # and the file runs again once it is done.
                if attempt == MIGRATION_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    return ran


def _lock(conn: psycopg.Connection, state_schema: str) -> None:
    # Until the transaction ends: two starts must not both create the schema
    # or both run a file.
    conn.execute("select pg_advisory_xact_lock(hashtextextended(%s, 0))",
                 [f"replicator state schema {state_schema}"])


def applied_lsn(conn: psycopg.Connection, state_schema: str, slot: str) -> int | None:
    row = conn.execute(
        sql.SQL("select applied_lsn::text from {}.pipelines where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return parse_lsn(row[0]) if row else None


@dataclass(frozen=True)
class SourceServer:
    """The server the applied position is read from: its system identifier (the same on a
    primary and its standbys) and its timeline (a new one after each promotion)."""
    system_id: str
    timeline: int


def record_applied(cur: psycopg.Cursor, state_schema: str, slot: str, lsn: int,
                   source: SourceServer | None = None) -> None:
    """Inside the batch's transaction: the batch and its position commit together."""
    cur.execute(
        sql.SQL(
            "insert into {}.pipelines as p (slot, applied_lsn, source_system_id, "
            "source_timeline) values (%s, %s::pg_lsn, %s, %s) on conflict (slot) do update set "
            # Never backwards: a batch holding only table-sync steps carries the
            # position the receiver last heard of, which may trail what another
            # batch already stored; a lower value would make the slot look ahead
            # of the mirror at the next start.
            "applied_lsn = greatest(p.applied_lsn, excluded.applied_lsn), "
            "source_system_id = coalesce(excluded.source_system_id, p.source_system_id), "
            "source_timeline = coalesce(excluded.source_timeline, p.source_timeline), "
            "updated_at = now()"
        ).format(sql.Identifier(state_schema)),
        [slot, format_lsn(lsn), source.system_id if source else None,
         source.timeline if source else None],
    )


def lock_pipeline(conn: psycopg.Connection, state_schema: str, slot: str) -> int | None:
    """The applied LSN, with the pipeline's row locked until the transaction ends (None:
    no row yet).

    The applier writes this row first in every batch transaction: while the lock is
    held no batch commits (the one in flight finishes first), so the mirror stays as of
    the LSN returned, without stopping `run`. `dead-letters --retry` and
    `verify --repair` serialise with the stream this way.
    """
    row = conn.execute(
        sql.SQL("select applied_lsn::text from {}.pipelines where slot = %s for update").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return parse_lsn(row[0]) if row else None
def record_commit_times(cur: psycopg.Cursor, state_schema: str, slot: str,
                       source_tables: list[str], commit_ts: int) -> None:
    """Inside the batch's transaction: the source commit time (microseconds since
    2000-01-01, as pgoutput sends it) of the batch's last transaction, for the tables it
    changed. One statement per batch: the freshness view reads it."""
    cur.execute(
        sql.SQL(
            "insert into {}.commit_times as c (slot, source_table, last_commit_at) "
            "select %s, t, timestamptz '2000-01-01 00:00:00+00' + %s * interval '1 microsecond' "
            "from unnest(%s::text[]) t on conflict (slot, source_table) do update set "
            "last_commit_at = greatest(c.last_commit_at, excluded.last_commit_at)"
        ).format(sql.Identifier(state_schema)),
        [slot, commit_ts, source_tables],
    )


def pipeline_row(conn: psycopg.Connection, state_schema: str,
                 slot: str) -> tuple[int, Any] | None:
    """(applied LSN, updated_at) of the slot's pipeline, or None when never run."""
    row = conn.execute(
        sql.SQL("select applied_lsn::text, updated_at from {}.pipelines where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return None if row is None else (parse_lsn(row[0]), row[1])


def dead_letter_count(conn: psycopg.Connection, state_schema: str, slot: str) -> int:
    row = conn.execute(
        sql.SQL("select count(*) from {}.dead_letters where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return int(row[0]) if row else 0


def lettered_tables(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], state_schema: str,
                    slot: str) -> set[str]:
    """Mirror tables with retryable dead letters (conn: a connection or a cursor)."""
    cur = conn.execute(
        sql.SQL("select distinct mirror_table from {}.dead_letters where slot = %s "
                "and op is not null").format(sql.Identifier(state_schema)), [slot])
    return {r[0] for r in cur.fetchall()}


def exists(conn: psycopg.Connection, state_schema: str) -> bool:
    """Whether the state schema's tables are there (read-only callers must not create them)."""
    names = [sql.Identifier(state_schema, t).as_string(conn)
             for t in ("pipelines", "tables", "dead_letters")]
    row = conn.execute("select bool_and(to_regclass(n) is not null) from unnest(%s::text[]) n",
                       [names]).fetchone()
    return bool(row and row[0])


def system_id(conn: psycopg.Connection, state_schema: str, slot: str) -> str | None:
    row = conn.execute(
        sql.SQL("select source_system_id from {}.pipelines where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return row[0] if row else None


def source_timeline(conn: psycopg.Connection, state_schema: str, slot: str) -> int | None:
    """The source timeline of the applied position (None: not run, or not recorded yet)."""
    row = conn.execute(
        sql.SQL("select source_timeline from {}.pipelines where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return row[0] if row else None


# -- per-table sync state ---------------------------------------------------
#
# pending:   known, to be copied (a new table, or a resync was asked for)
# copying:   the initial copy runs; sync_lsn is its snapshot's LSN
# copied:    rows and indexes are in; the stream takes over from sync_lsn
#            (only a copy made before streaming starts stops here: a copy made
#            while the stream runs goes from copying to streaming in the one
#            transaction that merges the changes held during it)
# streaming: the stream applies its changes
# removed:   no longer replicated (left the publication or the mappings); the
#            mirror keeps its rows, and a table that comes back is copied again
#
# A table is copied again unless its state is copied or streaming for the
# mirror table it is mapped to now, from the same source table and publication
# membership (source_identity): a table dropped and created again, or dropped
# from the publication and added back, while the replicator was stopped or
# between two of its polls, may have changes the stream never sent.

PENDING, COPYING, COPIED, STREAMING, REMOVED = (
    "pending", "copying", "copied", "streaming", "removed")


def set_table(conn: psycopg.Connection[Any] | psycopg.Cursor[Any],
              state_schema: str, slot: str, table: MirrorTable, table_state: str,
              sync_lsn: int | None = None, rows: int | None = None) -> None:
    """Record a table's sync state (conn: a connection or a cursor).

    Also the source identity of the table as this session knows it (its
    membership), which a start and the running poll compare with the source's.
    """
    conn.execute(
        sql.SQL(
            "insert into {}.tables as t (slot, source_table, mirror_table, state, sync_lsn, "
            "rows_copied, source_identity) values (%s, %s, %s, %s, %s::pg_lsn, coalesce(%s, 0), "
            "%s) on conflict (slot, source_table) do update set state = excluded.state, "
            "mirror_table = excluded.mirror_table, "
            "sync_lsn = coalesce(excluded.sync_lsn, t.sync_lsn), "
            "rows_copied = coalesce(%s, t.rows_copied), "
            "source_identity = coalesce(excluded.source_identity, t.source_identity), "
            "updated_at = now()"
        ).format(sql.Identifier(state_schema)),
        [slot, table.source.qualname, table.qualname, table_state,
         None if sync_lsn is None else format_lsn(sync_lsn), rows,
         table.source.membership or None, rows],
    )


def source_identities(conn: psycopg.Connection,
                      state_schema: str, slot: str) -> dict[str, str | None]:
    """source table -> the identity its mirror rows came from (None: not recorded yet)."""
    rows = conn.execute(
        sql.SQL("select source_table, source_identity from {}.tables where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchall()
    return dict(rows)


def named_tables(given: list[str], known: Collection[str], slot: str) -> list[str]:
    """``--table`` names as the state writes them (``public.`` when no schema is given);
    one that the pipeline does not replicate is the operator's mistake, said in one line."""
    names = [t if "." in t else f"public.{t}" for t in given]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"--table: {', '.join(unknown)} is not replicated by slot {slot!r}",
            "known tables: " + (", ".join(sorted(known)) or "none yet (run first)"))
    return names


def table_states(conn: psycopg.Connection,
                 state_schema: str, slot: str) -> dict[str, tuple[str, int]]:
    """source table -> (state, sync_lsn)."""
    return {name: (st, lsn) for name, (st, lsn, _m) in table_sync(conn, state_schema, slot).items()}


def table_sync(conn: psycopg.Connection,
               state_schema: str, slot: str) -> dict[str, tuple[str, int, str]]:
    """source table -> (state, sync_lsn, mirror table it was synced into)."""
    rows = conn.execute(
        sql.SQL("select source_table, state, sync_lsn::text, mirror_table from {}.tables "
                "where slot = %s").format(sql.Identifier(state_schema)), [slot]).fetchall()
    return {name: (st, parse_lsn(lsn), mirror) for name, st, lsn, mirror in rows}


def mark_removed(conn: psycopg.Connection,
                 state_schema: str, slot: str, source_tables: list[str]) -> list[str]:
    """Tables no longer replicated: a later return to the publication copies them again."""
    cur = conn.execute(
        sql.SQL("update {}.tables set state = 'removed', updated_at = now() "
                "where slot = %s and source_table = any(%s) and state <> 'removed' "
                "returning source_table").format(sql.Identifier(state_schema)),
        [slot, source_tables])
    return [r[0] for r in cur.fetchall()]


def request_resync(conn: psycopg.Connection,
                   state_schema: str, slot: str, source_tables: list[str]) -> int:
    """Mark tables for a new copy; a running replicator picks them up."""
    cur = conn.execute(
        sql.SQL("update {}.tables set state = 'pending', updated_at = now() "
                "where slot = %s and source_table = any(%s)").format(sql.Identifier(state_schema)),
        [slot, source_tables])
    return cur.rowcount


def column_attnums(conn: psycopg.Connection,
                   state_schema: str, slot: str, source_table: str) -> dict[int, str]:
    """source attnum -> mirror column, as last written with the mirror's DDL."""
    rows = conn.execute(
        sql.SQL("select attnum, mirror_column from {}.columns where slot = %s "
                "and source_table = %s").format(sql.Identifier(state_schema)),
        [slot, source_table]).fetchall()
    return dict(rows)


def record_column_attnums(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], state_schema: str,
                          slot: str, source_table: str, attnums: dict[int, str]) -> None:
    """In the transaction that changes the mirror's columns (conn: a connection or a cursor)."""
    conn.execute(sql.SQL("delete from {}.columns where slot = %s and source_table = %s").format(
        sql.Identifier(state_schema)), [slot, source_table])
    for attnum, name in sorted(attnums.items()):
        conn.execute(sql.SQL("insert into {}.columns (slot, source_table, attnum, mirror_column) "
                             "values (%s, %s, %s, %s)").format(sql.Identifier(state_schema)),
                     [slot, source_table, attnum, name])


def forget_pipeline(conn: psycopg.Connection, state_schema: str, slot: str) -> None:
    """Drop the applied position: the next run starts a new slot and copies everything."""
    conn.execute(sql.SQL("delete from {}.pipelines where slot = %s").format(
        sql.Identifier(state_schema)), [slot])


# -- secondary indexes still to build (indexes.py) ------------------------------


@dataclass(frozen=True)
class IndexBuild:
    mirror_table: str
    index_schema: str
    index_name: str
    statement: str     # create index concurrently if not exists ..., for the mirror table


def record_index_builds(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], state_schema: str,
                        slot: str, mirror_table: str, builds: list[IndexBuild]) -> None:
    """The table's secondary indexes to build, replacing what an earlier copy recorded."""
    conn.execute(sql.SQL("delete from {}.index_builds where slot = %s and mirror_table = %s")
                 .format(sql.Identifier(state_schema)), [slot, mirror_table])
    for b in builds:
        conn.execute(sql.SQL(
            "insert into {}.index_builds (slot, mirror_table, index_schema, index_name, "
            "statement) values (%s, %s, %s, %s, %s) on conflict do nothing").format(
            sql.Identifier(state_schema)),
            [slot, b.mirror_table, b.index_schema, b.index_name, b.statement])


def index_builds(conn: psycopg.Connection, state_schema: str, slot: str,
                 ready_only: bool = False) -> list[IndexBuild]:
    """Indexes still to build, in the order they were recorded; ready_only: only of tables
    the stream applies to (copied or streaming), not of tables still being copied."""
    ready = sql.SQL(
        " and exists (select 1 from {}.tables t where t.slot = b.slot and t.mirror_table = "
        "b.mirror_table and t.state in ('copied', 'streaming'))").format(
        sql.Identifier(state_schema)) if ready_only else sql.SQL("")
    rows = conn.execute(sql.SQL(
        "select mirror_table, index_schema, index_name, statement from {}.index_builds b "
        "where slot = %s{} order by id").format(sql.Identifier(state_schema), ready),
        [slot]).fetchall()
    return [IndexBuild(*r) for r in rows]


def index_built(conn: psycopg.Connection, state_schema: str, slot: str,
                build: IndexBuild) -> None:
    conn.execute(sql.SQL("delete from {}.index_builds where slot = %s and index_schema = %s "
                         "and index_name = %s").format(sql.Identifier(state_schema)),
                 [slot, build.index_schema, build.index_name])


# -- removing a pipeline (`replicator drop`) ------------------------------------

# Every state table holding rows of a pipeline, by its slot column. Not the lease: its row
# stays (released), so its generation never starts again at 1 (lease.py).
PIPELINE_TABLES = ("pipelines", "tables", "columns", "dead_letters", "index_builds",
                   "commit_times")


def pipeline_rows(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], state_schema: str,
                  slot: str) -> dict[str, int]:
    """State table -> the pipeline's rows in it (a table this state schema lacks: none)."""
    counts = {}
    for name in PIPELINE_TABLES:
        table = sql.Identifier(state_schema, name)
        found = conn.execute("select to_regclass(%s) is not null",
                             [table.as_string(conn)]).fetchone()
        if found and found[0]:
            row = conn.execute(sql.SQL("select count(*) from {} where slot = %s").format(table),
                               [slot]).fetchone()
            counts[name] = int(row[0]) if row else 0
    return counts


def delete_pipeline(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], state_schema: str,
                    slot: str) -> None:
    """Every row of the pipeline, in the caller's transaction (after its lease check)."""
    for name in pipeline_rows(conn, state_schema, slot):
        conn.execute(sql.SQL("delete from {} where slot = %s").format(
            sql.Identifier(state_schema, name)), [slot])


def mirror_tables(conn: psycopg.Connection, state_schema: str,
                  slot: str) -> list[tuple[str, str]]:
    """(schema, table) of the mirror tables the pipeline made that still exist, as the
    catalog names them (the state's "schema.table" is matched, never split)."""
    return [(r[0], r[1]) for r in conn.execute(sql.SQL(
        "select n.nspname, c.relname from {} t "
        "join pg_class c on c.relkind in ('r', 'p') "
        "join pg_namespace n on n.oid = c.relnamespace "
        "and n.nspname || '.' || c.relname = t.mirror_table "
        "where t.slot = %s order by 1, 2").format(sql.Identifier(state_schema, "tables")),
        [slot]).fetchall()]
