"""Initial-copy progress: bars on a terminal, log lines otherwise."""

from __future__ import annotations

import io
import logging
import time

from replicator.pipeline import backfill
from replicator.pipeline.backfill import TableCopy, _ProgressReporter
from replicator.schema import Column, MirrorTable, SourceTable


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def copies() -> list[TableCopy]:
    table = MirrorTable(SourceTable(1, "public", "account_move_line",
                                    (Column("id", "integer", 23, 4),), ("id",), "d"),
                        "odoo_mirror", "account_move_line", "replicator", binary=True)
    c = TableCopy(table, pages=100, est_rows=1000)
    c.started = time.monotonic() - 2.0
    c.rows, c.bytes = 250, 4_000_000
    return [c]


def test_terminal_shows_a_bar_per_table(monkeypatch):
    out = Tty()
    monkeypatch.setattr(backfill.sys, "stderr", out)
    reporter = _ProgressReporter(copies())
    reporter.tick()
    reporter.tick()
    screen = out.getvalue()
    line = screen.split("\x1b[2K")[-1]
    assert "odoo_mirror.account_move_line" in line and "250 rows" in line
    assert "MB/s" in line and "ETA" in line and "#" * 7 in line   # 25 % of 30
    assert "\x1b[F" in screen          # redrawn in place, not scrolled


def test_logs_a_progress_line_every_few_seconds(monkeypatch, caplog):
    monkeypatch.setattr(backfill.sys, "stderr", io.StringIO())
    monkeypatch.setattr(backfill, "PROGRESS_INTERVAL", 0.0)
    reporter = _ProgressReporter(copies())
    with caplog.at_level(logging.INFO, logger="replicator.pipeline.backfill"):
        reporter.tick()
    rec = [r for r in caplog.records if r.getMessage() == "copy progress"][0]
    assert rec.table == "odoo_mirror.account_move_line"
    assert rec.rows == 250 and rec.est_rows == 1000
    assert rec.mb_per_s > 0 and rec.eta_s > 0
