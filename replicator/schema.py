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

from .errors import ErrorKind, ReplicatorError

log = logging.getLogger(__name__)

# Objects with an OID below this are built in: the same binary format and the
# same name in every PostgreSQL cluster (FirstNormalObjectId).
FIRST_USER_OID = 16384

STAGING_PREFIX = "_r_"  # staging's own columns; Odoo never names a column so


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

    def __post_init__(self):
        if not self.columns:
            self.columns = self.source.columns
        self.staging = staging_name(self)

    @property
    def key_idx(self) -> list[int]:
        names = [c.name for c in self.columns]
        return [names.index(k) for k in self.source.key]

    @property
    def dest(self) -> sql.Composable:
        return sql.Identifier(self.dest_schema, self.dest_name)

    @property
    def stage(self) -> sql.Composable:
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


_TABLES_SQL = """
select c.oid, n.nspname, c.relname, c.relreplident, key.cols
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
left join lateral (
    -- the primary key, else the replica identity index
    select array_agg(a.attname order by k.ord) as cols
    from (select i.indrelid, i.indkey from pg_index i
          where i.indrelid = c.oid and (i.indisprimary or i.indisreplident)
          order by i.indisprimary desc limit 1) i
    cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
) key on true
where c.oid = %s::regclass
"""

_COLUMNS_SQL = """
select a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, t.typlen
from pg_attribute a
join pg_type t on t.oid = a.atttypid
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
order by a.attnum
"""

_PUBLICATION_SQL = """
select schemaname, tablename from pg_publication_tables where pubname = %s
order by schemaname, tablename
"""


def publication_exists(conn: psycopg.Connection, publication: str) -> bool:
    return conn.execute("select 1 from pg_publication where pubname = %s",
                        [publication]).fetchone() is not None


def publication_tables(conn: psycopg.Connection, publication: str) -> list[tuple[str, str]]:
    return [tuple(r) for r in conn.execute(_PUBLICATION_SQL, [publication])]


def read_table(conn: psycopg.Connection, schema: str, name: str) -> SourceTable:
    qual = sql.Identifier(schema, name).as_string(conn)
    row = conn.execute(_TABLES_SQL, [qual]).fetchone()
    oid, nsp, rel, replident, key = row
    cols = tuple(Column(n, t, o, ln) for n, t, o, ln in conn.execute(_COLUMNS_SQL, [oid]))
    if isinstance(replident, bytes):
        replident = replident.decode()
    return SourceTable(oid, nsp, rel, cols, tuple(key or ()), replident)


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


def column_type(conn: psycopg.Connection, typoid: int, typmod: int) -> tuple[str, int]:
    """format_type and typlen of a column type seen in a Relation message."""
    return conn.execute("select format_type(%s, %s), typlen from pg_type where oid = %s",
                        [typoid, typmod, typoid]).fetchone()


# -- destination DDL -------------------------------------------------------


def create_mirror_sql(t: MirrorTable, with_key: bool = True) -> list[sql.Composable]:
    """The mirror table; without its key when an initial copy adds it after the data."""
    cols = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.mirror_type))
            for c in t.columns]
    if with_key:
        cols.append(sql.SQL("primary key ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, t.source.key))))
    return [
        sql.SQL("create schema if not exists {}").format(sql.Identifier(t.dest_schema)),
        sql.SQL("create table if not exists {} ({})").format(t.dest, sql.SQL(", ").join(cols)),
    ]


def create_staging_sql(t: MirrorTable) -> sql.Composable:
    by_name = {c.name: c for c in t.columns}
    parts = [sql.SQL("_r_seq int8"), sql.SQL("_r_lsn int8"), sql.SQL('_r_op "char"')]
    parts += [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(t.staging_type(c)))
              for c in t.columns]
    parts += [sql.SQL("{} {}").format(sql.Identifier(f"_r_ok{i}"),
                                      sql.SQL(t.staging_type(by_name[k])))
              for i, k in enumerate(t.source.key)]
    parts.append(sql.SQL("_r_u bytea"))
    return sql.SQL("create unlogged table if not exists {} ({})").format(
        t.stage, sql.SQL(", ").join(parts))


def create_held_sql(t: MirrorTable) -> sql.Composable:
    return sql.SQL("create table if not exists {} (like {})").format(t.held, t.stage)


def mirror_columns(conn: psycopg.Connection, t: MirrorTable) -> dict[str, str]:
    rows = conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a "
        "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped",
        [t.dest.as_string(conn)],
    )
    return dict(rows.fetchall())


def alter_mirror_sql(t: MirrorTable, existing: dict[str, str]) -> list[sql.Composable]:
    """Bring an existing mirror table up to the stream's columns.

    New columns are added; a changed type is converted; a column the source
    dropped stays (nullable), so history the analysts query is not lost.
    """
    out = []
    for c in t.columns:
        have = existing.get(c.name)
        if have is None:
            out.append(sql.SQL("alter table {} add column {} {}").format(
                t.dest, sql.Identifier(c.name), sql.SQL(c.mirror_type)))
        elif have != c.mirror_type:
            out.append(sql.SQL("alter table {} alter column {} type {} using {}::{}").format(
                t.dest, sql.Identifier(c.name), sql.SQL(c.mirror_type),
                sql.Identifier(c.name), sql.SQL(c.mirror_type)))
    return out


def mirror_exists(conn: psycopg.Connection, t: MirrorTable) -> bool:
    return conn.execute("select to_regclass(%s) is not null",
                        [t.dest.as_string(conn)]).fetchone()[0]
