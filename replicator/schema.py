"""Source table definitions, and the mirror and staging tables made from them.

A mirror table has the source's column names and types and its key, and
nothing else: no foreign keys, defaults, sequences or NOT NULL (a column
dropped at the source can stay in the mirror). Its staging table lives in the
state schema, is UNLOGGED and persistent (created once, emptied per batch),
and is named after the mirror table and a hash of its column layout.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .config.settings import NO_OPTIONS, MappingOptions
from .errors import ErrorKind, ReplicatorError
from .source import catalog

log = logging.getLogger(__name__)

# Objects with an OID below this are built in: the same binary format and the
# same name in every PostgreSQL cluster (FirstNormalObjectId).
FIRST_USER_OID = 16384

STAGING_PREFIX = "_r_"  # staging's own columns; Odoo never names a column so
DELETED_AT = "_deleted_at"  # [mappings] soft_delete: when the source deleted the row


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str      # format_type() of the source column
    typoid: int
    typlen: int        # -1: varlena, the only kind that can be sent as unchanged TOAST

    @property
    def builtin(self) -> bool:
        return self.typoid < FIRST_USER_OID

    @property
    def mirror_type(self) -> str:
        # A user-defined type (enum, domain, composite) may not exist in the
        # destination: its text form is kept.
        return self.type_sql if self.builtin else "text"


@dataclass(frozen=True)
class SourceTable:
    oid: int
    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]          # primary key, or the replica identity index
    replident: str                # d, f, i, n
    # Which table and which publication membership the stream follows (see
    # publication_members); "" when not read.
    membership: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class MirrorTable:
    """One replicated table: where rows come from and where they go."""

    source: SourceTable
    dest_schema: str
    dest_name: str
    state_schema: str
    binary: bool
    columns: tuple[Column, ...] = ()   # in the order the stream sends them
    relid: int = 0
    staging: str = field(default="")
    options: MappingOptions = NO_OPTIONS   # exclude, filter, soft_delete, history
    # Staged in a temporary table of the session's (a streamed transaction's own), not
    # the shared one in the state schema.
    temp_stage: bool = False

    def __post_init__(self) -> None:
        if not self.columns:
            self.columns = self.source.columns
        self.staging = staging_name(self)

    @property
    def kept(self) -> tuple[Column, ...]:
        """The mirror's columns: the stream's (staging has all of them) minus the excluded."""
        return tuple(c for c in self.columns if c.name not in self.options.exclude)

    @property
    def history_name(self) -> str:
        return self.dest_name + "_history"

    @property
    def history(self) -> sql.Composable:
        """The change history table beside the mirror ([mappings] history = true)."""
        return sql.Identifier(self.dest_schema, self.history_name)

    @property
    def key_idx(self) -> list[int]:
        names = [c.name for c in self.columns]
        return [names.index(k) for k in self.source.key]

    @property
    def dest(self) -> sql.Composable:
        return sql.Identifier(self.dest_schema, self.dest_name)

    @property
    def stage(self) -> sql.Composable:
        return sql.Identifier("pg_temp" if self.temp_stage else self.state_schema, self.staging)

    @property
    def shared_stage(self) -> sql.Composable:
        return sql.Identifier(self.state_schema, self.staging)

    @property
    def qualname(self) -> str:
        return f"{self.dest_schema}.{self.dest_name}"

    @property
    def held(self) -> sql.Composable:
        """Where the table's changes wait while it is being copied (logged: they must survive)."""
        return sql.Identifier(self.state_schema, "held" + self.staging[5:])

    def staging_type(self, col: Column) -> str:
        return col.type_sql if self.binary else "text"


def staging_name(t: MirrorTable) -> str:
    shape = "|".join(f"{c.name}:{t.staging_type(c)}" for c in t.columns)
    shape += "|key=" + ",".join(t.source.key) + "|v2"
    digest = hashlib.sha1(f"{t.dest_schema}.{t.dest_name}|{shape}".encode()).hexdigest()[:10]
    return f"stage_{t.dest_name[:40]}_{digest}"


def check_source_filter(conn: psycopg.Connection, table: SourceTable,
                        options: MappingOptions) -> None:
    """The initial copy runs [mappings] filter on the source: refuse one it cannot run."""
    if options.filter is None:
        return
    try:
        conn.execute(sql.SQL("select from {} where ({}) limit 0").format(
            sql.Identifier(table.schema, table.name), sql.SQL(options.filter)))
    except psycopg.Error as exc:
        raise ReplicatorError(
            ErrorKind.CONFIG, f"[mappings.{table.qualname}] filter: the source cannot run "
            f"it for the initial copy: {exc.diag.message_primary or exc}",
            "write a SQL boolean expression over the table's column names, valid on both "
            "the source and the destination") from None


def read_table(conn: psycopg.Connection, schema: str, name: str) -> SourceTable:
    qual = sql.Identifier(schema, name).as_string(conn)
    oid, nsp, rel, replident, key = catalog.table_row(conn, qual)
    cols = tuple(Column(n, t, o, ln) for n, t, o, ln in catalog.table_columns(conn, oid))
    return SourceTable(oid, nsp, rel, cols, tuple(key), replident)


def check_replicable(table: SourceTable) -> None:
    """Refuse a table the mirror could not apply changes of, with the fix."""
    if table.key:
        return
    qual = sql.Identifier(table.schema, table.name).as_string()
    raise ReplicatorError(
        ErrorKind.SOURCE_SETUP,
        f"table {table.qualname} has no primary key and no replica identity index: "
        "its updates and deletes cannot be matched to a mirror row",
        f"run on the source: ALTER TABLE {qual} ADD PRIMARY KEY (<its key columns>); "
        f"or, with a unique index on NOT NULL columns: ALTER TABLE {qual} "
        "REPLICA IDENTITY USING INDEX <index name>",
    )


def check_options(table: SourceTable, options: MappingOptions) -> None:
    """Refuse [mappings] options the table cannot have."""
    excluded_key = [k for k in table.key if k in options.exclude]
    if excluded_key:
        raise ReplicatorError(
            ErrorKind.CONFIG, f"[mappings.{table.qualname}] exclude: "
            f"{', '.join(excluded_key)} is part of the table's key",
            "the mirror needs the key to apply updates and deletes: remove it from exclude")


# -- destination DDL -------------------------------------------------------


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


@dataclass(frozen=True)
class Origin:
    """Where a stream column comes from in the source catalog, when that is known."""
    attnum: int | None = None      # the column's identity: survives renames and type changes
    has_default: bool = False      # a default expression, or an identity
    missing: str | None = None     # text of a fast default (atthasmissing), for rows older than it


def column_origins(conn: psycopg.Connection, oid: int,
                   columns: tuple[Column, ...]) -> tuple[Origin, ...]:
    """Each column's attnum (and fast default) in the source catalog as it is now.

    A Relation message describes the table as of the transaction being
    decoded, the catalog as of now. When both list the same columns, position
    gives the attnum. When the catalog has moved on, only a column whose name
    and type are unchanged is trusted; the others stay unknown and are matched
    to the mirror by name.
    """
    rows = catalog.column_origins(conn, oid)
    if [(r[1], r[2]) for r in rows] == [(c.name, c.type_sql) for c in columns]:
        return tuple(Origin(r[0], r[3], r[4]) for r in rows)
    by_name = {r[1]: r for r in rows}
    out = []
    for c in columns:
        r = by_name.get(c.name)
        out.append(Origin(r[0], r[3], r[4]) if r is not None and r[2] == c.type_sql else Origin())
    return tuple(out)


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
