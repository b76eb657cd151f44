"""What the receiver and the applier thread share: one closed batch, and the applied position.

At most one closed batch waits between them; when the applier is idle, the
receiver closes the batch at the next transaction boundary, so batches stay
small when there is no backlog and grow up to `batch_size` rows when there
is one.
"""

from __future__ import annotations

import dataclasses
import threading

from .batch import Batch


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
    """Written by the applier thread after each batch; read by the receiver and the retry loop."""

    applied_lsn: int = 0
    last_commit_ts: int = 0
