"""Error kinds, their retry policy and operator hints: the one table of what a failure means.

Every failure that reaches an operator is a ``ReplicatorError`` of one ``ErrorKind``; the
table ``_TABLE`` below gives each kind its retry policy, exit code and default hint, so "what
do I do about it" is decided in one place instead of in each module's except clause. Modules
raise ``ReplicatorError(kind, message, hint)`` for failures they understand and call
``classify.classify(exc, side=...)`` on the ones they do not (psycopg errors, socket errors).
Messages and hints are redacted (``redact.redact``) on construction.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any

from .redact import redact

__all__ = [
    "ConfigError",
    "ErrorKind",
    "ExitCode",
    "ReplicatorError",
    "Retries",
    "RetryPolicy",
]


class ExitCode(enum.IntEnum):
    """Process exit codes; scripts and supervisors branch on these."""

    OK = 0
    INTERNAL = 1  # a bug in the replicator
    FATAL = 2  # the operator must change something: config, source setup, a resync
    UNAVAILABLE = 3  # a database stayed unreachable
    FAILED = 4  # applying or decoding kept failing on the same data
    SUPERSEDED = 5  # another process holds the pipeline's lease: this one wrote nothing more
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


@dataclass(frozen=True)
class RetryPolicy:
    """How the runtime reacts to one kind of error.

    ``max_attempts`` counts consecutive failures (reset after progress); ``None`` retries for
    ever, which is right for a daemon waiting for a database to come back.
    """

    retryable: bool
    exit_code: ExitCode
    initial_delay: float = 1.0
    max_delay: float = 60.0
    max_attempts: int | None = None

    def should_retry(self, failures: int) -> bool:
        """True if another attempt is allowed after ``failures`` consecutive failures."""
        if not self.retryable:
            return False
        return self.max_attempts is None or failures < self.max_attempts

    def delay(self, failures: int, *, jitter: bool = True) -> float:
        """Seconds to wait after ``failures`` (>= 1) consecutive failures.

        Exponential, capped at ``max_delay``. Jitter keeps several replicators (or the
        source and destination loops) from reconnecting in lock step after an outage.
        """
        exponent = min(max(failures, 1) - 1, 30)  # 2**30 s is far past any cap
        seconds = min(self.max_delay, self.initial_delay * 2**exponent)
        return random.uniform(seconds / 2, seconds) if jitter else seconds


class ErrorKind(enum.Enum):
    CONFIG = "config"
    SOURCE_CONNECT = "source_connect"
    SOURCE_SETUP = "source_setup"
    DESTINATION_CONNECT = "destination_connect"
    DESTINATION_APPLY = "destination_apply"
    DESTINATION_REJECTED = "destination_rejected"
    PROTOCOL = "protocol"
    RESYNC_REQUIRED = "resync_required"
    MIRROR_BEHIND = "mirror_behind"
    SUPERSEDED = "superseded"
    INTERNAL = "internal"

    @property
    def policy(self) -> RetryPolicy:
        return _POLICIES[self]

    @property
    def retryable(self) -> bool:
        return _POLICIES[self].retryable

    @property
    def exit_code(self) -> ExitCode:
        return _POLICIES[self].exit_code

    @property
    def default_hint(self) -> str:
        return _DEFAULT_HINTS[self]


_FATAL = RetryPolicy(retryable=False, exit_code=ExitCode.FATAL)
# Databases restart, poolers fail over, VPNs drop: a daemon waits for them indefinitely
# (`run --until-caught-up` gives up after [source]/[destination] retry_timeout instead).
_WAIT = RetryPolicy(True, ExitCode.UNAVAILABLE, 1.0, 60.0, None)

# kind -> (retry policy, what the operator should do). Attempts count failures of one kind in
# a row: they start again from 1 (a retry within about a second) after progress.
_TABLE: dict[ErrorKind, tuple[RetryPolicy, str]] = {
    ErrorKind.CONFIG: (
        _FATAL,
        "fix etl-config.toml or .env, then run `replicator check --config PATH`",
    ),
    ErrorKind.SOURCE_SETUP: (
        _FATAL,
        "fix the source database setup (wal_level = logical, the publication, replication "
        "privileges); `replicator check` lists what is missing",
    ),
    ErrorKind.RESYNC_REQUIRED: (
        _FATAL,
        "the mirror cannot continue from its stored position: drop the replication slot and the "
        "mirror's state, then run again to copy the tables afresh",
    ),
    # `replicator verify` compares the mirror only once it has applied what the source's
    # snapshot shows; a mirror that does not get there cannot be judged.
    ErrorKind.MIRROR_BEHIND: (
        _FATAL,
        "start `replicator run` (or `replicator run --until-caught-up`) and verify again, or "
        "give it longer with --wait",
    ),
    ErrorKind.SOURCE_CONNECT: (
        _WAIT,
        "check that the Odoo database is running and reachable from this host "
        "([source] host and port)",
    ),
    ErrorKind.DESTINATION_CONNECT: (
        _WAIT,
        "check that the Supabase database is reachable from this host ([destination] host and "
        "port)",
    ),
    # A batch is replayed from the last applied LSN; if the same data keeps failing, looping
    # for ever only hides it, so give up after a few tries in a row and say so.
    ErrorKind.DESTINATION_APPLY: (
        RetryPolicy(True, ExitCode.FAILED, 1.0, 60.0, 5),
        "the batch is retried from the last applied position; if it keeps failing, compare the "
        "mirror table with the source table and look at the dead letters in the state schema",
    ),
    # A change the mirror rejects ([destination] on_error = "stop"): the same data fails the
    # same way on every attempt, so stop at once, applying nothing of its batch.
    ErrorKind.DESTINATION_REJECTED: (
        RetryPolicy(retryable=False, exit_code=ExitCode.FAILED),
        "nothing of this batch was applied and the slot keeps it: fix the mirror table (the "
        "constraint or the column type) and start again, or set [destination] on_error = "
        '"dead_letter" to set such changes aside and go on',
    ),
    ErrorKind.PROTOCOL: (
        RetryPolicy(True, ExitCode.FAILED, 1.0, 60.0, 3),
        "the replication stream could not be decoded; it is re-read from the last applied "
        "position. If this persists, report it with the log",
    ),
    # Another process took the pipeline's lease (destination/lease.py): writing on would
    # make two writers.
    # Not retried here; a supervisor that restarts the process makes it a standby.
    ErrorKind.SUPERSEDED: (
        RetryPolicy(retryable=False, exit_code=ExitCode.SUPERSEDED),
        "only one replicator process writes for a pipeline: if the other one was not meant "
        "to run, stop it; restarted, this one waits as a standby and takes over when the "
        "other stops ([destination] lease_timeout after it dies)",
    ),
    ErrorKind.INTERNAL: (
        RetryPolicy(retryable=False, exit_code=ExitCode.INTERNAL),
        "this is a bug in odoo-replicator: please report it with the log",
    ),
}
_POLICIES = {kind: policy for kind, (policy, _hint) in _TABLE.items()}
_DEFAULT_HINTS = {kind: hint for kind, (_policy, hint) in _TABLE.items()}


class Retries:
    """Failures in a row, per error kind, since the last progress.

    Each kind counts on its own, so weeks of occasional reconnects do not use up the few
    attempts an apply error gets, and a reconnect after progress waits about a second, not
    the backoff cap. ``progress(connected=True)`` (a session reached streaming) resets only
    the connection kinds: it proves the servers are reachable, but not that the batch or
    message that failed last time gets through; ``progress()`` (the applied position moved)
    resets every kind.
    """

    _CONNECT = (ErrorKind.SOURCE_CONNECT, ErrorKind.DESTINATION_CONNECT)

    def __init__(self) -> None:
        self._failures: dict[ErrorKind, int] = {}
        self._since: dict[ErrorKind, float] = {}

    def failed(self, kind: ErrorKind, now: float) -> int:
        """Record a failure; returns how many of this kind came in a row (1 after progress)."""
        self._failures[kind] = self._failures.get(kind, 0) + 1
        self._since.setdefault(kind, now)
        return self._failures[kind]

    def failing_for(self, kind: ErrorKind, now: float) -> float:
        """Seconds since the first of this kind's failures in a row."""
        return now - self._since.get(kind, now)

    def progress(self, *, connected: bool = False) -> None:
        for kind in self._CONNECT if connected else list(self._failures):
            self._failures.pop(kind, None)
            self._since.pop(kind, None)


class ReplicatorError(Exception):
    """A failure an operator can act on: ``message`` says what and where, ``hint`` what to do.

    Both are redacted on construction, so the exception can be logged or printed anywhere.
    """

    def __init__(self, kind: ErrorKind, message: str, hint: str | None = None) -> None:
        self.kind = kind
        self.message = redact(message)
        self.hint = redact(kind.default_hint if hint is None else hint)
        super().__init__(self.message)

    @property
    def policy(self) -> RetryPolicy:
        return self.kind.policy

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    @property
    def exit_code(self) -> ExitCode:
        return self.kind.exit_code

    def one_line(self) -> str:
        """``message — hint`` on a single line (server errors often carry DETAIL lines)."""
        text = f"{self.message} — {self.hint}" if self.hint else self.message
        return " ".join(text.split())

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.name}, {self.message!r}, hint={self.hint!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickling replays self.args into __init__, which does not match our
        # signature; rebuild explicitly so errors survive multiprocessing and copy.
        return (_rebuild, (type(self), self.kind, self.message, self.hint))


class ConfigError(ReplicatorError):
    """The configuration (etl-config.toml, .env, command line) is wrong. Exit code 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(ErrorKind.CONFIG, message, hint)


def _rebuild(cls: type[ReplicatorError], kind: ErrorKind, message: str, hint: str) -> Any:
    err = cls.__new__(cls)
    ReplicatorError.__init__(err, kind, message, hint)
    return err
