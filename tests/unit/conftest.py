"""Unit tests share one clean slate: no registered secrets, no handler left by
setup_logging, no REPLICATOR_CONFIG from the caller's environment."""

import logging

import pytest

from replicator import redact


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    redact.clear_secrets()
    monkeypatch.delenv("REPLICATOR_CONFIG", raising=False)
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, "_replicator_handler", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    redact.clear_secrets()
