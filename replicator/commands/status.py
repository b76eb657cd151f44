"""`replicator status`: is the mirror fresh and complete? Read-only, safe beside a running `run`.

It reads the source's slot and WAL position, and the destination's state schema
(applied position, table states, dead letters) and mirror row counts. Nothing is
written, and no lock is waited for: the destination session runs read-only with
a short lock_timeout, so a count never queues in front of the replicator's own
TRUNCATE or ALTER TABLE; a count that cannot get its lock or takes too long is
reported as unknown.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..classify import classify
from ..config.settings import Config
from ..destination import lease, state
from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn, parse_lsn
from ..source import catalog, failover

log = logging.getLogger(__name__)

# Up to this many rows (by the planner's estimate) a mirror table is counted
# exactly; bigger ones show the mirror's own estimate, which costs nothing.
EXACT_COUNT_LIMIT = 100_000
# Read-only; never wait for a lock the replicator holds or wants; give up slow counts.
DEST_OPTIONS = ("-c default_transaction_read_only=on -c lock_timeout=200 "
                "-c statement_timeout=5000")
SOURCE_OPTIONS = "-c default_transaction_read_only=on -c statement_timeout=5000"


@dataclass
class TableStatus:
    source_table: str
    mirror_table: str
    state: str
    source_rows_estimate: int | None
    mirror_rows: int | None
    mirror_rows_method: str   # "count", "estimate" or "unknown"


@dataclass
class Status:
    slot: str
    slot_exists: bool
    slot_active: bool
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None
    retained_wal_bytes: int | None
    source_current_lsn: str
    synced: bool                       # the state has an applied position for this slot
    applied_lsn: str | None
    applied_at: str | None
    last_batch_at: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    dead_letters: int
    tables: list[TableStatus] = field(default_factory=list)
    # Secondary indexes of copied tables still being built ("mirror table: index"), in order.
    indexes_pending: list[str] = field(default_factory=list)
    # The process holding the pipeline's lease (destination/lease.py): "holding" (it
    # renews), "released" (stopped cleanly), "expired" (stopped renewing: died, or cut off)
    # or "none".
    writer: str | None = None
    writer_state: str = "none"
    writer_generation: int | None = None
    # holding: seconds until the lease expires; released/expired: seconds since.
    writer_seconds: float | None = None
    standby: str | None = None     # a second process waiting to take over
    # "running" (a writer renews the lease), "standby" (none does, a standby is taking
    # over) or "not running"; with since (the writer last seen) and why it stopped.
    running: str = "not running"
    stopped_at: str | None = None
    exit_reason: str | None = None
    problems: list[str] = field(default_factory=list)
    # Whether a failover of the source would keep the slot (source/failover.py): one line,
    # ready true/false/None (not known without [source] standby_host), and what to change.
    failover: str = ""
    failover_ready: bool | None = None
    failover_findings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(config: Config, max_lag_seconds: float) -> Status:
    src, dst = config.source, config.destination
    slot = src.slot
    try:
        source = psycopg.connect(src.conninfo(options=SOURCE_OPTIONS), autocommit=True,
                                 prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=src) from None
    with source:
        wal = catalog.slot_wal(source, slot)
        ready = failover.readiness(source, src, SOURCE_OPTIONS)
        try:
            dest = psycopg.connect(dst.conninfo(options=DEST_OPTIONS), autocommit=True,
                                   prepare_threshold=None)
        except psycopg.Error as exc:
            raise classify(exc, settings=dst) from None
        with dest:
            try:
                has_state = state.exists(dest, dst.state_schema)
                row = state.pipeline_row(dest, dst.state_schema, slot) if has_state else None
                synced = state.table_sync(dest, dst.state_schema, slot) if has_state else {}
                dead = state.dead_letter_count(dest, dst.state_schema, slot) if has_state else 0
                pending = _indexes_pending(dest, dst.state_schema, slot) if has_state else []
                who = lease.writers(dest, dst.state_schema, slot) if has_state else \
                    lease.Writers(None, "none", None, None, None)
            except psycopg.errors.LockNotAvailable:
                # Only a migration takes more than a row lock there: not worth waiting for.
                raise ReplicatorError(
                    ErrorKind.DESTINATION_CONNECT,
                    f"[destination] the replicator's state (schema {dst.state_schema!r}) is "
                    "locked, and status does not wait for a lock",
                    "a replicator starting a newer version is upgrading it: try again in a "
                    "few seconds") from None
            names = [n for n, (st, _l, _m) in synced.items() if st != state.REMOVED]
            estimates = catalog.table_estimates(source, names)
            tables = [_table(dest, name, synced[name][2], synced[name][0], estimates.get(name))
                      for name in sorted(names)]

    current = parse_lsn(wal.current_lsn)
    applied, updated = row if row else (None, None)
    lag_bytes = max(0, current - applied) if applied is not None else None
    lag_seconds: float | None = None
    if lag_bytes is not None and updated is not None:
        lag_seconds = 0.0 if lag_bytes == 0 else round(
            max(0.0, (dt.datetime.now(dt.timezone.utc) - updated).total_seconds()), 1)
    st = Status(
        slot=slot, slot_exists=wal.exists, slot_active=wal.active,
        confirmed_flush_lsn=wal.confirmed, restart_lsn=wal.restart, wal_status=wal.wal_status,
        retained_wal_bytes=max(0, current - parse_lsn(wal.restart)) if wal.restart else None,
        source_current_lsn=wal.current_lsn, synced=row is not None,
        applied_lsn=format_lsn(applied) if applied is not None else None,
        applied_at=updated.isoformat() if updated else None,
        last_batch_at=updated.isoformat() if updated else None,
        lag_bytes=lag_bytes, lag_seconds=lag_seconds, dead_letters=dead, tables=tables,
        indexes_pending=pending, writer=who.writer, writer_state=who.writer_state,
        writer_generation=who.generation, writer_seconds=who.seconds, standby=who.standby,
        running="running" if who.writer_state == "holding" else
        "standby" if who.standby else "not running",
        stopped_at=who.last_seen.isoformat() if who.last_seen and who.writer_state in (
            "released", "expired") else None,
        exit_reason=who.exit_reason if who.writer_state == "released" else None,
        failover=ready.summary, failover_ready=ready.ready,
        failover_findings=ready.findings)
    if st.running == "not running":
        st.problems.append(_not_running(st))
    if st.synced and not wal.exists:
        st.problems.append(f"replication slot {slot!r} is missing: the mirror lost changes "
                           "(run `replicator resync --all`)")
    elif st.synced and wal.wal_status == "lost":
        st.problems.append(f"replication slot {slot!r} lost WAL it needed (wal_status lost): "
                           "run `replicator resync --all`")
    elif wal.wal_status == "unreserved":
        st.problems.append(
            f"replication slot {slot!r} is about to lose WAL it needs (wal_status "
            "unreserved): the next checkpoint on the source may invalidate it; get "
            "`replicator run` streaming now, or raise max_slot_wal_keep_size")
    if lag_seconds is not None and lag_seconds > max_lag_seconds:
        st.problems.append(f"not keeping up: {lag_seconds:g} s behind (more than "
                           f"--max-lag-seconds {max_lag_seconds:g})")
    return st


def _indexes_pending(dest: psycopg.Connection, state_schema: str, slot: str) -> list[str]:
    # A state schema older than its index_builds table (status does not migrate it).
    row = dest.execute("select to_regclass(%s) is not null", [
        sql.Identifier(state_schema, "index_builds").as_string(dest)]).fetchone()
    if not (row and row[0]):
        return []
    return [f"{b.mirror_table}: {b.index_name}"
            for b in state.index_builds(dest, state_schema, slot)]


def _table(dest: psycopg.Connection, source_table: str, mirror_table: str, table_state: str,
           source_estimate: int | None) -> TableStatus:
    mirror_estimate = catalog.table_estimates(dest, [mirror_table]).get(mirror_table)
    big = max(source_estimate or 0, mirror_estimate or 0) > EXACT_COUNT_LIMIT
    if big:
        return TableStatus(source_table, mirror_table, table_state, source_estimate,
                           mirror_estimate, "estimate" if mirror_estimate is not None
                           else "unknown")
    schema, _, name = mirror_table.partition(".")
    try:
        with dest.transaction():
            row = dest.execute(sql.SQL("select count(*) from {}").format(
                sql.Identifier(schema, name))).fetchone()
    except psycopg.errors.UndefinedTable:
        return TableStatus(source_table, mirror_table, table_state, source_estimate, None,
                           "unknown")
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
        # The replicator holds (or waits for) the table: do not stand in its way.
        return TableStatus(source_table, mirror_table, table_state, source_estimate,
                           mirror_estimate, "estimate" if mirror_estimate is not None
                           else "unknown")
    return TableStatus(source_table, mirror_table, table_state, source_estimate,
                       int(row[0]) if row else None, "count")


def render(st: Status) -> str:
    """Aligned plain text for a terminal."""
    def val(v: Any) -> str:
        return "-" if v is None else str(v)

    slot = ("missing" if not st.slot_exists else
            f"{'active' if st.slot_active else 'inactive'}, wal_status {val(st.wal_status)}")
    pairs = [
        ("slot", f"{st.slot} ({slot})"),
        ("confirmed flush lsn", val(st.confirmed_flush_lsn)),
        ("restart lsn", val(st.restart_lsn)),
        ("retained wal", _bytes(st.retained_wal_bytes)),
        ("source current lsn", st.source_current_lsn),
        ("applied lsn", f"{val(st.applied_lsn)} at {val(st.applied_at)}" if st.synced
         else "- (never run)"),
        ("lag", f"{_bytes(st.lag_bytes)}, {val(st.lag_seconds)} s"),
        ("last batch", val(st.last_batch_at)),
        ("dead letters", str(st.dead_letters)),
        ("replicator", st.running if st.running != "not running" else
         f"not running since {val(st.stopped_at)}" if st.writer else "not running (never run)"),
        ("writer", _writer(st)),
        ("failover", st.failover),
    ]
    if st.standby:
        pairs.append(("standby", f"{st.standby} (waits to take over)"))
    if st.indexes_pending:
        shown = ", ".join(st.indexes_pending[:3]) + (", ..." if len(st.indexes_pending) > 3
                                                     else "")
        pairs.append(("indexes to build", f"{len(st.indexes_pending)} ({shown}), built "
                      "while `replicator run` streams"))
    width = max(len(k) for k, _ in pairs)
    lines = [f"{k.ljust(width)}  {v}" for k, v in pairs]
    if st.tables:
        head = ("source table", "mirror table", "state", "source rows (est.)", "mirror rows")
        rows = [(t.source_table, t.mirror_table, t.state, val(t.source_rows_estimate),
                 val(t.mirror_rows) + ("" if t.mirror_rows_method == "count"
                                       else f" ({t.mirror_rows_method})"))
                for t in st.tables]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines.append("")
        for r in [head, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for p in st.problems:
        lines.append(f"PROBLEM: {p}")
    for f in st.failover_findings:
        lines.append(f"failover: {f}")
    return "\n".join(lines)


def _not_running(st: Status) -> str:
    if st.writer is None:
        return "no replicator runs this pipeline: none has run yet (`replicator run`)"
    why = st.exit_reason or ("no exit recorded: killed, or cut off from the destination"
                             if st.writer_state == "expired" else "no reason recorded")
    return f"no replicator runs this pipeline: not running since {st.stopped_at}: {why}"


def _writer(st: Status) -> str:
    if st.writer is None:
        return "- (no replicator has run)"
    what = {"holding": f"holds the lease (expires in {st.writer_seconds} s unless renewed)",
            "released": f"stopped cleanly {st.writer_seconds} s ago",
            "expired": f"stopped renewing its lease {st.writer_seconds} s ago"}
    return f"{st.writer}, generation {st.writer_generation}: {what[st.writer_state]}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
