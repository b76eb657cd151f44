"""`replicator verify`: does the mirror hold what the source holds? Table by table, key by key.

Each table's key space is cut into ranges of about RANGE_ROWS rows (boundaries
sampled from the source in key order); both sides count the rows of a range and
sum a 64-bit hash of each row's text, server-side. A range whose count or sum
differs is cut again (SPLIT ways) until it is small enough to compare row by
row, which names the keys: changed, missing in the mirror, extra in the mirror.
(A range of the first pass is small enough already, unless the mirror has many
rows the source has not there.)

Under a live workload a difference may only be a change in flight. The source
is read in a REPEATABLE READ READ ONLY snapshot whose position L is
pg_current_wal_insert_lsn() read inside it: every commit the snapshot sees
inserted its commit record before the snapshot was taken, so it ends at or
before L. The mirror is read (in a snapshot too, with the applied position
stored beside the rows) only once it has applied past L, so it has every change
the source snapshot shows, and a difference is either drift or a later change.
Each differing key is then read again on both sides, in fresh snapshot pairs:
it drops out when the two sides agree; it is drift when a round shows exactly
the pair of row versions the round before showed (neither side moved, and the
mirror had applied everything the source showed both times); a key that is
still moving after MAX_RECHECKS rounds is reported as unsettled, not as drift.

With the pipeline stopped (its slot inactive) the mirror cannot pass L: it is
complete as of L when the slot holds no change of a published table committed
before L, which a peek at the slot tells without consuming anything.

No data is written, except by --repair (see Verifier.repair), and no table is
changed: on an idle source verify emits one logical message, a WAL record for
the slot to carry the applied position past the snapshot. Source reads are plain
SELECTs (ACCESS SHARE: writers are never blocked); every statement has a
timeout, and neither side waits long for a lock, so verify never queues in
front of the replicator's own DDL or an application's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from ..classify import classify
from ..config.settings import Config
from ..destination import lease, state
from ..destination.lease import Fence
from ..destination.mirror_ddl import column_types
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn, parse_lsn
from ..pipeline.preflight import check_read_privileges
from ..schema import FIRST_USER_OID
from ..source import catalog
from .verify_report import MAX_KEYS, DriftRange, Report, TableResult

log = logging.getLogger(__name__)

RANGE_ROWS = 10_000   # rows per range of the first pass
SPLIT = 16            # a differing range is cut into this many
# A differing range this small is compared row by row (key and hash, some 40 bytes a row):
# cheaper than cutting it again, which costs a scan for boundaries and a query per part.
LEAF_ROWS = RANGE_ROWS
MAX_RECHECKS = 5      # re-reads of the differing keys before one is called unsettled
RETRIES = 3           # a table whose read could not get its lock is tried again
# Both sides render rows with the same settings, so equal values give equal text.
RENDER_OPTIONS = ("-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres "
                  "-c extra_float_digits=1 -c bytea_output=hex -c lc_monetary=C")
# Read-only; a short lock wait (never queue in front of DDL); no statement runs away.
# One statement scans at most a whole table (the first pass on a one-column key).
SOURCE_OPTIONS = (RENDER_OPTIONS + " -c default_transaction_read_only=on "
                  "-c statement_timeout=600000 -c lock_timeout=1000 "
                  "-c idle_in_transaction_session_timeout=900000")
DEST_OPTIONS = (RENDER_OPTIONS + " -c default_transaction_read_only=on "
                "-c statement_timeout=600000 -c lock_timeout=500 "
                "-c idle_in_transaction_session_timeout=900000")
COMPARABLE = (state.STREAMING, state.COPIED)

Key = tuple[str, ...]          # the key columns' text, in key order
Pair = tuple[int | None, int | None]   # (source row hash, mirror row hash); None: no row

# The per-range reads, on either side. {table}, {keys}, {texts}, {row} and {pred} are
# filled in per table and side; every value travels as text with an explicit cast.
SUMMARY_SQL = ("select count(*), coalesce(sum(hashtextextended({row}::text, 0)), 0) "
               "from {table} where {pred}")
# The first pass on a one-column key: every range's count and sum in one scan per side.
BUCKETS_SQL = ("select width_bucket({keys}, array(select b::{cast} from unnest(%s::text[]) "
               "with ordinality u(b, i) order by i)), count(*), "
               "coalesce(sum(hashtextextended({row}::text, 0)), 0) from {table} group by 1")
BOUNDARIES_SQL = ("select {outs} from (select {texts}, row_number() over (order by {keys}) "
                  "as _rn from {table} where {pred}) s where _rn > 1 and (_rn - 1) %% {step} = 0 "
                  "order by _rn")
ROWS_SQL = "select {texts}, hashtextextended({row}::text, 0) from {table} where {pred}"
ROWS_FOR_SQL = ("select {texts}, {values}hashtextextended({row}::text, 0) from {table} "
                "join unnest({arrays}) as _k({names}) on ({keys}) = ({given})")
CURRENT_LSN_SQL = "select pg_current_wal_insert_lsn()::text"
# --repair, on the mirror only (values as text, cast to the mirror column's type).
UPDATE_SQL = "update {table} set {sets} where ({keys}) = ({given})"
INSERT_SQL = "insert into {table} ({cols}) values ({vals})"
DELETE_SQL = "delete from {table} where ({keys}) = ({given})"
# Writes wait briefly for a lock, never long: the applier's batch may hold a row.
REPAIR_OPTIONS = RENDER_OPTIONS + " -c statement_timeout=60000 -c lock_timeout=200"
REPAIR_ATTEMPTS = 20


# -- ranges and their comparison (pure) -------------------------------------------------------


@dataclass(frozen=True)
class Range:
    lo: Key | None = None    # first key in the range; None: from the start
    hi: Key | None = None    # first key after it; None: to the end


def split(r: Range, bounds: list[Key]) -> list[Range]:
    """r cut at each of the (ascending, inside r) bounds."""
    edges: list[Key | None] = [r.lo, *bounds, r.hi]
    return [Range(a, b) for a, b in zip(edges, edges[1:])]


def diff_rows(source: dict[Key, int], mirror: dict[Key, int]) -> dict[Key, Pair]:
    """Every key whose row differs: (source hash, mirror hash), None for a missing row."""
    return {k: (source.get(k), mirror.get(k)) for k in source.keys() | mirror.keys()
            if source.get(k) != mirror.get(k)}


def key_order(k: Key) -> tuple:
    """For listing keys: whole numbers by value (Odoo's ids), anything else as text."""
    return tuple((0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v) for v in k)


def kind(pair: Pair) -> str:
    return "missing" if pair[1] is None else "extra" if pair[0] is None else "changed"


@dataclass
class Recheck:
    """Differing keys through the re-check rounds (see the module's docstring)."""

    pairs: dict[Key, Pair]
    confirmed: dict[Key, Pair] = field(default_factory=dict)
    rounds: int = 0

    @property
    def open(self) -> list[Key]:
        return sorted(k for k in self.pairs if k not in self.confirmed)

    def update(self, seen: dict[Key, Pair]) -> None:
        """One round: seen has every open key's pair (equal hashes where the sides agree)."""
        self.rounds += 1
        for k in self.open:
            now = seen[k]
            if now[0] == now[1]:
                del self.pairs[k]
            elif now == self.pairs[k]:
                self.confirmed[k] = now
            else:
                self.pairs[k] = now


# -- reading one table on one side ------------------------------------------------------------


@dataclass
class Reader:
    """The range reads of one table on one side (a connection in a snapshot)."""

    conn: psycopg.Connection
    table: sql.Composable
    keys: list[sql.Composable]      # key expressions: their order is the ranges' order
    casts: list[sql.Composable]     # the type each key value (text) is cast to
    texts: list[sql.Composable]     # key columns as text
    row: sql.Composable             # row(compared columns), hashed as text

    def _pred(self, r: Range) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        for key, op in ((r.lo, ">="), (r.hi, "<")):
            if key is None:
                continue
            given = sql.SQL(", ").join(sql.SQL("%s::{}").format(c) for c in self.casts)
            parts.append(sql.SQL("({}) {} ({})").format(
                sql.SQL(", ").join(self.keys), sql.SQL(op), given))
            params.extend(key)
        return (sql.SQL(" and ").join(parts) if parts else sql.SQL("true")), params

    def _fill(self, template: str, r: Range | None = None, **extra: Any) -> tuple[
            sql.Composed, list[Any]]:
        pred, params = self._pred(r) if r is not None else (sql.SQL("true"), [])
        query = sql.SQL(template).format(
            table=self.table, keys=sql.SQL(", ").join(self.keys), pred=pred, row=self.row,
            texts=sql.SQL(", ").join(sql.SQL("{} as {}").format(t, sql.Identifier(f"_t{i}"))
                                     for i, t in enumerate(self.texts)),
            **extra)
        return query, params

    def summary(self, r: Range) -> tuple[int, Decimal]:
        query, params = self._fill(SUMMARY_SQL, r)
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return int(row[0]), Decimal(row[1])

    def summaries(self, ranges: list[Range]) -> list[tuple[int, Decimal]]:
        """summary() of each of the ranges that split() made of the whole table."""
        if len(self.keys) > 1 or len(ranges) == 1:
            return [self.summary(r) for r in ranges]
        bounds = [r.lo[0] for r in ranges[1:] if r.lo is not None]
        cast = self.casts[0]
        query, _ = self._fill(BUCKETS_SQL, cast=cast)
        found = {b: (int(n), Decimal(h)) for b, n, h in self.conn.execute(query, [bounds])}
        # width_bucket: 0 below the first bound, i from the i-th bound on.
        return [found.get(i, (0, Decimal(0))) for i in range(len(ranges))]

    def boundaries(self, r: Range, step: int) -> list[Key]:
        outs = sql.SQL(", ").join(sql.Identifier(f"_t{i}") for i in range(len(self.texts)))
        query, params = self._fill(BOUNDARIES_SQL, r, outs=outs, step=sql.Literal(step))
        return [tuple(row) for row in self.conn.execute(query, params)]

    def rows(self, r: Range) -> dict[Key, int]:
        query, params = self._fill(ROWS_SQL, r)
        return {tuple(row[:-1]): row[-1] for row in self.conn.execute(query, params)}

    def rows_for(self, keys: list[Key]) -> dict[Key, int]:
        return {k: v[0] for k, v in self.values_for(keys, []).items()}

    def values_for(self, keys: list[Key], values: list[sql.Composable]) -> dict[
            Key, tuple[int, list[str | None]]]:
        """key -> (row hash, the values' text) of the given keys that have a row."""
        n = len(self.keys)
        names = [sql.Identifier(f"_k{i}") for i in range(n)]
        query, _ = self._fill(
            ROWS_FOR_SQL, values=sql.SQL("").join(v + sql.SQL(", ") for v in values),
            arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(n)),
            names=sql.SQL(", ").join(names),
            given=sql.SQL(", ").join(sql.SQL("{}::{}").format(sql.Identifier("_k", f"_k{i}"), c)
                                     for i, c in enumerate(self.casts)))
        columns = [[k[i] for k in keys] for i in range(n)]
        return {tuple(row[:n]): (row[-1], list(row[n:-1]))
                for row in self.conn.execute(query, columns)}


@dataclass
class TablePlan:
    """What is compared of one table, and how each side reads it."""

    source_table: str
    mirror_table: str
    key_names: list[str]             # source names of the key columns
    compared: list[str]              # source names of the compared columns
    not_compared: list[str]          # "name (why)"
    source_parts: tuple[list[sql.Composable], list[sql.Composable], list[sql.Composable],
                        sql.Composable]
    mirror_parts: tuple[list[sql.Composable], list[sql.Composable], list[sql.Composable],
                        sql.Composable]
    source_values: list[sql.Composable] = field(default_factory=list)   # compared, as text
    mirror_columns: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    key_types: list[int] = field(default_factory=list)   # type OIDs of the key columns

    def key(self, k: Key) -> dict[str, Any]:
        """A key as JSON shows it, as the dead letters do (jsonb): integers as numbers."""
        return {n: int(v) if t in INTEGER_TYPES and v is not None else v
                for n, v, t in zip(self.key_names, k, self.key_types)}

    def source(self, conn: psycopg.Connection) -> Reader:
        schema, _, name = self.source_table.partition(".")
        return Reader(conn, sql.Identifier(schema, name), *self.source_parts)

    def mirror(self, conn: psycopg.Connection) -> Reader:
        schema, _, name = self.mirror_table.partition(".")
        return Reader(conn, sql.Identifier(schema, name), *self.mirror_parts)


# Seconds an inactive slot that holds unapplied changes is given to become active (a `run`
# starting, or reconnecting after a session restart) before verify stops waiting for it.
STALLED_GRACE = 10.0

# int2, int4, int8, oid: a key of one of these is a number in --json.
INTEGER_TYPES = frozenset({21, 23, 20, 26})


class Skip(Exception):
    """A table that cannot be compared; the message says why."""


def plan_table(src: psycopg.Connection, dst: psycopg.Connection, state_schema: str, slot: str,
               source_table: str, mirror_table: str) -> TablePlan:
    """The columns both sides have with the same type, matched through their source attnum."""
    qual = sql.Identifier(*source_table.split(".", 1)).as_string(src)
    try:
        oid, _nsp, _rel, _ident, key = catalog.table_row(src, qual)
    except psycopg.errors.UndefinedTable:
        raise Skip("the source table no longer exists") from None
    if not key:
        raise Skip("the source table has no primary key or replica identity index")
    cols = catalog.table_columns(src, oid)
    attnums = {name: attnum for attnum, name, *_ in catalog.column_origins(src, oid)}
    mapped = state.column_attnums(dst, state_schema, slot, source_table)
    mschema, _, mname = mirror_table.partition(".")
    try:
        have = column_types(dst, sql.Identifier(mschema, mname))
    except psycopg.errors.UndefinedTable:
        raise Skip("the mirror table does not exist") from None
    collatable = catalog.collatable_types(src, [typoid for _n, _t, typoid, _l in cols])

    compared: list[str] = []
    not_compared: list[str] = []
    mirror_name: dict[str, str] = {}
    s_row: list[sql.Composable] = []
    m_row: list[sql.Composable] = []
    values: list[sql.Composable] = []
    mirror_cols: list[tuple[str, str]] = []
    by_name = {}
    for name, type_sql, typoid, _len in cols:
        by_name[name] = (type_sql, typoid)
        builtin = typoid < FIRST_USER_OID
        want = type_sql if builtin else "text"
        other = mapped.get(attnums.get(name, -1)) if mapped else name
        if other is None or other not in have:
            not_compared.append(f"{name} (not in the mirror yet)")
            continue
        if have[other] != want:
            not_compared.append(f"{name} ({type_sql} at the source, {have[other]} in the mirror)")
            continue
        compared.append(name)
        mirror_name[name] = other
        # A user-defined type is text in the mirror: its text form is what is compared.
        s_row.append(sql.Identifier(name) if builtin
                     else sql.SQL("{}::text").format(sql.Identifier(name)))
        m_row.append(sql.Identifier(other))
        values.append(sql.SQL("{}::text").format(sql.Identifier(name)))
        mirror_cols.append((other, have[other]))
    missing = [k for k in key if k not in mirror_name]
    if missing:
        raise Skip(f"key column {', '.join(missing)} cannot be compared")

    def parts(names: list[str]) -> tuple[list[sql.Composable], list[sql.Composable],
                                         list[sql.Composable]]:
        keys: list[sql.Composable] = []
        casts: list[sql.Composable] = []
        texts: list[sql.Composable] = []
        for k, n in zip(key, names):
            type_sql, typoid = by_name[k]
            ident = sql.Identifier(n)
            texts.append(sql.SQL("{}::text").format(ident))
            if typoid in collatable or typoid >= FIRST_USER_OID:
                # The two databases' collations may sort text differently: ranges
                # must hold the same keys on both sides.
                keys.append(sql.SQL('{}::text collate "C"').format(ident))
                casts.append(sql.SQL('text collate "C"'))
            else:
                keys.append(ident)
                casts.append(sql.SQL(type_sql))
        return keys, casts, texts

    def row(items: list[sql.Composable]) -> sql.Composable:
        return sql.SQL("row({})").format(sql.SQL(", ").join(items))

    return TablePlan(source_table, mirror_table, list(key), compared, not_compared,
                     (*parts(list(key)), row(s_row)),
                     (*parts([mirror_name[k] for k in key]), row(m_row)), values, mirror_cols,
                     [by_name[k][1] for k in key])


# -- results -----------------------------------------------------------------------------------


# -- the run -----------------------------------------------------------------------------------


class Verifier:
    def __init__(self, config: Config, wait: float) -> None:
        self.config = config
        self.wait = wait
        self.slot = config.source.slot
        self.state_schema = config.destination.state_schema
        self.src = self._connect(config.source, SOURCE_OPTIONS)
        self.src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.src.read_only = True
        self.src_side = self._connect(config.source, SOURCE_OPTIONS)  # slot, peek, nudge
        self.dst = self._connect(config.destination, DEST_OPTIONS)
        self.dst.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.dst.read_only = True
        self.dst_write: psycopg.Connection | None = None    # --repair only
        self.fence: Fence | None = None    # --repair only: the lease as found
        self.drifted: dict[str, tuple[TablePlan, dict[Key, Pair]]] = {}

    @staticmethod
    def _connect(settings: Any, options: str) -> psycopg.Connection:
        try:
            return psycopg.connect(settings.conninfo(options=options), autocommit=True,
                                   prepare_threshold=None)
        except psycopg.Error as exc:
            raise classify(exc, settings=settings) from None

    def close(self) -> None:
        for conn in (self.src, self.src_side, self.dst, self.dst_write):
            if conn is not None:
                conn.close()

    # -- which tables

    def tables(self, wanted: list[str] | None) -> dict[str, tuple[str, str]]:
        """source table -> (state, mirror table) of the tables to verify."""
        if not state.exists(self.dst, self.state_schema):
            raise ReplicatorError(
                ErrorKind.MIRROR_BEHIND,
                f"the destination has no replicator state (schema {self.state_schema}): "
                "nothing was replicated yet", "run `replicator run` first")
        if state.applied_lsn(self.dst, self.state_schema, self.slot) is None:
            raise ReplicatorError(
                ErrorKind.MIRROR_BEHIND,
                f"pipeline {self.slot!r} has never been synced: the mirror has nothing to "
                "compare yet", "run `replicator run` first, then verify")
        synced = {n: (st, m) for n, (st, _l, m)
                  in state.table_sync(self.dst, self.state_schema, self.slot).items()
                  if st != state.REMOVED}
        if not wanted:
            return dict(sorted(synced.items()))
        return {n: synced[n] for n in state.named_tables(wanted, synced, self.slot)}

    # -- snapshots

    @contextlib.contextmanager
    def snapshots(self, source_table: str, mirror_table: str) -> Iterator[None]:
        """A source snapshot, then a mirror snapshot that has applied past it."""
        with self.src.transaction():
            row = self.src.execute(CURRENT_LSN_SQL).fetchone()
            assert row is not None
            at = parse_lsn(row[0])
            self.wait_for_mirror(at)
            with self.dst.transaction():
                applied = state.applied_lsn(self.dst, self.state_schema, self.slot)
                st, mirror = state.table_sync(self.dst, self.state_schema, self.slot).get(
                    source_table, ("missing", 0, ""))[0::2]
                if st not in COMPARABLE or mirror != mirror_table:
                    raise Skip(f"its sync state changed to {st} during verify "
                               "(a resync started?): verify it again later")
                log.debug("snapshots", extra={"table": source_table, "source_lsn": row[0],
                                              "applied_lsn": format_lsn(applied or 0)})
                yield

    def wait_for_mirror(self, at: int) -> None:
        """Until the mirror has applied every change committed before `at`."""
        started = time.monotonic()
        nudged = False
        next_peek = 0.0
        peek_error = ""
        stalled_since: float | None = None   # inactive slot, changes left in it
        while True:
            applied = state.applied_lsn(self.dst, self.state_schema, self.slot)
            if applied is None:
                raise ReplicatorError(
                    ErrorKind.MIRROR_BEHIND,
                    f"slot {self.slot!r} has no applied position in the destination's state",
                    "run `replicator run` first")
            if applied >= at:
                return
            now = time.monotonic()
            wal = catalog.slot_wal(self.src_side, self.slot)
            if not wal.exists:
                raise ReplicatorError(
                    ErrorKind.RESYNC_REQUIRED,
                    f"replication slot {self.slot!r} is missing: the mirror lost changes",
                    "run `replicator resync --config PATH --all`, then `replicator run`")
            if wal.active:
                stalled_since = None
            elif now >= next_peek:
                next_peek = now + 1.0
                try:
                    if not catalog.slot_has_changes(self.src_side, self.slot,
                                                    self.config.source.publication,
                                                    format_lsn(at)):
                        return   # stopped, and nothing of ours left to apply
                except psycopg.Error as exc:   # started meanwhile, or no privilege
                    peek_error = " ".join(str(exc).split())
                else:
                    stalled_since = stalled_since if stalled_since is not None else now
            if stalled_since is not None and now - stalled_since > STALLED_GRACE:
                # Nothing reads the slot: waiting for the mirror would wait for nothing.
                raise ReplicatorError(
                    ErrorKind.MIRROR_BEHIND,
                    f"the mirror is behind the source (applied {format_lsn(applied)}, source "
                    f"snapshot at {format_lsn(at)}) and no replicator is applying: slot "
                    f"{self.slot!r} is inactive and holds changes it has not applied",
                    "start `replicator run`, then verify again")
            if wal.active and not nudged and now - started > 0.5:
                # An idle source writes no WAL past `at`, and the applied position
                # moves with the WAL the slot sends: give it a record to send.
                nudged = True
                with contextlib.suppress(psycopg.Error):
                    catalog.emit_heartbeat(self.src_side)
            if now - started > self.wait:
                running = ("the pipeline is running but did not get there" if wal.active
                           else "the pipeline is not running (its slot is inactive) and the "
                           "slot holds changes it has not applied"
                           + (f" (peeking the slot failed: {peek_error})" if peek_error else ""))
                raise ReplicatorError(
                    ErrorKind.MIRROR_BEHIND,
                    f"the mirror did not catch up with the source within {self.wait:g} s "
                    f"(applied {format_lsn(applied)}, source snapshot at {format_lsn(at)}): "
                    f"{running}")
            time.sleep(0.1)

    # -- one table

    def verify_table(self, source_table: str, table_state: str,
                     mirror_table: str) -> TableResult:
        def skipped(reason: str) -> TableResult:
            return TableResult(source_table, mirror_table, "skipped", reason)

        if table_state not in COMPARABLE:
            return skipped(f"sync state {table_state}: only streaming or copied tables compare")
        reason = ""
        for attempt in range(1, RETRIES + 1):
            try:
                plan = plan_table(self.src, self.dst, self.state_schema, self.slot,
                                  source_table, mirror_table)
                return self._compare(plan, TableResult(source_table, mirror_table, "ok"))
            except Skip as why:
                return skipped(str(why))
            except psycopg.errors.LockNotAvailable as exc:
                # The replicator (or an application) holds the table for DDL: do not
                # stand in its way; try again shortly.
                reason = f"busy after {attempt} attempts: " + " ".join(str(exc).split())
                time.sleep(0.5)
            except psycopg.errors.QueryCanceled:
                return skipped("a read ran past the 10-minute statement_timeout")
            except psycopg.errors.UndefinedTable:
                return skipped("the table was dropped during verify")
        return skipped(reason)

    def _compare(self, plan: TablePlan, result: TableResult) -> TableResult:
        result.compared_columns = plan.compared
        result.not_compared = plan.not_compared
        found: dict[Key, Pair] = {}
        in_range: dict[Key, int] = {}
        counts: list[tuple[Range, int, int, bool]] = []
        with self.snapshots(plan.source_table, plan.mirror_table):
            src, dst = plan.source(self.src), plan.mirror(self.dst)
            ranges = split(Range(), src.boundaries(Range(), RANGE_ROWS))
            # The two servers scan at the same time.
            with ThreadPoolExecutor(1) as pool:
                mirror_side = pool.submit(dst.summaries, ranges)
                source_side = src.summaries(ranges)
                sums = list(zip(source_side, mirror_side.result()))
            total_s = total_m = 0
            for i, (r, ((cs, hs), (cm, hm))) in enumerate(zip(ranges, sums)):
                total_s += cs
                total_m += cm
                counts.append((r, cs, cm, (cs, hs) != (cm, hm)))
                if (cs, hs) == (cm, hm):
                    continue
                if len(found) >= MAX_KEYS:
                    result.narrowing_stopped = True
                    continue
                before = set(found)
                self._narrow(src, dst, r, cs, cm, found, result)
                for k in found.keys() - before:
                    in_range[k] = i
        result.source_rows, result.mirror_rows = total_s, total_m
        result.ranges = len(ranges)
        check = Recheck(dict(found))
        for _ in range(MAX_RECHECKS):
            keys = check.open
            if not keys:
                break
            with self.snapshots(plan.source_table, plan.mirror_table):
                a = plan.source(self.src).rows_for(keys)
                b = plan.mirror(self.dst).rows_for(keys)
            check.update({k: (a.get(k), b.get(k)) for k in keys})
        result.rounds = 1 + check.rounds
        result.unsettled = len(check.open)
        drifted = sorted(check.confirmed, key=key_order)
        self.drifted[plan.source_table] = (plan, dict(check.confirmed))
        result.keys_total = len(drifted)
        result.keys = [{"key": plan.key(k), "kind": kind(check.confirmed[k])}
                       for k in drifted]
        shown = {in_range[k] for k in drifted}
        if result.narrowing_stopped and drifted:
            # Ranges past the narrowing limit: different, their keys not looked for.
            shown |= {i for i, c in enumerate(counts) if c[3]} - set(in_range.values())
        for i in sorted(shown):
            r, cs, cm, _differs = counts[i]
            result.drift_ranges.append(DriftRange(
                plan.key(r.lo) if r.lo else None, plan.key(r.hi) if r.hi else None, cs, cm))
        result.verdict = "drift" if drifted else "ok"
        return result

    def _narrow(self, src: Reader, dst: Reader, r: Range, cs: int, cm: int,
                found: dict[Key, Pair], result: TableResult) -> None:
        if max(cs, cm) <= LEAF_ROWS:
            found.update(diff_rows(src.rows(r), dst.rows(r)))
            return
        # Cut where the side with more rows has its rows: every part is smaller.
        bigger = src if cs >= cm else dst
        for sub in split(r, bigger.boundaries(r, math.ceil(max(cs, cm) / SPLIT))):
            if len(found) >= MAX_KEYS:
                result.narrowing_stopped = True
                return
            (cs2, hs2), (cm2, hm2) = src.summary(sub), dst.summary(sub)
            if (cs2, hs2) != (cm2, hm2):
                self._narrow(src, dst, sub, cs2, cm2, found, result)


    # -- --repair

    def repair(self, source_table: str) -> tuple[int, int]:
        """Re-copy a table's drifted keys from the source; (keys repaired, keys left alone).

        In one destination transaction that holds the pipeline's row (so no batch
        commits meanwhile: the mirror stays at its applied position A), the source
        rows are read in a snapshot taken after the lock, which sees every change
        the mirror has (each was committed at the source before it was streamed)
        and maybe later ones. Writing those values never puts an older value over
        a newer one; the stream then applies its changes after A, each a whole
        row or a delete, and the row ends as the source has it. A key is left
        alone when either side no longer shows the versions verify confirmed as
        drift (it changed since: the next verify looks at it again).
        """
        plan, pairs = self.drifted[source_table]
        if self.dst_write is None:
            self.dst_write = self._connect(self.config.destination, REPAIR_OPTIONS)
            # The lease as found now: a takeover by another `run` fails the repair's
            # transactions before they write (destination/lease.py).
            self.fence = lease.observe(self.dst_write, self.state_schema, self.slot,
                                       "`replicator verify --repair`")
        conn = self.dst_write
        for _attempt in range(REPAIR_ATTEMPTS):
            try:
                with conn.transaction():
                    return self._repair_locked(conn, plan, pairs)
            except psycopg.errors.LockNotAvailable:
                # A batch holds one of the rows (it then waits for the pipeline's
                # row we hold): let it through and try again.
                time.sleep(0.2)
        raise ReplicatorError(
            ErrorKind.DESTINATION_APPLY,
            f"--repair: the rows of {plan.mirror_table} stayed locked by the replicator's "
            f"batches through {REPAIR_ATTEMPTS} attempts", "run verify --repair again")

    def _repair_locked(self, conn: psycopg.Connection, plan: TablePlan,
                       pairs: dict[Key, Pair]) -> tuple[int, int]:
        assert self.fence is not None, "repair() observes the lease first"
        self.fence.check(conn)
        applied = state.lock_pipeline(conn, self.state_schema, self.slot)
        st, mirror = state.table_sync(conn, self.state_schema, self.slot).get(
            plan.source_table, ("missing", 0, ""))[0::2]
        if applied is None or st not in COMPARABLE or mirror != plan.mirror_table:
            raise Skip(f"its sync state changed to {st} (a resync started?)")
        keys = sorted(pairs)
        now = plan.mirror(conn).rows_for(keys)
        with self.src.transaction():
            source = plan.source(self.src).values_for(keys, plan.source_values)
        fix = [k for k in keys if now.get(k) == pairs[k][1]
               and source.get(k, (None, []))[0] == pairs[k][0]]
        reader = plan.mirror(conn)
        table = reader.table
        given = sql.SQL(", ").join(sql.SQL("%s::{}").format(c) for c in reader.casts)
        keys_sql = sql.SQL(", ").join(reader.keys)
        cols = [sql.Identifier(n) for n, _t in plan.mirror_columns]
        casts = [sql.SQL("%s::{}").format(sql.SQL(t)) for _n, t in plan.mirror_columns]
        with conn.cursor() as cur:
            for k in fix:
                values = source[k][1] if k in source else None
                if values is None:
                    cur.execute(sql.SQL(DELETE_SQL).format(table=table, keys=keys_sql,
                                                           given=given), list(k))
                elif now.get(k) is None:
                    cur.execute(sql.SQL(INSERT_SQL).format(
                        table=table, cols=sql.SQL(", ").join(cols),
                        vals=sql.SQL(", ").join(casts)), values)
                else:
                    sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(c, v)
                                              for c, v in zip(cols, casts))
                    cur.execute(sql.SQL(UPDATE_SQL).format(table=table, sets=sets,
                                                           keys=keys_sql, given=given),
                                [*values, *k])
        log.info("repaired", extra={"table": plan.source_table, "keys": len(fix),
                                    "left": len(keys) - len(fix),
                                    "applied_lsn": format_lsn(applied)})
        return len(fix), len(keys) - len(fix)


def verify(config: Config, tables: list[str] | None = None, wait: float = 60.0,
           repair: bool = False) -> Report:
    verifier = Verifier(config, wait)
    try:
        chosen = verifier.tables(tables)
        # One line with the GRANT, not a "permission denied" halfway through the tables.
        check_read_privileges(verifier.src, config, only=chosen)
        results = []
        for name, (st, mirror) in chosen.items():
            result = verifier.verify_table(name, st, mirror)
            if repair and result.verdict == "drift":
                try:
                    fixed, left = verifier.repair(name)
                except Skip as why:
                    result.reason = f"not repaired: {why}"
                else:
                    # What the mirror holds now, verified afresh.
                    result = verifier.verify_table(name, st, mirror)
                    result.repaired, result.repair_skipped = fixed, left
            results.append(result)
    finally:
        verifier.close()
    return Report(config.source.slot, results)
