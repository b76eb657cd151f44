"""The replication connection: IDENTIFY_SYSTEM, slot, START_REPLICATION, status.

psycopg 3 has no replication API, so this drives its `pq` layer directly.
The walsender only speaks the simple query protocol, hence `exec_`. The
CopyData stream itself is read by the Cython decoder straight from libpq
(Decoder.attach/pump); this module only hands it the pointers.
"""

from __future__ import annotations

import logging
import select
import struct
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from ..classify import classify
from ..errors import ErrorKind, ReplicatorError
from ..libpq import function_addresses
from ..lsn import format_lsn, parse_lsn, pg_now

log = logging.getLogger(__name__)

# Settings that make pgoutput's text mode unambiguous for the destination's
# input functions (dates, floats, intervals, bytes).
TEXT_MODE_OPTIONS = (
    "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 "
    "-c bytea_output=hex"
)


def protocol_for(server_version: int) -> int:
    """The highest pgoutput protocol the server accepts.

    Chosen from the version, never by trial: PostgreSQL 15 rejects newer
    option values before it looks at the version.
    """
    if server_version >= 160000:
        return 4
    if server_version >= 150000:
        return 3
    if server_version >= 140000:
        return 2
    return 1


@dataclass(frozen=True)
class SystemInfo:
    system_id: str
    timeline: int
    xlogpos: int
    dbname: str | None


class ReplicationConnection:
    """One `replication=database` connection to the source."""

    def __init__(self, conninfo: str, answer_timeout: float | None = None):
        self._conninfo = conninfo
        # Seconds a command, or a status update the socket does not take, may wait for the
        # server ([source] receive_timeout); None: for ever.
        self.answer_timeout = answer_timeout
        self.pgconn: pq.PGconn | None = None

    def connect(self) -> None:
        conn = pq.PGconn.connect(self._conninfo.encode())
        if conn.status != pq.ConnStatus.OK:
            msg = conn.error_message.decode("utf-8", "replace").strip()
            conn.finish()
            raise ReplicatorError(
                ErrorKind.SOURCE_CONNECT,
                f"cannot open a replication connection to the source: {msg}",
                "check [source] host/port/user/password, and that a pg_hba.conf line admits "
                "this user to [source] database (`host <database> <user> <address> "
                "scram-sha-256`: logical replication matches the database name, not the "
                "`replication` keyword)",
            )
        self.pgconn = conn

    @property
    def server_version(self) -> int:
        return self.pgconn.server_version

    def fileno(self) -> int:
        return self.pgconn.socket

    def close(self) -> None:
        if self.pgconn is not None:
            self.pgconn.finish()
            self.pgconn = None

    def command(self, query: str) -> list[tuple[str | None, ...]]:
        """Run one walsender command; its rows as text."""
        res = self._exec(query)
        if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            msg = res.error_message.decode("utf-8", "replace").strip()
            raise ReplicatorError(
                ErrorKind.SOURCE_SETUP, f"source refused {query.split()[0]}: {msg}",
                "check that wal_level=logical, max_replication_slots/max_wal_senders "
                "are large enough and that the user has the REPLICATION attribute",
            )
        return [
            tuple(None if (v := res.get_value(r, c)) is None else v.decode()
                  for c in range(res.nfields))
            for r in range(res.ntuples)
        ]

    def _exec(self, query: str) -> pq.PGresult:
        """PQexec, but giving up after ``answer_timeout`` of silence (a dead tunnel)."""
        conn = self.pgconn
        if self.answer_timeout is None:
            return conn.exec_(query.encode())
        conn.nonblocking = 1
        try:
            conn.send_query(query.encode())  # raises on failure
            self._flush(query.split()[0])
            last: pq.PGresult | None = None
            while True:
                while conn.is_busy():
                    self._wait(query.split()[0], read=True)
                    conn.consume_input()
                res = conn.get_result()
                if res is None:
                    assert last is not None, "a query always has a result"
                    return last
                last = res
                if res.status in (pq.ExecStatus.COPY_BOTH, pq.ExecStatus.COPY_OUT):
                    return res
        finally:
            if conn.status == pq.ConnStatus.OK:
                conn.nonblocking = 0

    def _wait(self, doing: str, read: bool) -> None:
        sock = [self.pgconn.socket]
        r, w, _ = select.select(sock if read else [], [] if read else sock, [],
                                self.answer_timeout)
        if not r and not w:
            raise ReplicatorError(
                ErrorKind.SOURCE_CONNECT,
                f"nothing received from the source for {self.answer_timeout:g} s "
                f"([source] receive_timeout) while {doing}: the connection is dead",
                "the replicator reconnects and resumes from the last applied position")

    def _flush(self, doing: str) -> None:
        while True:
            pending = self.pgconn.flush()
            if pending == 0:
                return
            if pending < 0:
                raise self.stream_error(doing)
            self._wait(doing, read=False)

    def identify_system(self) -> SystemInfo:
        (sysid, tli, xlogpos, dbname), = self.command("IDENTIFY_SYSTEM")
        return SystemInfo(sysid, int(tli), parse_lsn(xlogpos), dbname)

    def create_slot(self, slot: str) -> int:
        """Create the logical slot; its consistent point.

        On PostgreSQL 17+ it is a failover slot: standbys that sync slots keep a copy, which
        the replicator resumes from after a failover instead of copying every table again.
        It costs the primary nothing unless synchronized_standby_slots is set; a slot made
        on a standby (PostgreSQL 16+ decodes there) cannot be one.
        """
        failover = ""
        if self.server_version >= 170000:
            # A standby refuses FAILOVER (only a primary's slots are synced).
            (in_recovery,), = self.command("select pg_is_in_recovery()")
            failover = ", FAILOVER true" if in_recovery == "f" else ""
        rows = self.command(f"CREATE_REPLICATION_SLOT {quote_ident(slot)} LOGICAL pgoutput "
                            f"(SNAPSHOT 'nothing'{failover})")
        return parse_lsn(rows[0][1])

    def timeline_history(self, timeline: int) -> dict[int, int]:
        """Each ancestor timeline of ``timeline`` -> the LSN where the next one forked off it
        (TIMELINE_HISTORY: the history file's lines are "parent\tswitchpoint\treason")."""
        rows = self.command(f"TIMELINE_HISTORY {int(timeline)}")
        forks = {}
        for line in (rows[0][1] or "").splitlines() if rows else []:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[0].strip().isdigit():
                forks[int(parts[0])] = parse_lsn(parts[1].strip())
        return forks

    def drop_slot(self, slot: str) -> None:
        self.command(f"DROP_REPLICATION_SLOT {quote_ident(slot)}")

    def start(self, slot: str, lsn: int, publication: str, protocol: int,
              binary: bool, streaming: bool = False) -> None:
        options = [
            ("proto_version", str(protocol)),
            ("publication_names", quote_ident(publication)),
            ("binary", "true" if binary else "false"),
            ("messages", "true"),
        ]
        if streaming and protocol >= 2:
            # 'on', not 'parallel': on 16+ that only adds the abort LSN and time to
            # Stream Abort, which the receiver does not need.
            options.append(("streaming", "on"))
        opts = ", ".join(f"{k} {quote_literal(v)}" for k, v in options)
        query = (f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL "
                 f"{format_lsn(lsn)} ({opts})")
        res = self._exec(query)
        if res.status != pq.ExecStatus.COPY_BOTH:
            msg = res.error_message.decode("utf-8", "replace").strip()
            code = res.error_field(pq.DiagnosticField.SQLSTATE)
            # The SQLSTATE decides: a slot busy elsewhere (55006) is waited out, a lost
            # one (55000) or a missing publication (42704) needs the operator.
            sqlstate = code.decode() if code else None
            try:
                exc: Exception = psycopg.errors.lookup(sqlstate or "")(msg)
            except KeyError:
                exc = psycopg.OperationalError(msg)
            err = classify(exc, side="source", sqlstate=sqlstate)
            kind, hint = err.kind, err.hint
            if kind is ErrorKind.INTERNAL:
                kind, hint = ErrorKind.SOURCE_SETUP, "check the slot and the publication"
            raise ReplicatorError(
                kind, f"source refused START_REPLICATION on slot {slot!r}: {msg}", hint)
        self.pgconn.nonblocking = 1
        log.info("replication started", extra={
            "slot": slot, "lsn": format_lsn(lsn), "protocol": protocol, "binary": binary,
            "streaming": streaming and protocol >= 2})

    def attach(self, decoder: Any) -> None:
        getcopydata, consumeinput, freemem = function_addresses(
            "PQgetCopyData", "PQconsumeInput", "PQfreemem")
        decoder.attach(self.pgconn.pgconn_ptr, getcopydata, consumeinput, freemem)

    def wait_readable(self, timeout: float) -> bool:
        r, _, _ = select.select([self.pgconn.socket], [], [], timeout)
        return bool(r)

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        msg = b"r" + struct.pack("!QQQqB", write, flush, apply, pg_now(), 1 if reply else 0)
        if self.pgconn.put_copy_data(msg) != 1:
            raise self.stream_error("sending a standby status update")
        if self.answer_timeout is None:
            while self.pgconn.flush() == 1:
                select.select([], [self.pgconn.socket], [], 1.0)
        else:
            self._flush("sending a standby status update")

    def stream_error(self, doing: str) -> ReplicatorError:
        msg = self.pgconn.error_message.decode("utf-8", "replace").strip() if self.pgconn else ""
        return ReplicatorError(
            ErrorKind.SOURCE_CONNECT, f"replication stream broke while {doing}: {msg}",
            "the replicator reconnects and resumes from the last applied position",
        )

    def end_result(self) -> str:
        """After the COPY ended: the server's reason, if any."""
        res = self.pgconn.get_result()
        msg = ""
        while res is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                msg = res.error_message.decode("utf-8", "replace").strip()
            res = self.pgconn.get_result()
        return msg


def quote_ident(name: str) -> str:
    # Walsender commands go through the simple query protocol: no parameters,
    # so names and values are quoted client side.
    return sql.Identifier(name).as_string()


def quote_literal(value: str) -> str:
    return sql.Literal(value).as_string()
