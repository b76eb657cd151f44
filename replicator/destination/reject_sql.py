"""Changes the mirror rejects: telling them apart, bisecting to their keys, dead letters.

A change the mirror rejects for its data (SQLSTATE class 22 or 23: a CHECK
added on the mirror, a value out of range after a manual type change) makes
the batch run again with each table's MERGE under a savepoint; the failing
table's staged keys are then bisected, under savepoints, down to the keys
that fail. Keys linked by a primary-key change stay together. While a key
has a waiting dead letter, its later changes queue behind it there, so a
retry (dead_letters.py) replays the key's changes in order and a dead letter
never overwrites a later change.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from ..schema import MirrorTable
from .batch_sql import (
    clear_staging_sql,
    ident,
    key_json,
    staging_columns,
    toastable,
    typed,
)

# SQLSTATE classes of a change rejected for its data: 22 data exception (a value out of
# range for a column narrowed by hand), 23 integrity constraint violation (a CHECK, NOT
# NULL, unique or foreign key added on the mirror). Any other error is not about one row.
REJECT_CLASSES = ("22", "23")


# Where a failing table's staged rows wait while their keys are bisected; dropped at
# commit, so nothing outlives the transaction (pooler safe).
ISOLATE = sql.Identifier("_r_isolate")


def rejects(exc: BaseException) -> bool:
    """Whether exc is the mirror refusing a change's data (not a lost connection)."""
    return (isinstance(exc, psycopg.Error) and not isinstance(exc, psycopg.OperationalError)
            and (exc.sqlstate or "")[:2] in REJECT_CLASSES)


def _waiting(t: MirrorTable) -> sql.Composed:
    """Condition on dead letter d: retryable, and not older than the table's last copy
    (a copy holds every change committed before its sync LSN)."""
    return sql.SQL(
        "d.slot = %(slot)s and d.mirror_table = %(table)s and d.op is not null "
        "and d.lsn >= coalesce((select max(sync_lsn) from {tables} "
        "where slot = %(slot)s and mirror_table = %(table)s), '0/0')"
    ).format(tables=sql.Identifier(t.state_schema, "tables"))


def queued_sql(t: MirrorTable) -> sql.Composed:
    """(the table has waiting dead letters, one of them has a key staged now)."""
    dl = sql.Identifier(t.state_schema, "dead_letters")
    return sql.SQL(
        "select exists (select 1 from {dl} d where {w}), "
        "exists (select 1 from {stage} s join {dl} d on d.key_data = {k} and {w})"
    ).format(dl=dl, w=_waiting(t), stage=t.stage, k=key_json(t, "s"))


def isolate_sql(t: MirrorTable) -> list[sql.Composed]:
    """Move the staged rows into ISOLATE, numbering keys (_r_kn) and groups (_r_grp)."""
    key = sql.SQL(", ").join(ident(k) for k in t.source.key)
    return [
        sql.SQL("drop table if exists pg_temp.{}").format(ISOLATE),
        sql.SQL(
            "create temp table {iso} on commit drop as select s.*, "
            "dense_rank() over (order by {k}) - 1 as _r_kn, "
            "dense_rank() over (order by {k}) - 1 as _r_grp, {kj} as _r_key from {stage} s"
        ).format(iso=ISOLATE, k=key, kj=key_json(t, "s"), stage=t.stage),
        clear_staging_sql(t),
    ]


def isolate_links_sql(t: MirrorTable) -> sql.Composed:
    """Pairs of key numbers one primary-key change links (they are applied together)."""
    on = sql.SQL(" and ").join(sql.SQL("o.{} = n.{}").format(ident(k), ident(f"_r_ok{i}"))
                               for i, k in enumerate(t.source.key))
    return sql.SQL("select distinct n._r_kn, o._r_kn from {iso} n join {iso} o on {on} "
                   "where n._r_ok0 is not null").format(iso=ISOLATE, on=on)


def isolate_queued_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL(
        "select distinct s._r_kn from {iso} s join {dl} d on d.key_data = s._r_key and {w}"
    ).format(iso=ISOLATE, dl=sql.Identifier(t.state_schema, "dead_letters"), w=_waiting(t))


def isolate_groups_sql() -> sql.Composed:
    return sql.SQL("update {iso} s set _r_grp = m.g from unnest(%s::int8[], %s::int8[]) "
                   "as m(kn, g) where s._r_kn = m.kn").format(iso=ISOLATE)


def isolate_stage_sql(t: MirrorTable) -> sql.Composed:
    """Stage the rows of groups lo <= _r_grp < hi again, for one attempt."""
    cols = sql.SQL(", ").join(staging_columns(t))
    return sql.SQL("insert into {stage} ({cols}) select {cols} from {iso} "
                   "where _r_grp >= %s and _r_grp < %s").format(
                       stage=t.stage, cols=cols, iso=ISOLATE)


def letter_sql(t: MirrorTable) -> sql.Composed:
    """Every change of the given groups into the dead letter table, in stream order.

    row_data has the mirror-typed new row without its unchanged-TOAST columns (named in
    unchanged: a retry keeps the mirror's value); a delete's is its key.
    """
    toast = [(i, c) for i, c in enumerate(t.columns) if toastable(c) and c in t.kept]
    if toast:
        unchanged: sql.Composable = sql.SQL(
            "case when s._r_u is null then '{{}}'::text[] else array_remove(array[{}]::text[], "
            "null) end").format(sql.SQL(", ").join(
                sql.SQL("case when get_bit(s._r_u, {}) = 1 then {} end").format(
                    sql.Literal(i), sql.Literal(c.name)) for i, c in toast))
    else:
        unchanged = sql.SQL("'{}'::text[]")
    row = sql.SQL(", ").join(
        sql.SQL("{} as {}").format(typed(sql.SQL("s.{}").format(ident(c.name)), t, c),
                                   ident(c.name)) for c in t.kept)
    old = key_json(t, "s", [f"_r_ok{i}" for i in range(len(t.source.key))])
    return sql.SQL(
        "insert into {dl} (slot, mirror_table, lsn, reason, sqlstate, op, key_data, old_key, "
        "row_data, unchanged) "
        "select %(slot)s, %(table)s, '0/0'::pg_lsn + s._r_lsn::numeric, %(reason)s, "
        "%(sqlstate)s, s._r_op, s._r_key, case when s._r_ok0 is not null then {old} end, "
        "case when s._r_op = 'D' then s._r_key else to_jsonb(r) - u.names end, u.names "
        "from {iso} s cross join lateral (select {row}) r "
        "cross join lateral (select {unchanged} as names) u "
        "where s._r_grp = any(%(groups)s) order by s._r_seq"
    ).format(dl=sql.Identifier(t.state_schema, "dead_letters"), old=old, row=row,
             unchanged=unchanged, iso=ISOLATE)


def isolate_ops_sql() -> sql.Composed:
    return sql.SQL("select _r_op, count(*) from {iso} where _r_grp = any(%s) group by 1").format(
        iso=ISOLATE)


def isolate_keys_sql() -> sql.Composed:
    return sql.SQL("select distinct _r_key::text, _r_lsn from {iso} where _r_grp = %s "
                   "order by 1 limit 5").format(iso=ISOLATE)


def group_keys(n: int, links: list[tuple[int, int]], queued: set[int]) -> tuple[list[int], int]:
    """Group numbers for key numbers 0..n-1: one group per set of keys that primary-key
    changes link, numbered in order of their first key; -1 for a group holding a key in
    queued (it follows its waiting dead letters). Returns (group per key, groups >= 0)."""
    parent = list(range(n))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    held = {root(k) for k in queued}
    number: dict[int, int] = {}
    groups = []
    for k in range(n):
        r = root(k)
        if r in held:
            groups.append(-1)
            continue
        if r not in number:
            number[r] = len(number)
        groups.append(number[r])
    return groups, len(number)
