"""The initial copy's progress, as a person watches it: live bars on a terminal, a log line
every few seconds elsewhere (a container's log).

On a terminal the bars are rich's live display, which owns the bottom of the screen: log
lines written meanwhile (to stdout or stderr, as they are at each write) are printed above
it instead of being overwritten by it. A table still waiting for a worker says so; one the
source never analyzed has no estimate, and its bar shows rows done against none.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from .console import printable

log = logging.getLogger(__name__)

LOG_EVERY = 5.0    # seconds between progress log lines


class _Copy(Protocol):
    """What a table copy tells about itself (pipeline.backfill.TableCopy)."""

    est_rows: int          # the planner's estimate; <= 0: never analyzed
    started: float
    finished: float

    @property
    def name(self) -> str: ...

    def live(self) -> tuple[int, int]: ...   # (rows, bytes) so far


def stats(c: _Copy, now: float | None = None) -> dict[str, Any]:
    """One table's progress: rows, the estimate (None: unknown), MB/s and ETA (None while
    waiting or unknown), and its state: waiting, copying or done."""
    rows, nbytes = c.live()
    now = time.monotonic() if now is None else now
    state = "done" if c.finished else "copying" if c.started else "waiting"
    est = c.est_rows if c.est_rows > 0 else None
    out: dict[str, Any] = {"table": c.name, "state": state, "rows": rows,
                           "est_rows": max(est, rows) if est is not None else None,
                           "mb_per_s": None, "eta_s": None}
    if c.started:
        secs = max(1e-3, (c.finished or now) - c.started)
        out["mb_per_s"] = round(nbytes / 1e6 / secs, 1)
        if state == "copying" and est is not None and rows:
            out["eta_s"] = round(max(0.0, est - rows) / (rows / secs), 1)
    return out


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class CopyProgress:
    """Bars on a terminal (stderr), log lines every LOG_EVERY seconds otherwise."""

    def __init__(self, copies: Sequence[_Copy], tty: bool | None = None) -> None:
        self.copies = copies
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.last_log = time.monotonic()
        self._live: Live | None = None
        self._bars: Progress | None = None
        self._tasks: dict[int, TaskID] = {}

    def __enter__(self) -> CopyProgress:
        if self.tty:
            self._bars = Progress(
                TextColumn("{task.fields[table]}"), BarColumn(bar_width=30),
                TextColumn("{task.fields[detail]}"),
                console=Console(file=sys.stderr), auto_refresh=False)
            for c in self.copies:
                self._tasks[id(c)] = self._bars.add_task("", total=None, table="", detail="")
            # Log lines to a terminal go above the bars; to a file or a pipe (`run > log`)
            # they go where they went, untouched.
            self._live = Live(self._bars, console=self._bars.console, refresh_per_second=4,
                              redirect_stdout=_is_tty(sys.stdout), redirect_stderr=True,
                              transient=False)
            self._live.start()
        return self

    def tick(self) -> None:
        now = time.monotonic()
        if self._bars is not None:
            for c in self.copies:
                self._draw(c, stats(c, now))
            self._bars.refresh()
        if now - self.last_log >= LOG_EVERY:
            self.last_log = now
            for c in self.copies:
                log.log(logging.DEBUG if self.tty else logging.INFO, "copy progress",
                        extra=stats(c, now))

    def _draw(self, c: _Copy, s: dict[str, Any]) -> None:
        assert self._bars is not None
        if s["state"] == "waiting":
            detail = "waiting for a copy worker"
        else:
            est = f" of ~{s['est_rows']:,}" if s["est_rows"] is not None else \
                " (no estimate: never analyzed)"
            detail = f"{s['rows']:>11,} rows{est}  {s['mb_per_s']:.1f} MB/s"
            if s["state"] == "done":
                detail += "  done"
            elif s["eta_s"] is not None:
                detail += f"  ETA {s['eta_s']:.0f}s"
        total = s["est_rows"] if s["est_rows"] is not None else None
        if s["state"] == "done":
            total = max(s["rows"], 1)
        self._bars.update(self._tasks[id(c)], table=printable(s["table"]), detail=detail,
                          total=total, completed=s["rows"] if s["state"] != "done" else total)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self.tick()
            self._live.stop()
            self._live = None
