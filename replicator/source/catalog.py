"""Every query this replicator sends to the source database's catalog.

One place to see what the replicator reads from the source (and so which
privileges and server versions it relies on). The functions return plain
rows; schema.py builds table definitions from them, pipeline/preflight.py judges them.
Queries against the destination live with what they serve: mirror DDL in
schema.py, the state schema in destination/state.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

WAL_LEVEL_SQL = "show wal_level"

PUBLICATION_EXISTS_SQL = "select 1 from pg_publication where pubname = %s"

PUBLICATION_TABLES_SQL = """
select schemaname, tablename from pg_publication_tables where pubname = %s
order by schemaname, tablename
"""

# The row that puts a table in the publication is created anew by every
# ALTER PUBLICATION ... ADD TABLE, and a dropped and created table has a new
# oid: either means the stream may have skipped changes of that name (made
# while it was not published, or to the other table), which names alone never show.
PUBLICATION_MEMBERS_SQL = """
select pt.schemaname, pt.tablename, c.oid::text || ':' || coalesce(
    (select min(pr.oid)::text from pg_publication_rel pr
     where pr.prpubid = p.oid and (pr.prrelid = c.oid
            -- empty for a table that is no partition
            or pr.prrelid in (select relid from pg_partition_ancestors(c.oid)))),
    {by_schema}
    'all')
from pg_publication p
join pg_publication_tables pt on pt.pubname = p.pubname
join pg_namespace n on n.nspname = pt.schemaname
join pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
where p.pubname = %s
"""
# pg_publication_namespace (FOR TABLES IN SCHEMA) exists from PostgreSQL 15 on.
PUBLICATION_MEMBERS_BY_SCHEMA_SQL = """(select min(pn.oid)::text from pg_publication_namespace pn
     where pn.pnpubid = p.oid and pn.pnnspid = c.relnamespace),"""

TABLE_SQL = """
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

COLUMNS_SQL = """
select a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, t.typlen
from pg_attribute a
join pg_type t on t.oid = a.atttypid
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
order by a.attnum
"""

COLUMN_TYPE_SQL = "select format_type(%s, %s), typlen from pg_type where oid = %s"

COLUMN_ORIGINS_SQL = """
select a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
       a.atthasdef or a.attidentity <> '',
       case when a.atthasmissing then (a.attmissingval::text::text[])[1] end
from pg_attribute a
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
order by a.attnum
"""

TABLE_SIZE_SQL = "select relpages, greatest(reltuples, 0)::bigint from pg_class where oid = %s"

# Each index by its catalog fields, never by parsing pg_get_indexdef (an index name may
# contain " USING "). Per column (indkey; the first indnkeyatts are keys, the rest
# INCLUDE): the table column, or the expression as the server deparses it; indoption's
# bits 1 (DESC) and 2 (NULLS FIRST); the operator class unless it is a default one; the
# collation unless it is the column's own (an expression's: the database default).
SECONDARY_INDEXES_SQL = """
select ic.relname, am.amname, pg_get_expr(i.indpred, i.indrelid),
       coalesce(ic.reloptions, '{}'),
       (select json_agg(json_build_object(
                  'column', a.attname,
                  'expression', pg_get_indexdef(i.indexrelid, k.n::int, true),
                  'key', k.n <= i.indnkeyatts,
                  'option', coalesce(i.indoption[k.n - 1], 0),
                  'opclass', case when not opc.opcdefault
                                  then json_build_array(opn.nspname, opc.opcname) end,
                  'collation', case when co.oid is not null
                                     and co.oid <> coalesce(a.attcollation, 100)
                                    then json_build_array(con.nspname, co.collname) end)
                order by k.n)
        from unnest(i.indkey::int2[]) with ordinality k(attnum, n)
        left join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
        left join pg_opclass opc on opc.oid = i.indclass[k.n - 1]
        left join pg_namespace opn on opn.oid = opc.opcnamespace
        left join pg_collation co on co.oid = nullif(i.indcollation[k.n - 1], 0)
        left join pg_namespace con on con.oid = co.collnamespace)
from pg_index i
join pg_class ic on ic.oid = i.indexrelid
join pg_am am on am.oid = ic.relam
where i.indrelid = %s and not i.indisprimary
  and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid)
order by i.indexrelid
"""

# invalidation_reason exists from PostgreSQL 17 on (wal_removed, rows_removed,
# wal_level_insufficient, idle_timeout in 18): read through to_jsonb so that one
# query serves 15 and 16 too, where it is null and wal_status 'lost' is the only sign.
# to_jsonb: columns of newer servers (invalidation_reason 17+, failover and synced 17+)
# read as NULL from older ones.
REPLICATION_SLOT_SQL = """
select plugin, database, confirmed_flush_lsn::text, active, wal_status,
       to_jsonb(s) ->> 'invalidation_reason', (to_jsonb(s) ->> 'failover')::boolean,
       (to_jsonb(s) ->> 'synced')::boolean
from pg_replication_slots s
where slot_name = %s
"""

MAY_REPLICATE_SQL = """
select rolreplication or rolsuper from pg_roles where rolname = current_user
"""

# What the initial copy and `verify` need of every published table: USAGE on its schema
# and SELECT on it, as current_user (a superuser has both). Asked by oid, found through
# the catalog alone: a name cast to regclass would itself need USAGE on the schema.
UNREADABLE_SQL = """
select n.nspname, c.relname, has_schema_privilege(c.relnamespace, 'usage'),
       has_table_privilege(c.oid, 'select')
from pg_publication_tables p
join pg_namespace n on n.nspname = p.schemaname
join pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
where p.pubname = %s
  and not (has_schema_privilege(c.relnamespace, 'usage') and has_table_privilege(c.oid, 'select'))
order by n.nspname, c.relname
"""


def _one(conn: psycopg.Connection, query: str, params: list[Any] | None = None) -> tuple:
    row = conn.execute(query, params).fetchone()
    assert row is not None, "a catalog query that always returns one row returned none"
    return row


def wal_level(conn: psycopg.Connection) -> str:
    return str(_one(conn, WAL_LEVEL_SQL)[0])


def publication_exists(conn: psycopg.Connection, publication: str) -> bool:
    return conn.execute(PUBLICATION_EXISTS_SQL, [publication]).fetchone() is not None


def publication_tables(conn: psycopg.Connection, publication: str) -> list[tuple[str, str]]:
    return [(s, t) for s, t in conn.execute(PUBLICATION_TABLES_SQL, [publication])]


def publication_members(conn: psycopg.Connection, publication: str) -> dict[tuple[str, str], str]:
    """(schema, table) -> "<table oid>:<membership>": changes when the stream may have a gap.

    The membership is the pg_publication_rel row (of the table or a partition
    ancestor), else the pg_publication_namespace row (FOR TABLES IN SCHEMA,
    15+), else "all" (FOR ALL TABLES).
    """
    by_schema = PUBLICATION_MEMBERS_BY_SCHEMA_SQL if conn.info.server_version >= 150000 else ""
    query = sql.SQL(PUBLICATION_MEMBERS_SQL.format(by_schema=by_schema))
    return {(s, t): m for s, t, m in conn.execute(query, [publication])}


def table_row(conn: psycopg.Connection, qualname: str) -> tuple[int, str, str, str, list[str]]:
    """oid, schema, name, replica identity and key columns of a table (a quoted name)."""
    oid, nsp, rel, replident, key = _one(conn, TABLE_SQL, [qualname])
    if isinstance(replident, bytes):
        replident = replident.decode()
    return oid, nsp, rel, replident, list(key or ())


def table_columns(conn: psycopg.Connection, oid: int) -> list[tuple[str, str, int, int]]:
    """name, format_type, type oid and typlen of each column the stream sends, in order."""
    return [(n, t, o, ln) for n, t, o, ln in conn.execute(COLUMNS_SQL, [oid])]


def column_type(conn: psycopg.Connection, typoid: int, typmod: int) -> tuple[str, int]:
    """format_type and typlen of a column type seen in a Relation message."""
    type_sql, typlen = _one(conn, COLUMN_TYPE_SQL, [typoid, typmod, typoid])
    return type_sql, typlen


def column_origins(conn: psycopg.Connection,
                   oid: int) -> list[tuple[int, str, str, bool, str | None]]:
    """attnum, name, format_type, has a default, fast default text, of each column now."""
    return [tuple(r) for r in conn.execute(COLUMN_ORIGINS_SQL, [oid])]


def table_size(conn: psycopg.Connection, oid: int) -> tuple[int, int]:
    """Heap pages and estimated rows (the planner's statistics)."""
    pages, est = _one(conn, TABLE_SIZE_SQL, [oid])
    return pages, est


@dataclass(frozen=True)
class IndexColumn:
    column: str | None        # the table's column; None: an expression
    expression: str           # the expression, deparsed by the source (for column None)
    key: bool                 # False: an INCLUDE column
    descending: bool = False
    nulls_first: bool = False
    opclass: tuple[str, str] | None = None     # (schema, name): not a default one
    collation: tuple[str, str] | None = None   # (schema, name): not the column's own


@dataclass(frozen=True)
class SourceIndex:
    name: str
    method: str                                 # pg_am.amname: btree, gin, ...
    columns: tuple[IndexColumn, ...]
    predicate: str | None                       # a partial index's, deparsed
    options: tuple[tuple[str, str], ...] = ()   # reloptions: (name, value)


def secondary_indexes(conn: psycopg.Connection, oid: int) -> list[SourceIndex]:
    """The indexes that are neither the primary key nor a constraint's, by catalog field."""
    out = []
    for name, method, predicate, options, columns in conn.execute(SECONDARY_INDEXES_SQL, [oid]):
        cols = tuple(IndexColumn(
            c["column"], c["expression"], c["key"], bool(c["option"] & 1),
            bool(c["option"] & 2), tuple(c["opclass"]) if c["opclass"] else None,
            tuple(c["collation"]) if c["collation"] else None) for c in columns or [])
        out.append(SourceIndex(name, method, cols, predicate,
                               tuple((k, v) for k, _, v in (o.partition("=") for o in options))))
    return out


@dataclass(frozen=True)
class Slot:
    plugin: str
    database: str
    confirmed: str | None   # confirmed_flush_lsn as text
    active: bool
    wal_status: str | None = None
    invalidation_reason: str | None = None
    failover: bool | None = None     # synced to standbys that sync slots (17+; None before)
    synced: bool | None = None       # a standby's copy of a primary's failover slot

    @property
    def invalidated(self) -> bool:
        """The source threw away what this slot held: it can never stream again."""
        return self.wal_status == "lost" or self.invalidation_reason is not None

    def why_invalidated(self) -> str:
        reason = self.invalidation_reason or "wal_removed"
        return {
            "wal_removed": "the source removed WAL it still needed (max_slot_wal_keep_size)",
            "idle_timeout": "it stayed inactive past the source's idle_replication_slot_timeout",
            "rows_removed": "catalog rows it needed were vacuumed away",
            "wal_level_insufficient": "the source's wal_level was lowered below logical",
        }.get(reason, f"invalidation reason {reason}")


def replication_slot(conn: psycopg.Connection, slot: str) -> Slot | None:
    row = conn.execute(REPLICATION_SLOT_SQL, [slot]).fetchone()
    return None if row is None else Slot(*row)


SLOT_HOLDER_SQL = """
select active_pid, (pg_current_wal_lsn() - restart_lsn)::int8
from pg_replication_slots
where slot_name = %s
"""


def slot_holder(conn: psycopg.Connection, slot: str) -> tuple[int | None, int | None] | None:
    """(the pid streaming from the slot, WAL bytes it keeps), or None without the slot."""
    row = conn.execute(SLOT_HOLDER_SQL, [slot]).fetchone()
    return None if row is None else (row[0], row[1])


def may_replicate(conn: psycopg.Connection) -> bool:
    """Whether the connected role has REPLICATION (or is a superuser)."""
    return bool(_one(conn, MAY_REPLICATE_SQL)[0])


def unreadable_tables(conn: psycopg.Connection,
                      publication: str) -> list[tuple[str, str, bool, bool]]:
    """(schema, name, usage on the schema, select on the table) of the publication's tables
    the connected role cannot read."""
    return [(s, t, bool(u), bool(r))
            for s, t, u, r in conn.execute(UNREADABLE_SQL, [publication])]


# One round trip for the slot monitor and `replicator status`: the current WAL
# position comes back even when the slot does not exist (a left join on a one-row
# relation).
SLOT_WAL_SQL = """
select pg_current_wal_lsn()::text, s.slot_name is not null, coalesce(s.active, false),
       s.confirmed_flush_lsn::text, s.restart_lsn::text, s.wal_status
from (select 1) one
left join pg_replication_slots s on s.slot_name = %s
"""

# reltuples is -1 for a table never vacuumed or analyzed (PostgreSQL 14+): unknown.
TABLE_ESTIMATES_SQL = """
select n.nspname || '.' || c.relname, case when c.reltuples < 0 then null
                                           else c.reltuples::bigint end
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where n.nspname || '.' || c.relname = any(%s) and c.relkind in ('r', 'p')
"""

HEARTBEAT_SQL = "select pg_logical_emit_message(false, 'replicator_heartbeat', '')"


@dataclass(frozen=True)
class SlotWal:
    current_lsn: str          # pg_current_wal_lsn() as text
    exists: bool
    active: bool
    confirmed: str | None     # confirmed_flush_lsn as text
    restart: str | None       # restart_lsn as text
    wal_status: str | None    # reserved | extended | unreserved | lost


def slot_wal(conn: psycopg.Connection, slot: str) -> SlotWal:
    """The source's current WAL position and the slot's (exists False when there is none)."""
    return SlotWal(*_one(conn, SLOT_WAL_SQL, [slot]))


def table_estimates(conn: psycopg.Connection, qualnames: list[str]) -> dict[str, int | None]:
    """"schema.table" -> the planner's row estimate (None: never analyzed)."""
    return {name: est for name, est in conn.execute(TABLE_ESTIMATES_SQL, [qualnames])}


def emit_heartbeat(conn: psycopg.Connection) -> None:
    """A WAL record that goes through the slot, so an idle source's slot can advance."""
    conn.execute(HEARTBEAT_SQL)


COLLATABLE_TYPES_SQL = "select oid from pg_type where oid = any(%s) and typcollation <> 0"

# `replicator verify` with the pipeline stopped: does the slot hold a change of a
# published table committed before upto_lsn? Peeking consumes nothing (the slot
# stays where the replicator left it) but needs the slot to be inactive. pgoutput
# (15+) sends nothing for a transaction that touched no published table; the
# message type (first byte) tells a change from a BEGIN/COMMIT of older servers.
SLOT_PENDING_SQL = """
select count(*) filter (where substr(data, 1, 1) in ('I', 'U', 'D', 'T')), count(*)
from pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, %s,
                                         'proto_version', '1', 'publication_names', %s)
"""
PEEK_LIMIT = 1000


def collatable_types(conn: psycopg.Connection, typoids: list[int]) -> set[int]:
    """Those of the type oids whose values sort by a collation (text, varchar, ...)."""
    return {oid for (oid,) in conn.execute(COLLATABLE_TYPES_SQL, [typoids])}


def slot_has_changes(conn: psycopg.Connection, slot: str, publication: str,
                     upto_lsn: str) -> bool:
    """Whether the (inactive) slot still holds published changes committed before upto_lsn.

    Conservative: a change already applied but not yet confirmed counts, and so does
    a peek that stopped at its row limit.
    """
    changes, rows = _one(conn, SLOT_PENDING_SQL, [slot, upto_lsn, PEEK_LIMIT, publication])
    return bool(changes) or rows >= PEEK_LIMIT
