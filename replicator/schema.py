"""Source tables and the mirror tables made from them: the definitions every part shares.

A table is read from the source catalog (read_table) and checked for what replication
needs (check_replicable); a MirrorTable adds where it goes and how it is staged. The DDL
made from these is destination/mirror_ddl.py's.
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

    @property
    def shadow(self) -> sql.Composable:
        """Where a new copy of a mirror that has rows goes (destination/shadow.py)."""
        return sql.Identifier(self.state_schema, "shadow" + self.staging[5:])

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


# -- where a stream column comes from in the source catalog ----------------


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
