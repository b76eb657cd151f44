"""One writer per pipeline: a lease in the destination, and the fence every write passes.

Two processes of one pipeline (a rolling update, a container started twice) must never
both write: two initial copies at once lose rows for good. The slot is no lock for that
(the copy writes before START_REPLICATION holds it), and a session advisory lock does not
survive a transaction-mode pooler. So the destination holds a lease row per slot
(<state>.leases, migration 005): an owner, a generation that only grows, an expiry on the
destination's clock.

- ``Lease.claim`` takes it when it is free, expired, released, or held by a process of
  this host that no longer exists (a crash restarted by a supervisor need not wait out
  the expiry); otherwise the process waits as a standby, polling once a second.
- The owner renews it from a thread of its own every third of ``lease_timeout``.
- Every destination transaction that writes starts with ``Fence.check`` (or has its
  statement in its first one): ``select ... for key share`` of the row where the
  generation is its own. A takeover locks the row FOR UPDATE before it raises the
  generation, so it waits for the transactions of the old owner in flight, and every
  later one finds no row of its generation and fails with SUPERSEDED before it writes.
  Renewal is a non-key UPDATE, which KEY SHARE does not block: a long transaction never
  holds the owner's own renewal up.
- A clean stop releases the lease, so a standby takes over within a second.

Correctness rests on the fence alone, never on timing: a paused owner that wakes up
after a standby took over writes nothing, whatever its clock says.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
from psycopg import pq, sql

from .. import deadline
from ..errors import ErrorKind, ReplicatorError

log = logging.getLogger(__name__)

# How often a standby looks at the lease: the takeover after a clean stop takes this long.
POLL_INTERVAL = 1.0
# A takeover waits this long at a time for the old owner's transactions in flight.
TAKEOVER_LOCK_TIMEOUT = "2s"
# Seconds a clean stop gives the release of the lease (connect and answer each).
RELEASE_TIMEOUT = 2.0


def _leases(state_schema: str) -> sql.Identifier:
    return sql.Identifier(state_schema, "leases")


@dataclass(frozen=True)
class Fence:
    """The check that a destination transaction is written by the lease's current holder.

    generation: the one this process holds (a pipeline); None for a command such as
    `verify --repair` (observe), which writes beside whichever process owns the pipeline:
    its transactions lock the lease row all the same, so a takeover waits for them.
    """

    state_schema: str
    slot: str
    generation: int | None
    holder: str = "this replicator"

    def statement(self, columns: sql.Composable | None = None) -> sql.Composed:
        """``select`` of the lease row, locked FOR KEY SHARE; ``columns``: what to select
        (so a transaction's first statement can carry it: BatchLimits.set_local)."""
        return sql.SQL(
            "select {cols} from {leases} where slot = {slot}{gen} for key share").format(
            cols=columns if columns is not None else sql.SQL("1"),
            leases=_leases(self.state_schema), slot=sql.Literal(self.slot),
            gen=sql.SQL("") if self.generation is None else
            sql.SQL(" and generation = {}").format(sql.Literal(self.generation)))

    def check(self, conn: psycopg.Connection[Any] | psycopg.Cursor[Any]) -> None:
        """First thing in a destination transaction that writes (conn: a connection or a
        cursor inside it)."""
        if conn.execute(self.statement()).fetchone() is None:
            raise self.superseded()

    def check_pq(self, pgconn: pq.abc.PGconn, conn_for_quoting: Any = None) -> None:
        """The same, on a bare libpq connection inside its transaction (the copy workers)."""
        res = pgconn.exec_(self.statement().as_string(conn_for_quoting).encode())
        if res.status != pq.ExecStatus.TUPLES_OK:
            msg = res.error_message.decode("utf-8", "replace").strip()
            raise ReplicatorError(ErrorKind.DESTINATION_CONNECT,
                                  f"checking the pipeline's lease: {msg}")
        if res.ntuples != 1:
            raise self.superseded()

    def passed(self, rows: list[Any] | None) -> None:
        """For a first statement that carried the fence: no row means superseded."""
        if not rows:
            raise self.superseded()

    def superseded(self) -> ReplicatorError:
        return ReplicatorError(
            ErrorKind.SUPERSEDED,
            f"another replicator process took over pipeline {self.slot!r} (the lease is no "
            f"longer at generation {self.generation}): {self.holder} stopped without writing",
            None)


def observe(conn: psycopg.Connection, state_schema: str, slot: str, holder: str) -> Fence:
    """A fence for a command that writes beside `run` (any generation: see Fence).

    Why not the generation found at the start: a command serialises with the owner's
    batches through the pipeline's state row, whoever the owner is, and one started
    beside a `run` that is taking the lease (a restart, a rolling update) would fail for
    nothing. A pipeline never started has no lease row: one at generation 0, expired, is
    put in, so that the command's transactions lock a row a first `run` must wait for.
    """
    with conn.transaction():
        conn.execute(sql.SQL(
            "insert into {} (slot, owner, owner_host, owner_pid, generation, expires_at) "
            "values (%s, '', '', 0, 0, 'epoch') on conflict (slot) do nothing").format(
            _leases(state_schema)), [slot])
    return Fence(state_schema, slot, None, holder)


@dataclass(frozen=True)
class Holder:
    """The lease as a standby (or `status`) sees it."""

    owner: str
    host: str
    pid: int
    generation: int
    expires_in: float        # seconds; <= 0: expired
    released: bool

    def describe(self) -> str:
        return f"{self.owner} (generation {self.generation})"


def _process_gone(host: str, pid: int, mine: str, owner: str) -> bool:
    """Whether the holder is a process of this host that no longer runs.

    Only on the same host name: another host's (or container's) pids mean nothing here.
    Our own pid held by another owner is an earlier process of ours (a restarted
    container's pid 1). A mistaken "gone" costs the other process its lease, never data:
    the fence stops it.
    """
    if host != socket.gethostname() or pid <= 0:
        return False
    if pid == os.getpid():
        return owner != mine
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # A zombie (killed, not yet reaped) holds nothing.
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def read(conn: psycopg.Connection, state_schema: str, slot: str) -> Holder | None:
    row = conn.execute(sql.SQL(
        "select owner, owner_host, owner_pid, generation, "
        "extract(epoch from expires_at - now())::float8, released_at is not null "
        "from {} where slot = %s").format(_leases(state_schema)), [slot]).fetchone()
    if row is None:
        return None
    expires_in = row[4] if row[4] is not None else float("-inf")
    return Holder(row[0], row[1], row[2], row[3], expires_in, row[5])


class Lease:
    """This process's claim to write for the pipeline of ``slot``."""

    def __init__(self, conninfo: str, state_schema: str, slot: str, timeout: float) -> None:
        self.conninfo = conninfo
        self.state_schema = state_schema
        self.slot = slot
        self.timeout = timeout
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host} pid {self.pid} {uuid.uuid4().hex[:8]}"
        self.fence: Fence | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost: Callable[[], None] | None = None

    @property
    def held(self) -> bool:
        return self.fence is not None and not self.lost.is_set()

    # -- taking it ---------------------------------------------------------

    def claim(self, conn: psycopg.Connection, stop: threading.Event,
              standby: Callable[[Holder, bool], None] | None = None,
              give_up_after: float | None = None) -> bool:
        """Hold the lease, waiting as a standby while another process does.

        False if ``stop`` was set first. ``standby(holder, first)`` is called at each look
        while waiting (first: the first time); ``give_up_after``: seconds of waiting before a
        ReplicatorError (a one-shot run).
        """
        waited_since: float | None = None
        blocked_logged = False
        while not stop.is_set():
            holder = read(conn, self.state_schema, self.slot)
            if holder is None or self._can_take(holder):
                try:
                    if self._take(conn):
                        if waited_since is not None:
                            log.info("took over the pipeline's lease", extra={
                                "slot": self.slot, "generation": self.fence.generation
                                if self.fence else None,
                                "previous_owner": holder.owner if holder else None})
                        return True
                except psycopg.errors.LockNotAvailable:
                    if not blocked_logged:
                        log.warning("taking over the lease: waiting for the previous writer's "
                                    "transaction in flight to end", extra={"slot": self.slot})
                        blocked_logged = True
                    continue
            else:
                first = waited_since is None
                if waited_since is None:
                    waited_since = time.monotonic()
                if standby is not None:
                    standby(holder, first)
                self._seen_as_standby(conn)
                if give_up_after is not None and \
                        time.monotonic() - waited_since > give_up_after:
                    raise ReplicatorError(
                        ErrorKind.SUPERSEDED,
                        f"another replicator process writes for pipeline {self.slot!r}: "
                        f"{holder.describe()}, and it kept renewing its lease for "
                        f"{give_up_after:g} s", "stop that process, or let it keep the "
                        "mirror current: `replicator status --config PATH` shows it")
            stop.wait(POLL_INTERVAL)
        return False

    def try_take(self, conn: psycopg.Connection) -> Holder | None:
        """Take the lease if no other process holds it (once, no waiting); None when taken,
        else the holder. For a command that must write alone (`replicator drop`)."""
        holder = read(conn, self.state_schema, self.slot)
        if holder is None or self._can_take(holder):
            try:
                if self._take(conn, announce=False):
                    return None
            except psycopg.errors.LockNotAvailable:
                pass
            holder = read(conn, self.state_schema, self.slot)
        assert holder is not None   # _take put a row in, and only a delete removes it
        return holder

    def _can_take(self, h: Holder) -> bool:
        return (h.owner == self.owner or h.released or h.expires_in <= 0
                or _process_gone(h.host, h.pid, self.owner, h.owner))

    def _take(self, conn: psycopg.Connection, announce: bool = True) -> bool:
        leases = _leases(self.state_schema)
        with conn.transaction():
            conn.execute("select set_config('lock_timeout', %s, true)", [TAKEOVER_LOCK_TIMEOUT])
            conn.execute(sql.SQL(
                "insert into {} (slot, owner, owner_host, owner_pid, generation, expires_at) "
                "values (%s, '', '', 0, 0, 'epoch') on conflict (slot) do nothing").format(
                leases), [self.slot])
            # FOR UPDATE waits for every transaction that passed the old generation's fence.
            row = conn.execute(sql.SQL(
                "select owner, owner_host, owner_pid, generation, "
                "extract(epoch from expires_at - now())::float8, released_at is not null "
                "from {} where slot = %s for update").format(leases), [self.slot]).fetchone()
            assert row is not None
            holder = Holder(row[0], row[1], row[2], row[3],
                            row[4] if row[4] is not None else float("-inf"), row[5])
            if not self._can_take(holder):
                return False    # renewed meanwhile: stay a standby
            same = holder.owner == self.owner and self.fence is not None \
                and self.fence.generation == holder.generation
            gen = conn.execute(sql.SQL(
                "update {} set owner = %s, owner_host = %s, owner_pid = %s, "
                "generation = generation + %s, acquired_at = now(), renewed_at = now(), "
                "expires_at = now() + %s * interval '1 second', released_at = null, "
                "exit_reason = null, "
                "standby = case when standby = %s then null else standby end "
                "where slot = %s returning generation").format(leases),
                [self.owner, self.host, self.pid, 0 if same else 1, self.timeout,
                 self.owner, self.slot]).fetchone()
        assert gen is not None
        self.fence = Fence(self.state_schema, self.slot, int(gen[0]))
        self.lost.clear()
        (log.info if announce else log.debug)("holding the pipeline's lease", extra={
            "slot": self.slot, "generation": self.fence.generation, "owner": self.owner,
            "lease_timeout_s": self.timeout})
        return True

    def _seen_as_standby(self, conn: psycopg.Connection) -> None:
        # For `status` only: a non-key update, which no writer's KEY SHARE waits for.
        conn.execute(sql.SQL("update {} set standby = %s, standby_seen_at = now() "
                             "where slot = %s").format(_leases(self.state_schema)),
                     [self.owner, self.slot])

    # -- keeping it --------------------------------------------------------

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew from a thread of its own until ``release``; ``on_lost`` if another took it."""
        self._on_lost = on_lost
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.timeout / 3
        conn: psycopg.Connection | None = None
        failing = False
        wait = interval
        while not self._stop.wait(wait):
            fence = self.fence
            if fence is None:
                return
            try:
                if conn is None or conn.closed:
                    conn = deadline.connect(self.conninfo, max(1.0, interval), side="destination",
                                            setting="[destination] lease_timeout",
                                            autocommit=True,
                                            connect_timeout=max(2, int(interval)))
                row = conn.execute(sql.SQL(
                    "update {} set renewed_at = now(), "
                    "expires_at = now() + %s * interval '1 second' "
                    "where slot = %s and generation = %s and owner = %s returning 1").format(
                    _leases(self.state_schema)),
                    [self.timeout, self.slot, fence.generation, self.owner]).fetchone()
            except psycopg.Error as exc:
                if not failing:
                    log.warning("cannot renew the pipeline's lease; retrying", extra={
                        "slot": self.slot, "error": str(exc).strip(),
                        "hint": "if the destination stays unreachable for [destination] "
                        "lease_timeout, a standby may take over; this process then stops"})
                failing = True
                if conn is not None:
                    conn.close()
                    conn = None
                wait = 1.0
                continue
            failing, wait = False, interval
            if row is None:
                log.error("another replicator process took over the pipeline's lease: "
                          "stopping without writing", extra={"slot": self.slot,
                                                             "generation": fence.generation})
                self.lost.set()
                if self._on_lost is not None:
                    self._on_lost()
                break
        if conn is not None:
            conn.close()

    def release(self, conn_factory: Callable[[], psycopg.Connection] | None = None,
                reason: str | None = None, announce: bool = True) -> None:
        """Stop renewing; on a clean stop, expire the lease so a standby takes over at once.

        Safe while a writer of ours is still in flight: the fence, not the expiry, keeps it
        from writing after a takeover. reason: why this process stops (`status` shows it).
        """
        self._stop.set()
        if self._thread is not None:
            # A renewal stuck on a dead connection ends by its own deadline; a daemon thread.
            self._thread.join(timeout=1)
            self._thread = None
        fence = self.fence
        if fence is None or self.lost.is_set():
            return
        if deadline.shut_down:
            # The stop closed connections that did not answer: the destination is likely
            # unreachable, and the process must exit in time. The lease expires instead.
            log.warning("not releasing the pipeline's lease (the destination did not "
                        "answer): a standby takes over when it expires",
                        extra={"slot": self.slot, "lease_timeout_s": self.timeout})
            self.fence = None
            return
        try:
            # Bounded: a stop must not wait on a destination that stopped answering.
            conn = conn_factory() if conn_factory else deadline.connect(
                self.conninfo, RELEASE_TIMEOUT, side="destination", autocommit=True,
                connect_timeout=int(RELEASE_TIMEOUT))
            with conn:
                conn.execute(sql.SQL(
                    "update {} set expires_at = now(), released_at = now(), exit_reason = %s "
                    "where slot = %s and generation = %s and owner = %s").format(
                    _leases(self.state_schema)),
                    [reason, self.slot, fence.generation, self.owner])
            (log.info if announce else log.debug)("released the pipeline's lease", extra={
                "slot": self.slot, "generation": fence.generation})
        except psycopg.Error as exc:
            log.warning("cannot release the pipeline's lease: a standby takes over when it "
                        "expires", extra={"slot": self.slot, "error": str(exc).strip(),
                                          "lease_timeout_s": self.timeout})
        self.fence = None


@dataclass(frozen=True)
class Writers:
    """Who writes for the pipeline, as `replicator status` shows it."""

    writer: str | None          # the owner of the lease, None if never held
    writer_state: str           # "holding", "released", "expired" or "none"
    generation: int | None
    seconds: float | None       # holding: until it expires; released/expired: since then
    standby: str | None         # a process seen waiting within STANDBY_SEEN seconds
    last_seen: dt.datetime | None = None   # the writer's last renewal (or release)
    exit_reason: str | None = None         # why it stopped, if it said (released)


# A standby looks every POLL_INTERVAL; one not seen for this long has gone.
STANDBY_SEEN = 10.0


def writers(conn: psycopg.Connection, state_schema: str, slot: str) -> Writers:
    """Read-only (status); a state schema older than the lease table has no writer."""
    found = conn.execute("select to_regclass(%s) is not null",
                         [_leases(state_schema).as_string(conn)]).fetchone()
    if not (found and found[0]):
        return Writers(None, "none", None, None, None)
    reason = sql.SQL("exit_reason") if _has_exit_reason(conn, state_schema) else sql.NULL
    row = conn.execute(sql.SQL(
        "select owner, generation, extract(epoch from expires_at - now())::float8, "
        "released_at is not null, "
        "case when standby_seen_at > now() - %s * interval '1 second' then standby end, "
        "coalesce(released_at, renewed_at), {}, owner_host, owner_pid, "
        # A renewal missed: the holder renews every third of its lease.
        "now() - renewed_at > (expires_at - renewed_at) / 3 + interval '2 seconds' "
        "from {} where slot = %s").format(reason, _leases(state_schema)),
        [STANDBY_SEEN, slot]).fetchone()
    if row is None or not row[0]:
        return Writers(None, "none", None, None, row[4] if row else None)
    owner, gen, left, released, standby, seen, why, host, pid, missed = row
    if not released and left is not None and left > 0 and missed and pid != os.getpid() \
            and _process_gone(host, pid, "", owner):
        # Gone before its lease ran out: it missed a renewal, and no process of its pid
        # runs on this host name. Both, since another container with this host name (host
        # networking, one pod) has pids of its own: a live writer there renews on time.
        return Writers(owner, "expired", gen, 0.0, standby, seen)
    if released:
        return Writers(owner, "released", gen, round(-left, 1), standby, seen, why)
    if left is None or left <= 0:
        return Writers(owner, "expired", gen, None if left is None else round(-left, 1),
                       standby, seen)
    return Writers(owner, "holding", gen, round(left, 1), standby, seen)


def _has_exit_reason(conn: psycopg.Connection, state_schema: str) -> bool:
    """A state schema from before 006_exit_reasons (status never migrates) has no column."""
    row = conn.execute(
        "select exists (select 1 from pg_attribute where attrelid = to_regclass(%s) "
        "and attname = 'exit_reason' and not attisdropped)",
        [_leases(state_schema).as_string(conn)]).fetchone()
    return bool(row and row[0])
