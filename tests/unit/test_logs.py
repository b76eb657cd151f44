"""Log lines: JSON shape, text shape, destinations, and redaction of every secret."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from datetime import datetime

import orjson
import pytest

from replicator.config.settings import DestinationSettings, LoggingSettings
from replicator.errors import ConfigError
from replicator.redact import redact, register_secret
from replicator.telemetry.logs import setup_logging

log = logging.getLogger("replicator.test")




def json_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines()]


# --- redact() -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host=db password=hunter2 user=odoo", "host=db password=*** user=odoo"),
        ("host=db password='with space\\'s' user=odoo", "host=db password=*** user=odoo"),
        ('password = "toml value"', "password = ***"),
        ("PASSWORD=x", "PASSWORD=***"),
        ("postgresql://odoo:hunter2@db:5432/odoo_core", "postgresql://odoo:***@db:5432/odoo_core"),
        ("postgresql://db/odoo?password=hunter2&sslmode=require", "postgresql://db/odoo?password=***&sslmode=require"),
        ("{'password': 'hunter2', 'user': 'odoo'}", "{'password': '***', 'user': 'odoo'}"),
        ('{"password": "hun\\"ter2", "user": "odoo"}', '{"password": "***", "user": "odoo"}'),
        ("nothing secret here: 0/16B3748", "nothing secret here: 0/16B3748"),
        ("", ""),
    ],
)
def test_redact_conninfo_forms(text, expected):
    assert redact(text) == expected


def test_redact_registered_secrets_and_their_url_encoding():
    register_secret("p@ss w0rd")
    register_secret("")  # ignored: masking "" would mask everything
    register_secret(None)
    text = "a p@ss w0rd b p%40ss%20w0rd c p%40ss+w0rd"
    assert redact(text) == "a *** b *** c ***"


def test_longer_secret_containing_a_shorter_one_is_masked_whole():
    register_secret("abcd")
    register_secret("xxabcdxx")
    assert redact("xxabcdxx abcd") == "*** ***"


def test_short_secrets_are_masked_only_where_they_stand_alone():
    register_secret("odoo")
    register_secret("x")
    assert redact("user odoo on odoo_core, got 'x' (box)") == "user *** on odoo_core, got '***' (box)"
    assert redact("postgresql://odoo:odoo@db/odoo_core") == "postgresql://***:***@db/odoo_core"
    assert redact("password=x host=db") == "password=*** host=db"
    register_secret("LongEnough1")
    assert redact("prefixLongEnough1suffix") == "prefix***suffix"


# --- JSON -----------------------------------------------------------------------------------


def test_json_line_shape_and_extra_fields(capsys):
    setup_logging(LoggingSettings(level="info", format="json", output="stdout"))
    log.info("applied batch of %d rows", 3, extra={"lsn": "0/16B3748", "table": "res_partner", "rows": 3})
    log.debug("not shown at info")

    (entry,) = json_lines(capsys.readouterr().out)
    assert list(entry)[:5] == ["ts", "level", "logger", "msg", "event"]
    assert entry["level"] == "info"
    assert entry["logger"] == "replicator.test"
    assert entry["msg"] == "applied batch of 3 rows"
    # The message as written, before its arguments: the same for every such line.
    assert entry["event"] == "applied batch of %d rows"
    assert (entry["lsn"], entry["table"], entry["rows"]) == ("0/16B3748", "res_partner", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0


def test_json_event_given_by_the_caller(capsys):
    setup_logging(LoggingSettings(level="info", format="json", output="stdout"))
    log.info("applied %s", "x", extra={"event": "batch_applied"})
    (entry,) = json_lines(capsys.readouterr().out)
    assert (entry["msg"], entry["event"]) == ("applied x", "batch_applied")
    assert list(entry).count("event") == 1


def test_json_exception_is_one_line_with_traceback(capsys):
    setup_logging(LoggingSettings(format="json", output="stdout"))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    (entry,) = json_lines(out)
    assert entry["level"] == "error"
    assert "Traceback" in entry["exc"] and "ValueError: boom" in entry["exc"]


def test_json_never_contains_secrets(capsys):
    register_secret("hunter2")
    dest = DestinationSettings(host="h", port=5433, database="d", user="u", password="supa-pw")
    setup_logging(LoggingSettings(format="json", output="stdout"))
    log.warning(
        "connecting with %s",
        "host=h password=hunter2",
        extra={
            "conninfo": dest.conninfo(),
            "settings": dest,  # a dataclass: orjson alone would write its password field
            "nested": {"list": ["hunter2", 1], "deep": {"pw": "hunter2"}},
            "big": 2**70,
        },
    )
    try:
        raise RuntimeError("auth failed for password hunter2")
    except RuntimeError:
        log.error("with traceback", exc_info=True)
    out = capsys.readouterr().out
    assert "hunter2" not in out and "supa-pw" not in out
    first, second = json_lines(out)
    assert first["msg"] == "connecting with host=h password=***"
    assert first["nested"] == {"list": ["***", 1], "deep": {"pw": "***"}}
    assert first["big"] == str(2**70)
    assert "***" in second["exc"]


def test_extra_cannot_replace_core_keys(capsys):
    setup_logging(LoggingSettings(format="json", output="stdout"))
    log.info("real", extra={"level": "fake", "ts": "fake", "logger": "fake"})
    (entry,) = json_lines(capsys.readouterr().out)
    assert (entry["level"], entry["logger"]) == ("info", "replicator.test")
    assert entry["ts"] != "fake"


# --- text -----------------------------------------------------------------------------------


def test_text_line(capsys):
    register_secret("hunter2")
    setup_logging(LoggingSettings(level="debug", format="text", output="stderr"))
    log.debug("caught up\nsecond line hunter2", extra={"lsn": "0/3000060", "note": "two words"})
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err
    assert line.count("\n") == 1
    assert re.fullmatch(
        r'\S+Z debug   replicator\.test: caught up second line \*\*\* lsn=0/3000060 note="two words"\n',
        line,
    )


# --- destinations and setup -----------------------------------------------------------------


def test_file_output(tmp_path):
    path = tmp_path / "replicator.log"
    register_secret("hunter2")
    setup_logging(LoggingSettings(format="json", output=str(path)))
    log.info("to file hunter2")
    for handler in logging.getLogger().handlers:
        handler.flush()
    (entry,) = json_lines(path.read_text())
    assert entry["msg"] == "to file ***"


def test_unwritable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^\[logging\] output: cannot open"):
        setup_logging(LoggingSettings(output=str(tmp_path / "missing-dir" / "x.log")))


def test_setup_twice_replaces_its_own_handler(capsys):
    setup_logging(LoggingSettings(format="json", output="stdout"))
    setup_logging(LoggingSettings(format="text", output="stdout", level="warning"))
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_replicator_handler", False)]
    assert len(ours) == 1
    log.info("hidden")
    log.warning("shown")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "shown" in out and not out.startswith("{")


# --- format "auto": text for a person, JSON for a container -------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty, json_expected", [(True, False), (False, True)])
def test_auto_format_is_text_on_a_terminal_and_json_otherwise(monkeypatch, tty, json_expected):
    out = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    setup_logging(LoggingSettings(level="info", output="stdout"))   # format: auto
    log.info("streaming", extra={"tables": ["public.a", "public.b"]})
    line = out.getvalue().strip()
    assert line.startswith("{") is json_expected, line
    if not json_expected:
        # A list reads as one: tables=public.a,public.b, not tables=['public.a', 'public.b'].
        assert line.endswith("streaming tables=public.a,public.b"), line


def test_auto_format_writes_json_to_a_file(tmp_path):
    path = tmp_path / "replicator.log"
    handler = setup_logging(LoggingSettings(level="info", output=str(path)))
    log.info("streaming")
    handler.flush()
    assert json.loads(path.read_text().splitlines()[-1])["msg"] == "streaming"


def test_the_setting_wins_over_the_terminal(monkeypatch):
    out = _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    setup_logging(LoggingSettings(level="info", format="json", output="stdout"))
    log.info("streaming")
    assert out.getvalue().startswith("{")
