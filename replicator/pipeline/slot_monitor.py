"""The slot's and the state's gauges: polled on a thread of their own, beside replication.

What the stream cannot tell the metrics: how much WAL the source's slot holds and whether it
is still safe, the source's WAL position, and the dead letters waiting in the destination.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from .. import deadline
from ..config.settings import Config
from ..destination import state
from ..lsn import parse_lsn
from ..source import catalog
from ..telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class SlotMonitor:
    """Every ``interval`` seconds: the source's WAL position and slot, and the dead letters.

    Its own autocommit connections, on its own thread: a slow or failing query
    never holds up replication. A failure is logged once per streak of them.
    """

    @classmethod
    def of(cls, config: Config, metrics: Metrics) -> SlotMonitor:
        """The pipeline's: its servers, slot and state, every [metrics] slot_poll_interval."""
        return cls(metrics, config.source.conninfo(), config.destination.conninfo(),
                   config.destination.state_schema, config.source.slot,
                   config.metrics.slot_poll_interval)

    def __init__(self, metrics: Metrics, source_conninfo: str, dest_conninfo: str,
                 state_schema: str, slot: str, interval: float) -> None:
        self.metrics = metrics
        self.conninfo = {"source": source_conninfo, "destination": dest_conninfo}
        self.state_schema = state_schema
        self.slot = slot
        self.interval = interval
        self.stop_event = threading.Event()
        self.conns: dict[str, psycopg.Connection] = {}
        self.failing: set[str] = set()
        self.thread = threading.Thread(target=self._loop, name="slot-monitor", daemon=True)

    def start(self) -> SlotMonitor:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        # A poll stuck on a dead connection ends by its own deadline; the thread is a daemon.
        self.thread.join(timeout=2)

    def _loop(self) -> None:
        try:
            while True:
                self.poll()
                if self.stop_event.wait(self.interval):
                    return
        finally:
            for conn in self.conns.values():
                conn.close()

    def poll(self) -> None:
        self._side("source", self._poll_source)
        self._side("destination", self._poll_dest)

    def _poll_source(self, conn: psycopg.Connection) -> None:
        w = catalog.slot_wal(conn, self.slot)
        current = parse_lsn(w.current_lsn)
        self.metrics.current_lsn = current
        self.metrics.slot_polled(current - parse_lsn(w.restart) if w.restart else None,
                                 w.wal_status)

    def _poll_dest(self, conn: psycopg.Connection) -> None:
        if state.exists(conn, self.state_schema):
            self.metrics.dead_letters.set(state.dead_letter_count(conn, self.state_schema,
                                                                  self.slot))

    def _side(self, side: str, poll: Callable[[psycopg.Connection], None]) -> None:
        try:
            conn = self.conns.get(side)
            if conn is None or conn.closed:
                # A deadline on its queries too: a dead connection must not hold up stop().
                conn = self.conns[side] = deadline.connect(
                    self.conninfo[side], 10, side=side, autocommit=True, connect_timeout=5)
            poll(conn)
        except psycopg.Error as exc:
            if side not in self.failing:
                self.failing.add(side)
                log.warning("metrics monitor: query failed (replication goes on; retried "
                            "every interval)", extra={"side": side, "error": str(exc).strip()})
            bad = self.conns.pop(side, None)
            if bad is not None:
                bad.close()
            return
        if side in self.failing:
            self.failing.discard(side)
            log.info("metrics monitor: query works again", extra={"side": side})
