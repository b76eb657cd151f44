"""What a pipeline's threads share: one closed batch, the applied position, the stop request.

At most one closed batch waits between them; when the applier is idle, the
receiver closes the batch at the next transaction boundary, so batches stay
small when there is no backlog and grow up to `batch_size` rows when there
is one.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

from ..batch import Batch
from ..config.settings import Config
from ..destination.lease import Fence
from ..telemetry.metrics import Metrics


class Handoff:
    """One closed batch waiting for the applier, and whether the applier is busy."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next: Batch | None = None
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None
        # Batches handed over, and applied: a streamed transaction's chunk waits for
        # every batch handed over before it (stream_apply's commit-order barrier).
        self.offered = 0
        self.applied = 0

    def idle(self) -> bool:
        with self._cv:
            return self._next is None and not self._busy

    def has_room(self, timeout: float) -> bool:
        with self._cv:
            return bool(self._cv.wait_for(lambda: self._next is None or self.error, timeout)) \
                and not self.error

    def offer(self, batch: Batch, timeout: float) -> bool:
        with self._cv:
            if not self._cv.wait_for(lambda: self._next is None or self.error, timeout):
                return False
            if self.error:
                return False
            self._next = batch
            self.offered += 1
            self._cv.notify_all()
            return True

    def take(self) -> Batch | None:
        """The next batch; calling it again says the one taken before is applied."""
        with self._cv:
            if self._busy:
                self.applied += 1
            self._busy = False
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._next is not None or self._closed)
            batch, self._next = self._next, None
            self._busy = batch is not None
            return batch

    def fail(self, exc: BaseException) -> None:
        with self._cv:
            self.error = exc
            self._busy = False
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return bool(self._cv.wait_for(
                lambda: (self._next is None and not self._busy) or self.error, timeout))


@dataclasses.dataclass
class Progress:
    """Written by the applier thread after each batch; read by the receiver and the retry loop.

    ``applied_lsn`` is committed at the destination, ``durable_lsn`` is on its disk: what
    the slot may be told is flushed. Batches commit with synchronous_commit off, so a
    committed batch is durable only once the destination's WAL is flushed past its commit
    record; until then a destination crash loses it, and the source must still have it.
    """

    applied_lsn: int = 0
    last_commit_ts: int = 0
    durable_lsn: int = 0
    # (destination WAL position at or past a batch's commit record, its source LSN, when
    # it was recorded), in commit order: committed batches not known to be flushed yet.
    _pending: collections.deque = dataclasses.field(default_factory=collections.deque)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def applied(self, lsn: int, wal_lsn: int = 0, wal_flushed: int = 0) -> None:
        """A batch up to ``lsn`` committed; ``wal_lsn``: past its commit record in the
        destination's WAL (0: committed synchronously, durable now); ``wal_flushed``: the
        destination's WAL flush position read after it."""
        self.applied_lsn = max(self.applied_lsn, lsn)
        with self._lock:
            if wal_lsn:
                self._pending.append((wal_lsn, lsn, time.monotonic()))
            elif not self._pending:
                self.durable_lsn = max(self.durable_lsn, lsn)
            else:
                self._pending.append((0, lsn, time.monotonic()))
        if wal_flushed:
            self.flushed(wal_flushed)

    def flushed(self, wal_flush_lsn: int) -> None:
        """The destination's WAL is on disk up to ``wal_flush_lsn``."""
        with self._lock:
            while self._pending and self._pending[0][0] <= wal_flush_lsn:
                self.durable_lsn = max(self.durable_lsn, self._pending.popleft()[1])

    def restart(self, wal_lsn: int) -> None:
        """A session starts from ``applied_lsn``, read from the destination, where WAL is
        now at ``wal_lsn``: that position may not be flushed yet (a commit of the previous
        session), and WAL positions recorded before a destination crash mean nothing."""
        with self._lock:
            self._pending.clear()
            if self.applied_lsn > self.durable_lsn:
                self._pending.append((wal_lsn, self.applied_lsn, time.monotonic()))

    @property
    def undurable(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def undurable_for(self) -> float:
        """Seconds since the oldest batch not known to be flushed committed (0: none)."""
        with self._lock:
            return time.monotonic() - self._pending[0][2] if self._pending else 0.0


@dataclasses.dataclass(frozen=True)
class Shared:
    """What every session of one pipeline, and each of its threads, works with.

    ``progress`` is the applier's applied and durable position, ``stop`` the pipeline's stop
    request, ``fence`` its lease (None: a caller that writes without one, in tests).
    """
    config: Config
    metrics: Metrics
    progress: Progress
    stop: threading.Event
    fence: Fence | None
