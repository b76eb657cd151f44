"""The dead letter table: what waits there, and applying it again once the mirror is fixed.

A change the mirror rejected (on_error = "dead_letter") waits there with its key, its row
and the server's reason; while it waits, every later change of the same key joins it
(apply.py), so a key's letters are its changes since the first failure, in order, and the
mirror holds the key as it was before them.

A retry (`replicator dead-letters --retry`) applies the letters in id order, one key (with
the keys its primary-key changes link to it) at a time, each key under a savepoint of one
destination transaction: all of a key's letters are applied and deleted, or none, and
the one that failed keeps the new error (reason, sqlstate, retries, retried_at). Never a
later change overwritten: a key's letters are all there is after the mirror's state of
it. Two cases differ:

- a letter older than its table's last copy (a resync since) is deleted unapplied: the
  copy already holds that change and everything after it;
- a letter that no retry can apply (op is null: an unchanged TOAST value nothing could
  supply) is listed but not retried; resync its table.

A letter is applied as the applier applies a change: staged as one row and written by the
applier's own statements (apply.py: the MERGE, and the history row), so the table's
[mappings] soft_delete (a delete marks the row, a later insert or update clears the mark)
and history (each retried change appended to <table>_history) hold here too. The letter's
row is the mirror's columns, so exclude needs nothing more; the filter is not applied again.
A letter keeps neither its source commit time nor its place in the transaction: its
_deleted_at and _commit_time are when it was set aside (the applier met the change, normally
seconds after its commit), and its history row comes first among its transaction's (_seq
below any the applier writes, in letter order).

The retry locks the pipeline's row in the state schema first: a running replicator
writes that row at the start of every batch transaction, so the batch in flight ends
before the retry starts and the next one waits for the retry to commit. Safe beside `run`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql

from ..config.settings import NO_OPTIONS, Config, MappingOptions
from ..lsn import format_lsn, parse_lsn
from ..schema import DELETED_AT, MirrorTable, read_table
from . import state
from .batch_sql import clear_staging_sql, history_sql, merge_sql
from .lease import Fence
from .mirror_ddl import create_staging_sql

__all__ = ["Letter", "RetryResult", "mirror_options", "retry", "waiting"]

# Rows deleted by a retried letter, by key, for a later letter of a key change that takes
# its unchanged TOAST values from them. Dropped at commit.
_IMAGES = sql.Identifier("_r_images")


@dataclass(frozen=True)
class Letter:
    id: int
    table: str
    lsn: int
    op: str | None          # I, U, D; None: cannot be retried
    key: str                # the key as JSON text
    old_key: str | None     # a primary-key change's previous key, as JSON text
    reason: str
    sqlstate: str | None
    created: Any
    retries: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "table": self.table, "lsn": format_lsn(self.lsn), "op": self.op,
                "key": json.loads(self.key) if self.key else None, "reason": self.reason,
                "sqlstate": self.sqlstate, "created": self.created.isoformat(),
                "retries": self.retries, "retryable": self.op is not None}


@dataclass
class RetryResult:
    applied: int = 0
    superseded: int = 0        # older than their table's last copy: deleted
    failed: list[tuple[Letter, str]] = field(default_factory=list)  # (letter, new error)
    not_retryable: int = 0


def waiting(conn: psycopg.Connection, state_schema: str, slot: str,
            table: str | None = None, lock: bool = False) -> list[Letter]:
    """The slot's dead letters in id order (of one mirror table if given)."""
    query = sql.SQL(
        "select id, mirror_table, lsn::text, op, coalesce(key_data, row_data)::text, "
        "old_key::text, reason, sqlstate, created_at, retries from {}.dead_letters "
        "where slot = %s and (%s::text is null or mirror_table = %s) order by id{}"
    ).format(sql.Identifier(state_schema), sql.SQL(" for update" if lock else ""))
    rows = conn.execute(query, [slot, table, table]).fetchall()
    return [Letter(i, t, parse_lsn(lsn), op, key or "", old, reason, code, created, n)
            for i, t, lsn, op, key, old, reason, code, created, n in rows]


def mirror_options(config: Config) -> dict[str, MappingOptions]:
    """Mirror table ("schema.table", as letters name it) -> its [mappings] options."""
    return {config.mappings[source]: options
            for source, options in config.mapping_options.items() if source in config.mappings}


def retry(conn: psycopg.Connection, state_schema: str, slot: str,
          table: str | None = None, fence: Fence | None = None,
          options: Mapping[str, MappingOptions] | None = None) -> RetryResult:
    """Apply the waiting letters again (see the module's docstring); one transaction.

    fence: the pipeline's lease (lease.observe): a takeover waits for this transaction.
    options: each mirror table's [mappings] options (mirror_options), none if not given."""
    res = RetryResult()
    mirrors: dict[str, MirrorTable] = {}
    dl = sql.Identifier(state_schema, "dead_letters")
    with conn.transaction():
        if fence is not None:
            fence.check(conn)
        state.lock_pipeline(conn, state_schema, slot)
        letters = waiting(conn, state_schema, slot, table, lock=True)
        copied = _copied_at(conn, state_schema, slot)
        todo = []
        for letter in letters:
            if letter.op is None:
                res.not_retryable += 1
            elif letter.lsn < copied.get(letter.table, 0):
                res.superseded += 1
                conn.execute(sql.SQL("delete from {} where id = %s").format(dl), [letter.id])
            else:
                todo.append(letter)
        if not todo:
            return res
        conn.execute(sql.SQL("create temp table if not exists {} (n bigserial, key jsonb, "
                             "image jsonb) on commit drop").format(_IMAGES))
        for queue in _queues(todo):
            current = queue[0]
            try:
                with conn.transaction():
                    for current in queue:
                        t = mirrors.get(current.table)
                        if t is None:
                            t = mirrors[current.table] = _mirror(
                                conn, state_schema, current,
                                (options or {}).get(current.table, NO_OPTIONS))
                        _apply(conn, dl, current, t)
                    conn.execute(sql.SQL("delete from {} where id = any(%s)").format(dl),
                                 [[q.id for q in queue]])
                res.applied += len(queue)
            except _CannotApply as exc:
                res.failed.append((current, _failed(conn, dl, current, str(exc), None)))
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                reason = exc.diag.message_primary or type(exc).__name__
                res.failed.append((current, _failed(conn, dl, current, reason, exc.sqlstate)))
    return res


class _CannotApply(Exception):
    """A letter that cannot be applied as the mirror is now (not a server error)."""


def _failed(conn: psycopg.Connection, dl: sql.Identifier, letter: Letter, reason: str,
            sqlstate: str | None) -> str:
    conn.execute(sql.SQL("update {} set reason = %s, sqlstate = %s, retries = retries + 1, "
                         "retried_at = now() where id = %s").format(dl),
                 [reason, sqlstate, letter.id])
    return reason


def _copied_at(conn: psycopg.Connection, state_schema: str, slot: str) -> dict[str, int]:
    """mirror table -> the sync LSN of its last copy."""
    rows = conn.execute(sql.SQL(
        "select mirror_table, max(sync_lsn)::text from {}.tables where slot = %s "
        "and sync_lsn is not null group by 1").format(sql.Identifier(state_schema)),
        [slot]).fetchall()
    return {t: parse_lsn(lsn) for t, lsn in rows}


def _queues(letters: list[Letter]) -> list[list[Letter]]:
    """Letters per key, keys a primary-key change links taken together; in id order."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(k: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(k, k)
        while parent[k] != k:
            k = parent[k]
        return k

    def node(table: str, key: str) -> tuple[str, str]:
        return table, json.dumps(json.loads(key), sort_keys=True)

    for letter in letters:
        a = root(node(letter.table, letter.key))
        if letter.old_key:
            b = root(node(letter.table, letter.old_key))
            if a != b:
                parent[max(a, b)] = min(a, b)
    queues: dict[tuple[str, str], list[Letter]] = {}
    for letter in letters:  # in id order: each queue is, and so is their first letter
        queues.setdefault(root(node(letter.table, letter.key)), []).append(letter)
    return list(queues.values())


# 2000-01-01, where pgoutput's (and so the applier's) commit times count from.
_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
# A retried change's staged _r_seq: its history row's _seq (2 * _r_seq + 1) is below any the
# applier writes (from 0 up), so it never takes one of its transaction's.
_SEQ_BASE = -(1 << 61)
_MICROSECOND = timedelta(microseconds=1)


def _mirror(conn: psycopg.Connection, state_schema: str, letter: Letter,
            options: MappingOptions) -> MirrorTable:
    """The letter's mirror table as the applier's statements need it, read from the mirror
    (its columns but _deleted_at), with a temporary staging table of those columns."""
    schema, _, name = letter.table.partition(".")
    found = read_table(conn, schema, name)
    source = replace(found, columns=tuple(c for c in found.columns if c.name != DELETED_AT),
                     key=tuple(json.loads(letter.key)))
    t = MirrorTable(source, schema, name, state_schema, binary=True, temp_stage=True,
                    options=MappingOptions(soft_delete=options.soft_delete,
                                           history=options.history))
    conn.execute(create_staging_sql(t))
    return t


def _apply(conn: psycopg.Connection, dl: sql.Identifier, letter: Letter,
           t: MirrorTable) -> None:
    dest = t.dest
    keys = list(t.source.key)

    def match(alias: str, param: str) -> sql.Composed:
        return sql.SQL("({}) = (select {} from jsonb_populate_record(null::{}, %({})s::jsonb) k)"
                       ).format(sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.SQL(alias),
                                                                           sql.Identifier(c))
                                                   for c in keys),
                                sql.SQL(", ").join(sql.SQL("k.{}").format(sql.Identifier(c))
                                                   for c in keys),
                                dest, sql.SQL(param))

    params = {"id": letter.id, "key": letter.key, "old": letter.old_key}
    change: sql.Composable
    if letter.op == "D":
        # Its row as it was, for a later letter of a key change that takes unchanged TOAST
        # values from it.
        conn.execute(sql.SQL(
            "insert into {images} (key, image) select %(key)s::jsonb, to_jsonb(t) "
            "from {dest} t where {m}").format(images=_IMAGES, dest=dest, m=match("t", "key")),
            params)
        change = sql.SQL("%(key)s::jsonb")
    else:
        found = conn.execute(sql.SQL(
            "select coalesce(unchanged, '{{}}') <> '{{}}', "
            "exists (select 1 from {dest} t where {m}) from {dl} where id = %(id)s"
        ).format(dest=dest, m=match("t", "key"), dl=dl), params).fetchone()
        assert found is not None  # the letter is locked by this transaction
        unchanged, exists = found
        change = sql.SQL("(select row_data from {} where id = %(id)s)").format(dl)
        if exists:
            # Its unchanged-TOAST columns keep the mirror's values.
            change = sql.SQL("((select to_jsonb(o) from {dest} o where {m}) || {change})").format(
                dest=dest, m=match("o", "key"), change=change)
        elif unchanged:
            # A new row whose unchanged TOAST values come from the key it moved from: that
            # row as an earlier letter of this retry deleted it, or as the mirror has it.
            image = sql.SQL(
                "coalesce((select image from {images} where key = %(old)s::jsonb order by n "
                "desc limit 1), (select to_jsonb(o) from {dest} o where {m}))"
            ).format(images=_IMAGES, dest=dest, m=match("o", "old"))
            has = conn.execute(sql.SQL("select {} is not null").format(image),
                               params).fetchone()
            if not letter.old_key or not has or not has[0]:
                raise _CannotApply("unchanged TOAST value and no mirror row to take it from: "
                                   "resync the table")
            change = sql.SQL("({} || {})").format(image, change)
    cols = [sql.Identifier(c.name) for c in t.columns]
    conn.execute(sql.SQL(
        "insert into {stage} (_r_seq, _r_lsn, _r_op, {cols}) "
        "select %(seq)s, %(lsn)s, %(op)s, {vals} from jsonb_populate_record(null::{dest}, "
        "{change}) r"
    ).format(stage=t.stage, cols=sql.SQL(", ").join(cols), dest=dest, change=change,
             vals=sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in cols)),
        {**params, "seq": _SEQ_BASE + letter.id, "lsn": letter.lsn, "op": letter.op})
    times = {"lsns": [letter.lsn],
             "times": [(letter.created - _EPOCH) // _MICROSECOND]}
    if t.options.history:
        conn.execute(history_sql(t), times)
    conn.execute(merge_sql(t), times)
    conn.execute(clear_staging_sql(t))
