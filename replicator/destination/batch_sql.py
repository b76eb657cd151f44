"""The statements of one batch: COPY into staging, one MERGE per table, history, soft deletes.

A table whose rows in the batch are all inserts skips staging: they are COPYed into the
mirror as they are (copy_mirror_sql), which costs a third of COPY + MERGE on a table with
only its primary key, and two thirds with Odoo's 18 indexes.

The MERGE keeps the last change per key (staging rows carry a sequence
number), deletes what was deleted, and never writes an unchanged-TOAST column
(`u`) as NULL: such a column keeps the mirror's value, or takes the latest
earlier image of the same row in the batch, whichever key it had then
(primary-key changes are followed back, however many), or the mirror's row
of the first key of that chain. A `u` that none of those can supply goes to
the dead letter table instead of the mirror.

Built from quoted identifiers (sql.Identifier) and the table's definition only.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from ..errors import ErrorKind, ReplicatorError
from ..schema import DELETED_AT, Column, MirrorTable
from .mirror_ddl import HISTORY_COLUMNS


def ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def typed(expr: sql.Composable, t: MirrorTable, col: Column) -> sql.Composable:
    # Binary staging already has the mirror's type; text staging is cast.
    if t.binary and col.builtin:
        return expr
    return sql.SQL("{}::{}").format(expr, sql.SQL(col.mirror_type))


def staging_columns(t: MirrorTable) -> list[sql.Identifier]:
    return ([ident("_r_seq"), ident("_r_lsn"), ident("_r_op")]
            + [ident(c.name) for c in t.columns]
            + [ident(f"_r_ok{i}") for i in range(len(t.source.key))] + [ident("_r_u")])


def copy_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL("copy {} ({}) from stdin (format binary)").format(
        t.stage, sql.SQL(", ").join(staging_columns(t)))


def copy_mirror_sql(t: MirrorTable) -> sql.Composed:
    """Inserts straight into the mirror (mirror_rows' stream: the kept columns)."""
    return sql.SQL("copy {} ({}) from stdin (format binary)").format(
        t.dest, sql.SQL(", ").join(ident(c.name) for c in t.kept))


def copy_held_sql(t: MirrorTable) -> sql.Composed:
    return sql.SQL("copy {} ({}) from stdin (format binary)").format(
        t.held, sql.SQL(", ").join(staging_columns(t)))


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
    rest = [c for c in staging_columns(t) if c != ident("_r_seq")]
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
        typed(sql.SQL("{}.{}").format(sql.SQL(alias), ident(c.name)), t, c) if cast
        else sql.SQL("{}.{}").format(sql.SQL(alias), ident(c.name)), ident(c.name))
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
        sql.SQL("t.{k} = s.{k}").format(k=ident(k)) for k in t.source.key)
    # (index in the stream's columns, column): _r_u bits and _r_keep{i} count all of them.
    cols = [(i, c) for i, c in enumerate(t.columns) if c.name not in t.options.exclude]
    if toast:
        # s already holds mirror-typed values and _r_keep{i} flags.
        def value(i: int, c: Column) -> sql.Composable:
            if c.name in key or not toastable(c):
                return sql.SQL("s.{}").format(ident(c.name))
            return sql.SQL("case when s.{keep} then t.{c} else s.{c} end").format(
                keep=ident(f"_r_keep{i}"), c=ident(c.name))
        ins_val: list[sql.Composable] = [sql.SQL("s.{}").format(ident(c.name))
                                         for _i, c in cols]
        upd_guard = sql.SQL(" and not s._r_bad")
        ins_guard: sql.Composable = sql.SQL(" and not s._r_bad and not s._r_anykeep")
    else:
        def value(i: int, c: Column) -> sql.Composable:
            return typed(sql.SQL("s.{}").format(ident(c.name)), t, c)
        ins_val = [value(i, c) for i, c in cols]
        upd_guard = ins_guard = sql.SQL("")
        on = sql.SQL(" and ").join(
            sql.SQL("t.{k} = {v}").format(
                k=ident(c.name), v=typed(sql.SQL("s.{}").format(ident(c.name)), t, c))
            for _i, c in cols if c.name in key)
    sets = [sql.SQL("{} = {}").format(ident(c.name), value(i, c))
            for i, c in cols if c.name not in key]
    delete: sql.Composable = sql.SQL("delete")
    if t.options.soft_delete:
        # The row stays, marked; a later insert or update of its key clears the mark.
        sets.append(sql.SQL("{} = null").format(ident(DELETED_AT)))
        delete = sql.SQL("update set {} = {}").format(ident(DELETED_AT), COMMIT_TIME)
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
             ig=ins_guard, cols=sql.SQL(", ").join(ident(c.name) for _i, c in cols),
             vals=sql.SQL(", ").join(ins_val))


def toastable(col: Column) -> bool:
    return col.typlen == -1


def merge_sql(t: MirrorTable) -> sql.Composed:
    """The common case: no unchanged-TOAST column in this table's batch."""
    key = sql.SQL(", ").join(ident(k) for k in t.source.key)
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
    k = sql.SQL(", ").join(ident(n) for n in key_names)
    cols = list(t.columns)
    # An excluded column's unchanged value is never needed: it is not in the mirror.
    tcols = [(i, c) for i, c in enumerate(cols) if toastable(c) and c.name not in key_names
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
            sql.SQL("{}.{} = {}.{}").format(sql.SQL(a), ident(x), sql.SQL(b), ident(y))
            for x, y in zip(names_a, names_b))

    fok = [f"_r_fok{j}" for j in range(nk)]
    rk = [f"_r_rk{j}" for j in range(nk)]      # the chain's root: the batch's last row's key
    ck = [f"_r_ck{j}" for j in range(nk)]      # the epoch the chain has reached
    nfok = [f"_r_nfok{j}" for j in range(nk)]  # where that epoch's row came from, if moved
    g = {i: ident(f"_r_g{i}") for i, _ in tcols}
    v = {i: ident(f"_r_v{i}") for i, _ in tcols}
    rr = {i: ident(f"_r_r{i}") for i, _ in tcols}
    w = {i: ident(f"_r_w{i}") for i, _ in tcols}

    g_parts = [sql.SQL(
        "count(*) filter (where _r_op <> 'D' and {kn}) "
        "over (partition by {k}, _r_ep order by _r_seq) as {g}"
    ).format(kn=known("e", i), k=k, g=g[i]) for i, c in tcols]
    g_parts += [sql.SQL(
        "first_value({ok}) over (partition by {k}, _r_ep order by _r_seq) as {f}").format(
        ok=ident(f"_r_ok{j}"), k=k, f=ident(fok[j])) for j in range(nk)]
    g_parts.append(sql.SQL(
        "first_value(_r_seq) over (partition by {k}, _r_ep order by _r_seq) as _r_fseq"
    ).format(k=k))
    v_parts = [sql.SQL(
        "first_value({c}) over (partition by {k}, _r_ep, {g} order by _r_seq) as {v}").format(
        c=ident(c.name), k=k, g=g[i], v=v[i]) for i, c in tcols]

    # p: for each epoch that began with a key change, the old key's epoch
    # that the key change's delete closed (-1: none in the batch, so the
    # old key's mirror row).
    p = sql.SQL(
        "p as (select distinct on ({xk}, x._r_ep) {xk}, x._r_ep, coalesce(d._r_ep, -1) as _r_pep "
        "from x left join x d on {dmatch} and d._r_op = 'D' and d._r_seq < x._r_fseq "
        "where x._r_fok0 is not null order by {xk}, x._r_ep, d._r_seq desc nulls last)"
    ).format(xk=sql.SQL(", ").join(sql.SQL("x.{}").format(ident(n)) for n in key_names),
             dmatch=eq("d", key_names, "x", fok))

    resolved = {i: sql.SQL("c.{}").format(rr[i]) for i, _ in tcols}

    def st(expr: sql.Composable, col: Column) -> sql.Composed:
        # A recursive CTE's columns must have one type and typmod in both
        # terms; window results and CASE lose the typmod (varchar(64)).
        return sql.SQL("({})::{}").format(expr, sql.SQL(t.staging_type(col)))
    base: list[sql.Composable] = [sql.SQL("l.{} as {}").format(ident(n), ident(rk[j]))
                                  for j, n in enumerate(key_names)]
    base += [sql.SQL("{} as {}").format(st(sql.SQL("l.{}").format(ident(n)), by_name[n]),
                                        ident(ck[j]))
             for j, n in enumerate(key_names)]
    base.append(sql.SQL("l._r_ep as _r_cep"))
    for i, col in tcols:
        base.append(sql.SQL("l.{g} > 0 as {r}, {v} as {w}").format(
            g=g[i], r=rr[i], v=st(sql.SQL("l.{}").format(v[i]), col), w=w[i]))
    base += [sql.SQL("l.{} as {}").format(ident(fok[j]), ident(nfok[j])) for j in range(nk)]
    base.append(sql.SQL("lp._r_pep as _r_npep"))
    step: list[sql.Composable] = [sql.SQL("c.{} as {}").format(ident(rk[j]), ident(rk[j]))
                                  for j in range(nk)]
    step += [sql.SQL("{} as {}").format(st(sql.SQL("c.{}").format(ident(nfok[j])), by_name[n]),
                                        ident(ck[j])) for j, n in enumerate(key_names)]
    step.append(sql.SQL("c._r_npep as _r_cep"))
    for i, col in tcols:
        step.append(sql.SQL("c.{r} or coalesce(x.{g} > 0, false) as {r}, {val} as {w}").format(
            r=rr[i], g=g[i], w=w[i], val=st(sql.SQL(
                "case when c.{r} then c.{w} when x.{g} > 0 then x.{v} end").format(
                    r=rr[i], w=w[i], g=g[i], v=v[i]), col)))
    step += [sql.SQL("x.{} as {}").format(ident(fok[j]), ident(nfok[j])) for j in range(nk)]
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
            c=ident(n), f=typed(sql.SQL("lo.{}").format(ident(ck[j])), t, by_name[n]))
        for j, n in enumerate(key_names))
    first_key = ident(key_names[0])

    out: list[sql.Composable] = [sql.SQL("l._r_op, l._r_seq, l._r_lsn")]
    keeps, bads = [], []
    tset = {i for i, _ in tcols}
    for i, col in enumerate(cols):
        own = typed(sql.SQL("l.{}").format(ident(col.name)), t, col)
        if i not in tset:
            out.append(sql.SQL("{} as {}").format(own, ident(col.name)))
            continue
        out.append(sql.SQL(
            "case when {kn} then {own} when l.{g} > 0 then {lv} "
            "when l._r_fok0 is not null then case when lo.{r} then {low} else tgo.{c} end end "
            "as {c}"
        ).format(kn=known("l", i), own=own, g=g[i],
                 lv=typed(sql.SQL("l.{}").format(v[i]), t, col), r=rr[i],
                 low=typed(sql.SQL("lo.{}").format(w[i]), t, col), c=ident(col.name)))
        keep = sql.SQL("(not {kn} and l.{g} = 0 and l._r_fok0 is null and l._r_ep = 0)").format(
            kn=known("l", i), g=g[i])
        out.append(sql.SQL("{} as {}").format(keep, ident(f"_r_keep{i}")))
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
    on = sql.SQL(" and ").join(sql.SQL("t.{k} = s.{k}").format(k=ident(k)) for k in key)
    obj = sql.SQL(", ").join(sql.SQL("{}, s.{}").format(sql.Literal(k), ident(k)) for k in key)
    return _toast_ctes(t) + sql.SQL(
        "insert into {dl} (slot, mirror_table, lsn, reason, row_data, key_data) "
        "select %s, %s, %s::pg_lsn, 'unchanged TOAST value with no earlier image in the batch "
        "and no mirror row to keep it from', jsonb_build_object({obj}), "
        "jsonb_build_object({obj}) from r s "
        "where s._r_op <> 'D' and (s._r_bad or (s._r_anykeep and not exists "
        "(select 1 from {dest} t where {on}))) and {f}"
    ).format(dl=sql.Identifier(t.state_schema, "dead_letters"), obj=obj, dest=t.dest, on=on,
             f=passes(t, "s", cast=False))


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
    ).format(hist=t.history, hcols=sql.SQL(", ").join(map(ident, HISTORY_COLUMNS)),
             cols=sql.SQL(", ").join(ident(c.name) for c in t.kept), ct=COMMIT_TIME,
             vals=sql.SQL(", ").join(vals), stage=t.stage, dest=t.dest, on=_on_mirror(t),
             f=passes(t, "s"))


def _on_mirror(t: MirrorTable) -> sql.Composed:
    """Mirror row m of staged row s."""
    by_name = {c.name: c for c in t.columns}
    return sql.SQL(" and ").join(sql.SQL("m.{} = {}").format(
        ident(k), typed(sql.SQL("s.{}").format(ident(k)), t, by_name[k])) for k in t.source.key)


def _images(t: MirrorTable, mirror: sql.SQL | None) -> list[sql.Composable]:
    """The mirror's columns of staged row s as mirror-typed values, a delete's key only. An
    unchanged-TOAST value is the latest earlier one of the key in staging, else the mirror
    row's (`mirror`: a format for the column, e.g. m.{}), else NULL."""
    key = list(t.source.key)
    same = sql.SQL(" and ").join(sql.SQL("p.{k} = s.{k}").format(k=ident(k)) for k in key)
    index = {c.name: i for i, c in enumerate(t.columns)}
    vals: list[sql.Composable] = []
    for c in t.kept:
        own = typed(sql.SQL("s.{}").format(ident(c.name)), t, c)
        if c.name in key:
            vals.append(own)
        elif not toastable(c):
            vals.append(sql.SQL("case when s._r_op <> 'D' then {} end").format(own))
        else:
            i = sql.Literal(index[c.name])
            vals.append(sql.SQL(
                "case when s._r_op = 'D' then null "
                "when s._r_u is null or get_bit(s._r_u, {i}) = 0 then {own} "
                "else coalesce((select {prev} from {stage} p where {same} and p._r_seq < s._r_seq "
                "and p._r_op <> 'D' and (p._r_u is null or get_bit(p._r_u, {i}) = 0) "
                "order by p._r_seq desc limit 1), {m}) end").format(
                    i=i, own=own, prev=typed(sql.SQL("p.{}").format(ident(c.name)), t, c),
                    stage=t.stage, same=same,
                    m=mirror.format(ident(c.name)) if mirror is not None else sql.NULL))
    return vals


def soft_deleted_sql(t: MirrorTable) -> sql.Composed:
    """After the MERGE: rows the batch inserted and deleted again (their key's last staged
    change is a delete, and the mirror has no row) are kept too, marked, with their latest
    image in the batch."""
    key = sql.SQL(", ").join(ident(k) for k in t.source.key)
    same = sql.SQL(" and ").join(sql.SQL("l.{k} = s.{k}").format(k=ident(k))
                                 for k in t.source.key)
    return sql.SQL(
        "insert into {dest} ({cols}, {deleted}) "
        "select {vals}, {ct} from (select distinct on ({k}) s.*, "
        "(select case when l._r_op = 'D' then l._r_lsn end from {stage} l where {same} "
        "order by l._r_seq desc limit 1) as _r_dlsn "
        "from {stage} s where s._r_op <> 'D' order by {k}, s._r_seq desc) s "
        "where s._r_dlsn is not null and not exists (select 1 from {dest} m where {on}) "
        "and {f}"
    ).format(dest=t.dest, cols=sql.SQL(", ").join(ident(c.name) for c in t.kept),
             deleted=ident(DELETED_AT), vals=sql.SQL(", ").join(_images(t, None)),
             ct=commit_time(sql.SQL("s._r_dlsn")), k=key, stage=t.stage, same=same,
             on=_on_mirror(t), f=passes(t, "s"))


def moving_in_sql(t: MirrorTable) -> sql.Composed:
    """Keys (jsonb) of the last staged rows that enter the filter with unchanged-TOAST
    values: no mirror row has those values (nor, after a key change, the old key's), the
    source is asked for them."""
    key = t.source.key
    on = sql.SQL(" and ").join(sql.SQL("t.{k} = s.{k}").format(k=ident(k)) for k in key)
    return _toast_ctes(t) + sql.SQL(
        "select coalesce(jsonb_agg({kj}), '[]') from r s where s._r_op <> 'D' "
        "and (s._r_anykeep or s._r_bad) and not exists (select 1 from {dest} t where {on}) "
        "and {f}"
    ).format(kj=key_json(t, "s"), dest=t.dest, on=on, f=passes(t, "s", cast=False))


def source_values_sql(t: MirrorTable) -> sql.Composed:
    """(On the source) the key and large values of the rows with the given keys, as jsonb."""
    cols = [c for c in t.kept if c.name in t.source.key or toastable(c)]
    src = sql.Identifier(t.source.schema, t.source.name)
    keys = sql.SQL(", ").join(ident(k) for k in t.source.key)
    return sql.SQL(
        "select coalesce(jsonb_agg(to_jsonb(x)), '[]') from (select {cols} from {src} "
        "where ({keys}) in (select {keys} from jsonb_populate_recordset(null::{src}, %s))) x"
    ).format(cols=sql.SQL(", ").join(
        sql.SQL("{}{} as {}").format(ident(c.name), sql.SQL("" if c.builtin else "::text"),
                                     ident(c.name)) for c in cols),
        src=src, keys=keys)


def fill_moving_in_sql(t: MirrorTable) -> sql.Composed:
    """Put the source's values into the unchanged-TOAST columns of each key's last staged
    row; the row then carries every value and is inserted like any other."""
    key = t.source.key
    same = sql.SQL(" and ").join(sql.SQL("s.{k} = f.{k}").format(k=ident(k)) for k in key)
    same2 = sql.SQL(" and ").join(sql.SQL("l.{k} = s.{k}").format(k=ident(k)) for k in key)
    sets: list[sql.Composable] = [sql.SQL(
        "{c} = case when get_bit(s._r_u, {i}) = 1 then f.{c} else s.{c} end").format(
        c=ident(c.name), i=sql.Literal(i)) for i, c in enumerate(t.columns)
        if toastable(c) and c in t.kept and c.name not in key]
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


def key_json(t: MirrorTable, alias: str, columns: list[str] | None = None) -> sql.Composed:
    """A staged row's key as jsonb of mirror-typed values: what dead letters are matched on.

    columns: the staging columns holding the key (default: the key columns themselves).
    """
    by_name = {c.name: c for c in t.columns}
    cols = columns or list(t.source.key)
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(k), typed(
            sql.SQL("{}.{}").format(sql.SQL(alias), ident(c)), t, by_name[k]))
        for k, c in zip(t.source.key, cols)))
