"""Applying a batch: one destination transaction, COPY into staging, one MERGE per table.

The MERGE keeps the last change per key (staging rows carry a sequence
number), deletes what was deleted, and never writes an unchanged-TOAST column
(`u`) as NULL: such a column keeps the mirror's value, or takes the latest
earlier image of the same row in the batch, whichever key it had then
(primary-key changes are followed back, however many), or the mirror's row
of the first key of that chain. A `u` that none of those can supply goes to
the dead letter table instead of the mirror.

A change the mirror rejects for its data (SQLSTATE class 22 or 23: a CHECK
added on the mirror, a value out of range after a manual type change) makes
the batch run again with each table's MERGE under a savepoint; the failing
table's staged keys are then bisected, under savepoints, down to the keys
that fail. Keys linked by a primary-key change stay together. With
[destination] on_error = "stop" the first such key stops the pipeline (the
batch rolls back); with "dead_letter" every change of it goes to the dead
letter table, in order, and the rest of the batch is applied. While a key
has a waiting dead letter, its later changes queue behind it there, so a
retry (dead_letters.py) replays the key's changes in order and a dead letter
never overwrites a later change.

Pooler safe (Supabase port 6543, transaction mode): no prepared statements,
settings by SET LOCAL only, nothing that outlives the transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import deadline, failpoints
from .._decode import Pieces
from ..batch import (
    AlterTable,
    Batch,
    Rows,
    SpilledRows,
    SpilledSlice,
    SyncDone,
    SyncStart,
    TableRows,
    Truncate,
)
from ..classify import setup_error
from ..config.settings import ON_ERROR
from ..deadline import BatchLimits, timed_out
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn, parse_lsn
from ..schema import (
    DELETED_AT,
    Column,
    MirrorTable,
    Origin,
    check_options,
    create_held_sql,
    create_mirror_sql,
    create_staging_sql,
    mirror_columns,
    mirror_exists,
    plan_mirror,
)
from . import access, state, watchdog
from .lease import Fence

if TYPE_CHECKING:  # the pipeline hands the applier its session's builder
    from .indexes import IndexBuilder

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    rows: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    dead_letters: int = 0
    copies: int = 0       # COPYs into staging: one per table with rows, unless a truncate splits
    seconds: float = 0.0
    # With Applier.defer_flush: a destination WAL position at or past the batch's commit
    # record, and the destination's WAL flush position, both read after the commit.
    wal_lsn: int = 0
    wal_flushed: int = 0
    per_op: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_per_table: dict[str, int] = field(default_factory=dict)
    lettered: set[str] = field(default_factory=set)   # tables given retryable dead letters

    def count(self, table: str, inserts: int = 0, updates: int = 0, deletes: int = 0) -> None:
        ops = self.per_op.setdefault(table, {"insert": 0, "update": 0, "delete": 0})
        ops["insert"] += inserts
        ops["update"] += updates
        ops["delete"] += deletes
        self.inserts += inserts
        self.updates += updates
        self.deletes += deletes

    def dead(self, table: str, n: int) -> None:
        if n > 0:
            self.dead_letters += n
            self.dead_per_table[table] = self.dead_per_table.get(table, 0) + n


# -- SQL builders ----------------------------------------------------------


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _cast(expr: sql.Composable, t: MirrorTable, col: Column) -> sql.Composable:
    # Binary staging already has the mirror's type; text staging is cast.
    if t.binary and col.builtin:
        return expr
    return sql.SQL("{}::{}").format(expr, sql.SQL(col.mirror_type))


def _staging_columns(t: MirrorTable) -> list[sql.Identifier]:
    return ([_ident("_r_seq"), _ident("_r_lsn"), _ident("_r_op")]
            + [_ident(c.name) for c in t.columns]
            + [_ident(f"_r_ok{i}") for i in range(len(t.source.key))] + [_ident("_r_u")])


def copy_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL("copy {} ({}) from stdin (format binary)").format(
        t.stage, sql.SQL(", ").join(_staging_columns(t)))


def copy_held_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL("copy {} ({}) from stdin (format binary)").format(
        t.held, sql.SQL(", ").join(_staging_columns(t)))


def clear_staging_sql(t: MirrorTable) -> sql.Composed:
    """Empty a staging table by delete, inside the batch's transaction.

    Not TRUNCATE: that gives the table a new relfilenode in every batch
    (pg_class updates, a file unlinked and created); a VACUUM every
    STAGING_VACUUM_ROWS rows keeps the deleted rows' space in check. Staging is
    emptied after each MERGE in the same transaction, so a commit leaves it
    empty and a rollback restores it empty; it is emptied before a session's
    first COPY into it too, for rows a replicator that truncated before COPY
    left behind.
    """
    return sql.SQL("delete from {}").format(t.stage)


def temp_staging_sql(t: MirrorTable) -> sql.Composed:
    """A streamed transaction's own staging table for t, emptied for the next chunk.

    Its chunks go into one long transaction, where rows deleted from the shared staging
    table stay (deleted by a transaction still open, no vacuum may take them) and every
    later chunk's MERGE and DELETE scanned them again: a 2M-row transaction took minutes.
    A temporary table is emptied by TRUNCATE without a lock anyone else waits for, and
    writes no WAL; it goes at the transaction's end, so a transaction-mode pooler is fine.
    """
    return sql.SQL("create temp table if not exists {} (like {} including defaults) "
                   "on commit drop; truncate {}").format(t.stage, t.shared_stage, t.stage)


# Rows a staging table takes (and deletes again) between two VACUUMs of it. Autovacuum
# comes by once a minute at best, and until then every COPY appends to fresh pages (the
# free space of the deleted rows is known only after a vacuum) that each batch's delete
# and MERGE scan again: under OLTP load staging grew by ~20 pages a batch, and both
# statements slowed several-fold in 20 s. A VACUUM every few thousand rows keeps it at a
# few pages, for about a millisecond.
STAGING_VACUUM_ROWS = 5000


def vacuum_staging_sql(t: MirrorTable) -> sql.Composed:
    # skip_locked: a session holding a conflicting lock on staging (an operator's VACUUM
    # FULL, ALTER) makes this VACUUM skip, not wait outside the batch's lock_timeout.
    return sql.SQL("vacuum (skip_locked) {}").format(t.stage)


def unhold_sql(t: MirrorTable) -> tuple[list[sql.Composed], sql.Composed]:
    """Statements moving a table's held changes (from its copy's sync LSN on) into staging.

    Changes committed before the sync LSN are in the copy already. A held
    truncate empties the mirror and drops what was held before it. Held rows
    span several batches (and restarts), so staging gets them renumbered in
    stream order: commit LSN, then place in the transaction. Staging is
    emptied by delete, not truncate (see clear_staging_sql), and again after
    the MERGE. Returned with them: the query telling whether a truncate is
    held (run after the first statement; the mirror is emptied then).
    """
    rest = [c for c in _staging_columns(t) if c != _ident("_r_seq")]
    cols = sql.SQL(", ").join(rest)
    last_truncate = sql.SQL(
        "(select _r_lsn, _r_seq from {held} where _r_op = 'T' "
        "order by _r_lsn desc, _r_seq desc limit 1)"
    ).format(held=t.held)
    return [
        sql.SQL("delete from {} where _r_lsn < %(sync)s").format(t.held),
        clear_staging_sql(t),
        sql.SQL(
            "insert into {stage} (_r_seq, {cols}) "
            "select row_number() over (order by _r_lsn, _r_seq), "
            "{cols} from {held} h where _r_op <> 'T' and not exists (select 1 from {lt} m "
            "where (h._r_lsn, h._r_seq) < (m._r_lsn, m._r_seq))"
        ).format(stage=t.stage, cols=cols, held=t.held, lt=last_truncate),
    ], sql.SQL("select exists {}").format(last_truncate)


def _filter_sql(t: MirrorTable) -> sql.Composable:
    # Operator-written SQL ([mappings] filter), trusted like the rest of the config. Every
    # statement holding it runs with parameters, so its % signs are doubled.
    assert t.options.filter is not None
    return sql.SQL(t.options.filter.replace("%", "%%"))


def passes(t: MirrorTable, alias: str, cast: bool = True) -> sql.Composable:
    """Whether the row `alias` (staging's, or mirror-typed when not cast) is in the table's
    [mappings] filter: the filter sees the row's columns by their source names."""
    if t.options.filter is None:
        return sql.SQL("true")
    cols = sql.SQL(", ").join(sql.SQL("{} as {}").format(
        _cast(sql.SQL("{}.{}").format(sql.SQL(alias), _ident(c.name)), t, c) if cast
        else sql.SQL("{}.{}").format(sql.SQL(alias), _ident(c.name)), _ident(c.name))
        for c in t.columns)
    return sql.SQL("coalesce((select true from (select {}) _r_f where ({})), false)").format(
        cols, _filter_sql(t))


# The source commit time of a staged row's transaction: the applier passes the batch's
# commit LSNs and times (microseconds since 2000-01-01, as pgoutput sends them).
def commit_time(lsn: sql.Composable) -> sql.Composed:
    return sql.SQL(
        "coalesce((select timestamptz '2000-01-01 00:00:00+00' + c.ts * interval '1 microsecond' "
        "from unnest(%(lsns)s::int8[], %(times)s::int8[]) c(lsn, ts) where c.lsn = {}), "
        "now())").format(lsn)


COMMIT_TIME = commit_time(sql.SQL("s._r_lsn"))


def _merge_tail(t: MirrorTable, source: sql.Composable, toast: bool) -> sql.Composed:
    key = set(t.source.key)
    on = sql.SQL(" and ").join(
        sql.SQL("t.{k} = s.{k}").format(k=_ident(k)) for k in t.source.key)
    # (index in the stream's columns, column): _r_u bits and _r_keep{i} count all of them.
    cols = [(i, c) for i, c in enumerate(t.columns) if c.name not in t.options.exclude]
    if toast:
        # s already holds mirror-typed values and _r_keep{i} flags.
        def value(i: int, c: Column) -> sql.Composable:
            if c.name in key or not _toastable(c):
                return sql.SQL("s.{}").format(_ident(c.name))
            return sql.SQL("case when s.{keep} then t.{c} else s.{c} end").format(
                keep=_ident(f"_r_keep{i}"), c=_ident(c.name))
        ins_val: list[sql.Composable] = [sql.SQL("s.{}").format(_ident(c.name))
                                         for _i, c in cols]
        upd_guard = sql.SQL(" and not s._r_bad")
        ins_guard: sql.Composable = sql.SQL(" and not s._r_bad and not s._r_anykeep")
    else:
        def value(i: int, c: Column) -> sql.Composable:
            return _cast(sql.SQL("s.{}").format(_ident(c.name)), t, c)
        ins_val = [value(i, c) for i, c in cols]
        upd_guard = ins_guard = sql.SQL("")
        on = sql.SQL(" and ").join(
            sql.SQL("t.{k} = {v}").format(
                k=_ident(c.name), v=_cast(sql.SQL("s.{}").format(_ident(c.name)), t, c))
            for _i, c in cols if c.name in key)
    sets = [sql.SQL("{} = {}").format(_ident(c.name), value(i, c))
            for i, c in cols if c.name not in key]
    delete: sql.Composable = sql.SQL("delete")
    if t.options.soft_delete:
        # The row stays, marked; a later insert or update of its key clears the mark.
        sets.append(sql.SQL("{} = null").format(_ident(DELETED_AT)))
        delete = sql.SQL("update set {} = {}").format(_ident(DELETED_AT), COMMIT_TIME)
    update = (sql.SQL("update set {}").format(sql.SQL(", ").join(sets)) if sets
              else sql.SQL("do nothing"))
    if t.options.filter is not None:
        # An update whose new row is outside the filter takes the row out of the mirror.
        delete += sql.SQL(" when matched and not s._r_in then delete")
        ins_guard += sql.SQL(" and s._r_in")
    return sql.SQL(
        "merge into {dest} t using {source} s on {on} "
        "when matched and s._r_op = 'D' then {delete} "
        "when matched{ug} then {update} "
        "when not matched and s._r_op <> 'D'{ig} then insert ({cols}) values ({vals})"
    ).format(dest=t.dest, source=source, on=on, delete=delete, ug=upd_guard, update=update,
             ig=ins_guard, cols=sql.SQL(", ").join(_ident(c.name) for _i, c in cols),
             vals=sql.SQL(", ").join(ins_val))


def _toastable(col: Column) -> bool:
    return col.typlen == -1


def merge_sql(t: MirrorTable) -> sql.Composed:
    """The common case: no unchanged-TOAST column in this table's batch."""
    key = sql.SQL(", ").join(_ident(k) for k in t.source.key)
    source = sql.SQL("(select distinct on ({k}) *, {f} as _r_in from {stage} s "
                     "order by {k}, _r_seq desc)").format(k=key, stage=t.stage,
                                                          f=passes(t, "s"))
    return _merge_tail(t, source, toast=False)


def _toast_ctes(t: MirrorTable) -> sql.Composed:
    """CTEs resolving every unchanged-TOAST column of the last row per key.

    A key's rows are cut into epochs at each delete (_r_ep; a delete belongs
    to the epoch it closes). An epoch is one logical row under one key:
    within it, _r_g{i} counts rows that carried column i, so first_value
    over (key, epoch, _r_g{i}) is the latest value sent for it, and the
    epoch's last row (_r_elast) holds its latest image. A key change writes a
    delete for the old key and a row for the new key carrying the old key
    (_r_ok*): the new key's epoch then continues the old key's epoch that
    this delete closed (p). Several key changes of one row (2 -> 12 -> 22, a
    swap through a third key) form a chain of epochs, walked back by the
    recursive c, one step per key change, until every column is known: the
    latest earlier image of the row, whichever key it had then. A chain
    that ends in a key's first epoch (without a key change into it)
    continues the mirror's row of that key as it was before this statement
    (_r_keep for the key itself, tgo for a chain's first key); one that ends
    in a later epoch began with an insert, and a `u` there has no image.
    """
    key_names = list(t.source.key)
    k = sql.SQL(", ").join(_ident(n) for n in key_names)
    cols = list(t.columns)
    # An excluded column's unchanged value is never needed: it is not in the mirror.
    tcols = [(i, c) for i, c in enumerate(cols) if _toastable(c) and c.name not in key_names
             and c.name not in t.options.exclude]
    nk = len(key_names)
    by_name = {c.name: c for c in cols}

    def known(alias: str, i: int) -> sql.Composed:
        return sql.SQL("({a}._r_u is null or get_bit({a}._r_u, {i}) = 0)").format(
            a=sql.SQL(alias), i=sql.Literal(i))

    def all_of(parts: list[sql.Composable]) -> sql.Composable:
        return sql.SQL(" and ").join(parts) if parts else sql.SQL("true")

    def eq(a: str, names_a: list[str], b: str, names_b: list[str]) -> sql.Composed:
        return sql.SQL(" and ").join(
            sql.SQL("{}.{} = {}.{}").format(sql.SQL(a), _ident(x), sql.SQL(b), _ident(y))
            for x, y in zip(names_a, names_b))

    fok = [f"_r_fok{j}" for j in range(nk)]
    rk = [f"_r_rk{j}" for j in range(nk)]      # the chain's root: the batch's last row's key
    ck = [f"_r_ck{j}" for j in range(nk)]      # the epoch the chain has reached
    nfok = [f"_r_nfok{j}" for j in range(nk)]  # where that epoch's row came from, if moved
    g = {i: _ident(f"_r_g{i}") for i, _ in tcols}
    v = {i: _ident(f"_r_v{i}") for i, _ in tcols}
    rr = {i: _ident(f"_r_r{i}") for i, _ in tcols}
    w = {i: _ident(f"_r_w{i}") for i, _ in tcols}

    g_parts = [sql.SQL(
        "count(*) filter (where _r_op <> 'D' and {kn}) "
        "over (partition by {k}, _r_ep order by _r_seq) as {g}"
    ).format(kn=known("e", i), k=k, g=g[i]) for i, c in tcols]
    g_parts += [sql.SQL(
        "first_value({ok}) over (partition by {k}, _r_ep order by _r_seq) as {f}").format(
        ok=_ident(f"_r_ok{j}"), k=k, f=_ident(fok[j])) for j in range(nk)]
    g_parts.append(sql.SQL(
        "first_value(_r_seq) over (partition by {k}, _r_ep order by _r_seq) as _r_fseq"
    ).format(k=k))
    v_parts = [sql.SQL(
        "first_value({c}) over (partition by {k}, _r_ep, {g} order by _r_seq) as {v}").format(
        c=_ident(c.name), k=k, g=g[i], v=v[i]) for i, c in tcols]

    # p: for each epoch that began with a key change, the old key's epoch
    # that the key change's delete closed (-1: none in the batch, so the
    # old key's mirror row).
    p = sql.SQL(
        "p as (select distinct on ({xk}, x._r_ep) {xk}, x._r_ep, coalesce(d._r_ep, -1) as _r_pep "
        "from x left join x d on {dmatch} and d._r_op = 'D' and d._r_seq < x._r_fseq "
        "where x._r_fok0 is not null order by {xk}, x._r_ep, d._r_seq desc nulls last)"
    ).format(xk=sql.SQL(", ").join(sql.SQL("x.{}").format(_ident(n)) for n in key_names),
             dmatch=eq("d", key_names, "x", fok))

    resolved = {i: sql.SQL("c.{}").format(rr[i]) for i, _ in tcols}

    def st(expr: sql.Composable, col: Column) -> sql.Composed:
        # A recursive CTE's columns must have one type and typmod in both
        # terms; window results and CASE lose the typmod (varchar(64)).
        return sql.SQL("({})::{}").format(expr, sql.SQL(t.staging_type(col)))
    base: list[sql.Composable] = [sql.SQL("l.{} as {}").format(_ident(n), _ident(rk[j]))
                                  for j, n in enumerate(key_names)]
    base += [sql.SQL("{} as {}").format(st(sql.SQL("l.{}").format(_ident(n)), by_name[n]),
                                        _ident(ck[j]))
             for j, n in enumerate(key_names)]
    base.append(sql.SQL("l._r_ep as _r_cep"))
    for i, col in tcols:
        base.append(sql.SQL("l.{g} > 0 as {r}, {v} as {w}").format(
            g=g[i], r=rr[i], v=st(sql.SQL("l.{}").format(v[i]), col), w=w[i]))
    base += [sql.SQL("l.{} as {}").format(_ident(fok[j]), _ident(nfok[j])) for j in range(nk)]
    base.append(sql.SQL("lp._r_pep as _r_npep"))
    step: list[sql.Composable] = [sql.SQL("c.{} as {}").format(_ident(rk[j]), _ident(rk[j]))
                                  for j in range(nk)]
    step += [sql.SQL("{} as {}").format(st(sql.SQL("c.{}").format(_ident(nfok[j])), by_name[n]),
                                        _ident(ck[j])) for j, n in enumerate(key_names)]
    step.append(sql.SQL("c._r_npep as _r_cep"))
    for i, col in tcols:
        step.append(sql.SQL("c.{r} or coalesce(x.{g} > 0, false) as {r}, {val} as {w}").format(
            r=rr[i], g=g[i], w=w[i], val=st(sql.SQL(
                "case when c.{r} then c.{w} when x.{g} > 0 then x.{v} end").format(
                    r=rr[i], w=w[i], g=g[i], v=v[i]), col)))
    step += [sql.SQL("x.{} as {}").format(_ident(fok[j]), _ident(nfok[j])) for j in range(nk)]
    step.append(sql.SQL("xp._r_pep as _r_npep"))
    all_resolved = all_of([resolved[i] for i, _ in tcols])
    c = sql.SQL(
        "c as (select {base} from l left join p lp on {lpm} and lp._r_ep = l._r_ep "
        "where l._r_op <> 'D' and l._r_fok0 is not null and not ({lres}) "
        "union all "
        "select {step} from c left join x on {xm} and x._r_ep = c._r_npep "
        "left join p xp on {xpm} and xp._r_ep = x._r_ep "
        "where c._r_nfok0 is not null and not ({res}))"
    ).format(base=sql.SQL(", ").join(base), lpm=eq("lp", key_names, "l", key_names),
             lres=all_of([sql.SQL("l.{} > 0").format(g[i]) for i, _ in tcols]),
             step=sql.SQL(", ").join(step), xm=eq("x", key_names, "c", nfok),
             xpm=eq("xp", key_names, "x", key_names), res=all_resolved)
    # lo: where each chain stopped: every column found, or no earlier key.
    lo = sql.SQL("lo as (select * from c where c._r_nfok0 is null or ({res}))").format(
        res=all_resolved)

    tgo_match = sql.SQL(" and ").join(
        sql.SQL("tgo.{c} = {f}").format(
            c=_ident(n), f=_cast(sql.SQL("lo.{}").format(_ident(ck[j])), t, by_name[n]))
        for j, n in enumerate(key_names))
    first_key = _ident(key_names[0])

    out: list[sql.Composable] = [sql.SQL("l._r_op, l._r_seq, l._r_lsn")]
    keeps, bads = [], []
    tset = {i for i, _ in tcols}
    for i, col in enumerate(cols):
        own = _cast(sql.SQL("l.{}").format(_ident(col.name)), t, col)
        if i not in tset:
            out.append(sql.SQL("{} as {}").format(own, _ident(col.name)))
            continue
        out.append(sql.SQL(
            "case when {kn} then {own} when l.{g} > 0 then {lv} "
            "when l._r_fok0 is not null then case when lo.{r} then {low} else tgo.{c} end end "
            "as {c}"
        ).format(kn=known("l", i), own=own, g=g[i],
                 lv=_cast(sql.SQL("l.{}").format(v[i]), t, col), r=rr[i],
                 low=_cast(sql.SQL("lo.{}").format(w[i]), t, col), c=_ident(col.name)))
        keep = sql.SQL("(not {kn} and l.{g} = 0 and l._r_fok0 is null and l._r_ep = 0)").format(
            kn=known("l", i), g=g[i])
        out.append(sql.SQL("{} as {}").format(keep, _ident(f"_r_keep{i}")))
        keeps.append(keep)
        bads.append(sql.SQL(
            "(not {kn} and l.{g} = 0 and case when l._r_fok0 is not null then not ("
            "coalesce(lo.{r}, false) or (lo._r_cep <= 0 and tgo.{fk} is not null)) "
            "else l._r_ep > 0 end)"
        ).format(kn=known("l", i), g=g[i], r=rr[i], fk=first_key))
    out.append(sql.SQL("{} as _r_anykeep").format(
        sql.SQL(" or ").join(keeps) if keeps else sql.SQL("false")))
    out.append(sql.SQL("{} as _r_bad").format(
        sql.SQL(" or ").join(bads) if bads else sql.SQL("false")))

    return sql.SQL(
        "with recursive e as (select s.*, coalesce(count(*) filter (where _r_op = 'D') over ("
        "partition by {k} order by _r_seq rows between unbounded preceding and 1 preceding), 0) "
        "as _r_ep, "
        "lead(_r_seq) over (partition by {k} order by _r_seq) is null as _r_klast, "
        "_r_op = 'D' or lead(_r_seq) over (partition by {k} order by _r_seq) is null as _r_elast "
        "from {stage} s), "
        "g as (select e.*, {g_parts} from e), "
        "v as (select g.*{v_parts} from g), "
        "l as (select * from v where _r_klast), "
        "x as (select * from v where _r_elast), "
        "{p}, {c}, {lo}, "
        "r as (select {out} from l "
        "left join lo on l._r_fok0 is not null and {lom} "
        "left join {dest} tgo on lo._r_cep <= 0 and {tgo_match}) "
    ).format(k=k, stage=t.stage, g_parts=sql.SQL(", ").join(g_parts),
             v_parts=sql.SQL("").join(sql.SQL(", ") + p_ for p_ in v_parts),
             p=p, c=c, lo=lo, out=sql.SQL(", ").join(out),
             lom=eq("lo", rk, "l", key_names), dest=t.dest, tgo_match=tgo_match)


def merge_toast_sql(t: MirrorTable) -> sql.Composed:
    # MERGE takes no WITH RECURSIVE of its own (PostgreSQL 15): the CTEs go
    # inside its source.
    return _merge_tail(t, sql.SQL("(") + _toast_ctes(t) + sql.SQL(
        "select r.*, {} as _r_in from r)").format(passes(t, "r", cast=False)), toast=True)


def dead_letter_sql(t: MirrorTable) -> sql.Composed:
    key = t.source.key
    on = sql.SQL(" and ").join(sql.SQL("t.{k} = s.{k}").format(k=_ident(k)) for k in key)
    obj = sql.SQL(", ").join(sql.SQL("{}, s.{}").format(sql.Literal(k), _ident(k)) for k in key)
    return _toast_ctes(t) + sql.SQL(
        "insert into {dl} (slot, mirror_table, lsn, reason, row_data, key_data) "
        "select %s, %s, %s::pg_lsn, 'unchanged TOAST value with no earlier image in the batch "
        "and no mirror row to keep it from', jsonb_build_object({obj}), "
        "jsonb_build_object({obj}) from r s "
        "where s._r_op <> 'D' and (s._r_bad or (s._r_anykeep and not exists "
        "(select 1 from {dest} t where {on}))) and {f}"
    ).format(dl=sql.Identifier(t.state_schema, "dead_letters"), obj=obj, dest=t.dest, on=on,
             f=passes(t, "s", cast=False))


# -- [mappings] options: history, rows moving into a filter -----------------

HISTORY_COLUMNS = ("_op", "_commit_time", "_lsn", "_seq")


def create_history_sql(t: MirrorTable) -> list[sql.Composed]:
    """<table>_history beside the mirror: one row per change, the new row (a delete's key)."""
    cols: list[sql.Composable] = [sql.SQL(
        '_op "char" not null, _commit_time timestamptz, _lsn pg_lsn not null, '
        '_seq int8 not null')]
    cols += [sql.SQL("{} {}").format(_ident(c.name), sql.SQL(c.mirror_type)) for c in t.kept]
    return [
        sql.SQL("create table if not exists {} ({})").format(t.history, sql.SQL(", ").join(cols)),
        # A change is appended once: the batch commits with the applied position.
        sql.SQL("create unique index if not exists {} on {} (_lsn, _seq)").format(
            _ident(f"{t.dest_name[:50]}_history_lsn"), t.history),
    ]


def history_sql(t: MirrorTable) -> sql.Composed:
    """Append the staged changes to the history, before the MERGE (it reads the mirror's rows
    for unchanged-TOAST values: the latest earlier value of the key in the batch, else the
    mirror's). With a filter, only deletes and rows the filter keeps are logged."""
    vals = _images(t, sql.SQL("m.{}"))
    return sql.SQL(
        "insert into {hist} ({hcols}, {cols}) "
        "select s._r_op, {ct}, '0/0'::pg_lsn + s._r_lsn::numeric, 2 * s._r_seq + 1, {vals} "
        "from {stage} s left join {dest} m on {on} where s._r_op = 'D' or {f} "
        "order by s._r_seq"
    ).format(hist=t.history, hcols=sql.SQL(", ").join(map(_ident, HISTORY_COLUMNS)),
             cols=sql.SQL(", ").join(_ident(c.name) for c in t.kept), ct=COMMIT_TIME,
             vals=sql.SQL(", ").join(vals), stage=t.stage, dest=t.dest, on=_on_mirror(t),
             f=passes(t, "s"))


def _on_mirror(t: MirrorTable) -> sql.Composed:
    """Mirror row m of staged row s."""
    by_name = {c.name: c for c in t.columns}
    return sql.SQL(" and ").join(sql.SQL("m.{} = {}").format(
        _ident(k), _cast(sql.SQL("s.{}").format(_ident(k)), t, by_name[k])) for k in t.source.key)


def _images(t: MirrorTable, mirror: sql.SQL | None) -> list[sql.Composable]:
    """The mirror's columns of staged row s as mirror-typed values, a delete's key only. An
    unchanged-TOAST value is the latest earlier one of the key in staging, else the mirror
    row's (`mirror`: a format for the column, e.g. m.{}), else NULL."""
    key = list(t.source.key)
    same = sql.SQL(" and ").join(sql.SQL("p.{k} = s.{k}").format(k=_ident(k)) for k in key)
    index = {c.name: i for i, c in enumerate(t.columns)}
    vals: list[sql.Composable] = []
    for c in t.kept:
        own = _cast(sql.SQL("s.{}").format(_ident(c.name)), t, c)
        if c.name in key:
            vals.append(own)
        elif not _toastable(c):
            vals.append(sql.SQL("case when s._r_op <> 'D' then {} end").format(own))
        else:
            i = sql.Literal(index[c.name])
            vals.append(sql.SQL(
                "case when s._r_op = 'D' then null "
                "when s._r_u is null or get_bit(s._r_u, {i}) = 0 then {own} "
                "else coalesce((select {prev} from {stage} p where {same} and p._r_seq < s._r_seq "
                "and p._r_op <> 'D' and (p._r_u is null or get_bit(p._r_u, {i}) = 0) "
                "order by p._r_seq desc limit 1), {m}) end").format(
                    i=i, own=own, prev=_cast(sql.SQL("p.{}").format(_ident(c.name)), t, c),
                    stage=t.stage, same=same,
                    m=mirror.format(_ident(c.name)) if mirror is not None else sql.NULL))
    return vals


def soft_deleted_sql(t: MirrorTable) -> sql.Composed:
    """After the MERGE: rows the batch inserted and deleted again (their key's last staged
    change is a delete, and the mirror has no row) are kept too, marked, with their latest
    image in the batch."""
    key = sql.SQL(", ").join(_ident(k) for k in t.source.key)
    same = sql.SQL(" and ").join(sql.SQL("l.{k} = s.{k}").format(k=_ident(k))
                                 for k in t.source.key)
    return sql.SQL(
        "insert into {dest} ({cols}, {deleted}) "
        "select {vals}, {ct} from (select distinct on ({k}) s.*, "
        "(select case when l._r_op = 'D' then l._r_lsn end from {stage} l where {same} "
        "order by l._r_seq desc limit 1) as _r_dlsn "
        "from {stage} s where s._r_op <> 'D' order by {k}, s._r_seq desc) s "
        "where s._r_dlsn is not null and not exists (select 1 from {dest} m where {on}) "
        "and {f}"
    ).format(dest=t.dest, cols=sql.SQL(", ").join(_ident(c.name) for c in t.kept),
             deleted=_ident(DELETED_AT), vals=sql.SQL(", ").join(_images(t, None)),
             ct=commit_time(sql.SQL("s._r_dlsn")), k=key, stage=t.stage, same=same,
             on=_on_mirror(t), f=passes(t, "s"))


def moving_in_sql(t: MirrorTable) -> sql.Composed:
    """Keys (jsonb) of the last staged rows that enter the filter with unchanged-TOAST
    values: no mirror row has those values (nor, after a key change, the old key's), the
    source is asked for them."""
    key = t.source.key
    on = sql.SQL(" and ").join(sql.SQL("t.{k} = s.{k}").format(k=_ident(k)) for k in key)
    return _toast_ctes(t) + sql.SQL(
        "select coalesce(jsonb_agg({kj}), '[]') from r s where s._r_op <> 'D' "
        "and (s._r_anykeep or s._r_bad) and not exists (select 1 from {dest} t where {on}) "
        "and {f}"
    ).format(kj=key_json(t, "s"), dest=t.dest, on=on, f=passes(t, "s", cast=False))


def source_values_sql(t: MirrorTable) -> sql.Composed:
    """(On the source) the key and large values of the rows with the given keys, as jsonb."""
    cols = [c for c in t.kept if c.name in t.source.key or _toastable(c)]
    src = sql.Identifier(t.source.schema, t.source.name)
    keys = sql.SQL(", ").join(_ident(k) for k in t.source.key)
    return sql.SQL(
        "select coalesce(jsonb_agg(to_jsonb(x)), '[]') from (select {cols} from {src} "
        "where ({keys}) in (select {keys} from jsonb_populate_recordset(null::{src}, %s))) x"
    ).format(cols=sql.SQL(", ").join(
        sql.SQL("{}{} as {}").format(_ident(c.name), sql.SQL("" if c.builtin else "::text"),
                                     _ident(c.name)) for c in cols),
        src=src, keys=keys)


def fill_moving_in_sql(t: MirrorTable) -> sql.Composed:
    """Put the source's values into the unchanged-TOAST columns of each key's last staged
    row; the row then carries every value and is inserted like any other."""
    key = t.source.key
    same = sql.SQL(" and ").join(sql.SQL("s.{k} = f.{k}").format(k=_ident(k)) for k in key)
    same2 = sql.SQL(" and ").join(sql.SQL("l.{k} = s.{k}").format(k=_ident(k)) for k in key)
    sets: list[sql.Composable] = [sql.SQL(
        "{c} = case when get_bit(s._r_u, {i}) = 1 then f.{c} else s.{c} end").format(
        c=_ident(c.name), i=sql.Literal(i)) for i, c in enumerate(t.columns)
        if _toastable(c) and c in t.kept and c.name not in key]
    sets.append(sql.SQL("_r_u = null"))
    return sql.SQL(
        "update {stage} s set {sets} from jsonb_populate_recordset(null::{stage}, %s) f "
        "where {same} and s._r_u is not null "
        "and s._r_seq = (select max(l._r_seq) from {stage} l where {same2})"
    ).format(stage=t.stage, sets=sql.SQL(", ").join(sets), same=same, same2=same2)


def check_filter_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL("select {} from {} s limit 0").format(passes(t, "s"), t.stage)


def check_filter(conn: psycopg.Connection, t: MirrorTable) -> None:
    """Refuse a [mappings] filter the destination cannot run on the table's staged rows
    (t's staging table must exist)."""
    if t.options.filter is None:
        return
    try:
        with conn.transaction():
            conn.execute(check_filter_sql(t), {})
    except psycopg.Error as exc:
        raise ReplicatorError(
            ErrorKind.CONFIG, f"[mappings.{t.source.qualname}] filter: the destination cannot "
            f"run it on the table's rows: {exc.diag.message_primary or exc}",
            "write a SQL boolean expression over the source table's column names, valid on "
            "both the source and the destination") from None


# -- changes the mirror rejects ---------------------------------------------

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


def key_json(t: MirrorTable, alias: str, columns: list[str] | None = None) -> sql.Composed:
    """A staged row's key as jsonb of mirror-typed values: what dead letters are matched on.

    columns: the staging columns holding the key (default: the key columns themselves).
    """
    by_name = {c.name: c for c in t.columns}
    cols = columns or list(t.source.key)
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(k), _cast(
            sql.SQL("{}.{}").format(sql.SQL(alias), _ident(c)), t, by_name[k]))
        for k, c in zip(t.source.key, cols)))


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
    key = sql.SQL(", ").join(_ident(k) for k in t.source.key)
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
    on = sql.SQL(" and ").join(sql.SQL("o.{} = n.{}").format(_ident(k), _ident(f"_r_ok{i}"))
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
    cols = sql.SQL(", ").join(_staging_columns(t))
    return sql.SQL("insert into {stage} ({cols}) select {cols} from {iso} "
                   "where _r_grp >= %s and _r_grp < %s").format(
                       stage=t.stage, cols=cols, iso=ISOLATE)


def letter_sql(t: MirrorTable) -> sql.Composed:
    """Every change of the given groups into the dead letter table, in stream order.

    row_data has the mirror-typed new row without its unchanged-TOAST columns (named in
    unchanged: a retry keeps the mirror's value); a delete's is its key.
    """
    toast = [(i, c) for i, c in enumerate(t.columns) if _toastable(c) and c in t.kept]
    if toast:
        unchanged: sql.Composable = sql.SQL(
            "case when s._r_u is null then '{{}}'::text[] else array_remove(array[{}]::text[], "
            "null) end").format(sql.SQL(", ").join(
                sql.SQL("case when get_bit(s._r_u, {}) = 1 then {} end").format(
                    sql.Literal(i), sql.Literal(c.name)) for i, c in toast))
    else:
        unchanged = sql.SQL("'{}'::text[]")
    row = sql.SQL(", ").join(
        sql.SQL("{} as {}").format(_cast(sql.SQL("s.{}").format(_ident(c.name)), t, c),
                                   _ident(c.name)) for c in t.kept)
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


# -- the applier -----------------------------------------------------------


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



def _write(copy: psycopg.Copy, data: bytes | Pieces | SpilledRows | SpilledSlice) -> None:
    if isinstance(data, (SpilledRows, SpilledSlice)):
        for chunk in data.chunks():
            copy.write(chunk)
    elif isinstance(data, Pieces):
        # A memoryview: psycopg sends a big part in slices, which a Span cannot make.
        for part in data.parts:
            copy.write(memoryview(part))
    else:
        copy.write(data)



class Applier:
    """Owns the destination connection; applies batches one transaction each."""

    def __init__(self, conninfo: str, state_schema: str, slot: str, on_error: str = "stop",
                 limits: BatchLimits | None = None, readers: tuple[str, ...] = (),
                 source_conninfo: str | None = None, fence: Fence | None = None):
        assert on_error in ON_ERROR, on_error
        self._conninfo = conninfo
        # Read only for rows that move into a [mappings] filter with unchanged-TOAST values.
        self._source_conninfo = source_conninfo
        self._source: psycopg.Connection | None = None
        # The batch's commit LSNs and times (soft deletes, history rows).
        self._times: dict[str, list[int]] = {"lsns": [], "times": []}
        self.state_schema = state_schema
        self.slot = slot
        self.on_error = on_error
        self.limits = limits
        # The pipeline's lease (lease.py): every transaction of this applier that writes
        # checks it first, and fails without writing once another process took over.
        self.fence = fence
        # The session's index builder: a batch that alters a mirror table holds its builds.
        self.index_builds: IndexBuilder | None = None
        self._held: list[str] = []   # mirror tables whose builds this transaction holds
        # Mirror tables that may have waiting dead letters (None: not read yet). A batch
        # checks their staged keys against the letters; a table found to have none leaves.
        self._lettered: set[str] | None = None
        # Set while a batch runs again after a rejected change: each table's MERGE then
        # runs under a savepoint, and a failing one is bisected.
        self._careful = False
        # [destination] analytics_roles: the policy of every mirror table it creates.
        self.readers = readers
        # Set once <state>.commit_times exists (the pipeline sets up its component):
        # each batch then records its commit time for the tables it changed.
        self.commit_times = False
        # Commit batches with synchronous_commit off and report where their commit records
        # are (ApplyResult.wal_lsn): the caller confirms a batch to the source only once the
        # destination's WAL is flushed past it. The pipeline sets it; other callers (a dead
        # letter retry) get a commit that is durable when apply() returns.
        self.defer_flush = False
        self.conn: psycopg.Connection | None = None
        self._statements: dict[tuple[str, str, bool], sql.SQL] = {}
        # Mirror tables being copied while the stream runs: their changes are
        # held, not merged, until the copy is in (SyncStart ... SyncDone).
        self.holding: set[str] = set()
        # Staging tables known to be empty as committed: every batch empties what it
        # stages before it commits, so only the first use in a session (after an older
        # replicator, or a crash of one that emptied staging before COPY) clears first.
        self._clean: set[str] = set()
        # Staging tables emptied by the batch in flight, and rows staged since the last
        # VACUUM (table name -> (table, rows)).
        self._emptied: set[str] = set()
        self._staged: dict[str, tuple[MirrorTable, int]] = {}

    def connect(self) -> psycopg.Connection:
        try:
            # Watched: a dead connection is noticed long before stall_timeout (watchdog.py);
            # never prepared, as no connection deadline.connect makes is (a pooler).
            self.conn = watchdog.connect(
                self._conninfo, self.limits.answer_timeout if self.limits else None,
                side="destination", setting="[destination] stall_timeout", autocommit=True)
        except psycopg.OperationalError as exc:
            raise ReplicatorError(
                ErrorKind.DESTINATION_CONNECT, f"cannot connect to the destination: {exc}",
                "check [destination] host/port/user/password and that the database exists",
            ) from exc
        return self.conn

    @property
    def _dest(self) -> psycopg.Connection:
        """The connection connect() opened; applying without one is a bug."""
        assert self.conn is not None, "Applier.connect() was not called"
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def abort(self) -> None:
        """Shut the connection down under the batch in flight (from another thread).

        For a destination that answers neither the batch nor a cancel: the batch fails at
        once, and the server rolls it back (it never got the commit).
        """
        deadline.shut(self.conn)

    def cancel(self, timeout: float = 5) -> None:
        """Ask the destination to cancel the statement in flight (from another thread)."""
        conn = self.conn
        if conn is None:
            return
        try:
            conn.cancel_safe(timeout=timeout)
        except (psycopg.Error, OSError) as exc:
            log.warning("cannot cancel the batch in flight", extra={"error": str(exc)})

    def prepare_tables(self, tables: list[MirrorTable], alter: bool = True) -> None:
        """Create missing mirror and staging tables; alter existing mirrors unless told not to.

        At startup the pipeline passes alter=False: the stream may replay
        transactions older than the catalog, and the mirror's columns follow
        the Relation messages of transactions it applies, in stream order.
        """
        with self._dest.transaction():
            if self.fence is not None:
                self.fence.check(self._dest)
            for t in tables:
                self._ensure_table(t, alter=alter)

    def _ensure_table(self, t: MirrorTable, origins: tuple[Origin, ...] | None = None,
                      alter: bool = True) -> None:
        conn = self._dest
        if mirror_exists(conn, t):
            if alter:
                ensure_mirror_columns(conn, t, self.state_schema, self.slot, origins,
                                      before_alter=lambda: self._hold_index_builds(t))
        else:
            for stmt in create_mirror_sql(t):
                conn.execute(stmt)
            access.secure_table(conn, t.dest_schema, t.dest_name, self.readers)
            log.info("created mirror table", extra={"table": t.qualname})
            if origins:
                state.record_column_attnums(
                    conn, self.state_schema, self.slot, t.source.qualname,
                    {o.attnum: c.name for c, o in zip(t.columns, origins) if o.attnum is not None})
        conn.execute(create_staging_sql(t))
        self._ensure_options(t)

    def _hold_index_builds(self, t: MirrorTable) -> None:
        """No index build on t until this batch transaction ends: its ALTER TABLE waits for
        a CREATE INDEX CONCURRENTLY's lock, and the build waits for this transaction (an
        older snapshot, and maybe t's rows written): a deadlock the server ends by failing
        one of them. The build in flight is cancelled and done again after."""
        if self.index_builds is not None and t.qualname not in self._held:
            self.index_builds.hold(t.qualname)
            self._held.append(t.qualname)

    def _ensure_options(self, t: MirrorTable) -> None:
        """What the table's [mappings] options need in the mirror, checked before any row."""
        conn = self._dest
        check_options(t.source, t.options)
        if t.options.soft_delete:
            conn.execute(sql.SQL("alter table {} add column if not exists {} timestamptz").format(
                t.dest, _ident(DELETED_AT)))
        if t.options.history:
            row = conn.execute("select to_regclass(%s) is null",
                               [t.history.as_string(conn)]).fetchone()
            for stmt in create_history_sql(t):
                conn.execute(stmt)
            if row and row[0]:
                # As a mirror table, in the transaction that creates it: the schema's
                # default privileges (Supabase's for anon) must not outlive the commit.
                access.secure_table(conn, t.dest_schema, t.history_name, self.readers)
        check_filter(conn, t)

    def _stmt(self, kind: str, t: MirrorTable) -> sql.SQL:
        key = (kind, t.staging, t.temp_stage)
        stmt = self._statements.get(key)
        if stmt is None:
            build = {"copy": copy_sql, "copy_held": copy_held_sql, "merge": merge_sql,
                     "merge_toast": merge_toast_sql, "dead": dead_letter_sql,
                     "queued": queued_sql, "isolate_links": isolate_links_sql,
                     "isolate_queued": isolate_queued_sql, "isolate_stage": isolate_stage_sql,
                     "letter": letter_sql, "history": history_sql, "moving_in": moving_in_sql,
                     "fill_moving_in": fill_moving_in_sql,
                     "soft_deleted": soft_deleted_sql}[kind]
            stmt = self._statements[key] = sql.SQL(build(t).as_string(self.conn))
        return stmt

    def apply(self, batch: Batch, record_lsn: bool = True,
              system_id: str | None = None) -> ApplyResult:
        if batch.txns:
            failpoints.hit(failpoints.BATCH_BEFORE_BEGIN)
        try:
            return self._apply(batch, record_lsn, system_id)
        except _Rejected as rejected:
            # Savepoints cost nothing until a change fails: only then does the batch run
            # again, each table's MERGE under one, to find the keys that fail.
            exc = rejected.exc
            log.warning("the destination rejected a change: applying the batch again, "
                        "table by table, to find it", extra={
                            "lsn": format_lsn(batch.end_lsn), "sqlstate": exc.sqlstate,
                            "condition": type(exc).__name__})
            self._careful = True
            try:
                return self._apply(batch, record_lsn, system_id)
            finally:
                self._careful = False
        finally:
            self._release_index_builds()

    def _release_index_builds(self) -> None:
        """The batch transaction has ended: the index builds it held may go on."""
        if self.index_builds is not None:
            for table in self._held:
                self.index_builds.release(table)
        self._held = []

    def _apply(self, batch: Batch, record_lsn: bool, system_id: str | None) -> ApplyResult:
        res = ApplyResult()
        started = time.monotonic()
        holding_before = set(self.holding)
        syncs_done = any(isinstance(op, SyncDone) for op in batch.ops)
        self._times = {"lsns": list(batch.commit_times), "times": list(batch.commit_times.values())}
        self._emptied = set()
        try:
            conn = self._dest
            with conn.transaction(), conn.cursor() as cur:
                # The source may forget a transaction once it is confirmed, so the commit
                # must be durable before we confirm it: at once (on), or later, once the
                # destination's WAL is flushed past it (defer_flush): the commit returns
                # without waiting for the disk, which a small batch spends much of its time on.
                durability = "off" if self.defer_flush else "on"
                if self.limits is not None:
                    self.limits.set_local(cur, synchronous_commit=durability, fence=self.fence)
                else:
                    cur.execute(f"set local synchronous_commit = {durability}")
                    if self.fence is not None:
                        self.fence.check(cur)
                if record_lsn and batch.end_lsn:
                    # First, so the pipeline's row is locked for the whole batch: a
                    # `dead-letters --retry` locks it before touching the mirror, and the
                    # two take turns instead of deadlocking on mirror rows. The position
                    # still commits with the batch, or not at all.
                    state.record_applied(cur, self.state_schema, self.slot, batch.end_lsn,
                                         system_id)
                if self._lettered is None:
                    self._lettered = state.lettered_tables(cur, self.state_schema, self.slot)
                for op in batch.ops:
                    if isinstance(op, Rows):
                        for tr in op.tables:
                            self._apply_rows(cur, tr, batch.end_lsn, res)
                    elif isinstance(op, Truncate):
                        self._truncate(cur, op)
                    elif isinstance(op, AlterTable) and not op.alter:
                        cur.execute(create_staging_sql(op.table))
                    elif isinstance(op, AlterTable):
                        self._ensure_table(op.table, op.origins)
                    elif isinstance(op, SyncStart):
                        self._hold(cur, op.table)
                    elif isinstance(op, SyncDone):
                        self._unhold(cur, op, batch.end_lsn, res)
                if self.commit_times and batch.last_commit_ts:
                    changed = sorted({tr.table.source.qualname for tr in batch.table_rows()
                                      if tr.table.qualname not in self.holding}
                                     | {t.source.qualname for op in batch.ops
                                        if isinstance(op, Truncate) for t in op.tables
                                        if t.qualname not in self.holding})
                    if changed:
                        state.record_commit_times(cur, self.state_schema, self.slot, changed,
                                                  batch.last_commit_ts)
                if syncs_done:
                    failpoints.hit(failpoints.SYNC_DONE_BEFORE_COMMIT)
                if batch.txns:
                    failpoints.hit(failpoints.BATCH_BEFORE_COMMIT)
        except ReplicatorError:
            self.holding = holding_before
            raise
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled,
                psycopg.errors.DeadlockDetected) as exc:
            self.holding = holding_before
            raise timed_out(exc, batch.end_lsn, self.limits) from exc
        except psycopg.OperationalError as exc:
            self.holding = holding_before
            raise ReplicatorError(
                ErrorKind.DESTINATION_CONNECT, f"destination connection lost while applying "
                f"up to {format_lsn(batch.end_lsn)}: {exc}",
                "the batch was rolled back; the replicator retries it after reconnecting",
            ) from exc
        except psycopg.Error as exc:
            self.holding = holding_before
            if not self._careful and rejects(exc):
                raise _Rejected(exc) from exc
            refused = setup_error(exc, side="destination", role=self.conn.info.user
                                  if self.conn is not None else None)
            if refused is not None:  # a missing grant: the same on every retry
                raise refused from exc
            raise ReplicatorError(
                ErrorKind.DESTINATION_APPLY,
                f"the destination rejected the batch ending at {format_lsn(batch.end_lsn)}: {exc}",
                "nothing of this batch was applied; fix the mirror table named above "
                "(or drop it so it is recreated) and restart",
            ) from exc
        self._clean |= self._emptied
        res.seconds = time.monotonic() - started
        if batch.txns:
            failpoints.hit(failpoints.BATCH_COMMITTED)
        if self._lettered is not None:
            self._lettered |= res.lettered
        if syncs_done:
            failpoints.hit(failpoints.SYNC_DONE_COMMITTED)
        for op in batch.ops:
            if isinstance(op, SyncStart):
                failpoints.hit(failpoints.SYNC_START_COMMITTED)
                op.applied.set()
        if self.defer_flush:
            self._commit_position(res)
        self._vacuum_staging()
        return res

    def _commit_position(self, res: ApplyResult) -> None:
        """Where the batch's commit record is in the destination's WAL, and what is flushed.

        Read after the commit: the insert position then is past the commit record (read
        inside the transaction it would be before it). Both are server-wide, so through a
        transaction-mode pooler any server connection answers the same.
        """
        try:
            row = self._dest.execute(
                "select pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
            ).fetchone()
        except psycopg.OperationalError as exc:
            raise ReplicatorError(
                ErrorKind.DESTINATION_CONNECT,
                f"destination connection lost after a commit, before its WAL position: {exc}",
                "the batch is not confirmed to the source; the replicator reconnects") from exc
        assert row is not None  # a select without from: always one row
        res.wal_lsn, res.wal_flushed = parse_lsn(row[0]), parse_lsn(row[1])

    def _vacuum_staging(self) -> None:
        """VACUUM the staging tables that took STAGING_VACUUM_ROWS rows since the last one.

        Between batches, outside any transaction (VACUUM cannot run in one; through a
        transaction-mode pooler it is a transaction of its own). The batch committed
        already: a lost connection here is retried like one lost before the next batch.
        """
        for name, (t, rows) in list(self._staged.items()):
            if rows < STAGING_VACUUM_ROWS:
                continue
            del self._staged[name]
            try:
                self._dest.execute(vacuum_staging_sql(t))
            except psycopg.OperationalError as exc:
                raise ReplicatorError(
                    ErrorKind.DESTINATION_CONNECT,
                    f"destination connection lost while vacuuming {t.qualname}'s staging: {exc}",
                    "the batches before were committed; the replicator reconnects") from exc
            except psycopg.Error as exc:
                # Only the speed of later batches depends on it: autovacuum still comes.
                log.warning("cannot vacuum a staging table", extra={
                    "table": t.qualname, "error": str(exc).strip()})

    # -- tables being copied while the stream runs ---------------------------

    def _hold(self, cur: psycopg.Cursor, t: MirrorTable) -> None:
        cur.execute(create_staging_sql(t))
        cur.execute(create_held_sql(t))
        cur.execute(sql.SQL("truncate {}").format(t.held))
        state.set_table(cur, self.state_schema, self.slot, t, state.PENDING)
        self.holding.add(t.qualname)

    def _unhold(self, cur: psycopg.Cursor, op: SyncDone, end_lsn: int, res: ApplyResult) -> None:
        t = op.table
        statements, truncated = unhold_sql(t)
        cur.execute(statements[0], {"sync": op.sync_lsn})
        cur.execute(truncated)
        held_truncate = cur.fetchone()
        assert held_truncate is not None  # select exists (...): always one row
        if held_truncate[0]:
            cur.execute(sql.SQL("truncate {}").format(t.dest))
        for stmt in statements[1:]:
            cur.execute(stmt)
        cur.execute(sql.SQL(
            "select count(*) filter (where _r_op = 'I'), count(*) filter (where _r_op = 'U'), "
            "count(*) filter (where _r_op = 'D'), count(_r_u) from {}").format(t.stage))
        counts = cur.fetchone()
        assert counts is not None  # count(*) without group by: always one row
        ins, upd, dele, unchanged = counts
        rows = ins + upd + dele
        if rows:
            out = self._merge_table(cur, t, bool(unchanged), end_lsn, res)
            ins, upd, dele = (max(0, n - out.get(o, 0)) for n, o in zip((ins, upd, dele), "IUD"))
            rows -= sum(out.values())
        res.count(t.qualname, ins, upd, dele)
        cur.execute(clear_staging_sql(t))
        cur.execute(sql.SQL("truncate {}").format(t.held))
        state.set_table(cur, self.state_schema, self.slot, t, state.STREAMING, op.sync_lsn)
        self.holding.discard(t.qualname)
        res.rows += rows
        log.info("table sync state", extra={"table": t.qualname, "state": "streaming",
                                            "held_changes": rows})

    def _truncate(self, cur: psycopg.Cursor, op: Truncate) -> None:
        direct = [t for t in op.tables if t.qualname not in self.holding]
        for t in direct:
            if t.options.history:
                cur.execute(sql.SQL(
                    "insert into {} (_op, _commit_time, _lsn, _seq) select 'T', {}, "
                    "'0/0'::pg_lsn + s._r_lsn::numeric, 2 * %(seq)s::int8 "
                    "from (select %(lsn)s::int8 as _r_lsn) s").format(t.history, COMMIT_TIME),
                    {**self._times, "seq": op.seq, "lsn": op.lsn})
        soft = [t for t in direct if t.options.soft_delete]
        for t in soft:
            # Every row was deleted at the source: all are marked, none removed.
            cur.execute(sql.SQL(
                "update {} set {} = {} from (select %(lsn)s::int8 as _r_lsn) s "
                "where {} is null").format(t.dest, _ident(DELETED_AT), COMMIT_TIME,
                                           _ident(DELETED_AT)), {**self._times, "lsn": op.lsn})
        direct = [t for t in direct if not t.options.soft_delete]
        if direct:
            cur.execute(sql.SQL("truncate {}").format(sql.SQL(", ").join(t.dest for t in direct)))
        for t in op.tables:
            if t.qualname in self.holding:
                cur.execute(sql.SQL(
                    "insert into {} (_r_seq, _r_lsn, _r_op) values (%s, %s, 'T')").format(
                    t.held), [op.seq, op.lsn])

    def _apply_rows(self, cur: psycopg.Cursor, tr: TableRows, end_lsn: int,
                    res: ApplyResult) -> None:
        t = tr.table
        if t.qualname in self.holding:
            with cur.copy(self._stmt("copy_held", t)) as copy:
                _write(copy, tr.data)
            return
        if t.staging not in self._clean and t.staging not in self._emptied:
            cur.execute(clear_staging_sql(t))
        with cur.copy(self._stmt("copy", t)) as copy:
            _write(copy, tr.data)
        res.copies += 1
        out = self._merge_table(cur, t, bool(tr.unchanged), end_lsn, res)
        cur.execute(clear_staging_sql(t))
        self._emptied.add(t.staging)
        staged = self._staged.get(t.staging, (t, 0))[1] + tr.rows
        self._staged[t.staging] = (t, staged)
        res.rows += tr.rows - sum(out.values())
        # A key change's delete is not counted as a delete, hence the floor.
        res.count(t.qualname, *(max(0, n - out.get(o, 0))
                                for n, o in zip((tr.inserts, tr.updates, tr.deletes), "IUD")))

    def merge_streamed(self, cur: psycopg.Cursor, t: MirrorTable,
                       data: bytes | Pieces | SpilledRows | SpilledSlice, unchanged: bool,
                       res: ApplyResult, lettered: bool = False) -> int | None:
        """Stage and merge streamed rows of one table: a chunk's, or a piece of one.

        lettered: the table has waiting dead letters. If one of the staged keys has one,
        nothing is merged and None returned: the key's change must queue behind its
        letters, and a letter needs the commit LSN, which only the commit brings.
        """
        if t.temp_stage:
            cur.execute(temp_staging_sql(t))
        else:
            cur.execute(clear_staging_sql(t))
        with cur.copy(self._stmt("copy", t)) as copy:
            _write(copy, data)
        res.copies += 1
        if lettered:
            cur.execute(self._stmt("queued", t), {"slot": self.slot, "table": t.qualname})
            found = cur.fetchone()
            assert found is not None  # select exists ...: always one row
            if found[1]:
                return None
        dead = self._merge_staged(cur, t, unchanged, 0)
        if not t.temp_stage:
            cur.execute(clear_staging_sql(t))
        return dead

    # -- merging a table's staged rows ---------------------------------------

    def _merge_staged(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool,
                      end_lsn: int) -> int:
        """Merge what is staged; returns the unchanged-TOAST rows set aside (dead letters)."""
        if unchanged and t.options.filter is not None:
            self._fill_moving_in(cur, t)
        if t.options.history:
            cur.execute(self._stmt("history", t), self._times)
        if not unchanged:
            cur.execute(self._stmt("merge", t), self._times)
            if t.options.soft_delete:
                cur.execute(self._stmt("soft_deleted", t), self._times)
            return 0
        cur.execute(self._stmt("dead", t), [self.slot, t.qualname, format_lsn(end_lsn)])
        dead = max(cur.rowcount, 0)
        if dead:
            log.warning("rows sent with unchanged TOAST values that the mirror cannot "
                        "supply were written to the dead letter table",
                        extra={"table": t.qualname, "rows": dead})
        cur.execute(self._stmt("merge_toast", t), self._times)
        if t.options.soft_delete:
            cur.execute(self._stmt("soft_deleted", t), self._times)
        return dead

    def _fill_moving_in(self, cur: psycopg.Cursor, t: MirrorTable) -> None:
        """Rows an update moves into the filter come with unchanged-TOAST values that no
        mirror row has: they are read from the source, now. The source may be ahead of the
        stream, but a value changed since then comes again in a later change of the stream
        (a changed large value is always sent), which overwrites it; a row deleted since
        is not found and its change goes to the dead letters like any unsuppliable one."""
        cur.execute(self._stmt("moving_in", t), self._times)
        found = cur.fetchone()
        keys = found[0] if found else []
        if not keys:
            return
        if self._source_conninfo is None:
            return
        try:
            if self._source is None or self._source.closed:
                self._source = psycopg.connect(self._source_conninfo, autocommit=True,
                                               prepare_threshold=None)
            row = self._source.execute(source_values_sql(t), [Jsonb(keys)]).fetchone()
        except psycopg.OperationalError as exc:
            raise ReplicatorError(
                ErrorKind.SOURCE_CONNECT, f"cannot read {t.source.qualname} on the source for "
                f"rows entering its [mappings] filter: {exc}",
                "the batch was rolled back; the replicator retries it after reconnecting",
            ) from exc
        values = row[0] if row else []
        log.info("rows entering the filter took unchanged large values from the source",
                 extra={"table": t.qualname, "rows": len(keys), "found": len(values)})
        if values:
            cur.execute(self._stmt("fill_moving_in", t), [Jsonb(values)])

    def _merge_table(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool, end_lsn: int,
                     res: ApplyResult) -> dict[str, int]:
        """Merge the table's staged rows; returns the changes dead-lettered, per op."""
        queued = False
        if self._lettered is not None and t.qualname in self._lettered:
            cur.execute(self._stmt("queued", t), {"slot": self.slot, "table": t.qualname})
            found = cur.fetchone()
            assert found is not None  # select exists ...: always one row
            if not found[0]:
                self._lettered.discard(t.qualname)
            queued = bool(found[1])
        failed: psycopg.Error | None = None
        if not queued:
            if not self._careful:
                res.dead(t.qualname, self._merge_staged(cur, t, unchanged, end_lsn))
                return {}
            try:
                with cur.connection.transaction():
                    dead = self._merge_staged(cur, t, unchanged, end_lsn)
                res.dead(t.qualname, dead)
                return {}
            except psycopg.Error as exc:
                if not rejects(exc):
                    raise
                failed = exc
        return self._isolate(cur, t, unchanged, end_lsn, res, failed)

    def _isolate(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool, end_lsn: int,
                 res: ApplyResult, failed: psycopg.Error | None) -> dict[str, int]:
        """Apply the staged keys that the mirror accepts, set the others aside.

        failed: the error of merging everything staged, if that was tried.
        """
        for stmt in isolate_sql(t):
            cur.execute(stmt)
        cur.execute(sql.SQL("select coalesce(max(_r_kn) + 1, 0) from {}").format(ISOLATE))
        counted = cur.fetchone()
        n = int(counted[0]) if counted else 0
        cur.execute(self._stmt("isolate_links", t))
        links = [(int(a), int(b)) for a, b in cur.fetchall()]
        queued: set[int] = set()
        if self._lettered is not None and t.qualname in self._lettered:
            cur.execute(self._stmt("isolate_queued", t), {"slot": self.slot, "table": t.qualname})
            queued = {int(r[0]) for r in cur.fetchall()}
        groups, count = list(range(n)), n
        if links or queued:
            groups, count = group_keys(n, links, queued)
            cur.execute(isolate_groups_sql(), [list(range(n)), groups])
        bad: list[int] = []
        if queued:
            if self.on_error == "stop":
                raise ReplicatorError(ErrorKind.DESTINATION_REJECTED, (
                    f"{t.qualname}: {self._keys(cur, -1)} has a waiting dead letter, and "
                    f"[destination] on_error is \"stop\""), "retry or delete its dead letters "
                    "(`replicator dead-letters --retry`), or set on_error = \"dead_letter\"")
            self._letter(cur, t, [-1], "queued behind an earlier dead letter of the same key",
                         None, res)
            bad.append(-1)
        if count:
            res.dead(t.qualname, self._bisect(cur, t, unchanged, end_lsn, 0, count, failed, bad,
                                              res))
        out: dict[str, int] = {}
        if bad:
            cur.execute(isolate_ops_sql(), [bad])
            out = {op: int(c) for op, c in cur.fetchall()}
        cur.execute(sql.SQL("drop table pg_temp.{}").format(ISOLATE))
        return out

    def _bisect(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool, end_lsn: int,
                lo: int, hi: int, failed: psycopg.Error | None, bad: list[int],
                res: ApplyResult) -> int:
        """Merge groups lo..hi-1, halving what fails; returns unchanged-TOAST dead rows."""
        if failed is None:
            try:
                with cur.connection.transaction():
                    cur.execute(self._stmt("isolate_stage", t), [lo, hi])
                    dead = self._merge_staged(cur, t, unchanged, end_lsn)
                    cur.execute(clear_staging_sql(t))
                return dead
            except psycopg.Error as exc:
                if not rejects(exc):
                    raise
                failed = exc
        if hi - lo > 1:
            mid = (lo + hi) // 2
            return (self._bisect(cur, t, unchanged, end_lsn, lo, mid, None, bad, res)
                    + self._bisect(cur, t, unchanged, end_lsn, mid, hi, None, bad, res))
        reason = failed.diag.message_primary or type(failed).__name__
        if self.on_error == "stop":
            raise ReplicatorError(
                ErrorKind.DESTINATION_REJECTED,
                f"the destination rejected a change of {t.qualname} key {self._keys(cur, lo)}: "
                f"{reason} (SQLSTATE {failed.sqlstate})")
        self._letter(cur, t, [lo], reason, failed, res)
        bad.append(lo)
        return 0

    def _letter(self, cur: psycopg.Cursor, t: MirrorTable, groups: list[int], reason: str,
                failed: psycopg.Error | None, res: ApplyResult) -> None:
        cur.execute(self._stmt("letter", t), {
            "slot": self.slot, "table": t.qualname, "reason": reason, "groups": groups,
            "sqlstate": failed.sqlstate if failed is not None else None})
        rows = max(cur.rowcount, 0)
        res.dead(t.qualname, rows)
        res.lettered.add(t.qualname)
        # Neither key nor row values here (the dead letter table has them): the log is read
        # by more people than the mirror is.
        log.warning("changes the destination rejected were written to the dead letter table",
                    extra={"table": t.qualname, "rows": rows, "sqlstate":
                           failed.sqlstate if failed is not None else None,
                           "condition": type(failed).__name__ if failed is not None
                           else "queued behind a dead letter",
                           "constraint": failed.diag.constraint_name if failed is not None
                           else None})

    def _keys(self, cur: psycopg.Cursor, group: int) -> str:
        """The keys of one group, with their commit LSNs, for an error line."""
        cur.execute(isolate_keys_sql(), [group])
        found = [f"{k} (LSN {format_lsn(int(lsn))})" for k, lsn in cur.fetchall()]
        return ", ".join(found) or "?"


class _Rejected(Exception):
    """A change was rejected in a batch applied without savepoints: apply it again with them."""

    def __init__(self, exc: psycopg.Error) -> None:
        super().__init__(str(exc))
        self.exc = exc
