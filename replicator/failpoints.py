"""Named points in the crash windows, where a test can make the process die or fail.

Each point sits right before or after a commit whose order matters for
exactly-once (a table marked copied, a batch that ends a table sync). Tests
set ``REPLICATOR_FAILPOINTS`` to a comma-separated list of ``name=action``:

- ``kill``: the process sends itself SIGKILL (a crash at exactly that point);
- ``error``: raise a connection error once, as if the destination went away
  (the pipeline's own retry path takes over);
- ``sleep:SECONDS``: wait there, so a test can act inside the window (write
  to the source, send a signal);
- ``stop``: the process sends itself SIGSTOP, once (a frozen VM, a process paused
  past its lease): it goes on where it was when the test sends SIGCONT.

In-process tests can also hold a point until they release it (``hold``).

Unset (production), a point costs one dictionary lookup on an empty dict.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psycopg

log = logging.getLogger(__name__)

ENV = "REPLICATOR_FAILPOINTS"

# Points used by the code (kept here so tests and readers find them in one place).
BATCH_BEFORE_BEGIN = "apply.batch_before_begin"            # a batch in hand, nothing sent yet
BATCH_BEFORE_COMMIT = "apply.batch_before_commit"          # a batch of changes, not committed
BATCH_COMMITTED = "apply.batch_committed"                  # committed, not confirmed to the source
COPY_PLANNED = "backfill.copy_planned"                     # tables made and emptied, no row yet
COPY_DONE_BEFORE_MARK = "backfill.copy_done_before_mark"   # rows in, state not yet written
COPY_MARKED = "backfill.copy_marked"                       # a startup copy marked 'copied'
STARTUP_COPIED = "startup.copied"                          # startup copy done, not yet streaming
SYNC_DONE_BEFORE_COMMIT = "apply.sync_done_before_commit"  # merge of held rows not committed
SYNC_DONE_COMMITTED = "apply.sync_done_committed"          # held rows merged, table streaming
SYNC_START_COMMITTED = "apply.sync_start_committed"        # the table's changes are held
STREAM_CHUNK_APPLIED = "stream.chunk_applied"              # a chunk in its open transaction
STREAM_BEFORE_COMMIT = "stream.before_commit"              # streamed txn complete, not committed
STREAM_COMMITTED = "stream.committed"                      # committed, not confirmed to the source
STREAM_SAVEPOINT_ROLLED_BACK = "stream.savepoint_rolled_back"  # a subxact undone in its open txn
INDEX_BUILD = "indexes.before_build"                       # streaming, a secondary index not built


def _parse(text: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, action = item.partition("=")
        points[name.strip()] = action.strip() or "kill"
    return points


_armed: dict[str, str] = _parse(os.environ.get(ENV, ""))
_held: dict[str, threading.Event] = {}


def hit(name: str) -> None:
    """Fire the point if a test armed it."""
    held = _held.get(name)
    if held is not None:
        log.warning("failpoint", extra={"failpoint": name, "action": "hold"})
        held.wait()
    action = _armed.get(name)
    if action is None:
        return
    log.warning("failpoint", extra={"failpoint": name, "action": action})
    if action == "kill":
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action == "stop":
        del _armed[name]
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Sent to this thread, so that it is this thread that stops the process before
        # its next instruction; sent to the process, the kernel may hand it to another
        # thread, and this one runs on for a moment (CI saw it begin the batch's
        # transaction, whose fence then held a takeover up for idle_in_transaction_timeout).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    elif action == "error":
        del _armed[name]      # once: the retry after it must get through
        raise psycopg.OperationalError(f"failpoint {name}: injected connection loss")
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} for {name!r} "
                         "(kill, sleep:S, stop or error)")


def arm(name: str, action: str = "kill") -> None:
    """For in-process tests."""
    _armed[name] = action


def hold(name: str) -> threading.Event:
    """For in-process tests: whoever reaches the point waits there until the event is set."""
    _held[name] = threading.Event()
    return _held[name]


def disarm_all() -> None:
    _armed.clear()
    for event in _held.values():
        event.set()
    _held.clear()
