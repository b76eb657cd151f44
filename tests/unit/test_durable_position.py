"""The applied position the slot is told: committed batches count only once flushed."""

from __future__ import annotations

from replicator.pipeline.handoff import Progress


def test_a_batch_committed_without_flush_is_durable_once_wal_passes_it():
    p = Progress(applied_lsn=100, durable_lsn=100)
    p.applied(200, wal_lsn=5000, wal_flushed=4000)
    assert (p.applied_lsn, p.durable_lsn, p.undurable) == (200, 100, True)
    p.applied(300, wal_lsn=6000, wal_flushed=5500)
    assert (p.applied_lsn, p.durable_lsn) == (300, 200)
    p.flushed(5999)
    assert p.durable_lsn == 200
    p.flushed(6000)
    assert (p.durable_lsn, p.undurable) == (300, False)


def test_a_synchronous_commit_is_durable_at_once_but_not_before_earlier_ones():
    p = Progress()
    p.applied(100)
    assert p.durable_lsn == 100
    p.applied(200, wal_lsn=5000)
    p.applied(300)  # flushing it flushed the earlier one too, but that is not known here
    assert p.durable_lsn == 100
    p.flushed(5000)
    assert (p.durable_lsn, p.undurable) == (300, False)


def test_a_session_start_forgets_wal_positions_of_the_last_one():
    # After a destination crash its WAL continues below positions recorded before it:
    # those say nothing about what the new session commits.
    p = Progress(applied_lsn=100, durable_lsn=100)
    p.applied(200, wal_lsn=9000)
    p.applied_lsn = 150  # read back from the destination after the crash
    p.restart(wal_lsn=8000)
    p.flushed(8500)
    assert p.durable_lsn == 150
    p.applied(400, wal_lsn=8800)
    p.flushed(8900)
    assert (p.durable_lsn, p.undurable) == (400, False)


def test_a_start_position_not_yet_flushed_waits_for_the_flush():
    p = Progress(applied_lsn=700)  # a new process: nothing confirmed by it yet
    p.restart(wal_lsn=3000)
    assert (p.durable_lsn, p.undurable) == (0, True)
    p.flushed(3000)
    assert p.durable_lsn == 700
