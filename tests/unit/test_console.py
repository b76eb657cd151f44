"""Control characters in names never reach a person's terminal raw: printed text, the error
line and the text log escape them (a table named with an OSC sequence retitles the terminal
of whoever runs `check`, a CSI sequence rewrites what it printed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from replicator.commands.cli import main
from replicator.errors import ErrorKind, ReplicatorError
from replicator.pipeline import preflight
from replicator.telemetry.console import printable
from replicator.telemetry.logs import TextFormatter

REPO = Path(__file__).resolve().parents[2]
OSC_TITLE = "\x1b]0;pwned\x07"  # sets the terminal's title
HOSTILE = f"res_partner{OSC_TITLE}\x1b[2K\x9b31m\u202e\r\x00\x7f"


def _controls(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) <= 0x9f
            or c == "\u202e"]


def test_printable_escapes_every_control_character_as_python_does():
    assert printable(OSC_TITLE) == "\\x1b]0;pwned\\x07"
    out = printable(HOSTILE)
    assert _controls(out) == [], repr(out)
    assert out == "res_partner\\x1b]0;pwned\\x07\\x1b[2K\\x9b31m\\u202e\\r\\x00\\x7f"
    assert printable("a\nb\tc") == "a\\nb\\tc"  # one line stays one line


def test_printable_leaves_ordinary_text_alone():
    text = r'odoo_mirror.res_partner — café, 東京, C:\path "quoted" 100%'
    assert printable(text) == text
    assert printable("line one\nline two", multiline=True) == "line one\nline two"
    assert printable(f"a{OSC_TITLE}\nb", multiline=True) == "a\\x1b]0;pwned\\x07\nb"


def test_the_error_line_escapes_names(monkeypatch, capsys):
    def check(config):
        raise ReplicatorError(ErrorKind.SOURCE_SETUP, f'table "{HOSTILE}" has no key',
                              f"alter table {HOSTILE} replica identity full")

    monkeypatch.setattr(preflight, "check", check)
    monkeypatch.setenv("ODOO_DB_PASSWORD", "x" * 12)
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", "y" * 12)
    assert main(["check", "--config", str(REPO / "etl-config.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert _controls(err) == [], repr(err)
    assert 'table "res_partner\\x1b]0;pwned\\x07' in err, err


@pytest.mark.parametrize("value", [HOSTILE, {"table": HOSTILE}])
def test_the_text_log_escapes_names(value):
    record = logging.LogRecord("replicator.commands.init", logging.INFO, __file__, 1,
                               "created mirror table %s", (HOSTILE,), None)
    record.table = value
    line = TextFormatter().format(record)
    assert _controls(line) == [], repr(line)
    assert "\\x1b]0;pwned\\x07" in line
