"""A copy of a mirror that has rows goes into a shadow table, and the mirror is brought to it.

Truncating the mirror and copying into it would show analysts an empty, then a half-filled
table for the whole copy. The copy fills an unlogged table in the state schema instead (no
one but the replicator can read it there), and one transaction makes the mirror equal to
it: rows the copy does not have are deleted, rows that differ are updated, new rows are
inserted. The mirror stays the same table (its OID, the views over it, its RLS policy,
grants, history and indexes), readers see the old rows until that commit and the new ones
after, and rows that did not change are not written.

A column whose type the source changed cannot always be converted in place; then the swap
empties the mirror first, inside the same transaction: readers wait for its commit instead
of reading, and still never see it empty. A crash before the swap leaves the mirror as it
was and the table 'copying': the next start copies it again, into a new shadow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..schema import DELETED_AT, MirrorTable, Origin
from . import state
from .mirror_ddl import ensure_mirror_columns, mirror_columns, plan_mirror

log = logging.getLogger(__name__)


@dataclass
class Swapped:
    deleted: int = 0
    updated: int = 0
    inserted: int = 0
    emptied: bool = False      # a type change: the mirror was emptied and filled again


def has_primary_key(conn: psycopg.Connection[Any], t: MirrorTable) -> bool:
    row = conn.execute(
        "select exists (select 1 from pg_constraint where conrelid = %s::regclass "
        "and contype = 'p')", [t.dest.as_string(conn)]).fetchone()
    return bool(row and row[0])


def check_owner(conn: psycopg.Connection[Any], t: MirrorTable) -> None:
    """Refuse, before any row is copied, a mirror the swap could not alter: as the server
    would refuse its ALTER (the caller names the fix), without the ALTER's lock."""
    row = conn.execute("select pg_has_role(current_user, relowner, 'usage') from pg_class "
                       "where oid = %s::regclass", [t.dest.as_string(conn)]).fetchone()
    if not (row and row[0]):
        raise psycopg.errors.InsufficientPrivilege(f"must be owner of table {t.dest_name}")


def create_shadow_sql(t: MirrorTable) -> list[sql.Composed]:
    """An empty shadow (one an interrupted copy left is dropped): the copy's columns, no key."""
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.mirror_type)) for c in t.kept)
    return [sql.SQL("drop table if exists {}").format(t.shadow),
            sql.SQL("create unlogged table {} ({})").format(t.shadow, cols)]


# The swap's own temporary table, qualified: a table of that name elsewhere on the
# search_path is never the one written.
DIFF = sql.Identifier("pg_temp", "_r_diff")


def swap_sql(t: MirrorTable) -> list[sql.Composed]:
    """Find what differs in one pass, then delete, update and insert only that.

    One full join of the shadow and the mirror (one hash join, not one per step) keeps the
    rows that differ, with the shadow's values, in a temporary table; the three statements
    after it touch the mirror through its primary key only. Rows are compared by their
    binary images (`*<>`, as REFRESH MATERIALIZED VIEW CONCURRENTLY does): every type,
    also those without `=` (json, point), and values that `=` calls equal but that read
    differently (numeric 1.0 and 1.00, -0 and 0, '1 day' and '24 hours') count as changed.
    """
    key = [sql.Identifier(k) for k in t.source.key]
    mkeys = [sql.Identifier(f"_r_m{i}") for i in range(len(key))]
    on = sql.SQL(" and ").join(sql.SQL("s.{k} = m.{k}").format(k=k) for k in key)
    values = [sql.Identifier(c.name) for c in t.kept if c.name not in t.source.key]
    differs: list[sql.Composable] = []
    if values:
        differs.append(sql.SQL("(row({m}))::record *<> (row({s}))::record").format(
            m=sql.SQL(", ").join(sql.SQL("m.{}").format(c) for c in values),
            s=sql.SQL(", ").join(sql.SQL("s.{}").format(c) for c in values)))
    sets = [sql.SQL("{c} = d.{c}").format(c=c) for c in values]
    deleted_at = sql.Identifier(DELETED_AT)
    if t.options.soft_delete:
        # A soft-deleted row the copy has again: it is not deleted any more.
        differs.append(sql.SQL("m.{} is not null").format(deleted_at))
        sets.append(sql.SQL("{} = null").format(deleted_at))
    keep = sql.SQL(" or ").join([sql.SQL("s.{} is null").format(key[0]),
                                 sql.SQL("m.{} is null").format(key[0]), *differs])
    # The shadow's columns by name (not s.*): no source column can collide with ours.
    shadow_cols = sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c.name))
                                     for c in t.kept)
    statements = [sql.SQL(
        "create temporary table {d} on commit drop as select {cols}, {mk}, "
        "s.{k0} is null as _r_gone, m.{k0} is null as _r_new "
        "from {s} s full join {m} m on {on} where {keep}").format(
        d=DIFF, cols=shadow_cols, mk=sql.SQL(", ").join(
            sql.SQL("m.{} as {}").format(k, mk) for k, mk in zip(key, mkeys)),
        k0=key[0], s=t.shadow, m=t.dest, on=on, keep=keep)]
    # A soft-deleted row too: a resync copies the table afresh (docs/configuration.md).
    statements.append(sql.SQL("delete from {m} m using {d} d where d._r_gone and {on}").format(
        m=t.dest, d=DIFF, on=sql.SQL(" and ").join(
            sql.SQL("m.{} = d.{}").format(k, mk) for k, mk in zip(key, mkeys))))
    if sets:
        statements.append(sql.SQL(
            "update {m} m set {sets} from {d} d where not d._r_gone and not d._r_new "
            "and {on}").format(m=t.dest, sets=sql.SQL(", ").join(sets), d=DIFF,
                               on=sql.SQL(" and ").join(
                                   sql.SQL("m.{k} = d.{k}").format(k=k) for k in key)))
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.kept)
    statements.append(sql.SQL("insert into {m} ({cols}) select {cols} from {d} where _r_new")
                      .format(m=t.dest, cols=cols, d=DIFF))
    return statements


# pg_trigger.tgenabled -> how ALTER TABLE enables it again: O (origin and local), A
# (always), R (replica only).
_ENABLE = {"O": "enable trigger", "A": "enable always trigger", "R": "enable replica trigger"}


def _enabled_user_triggers(conn: psycopg.Connection[Any], t: MirrorTable) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute(
        "select tgname::text, tgenabled::text from pg_trigger where tgrelid = %s::regclass "
        "and not tgisinternal and tgenabled <> 'D' order by tgname",
        [t.dest.as_string(conn)]).fetchall()]


class ShadowIncomplete(Exception):
    """The shadow holds fewer rows than the copy wrote: it was emptied under us (an
    unlogged table after a destination crash, reached again through a pooler)."""


def swap_in(conn: psycopg.Connection[Any], t: MirrorTable, state_schema: str, slot: str,
            origins: tuple[Origin, ...] | None, rows: int) -> Swapped:
    """In conn's transaction: bring the mirror to the shadow's rows and columns, drop the shadow.

    ``rows``: what the copy wrote into the shadow; a shadow with fewer is refused
    (ShadowIncomplete) rather than taken as the source's rows. User triggers do not fire (the
    copied rows are history, not news; the invoice-to-memory one also skips them by
    replicator.phase): the enabled ones are disabled for the swap and enabled again after
    it, one by one and in their mode, so a trigger an operator disabled stays disabled.
    """
    held = conn.execute(sql.SQL("select count(*) from {}").format(t.shadow)).fetchone()
    if held is None or held[0] != rows:
        raise ShadowIncomplete(f"the shadow of {t.qualname} holds {held[0] if held else 0} "
                               f"rows, the copy wrote {rows}")
    conn.execute(sql.SQL("analyze {}").format(t.shadow))
    triggers = _enabled_user_triggers(conn, t)
    for name, _mode in triggers:
        conn.execute(sql.SQL("alter table {} disable trigger {}").format(
            t.dest, sql.Identifier(name)))
    conn.execute("set local replicator.phase = 'copy'")
    plan = plan_mirror(t, mirror_columns(conn, t),
                       state.column_attnums(conn, state_schema, slot, t.source.qualname),
                       origins, fast_defaults=False)
    done = Swapped(emptied=any(cast is not None for _stmt, cast in plan.statements))
    if done.emptied:
        before = conn.execute(sql.SQL("select count(*) from {}").format(t.dest)).fetchone()
        done.deleted = before[0] if before else 0
        conn.execute(sql.SQL("truncate {}").format(t.dest))
    ensure_mirror_columns(conn, t, state_schema, slot, origins, fast_defaults=False)
    # The diff's hash join holds a key and a row of each side: in memory, not in batches
    # on disk (4 MB, the default, spills a million rows several times over).
    conn.execute("set local work_mem = '64MB'")
    if done.emptied:
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.kept)
        done.inserted = conn.execute(sql.SQL("insert into {} ({}) select {} from {}").format(
            t.dest, cols, cols, t.shadow)).rowcount
    else:
        counts = [conn.execute(stmt).rowcount for stmt in swap_sql(t)]
        done.deleted, done.inserted = counts[1], counts[-1]
        done.updated = counts[2] if len(counts) == 4 else 0
        conn.execute(sql.SQL("drop table {}").format(DIFF))
    for name, mode in triggers:
        conn.execute(sql.SQL("alter table {} {} {}").format(
            t.dest, sql.SQL(_ENABLE.get(mode, "enable trigger")), sql.Identifier(name)))
    conn.execute("set local replicator.phase = ''")
    conn.execute(sql.SQL("drop table {}").format(t.shadow))
    log.info("mirror brought to its new copy", extra={
        "table": t.qualname, "deleted": done.deleted, "updated": done.updated,
        "inserted": done.inserted, "emptied_for_a_type_change": done.emptied})
    return done
