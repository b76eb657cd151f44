"""Tables copied while the stream goes on: added to the publication, or resynced.

Each copy runs in a thread of its own, and starts only once the applier holds the
table's changes (its SyncStart is applied), so nothing applied afterwards lands on top
of the copy. The receiver hands a finished copy over with the next batch (SyncDone).
Finding the work is a poll: the publication's members against the mirrors, and the
destination's table states (`replicator resync` marks a table pending).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg

from ..batch import SyncStart
from ..config.settings import Config
from ..destination import state
from ..destination.lease import Fence
from ..schema import MirrorTable
from ..source.catalog import publication_members
from ..telemetry.metrics import Metrics
from .backfill import Backfill, CopyStopped

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0        # how often to look for tables added to the publication or resyncs

Key = tuple[str, str]


class SessionRestart(Exception):
    """The session starts over from the applied position; not a failure (no retry counted)."""


@dataclass
class Work:
    """What a poll found: tables to copy, and tables whose mirrors stop changing."""
    added: list[Key] = field(default_factory=list)    # published and mapped, not mirrored yet
    gone: list[Key] = field(default_factory=list)     # mirrored, no longer published
    resync: list[Key] = field(default_factory=list)   # marked pending in the destination


class TableCopies:
    """The copies running beside one session's stream, and the polls that find them.

    ``dest`` opens (or returns) the receiver's destination connection.
    """

    def __init__(self, config: Config, metrics: Metrics, catalog: psycopg.Connection,
                 dest: Callable[[], psycopg.Connection], fence: Fence | None) -> None:
        self.cfg = config
        self.metrics = metrics
        self.catalog = catalog
        self.dest = dest
        self.fence = fence
        self.running: dict[Key, threading.Thread] = {}
        self.results: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        # Tables added to the publication that cannot be replicated: logged once, not copied.
        self.refused: set[Key] = set()
        self.last_poll = time.monotonic()

    def __contains__(self, key: Key) -> bool:
        return key in self.running

    def __bool__(self) -> bool:
        return bool(self.running)

    # -- finding work ---------------------------------------------------------

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last_poll < POLL_INTERVAL:
            return False
        self.last_poll = now
        return True

    def poll(self, mirrors: dict[Key, MirrorTable]) -> Work:
        src, dst = self.cfg.source, self.cfg.destination
        members = publication_members(self.catalog, src.publication)
        published = set(members)
        for key, t in mirrors.items():
            if key in published and key not in self.running and t.source.membership \
                    and members[key] != t.source.membership:
                # Dropped and created again, or dropped from the publication and
                # added back, since the last poll: the stream may have missed
                # changes. The next session's start copies it again (its sync
                # state still holds the old identity).
                log.info("table was recreated or rejoined the publication: copied again",
                         extra={"table": t.source.qualname})
                raise SessionRestart(f"{t.source.qualname} changed identity at the source")
        work = Work()
        work.added = [key for key in sorted(published)
                      if key not in mirrors and key not in self.refused]
        work.gone = [key for key in mirrors if key not in published and key not in self.running]
        states = state.table_states(self.dest(), dst.state_schema, src.slot)
        work.resync = [key for key, t in mirrors.items()
                       if key not in work.gone and key not in self.running
                       and states.get(t.source.qualname, ("",))[0] == state.PENDING]
        return work

    def mark_removed(self, keys: list[Key]) -> None:
        """Record that these tables left the publication (their mirrors keep their rows)."""
        conn = self.dest()
        with conn.transaction():
            if self.fence is not None:
                self.fence.check(conn)
            names = state.mark_removed(conn, self.cfg.destination.state_schema,
                                       self.cfg.source.slot, [f"{s}.{n}" for s, n in keys])
        for name in names:
            log.info("table left the publication: its mirror keeps its rows; if it comes back "
                     "it is copied again", extra={"table": name})

    # -- the copies -----------------------------------------------------------

    def start(self, key: Key, t: MirrorTable, op: SyncStart) -> None:
        th = threading.Thread(target=self._copy, args=(key, t, op), daemon=True,
                              name=f"sync-{t.dest_name}")
        self.running[key] = th
        th.start()

    def finished(self) -> Iterator[tuple[Key, MirrorTable, int]]:
        """The copies done since the last look, with their sync LSNs; a failed one raises."""
        while True:
            try:
                key, t, result = self.results.get_nowait()
            except queue.Empty:
                return
            self.running.pop(key).join()
            if isinstance(result, BaseException):
                raise result
            yield key, t, result

    def stop(self) -> None:
        self.stopping.set()
        for th in self.running.values():
            th.join(timeout=30)

    def _copy(self, key: Key, t: MirrorTable, op: SyncStart) -> None:
        try:
            # Copy only once the applier holds the table's changes, so nothing
            # it applies afterwards lands on top of the copy.
            while not op.applied.wait(0.5):
                if self.stopping.is_set():
                    return
            self.metrics.table_sync(t.qualname, state.COPYING)
            lsn = Backfill(self.cfg, [t], self.cfg.source.slot, self.stopping, self.metrics,
                           live=True, fence=self.fence).run()
            self.results.put((key, t, lsn))
        except CopyStopped:
            pass  # the receiver is stopping; the table stays pending for the next run
        except BaseException as exc:
            self.results.put((key, t, exc))
