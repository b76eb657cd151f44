"""The dead-connection settings: defaults, and the one line a wrong value gets."""

from __future__ import annotations

import pytest
from plugins.replicator import write_config

from replicator.config.load import load_config
from replicator.deadline import STALL_GRACE, BatchLimits
from replicator.errors import ConfigError


def test_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert cfg.source.receive_timeout == 60
    dst = cfg.destination
    assert (dst.stall_timeout, dst.lock_timeout, dst.idle_in_transaction_timeout) == (300, 30, 60)
    assert BatchLimits.of(dst).answer_timeout == 300 + STALL_GRACE


def test_values_from_the_file(tmp_path):
    cfg = load_config(write_config(
        tmp_path, source={"receive_timeout": 5},
        destination={"stall_timeout": 20, "lock_timeout": 2, "idle_in_transaction_timeout": 9}))
    assert cfg.source.receive_timeout == 5
    assert BatchLimits.of(cfg.destination) == BatchLimits(20, 2, 9)


@pytest.mark.parametrize(("section", "keys", "wrong"), [
    ("source", {"receive_timeout": 0}, "[source] receive_timeout: must be > 0"),
    ("destination", {"stall_timeout": -1}, "[destination] stall_timeout: must be > 0"),
    ("destination", {"stall_timeout": 10, "lock_timeout": 10},
     "[destination] lock_timeout: must be less than stall_timeout (10), got 10"),
])
def test_wrong_values_are_one_clear_line(tmp_path, section, keys, wrong):
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, **{section: keys}))
    assert exc.value.message.startswith(wrong), exc.value.message
    assert "\n" not in exc.value.one_line()
