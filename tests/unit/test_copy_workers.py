"""How many parallel COPY streams an initial copy uses."""

from __future__ import annotations

import os

import pytest

from replicator.config.load import from_dsns
from replicator.errors import ConfigError
from replicator.pipeline import backfill

DSNS = ("host=/tmp/pg dbname=odoo user=odoo", "host=/tmp/pg dbname=mirror user=postgres", "pub")


@pytest.mark.parametrize(("cpus", "workers"), [
    (1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (16, 4), (64, 4)])
def test_default_from_cpus(cpus, workers):
    # Half the CPUs this process may use, at most 4 (bench/backfill.py --tune).
    assert backfill.default_copy_workers(cpus) == workers


def test_usable_cpus_are_this_process_s():
    assert 1 <= backfill.usable_cpus() <= (os.cpu_count() or 1)


def test_unset_means_the_cpus_default(monkeypatch):
    monkeypatch.setattr(backfill, "usable_cpus", lambda: 8)
    assert backfill.copy_workers(from_dsns(*DSNS)) == 4
    monkeypatch.setattr(backfill, "usable_cpus", lambda: 2)
    assert backfill.copy_workers(from_dsns(*DSNS)) == 1


def test_explicit_setting_wins_within_max_connections(monkeypatch):
    monkeypatch.setattr(backfill, "usable_cpus", lambda: 2)
    assert backfill.copy_workers(from_dsns(*DSNS, copy_workers=6)) == 6
    # The catalog and replication connections need two of the source's connections.
    assert backfill.copy_workers(from_dsns(
        *DSNS, copy_workers=6, source_max_connections=5)) == 3
    monkeypatch.setattr(backfill, "usable_cpus", lambda: 16)
    assert backfill.copy_workers(from_dsns(*DSNS, source_max_connections=3)) == 1


def test_copy_workers_must_be_positive():
    with pytest.raises(ConfigError, match=r"\[destination\] copy_workers: must be >= 1"):
        from_dsns(*DSNS, copy_workers=0)
