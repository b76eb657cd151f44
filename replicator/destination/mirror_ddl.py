"""Mirror DDL: the mirror, staging, held and history tables, and altering a mirror to the stream.

A mirror table has the source's column names and types and its key, and
nothing else: no foreign keys, defaults, sequences or NOT NULL (a column
dropped at the source can stay in the mirror). Its staging table lives in the
state schema, is UNLOGGED and persistent (created once, emptied per batch),
and is named after the mirror table and a hash of its column layout.
Securing what is created (RLS, policy, grants) is access.py's, in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..errors import ErrorKind, ReplicatorError
from ..schema import DELETED_AT, MirrorTable, Origin
from . import state

log = logging.getLogger(__name__)


def ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def create_mirror_sql(t: MirrorTable, with_key: bool = True,
                      if_not_exists: bool = True) -> list[sql.Composed]:
    """The mirror table; without its key when an initial copy adds it after the data.

    if_not_exists=False: fail (DuplicateTable) if another session created it first.
    """
    cols = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.mirror_type))
            for c in t.kept]
    if t.options.soft_delete:
        cols.append(sql.SQL("{} timestamptz").format(sql.Identifier(DELETED_AT)))
    if with_key:
        cols.append(sql.SQL("primary key ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, t.source.key))))
    return [
        sql.SQL("create schema if not exists {}").format(sql.Identifier(t.dest_schema)),
        sql.SQL("create table {}{} ({})").format(
            sql.SQL("if not exists " if if_not_exists else ""), t.dest,
            sql.SQL(", ").join(cols)),
    ]


def create_staging_sql(t: MirrorTable) -> sql.Composed:
    by_name = {c.name: c for c in t.columns}
    parts: list[sql.Composable] = [
        sql.SQL("_r_seq int8"), sql.SQL("_r_lsn int8"), sql.SQL('_r_op "char"')]
    parts += [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(t.staging_type(c)))
              for c in t.columns]
    parts += [sql.SQL("{} {}").format(sql.Identifier(f"_r_ok{i}"),
                                      sql.SQL(t.staging_type(by_name[k])))
              for i, k in enumerate(t.source.key)]
    parts.append(sql.SQL("_r_u bytea"))
    if t.temp_stage:
        return sql.SQL("create temp table if not exists {} ({}) on commit drop").format(
            t.stage, sql.SQL(", ").join(parts))
    return sql.SQL("create unlogged table if not exists {} ({})").format(
        t.stage, sql.SQL(", ").join(parts))


def create_held_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL("create table if not exists {} (like {})").format(t.held, t.stage)


def mirror_columns(conn: psycopg.Connection, t: MirrorTable) -> dict[str, str]:
    return column_types(conn, t.dest)


def column_types(conn: psycopg.Connection, table: sql.Composable) -> dict[str, str]:
    """column name -> format_type of a destination table (a qualified identifier)."""
    rows = conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a "
        "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped",
        [table.as_string(conn)],
    )
    return dict(rows.fetchall())


def takes_rows_as_sent(conn: psycopg.Connection, t: MirrorTable) -> bool:
    """Whether t's inserts can be COPYed into its mirror as the stream sent them (binary).

    Each kept column must have the stream's own type: COPY BINARY converts nothing, and a
    column whose type was changed by hand (timestamp to timestamptz: the same bytes, another
    meaning) takes them through the MERGE's casts. The mirror's primary key must be the
    table's key, so an insert of a key the mirror has fails instead of adding a second row.
    """
    if not t.binary or not all(c.builtin for c in t.kept):
        return False
    types = column_types(conn, t.dest)
    if any(types.get(c.name) != c.type_sql for c in t.kept):
        return False
    row = conn.execute(
        "select coalesce(array_agg(a.attname::text), '{}') "
        "from pg_index i join pg_attribute a on a.attrelid = i.indrelid "
        "and a.attnum = any(i.indkey) where i.indrelid = %s::regclass and i.indisprimary",
        [t.dest.as_string(conn)]).fetchone()
    return row is not None and sorted(row[0]) == sorted(t.source.key)


def has_user_triggers(conn: psycopg.Connection, t: MirrorTable) -> bool:
    """Whether t's mirror has an enabled trigger of a user's (the invoice-to-memory one)."""
    row = conn.execute(
        "select exists (select 1 from pg_trigger where tgrelid = %s::regclass "
        "and not tgisinternal and tgenabled <> 'D')", [t.dest.as_string(conn)]).fetchone()
    return bool(row and row[0])


@dataclass
class MirrorPlan:
    statements: list[tuple[sql.Composed, tuple | None]]  # (stmt, (column, from, to) of a cast)
    attnums: dict[int, str]       # source attnum -> mirror column, after the plan
    recopy: list[str]             # columns added whose existing rows the stream cannot fill


def plan_mirror(t: MirrorTable, existing: dict[str, str], remembered: dict[int, str],
                origins: tuple[Origin, ...] | None = None,
                fast_defaults: bool = True) -> MirrorPlan:
    """The ALTERs that bring an existing mirror table to the stream's columns.

    A column is known by its source attnum (remembered: attnum -> mirror
    column, from earlier plans), so a rename is a rename and Odoo's type change
    (rename `c` to `c_moved0`, add a new `c`) moves the old values with the old
    column. Without an attnum a column is matched by name. A changed type is
    converted; a column the source dropped stays (nullable), so history the
    analysts query is not lost, and steps aside (renamed `<name>_dropped`) when
    a new source column takes its name. A new column with a fast default at the source
    gets it on the rows the mirror has (the ALTER runs in stream order, before
    any row that carries the column); one whose default was volatile (the
    source rewrote the table, which is not replicated) is listed in `recopy`.
    """
    origins = origins or tuple(Origin() for _ in t.columns)
    # An excluded column is not in the mirror, whatever the source does with it.
    pairs = [(c, o) for c, o in zip(t.columns, origins) if c.name not in t.options.exclude]
    columns = [c for c, _ in pairs]
    origins = tuple(o for _, o in pairs)
    remembered = {a: n for a, n in remembered.items() if n in existing}
    owner = {n: a for a, n in remembered.items()}
    wanted = {o.attnum for o in origins if o.attnum is not None}
    olds: list[str | None] = []
    claimed: set[str] = set()
    for c, o in zip(columns, origins):
        old = remembered.get(o.attnum) if o.attnum is not None else None
        if old is None and c.name in existing:
            other = owner.get(c.name)
            # Unless the mirror column of that name came from another source
            # column (one being renamed away, or one the source dropped before
            # adding this one), it is this column.
            if other is None or other == o.attnum or (other not in wanted and o.attnum is None):
                old = c.name
        if old in claimed:
            old = None
        if old is not None:
            claimed.add(old)
        olds.append(old)

    out: list[tuple[sql.Composed, tuple | None]] = []
    names = set(existing)

    def rename(a: str, b: str) -> None:
        out.append((sql.SQL("alter table {} rename column {} to {}").format(
            t.dest, sql.Identifier(a), sql.Identifier(b)), None))
        names.discard(a)
        names.add(b)

    renames = [(old, c.name) for c, old in zip(columns, olds)
               if old is not None and old != c.name]
    moving = {a for a, _ in renames}
    for c, old in zip(columns, olds):
        b = c.name
        if old != b and b in names and b not in moving:
            # A column the source dropped is in the way: it steps aside.
            n = 0
            while f"{b[:50]}_dropped{n or ''}" in names:
                n += 1
            rename(b, f"{b[:50]}_dropped{n or ''}")
    if any(b in names for _a, b in renames):
        # Names swap or chain: go through temporary names.
        tmp = [(a, f"_r_tmp{i}", b) for i, (a, b) in enumerate(renames)]
        for a, m, _b in tmp:
            rename(a, m)
        for _a, m, b in tmp:
            rename(m, b)
    else:
        for a, b in renames:
            rename(a, b)
    for name in sorted(existing):
        if name in t.options.exclude and name in names and name not in claimed:
            # Excluded after the mirror had it (a partner's email): it goes.
            out.append((sql.SQL("alter table {} drop column {}").format(
                t.dest, sql.Identifier(name)), None))
            names.discard(name)

    recopy = []
    for c, o, old in zip(columns, origins, olds):
        if old is not None:
            have = existing[old]
            if have != c.mirror_type:
                out.append((sql.SQL("alter table {} alter column {} type {} using {}::{}").format(
                    t.dest, sql.Identifier(c.name), sql.SQL(c.mirror_type),
                    sql.Identifier(c.name), sql.SQL(c.mirror_type)), (c.name, have, c.mirror_type)))
            continue
        add = sql.SQL("alter table {} add column {} {}").format(
            t.dest, sql.Identifier(c.name), sql.SQL(c.mirror_type))
        if fast_defaults and o.missing is not None:
            out.append((add + sql.SQL(" default {}::{}").format(
                sql.Literal(o.missing), sql.SQL(c.mirror_type)), None))
            # Only the rows already there take it: later rows carry their own value.
            out.append((sql.SQL("alter table {} alter column {} drop default").format(
                t.dest, sql.Identifier(c.name)), None))
        else:
            out.append((add, None))
            if fast_defaults and o.has_default:
                recopy.append(c.name)
    attnums = dict(remembered)
    for c, o in zip(columns, origins):
        if o.attnum is not None:
            attnums[o.attnum] = c.name
    # A name now belongs to one attnum only (the others were dropped at the source).
    latest = {n: a for a, n in attnums.items() if a in wanted}
    attnums = {a: n for a, n in attnums.items() if latest.get(n, a) == a}
    return MirrorPlan(out, attnums, recopy)


def alter_mirror_sql(t: MirrorTable, existing: dict[str, str],
                     remembered: dict[int, str] | None = None,
                     origins: tuple[Origin, ...] | None = None) -> list[sql.Composed]:
    """Bring an existing mirror table up to the stream's columns (see plan_mirror)."""
    return [s for s, _ in plan_mirror(t, existing, remembered or {}, origins).statements]


def mirror_exists(conn: psycopg.Connection, t: MirrorTable) -> bool:
    row = conn.execute("select to_regclass(%s) is not null",
                       [t.dest.as_string(conn)]).fetchone()
    return bool(row and row[0])


HISTORY_COLUMNS = ("_op", "_commit_time", "_lsn", "_seq")


def create_history_sql(t: MirrorTable) -> list[sql.Composed]:
    """<table>_history beside the mirror: one row per change, the new row (a delete's key)."""
    cols: list[sql.Composable] = [sql.SQL(
        '_op "char" not null, _commit_time timestamptz, _lsn pg_lsn not null, '
        '_seq int8 not null')]
    cols += [sql.SQL("{} {}").format(ident(c.name), sql.SQL(c.mirror_type)) for c in t.kept]
    return [
        sql.SQL("create table if not exists {} ({})").format(t.history, sql.SQL(", ").join(cols)),
        # A change is appended once: the batch commits with the applied position.
        sql.SQL("create unique index if not exists {} on {} (_lsn, _seq)").format(
            ident(f"{t.dest_name[:50]}_history_lsn"), t.history),
    ]


def ensure_mirror_columns(conn: psycopg.Connection, t: MirrorTable, state_schema: str, slot: str,
                          origins: tuple[Origin, ...] | None, fast_defaults: bool = True,
                          before_alter: Callable[[], None] | None = None) -> None:
    """Alter an existing mirror to t's columns and remember their attnums (in conn's transaction).

    A column added with a volatile default marks the table for a new copy
    (pending: the running replicator copies it while the stream goes on).
    before_alter: called once before the first ALTER, if there is one.
    """
    plan = plan_mirror(t, mirror_columns(conn, t),
                       state.column_attnums(conn, state_schema, slot, t.source.qualname),
                       origins, fast_defaults)
    if plan.statements and before_alter is not None:
        before_alter()
    for stmt, cast in plan.statements:
        log.info("altering mirror table", extra={"table": t.qualname,
                                                 "sql": stmt.as_string(conn)})
        if cast is None:
            conn.execute(stmt)
            continue
        try:
            with conn.transaction():
                conn.execute(stmt)
        except psycopg.Error as exc:
            col, have, want = cast
            raise ReplicatorError(
                ErrorKind.DESTINATION_APPLY,
                f"cannot convert mirror column {t.qualname}.{col} from {have} to {want} "
                f"as the source did: {exc.diag.message_primary or exc}",
                "convert or empty that column in the mirror by hand, or resync the table "
                "(`replicator resync --table`), then restart") from None
    state.record_column_attnums(conn, state_schema, slot, t.source.qualname, plan.attnums)
    if plan.recopy:
        log.warning("column added at the source with a volatile default: the table is "
                    "copied again", extra={"table": t.qualname, "columns": plan.recopy})
        state.set_table(conn, state_schema, slot, t, state.PENDING)
