"""Initial-copy progress: live bars on a terminal (log lines printed above them, never over
them), a log line every few seconds otherwise; a waiting table says so, a table never
analyzed has no made-up estimate."""

from __future__ import annotations

import io
import logging
import sys
import time

from replicator.pipeline.backfill import TableCopy
from replicator.schema import Column, MirrorTable, SourceTable
from replicator.telemetry import progress
from replicator.telemetry.progress import CopyProgress, stats


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def table_copy(name: str, est_rows: int, started: bool = True) -> TableCopy:
    table = MirrorTable(SourceTable(1, "public", name, (Column("id", "integer", 23, 4),),
                                    ("id",), "d"), "odoo_mirror", name, "replicator",
                        binary=True)
    c = TableCopy(table, pages=100, est_rows=est_rows)
    if started:
        c.started = time.monotonic() - 2.0
        c.rows, c.bytes = 250, 4_000_000
    return c


def test_stats_of_a_copying_a_waiting_and_a_never_analyzed_table():
    copying = stats(table_copy("account_move_line", 1000))
    assert copying["state"] == "copying" and copying["rows"] == 250
    assert copying["est_rows"] == 1000 and copying["mb_per_s"] > 0 and copying["eta_s"] > 0
    waiting = stats(table_copy("res_partner", 1000, started=False))
    # Not "0.0 MB/s, ETA 0 s": it has not started.
    assert waiting["state"] == "waiting" and waiting["mb_per_s"] is None
    assert waiting["eta_s"] is None
    # reltuples -1 (never analyzed): no estimate, rather than one equal to the rows done.
    unknown = stats(table_copy("project_task", -1))
    assert unknown["est_rows"] is None and unknown["eta_s"] is None


def test_terminal_shows_bars_and_log_lines_above_them(monkeypatch):
    out = Tty()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("COLUMNS", "160")   # a wide terminal: nothing cut short
    copies = [table_copy("account_move_line", 1000), table_copy("res_partner", 10, False),
              table_copy("project_task", -1)]
    with CopyProgress(copies, tty=True) as bars:
        bars.tick()
        # A log line written while the bars are up (our handler writes to sys.stderr as it
        # is at each write): printed above them by the live display, not over them.
        sys.stderr.write("a log line meanwhile\n")
        bars.tick()
    screen = out.getvalue()
    assert "a log line meanwhile" in screen
    last = screen[screen.rindex("a log line meanwhile"):]
    assert "odoo_mirror.account_move_line" in last and "250 rows of ~1,000" in last
    assert "MB/s" in last and "ETA" in last
    assert "waiting for a copy worker" in last
    assert "(no estimate: never analyzed)" in last
    assert "\x1b[F" not in screen     # no cursor-up codes of our own


def test_logs_a_progress_line_every_few_seconds(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="replicator.telemetry.progress"), \
            CopyProgress([table_copy("account_move_line", 1000)], tty=False) as bars:
        bars.tick()
    rec = [r for r in caplog.records if r.getMessage() == "copy progress"][0]
    assert rec.table == "odoo_mirror.account_move_line" and rec.state == "copying"
    assert rec.rows == 250 and rec.est_rows == 1000
    assert rec.mb_per_s > 0 and rec.eta_s > 0


def test_log_lines_to_a_file_stay_in_the_file(monkeypatch):
    # `run > replicator.log` on a terminal: the bars on stderr, the log lines (stdout) in
    # the file, not captured into the live display.
    out, err = io.StringIO(), Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with CopyProgress([table_copy("account_move_line", 1000)], tty=True) as bars:
        sys.stdout.write("a log line for the file\n")
        bars.tick()
    assert out.getvalue() == "a log line for the file\n"
    assert "a log line for the file" not in err.getvalue()
