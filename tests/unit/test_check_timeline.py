"""preflight.check_timeline: which failovers of the source the mirror may follow."""

from __future__ import annotations

import pytest

from replicator.errors import ErrorKind, ReplicatorError
from replicator.lsn import parse_lsn
from replicator.pipeline.preflight import check_timeline
from replicator.source.connection import ReplicationConnection


class History(ReplicationConnection):
    """TIMELINE_HISTORY answered from text, as the walsender sends the history file."""

    def __init__(self, text: str) -> None:
        super().__init__("")
        self.text = text
        self.asked: list[str] = []

    def command(self, query: str) -> list[tuple[str | None, ...]]:
        self.asked.append(query)
        return [("00000003.history", self.text)]


# Timeline 1 ended at 0/5000000, timeline 2 at 0/7000000 (a second failover).
TWO_HOPS = ("1\t0/5000000\tno recovery target specified\n\n"
            "2\t0/7000000\tno recovery target specified\n")


def refused(repl: ReplicationConnection, timeline: int, recorded: int, applied: str) -> str:
    with pytest.raises(ReplicatorError) as info:
        check_timeline(repl, timeline, recorded, parse_lsn(applied))
    assert info.value.kind is ErrorKind.RESYNC_REQUIRED
    return info.value.message


def test_the_same_timeline_or_nothing_known_asks_nothing():
    repl = History(TWO_HOPS)
    check_timeline(repl, 3, 3, parse_lsn("0/9000000"))
    check_timeline(repl, 3, None, parse_lsn("0/9000000"))
    check_timeline(repl, 3, 1, None)
    assert repl.asked == []


@pytest.mark.parametrize("recorded, applied", [(1, "0/5000000"), (1, "0/4000000"),
                                               (2, "0/6FFFFFF"), (2, "0/7000000")])
def test_a_position_before_the_fork_of_its_timeline_goes_on(recorded, applied):
    repl = History(TWO_HOPS)
    check_timeline(repl, 3, recorded, parse_lsn(applied))
    assert repl.asked == ["TIMELINE_HISTORY 3"]


@pytest.mark.parametrize("recorded, applied, fork", [(1, "0/5000001", "0/5000000"),
                                                     (2, "0/8000000", "0/7000000")])
def test_a_position_past_the_fork_is_refused(recorded, applied, fork):
    message = refused(History(TWO_HOPS), 3, recorded, applied)
    assert f"forked from timeline {recorded} at {fork}" in message
    assert f"(at {applied})" in message


def test_an_older_timeline_or_another_branch_is_refused():
    assert "older than the timeline 3" in refused(History(TWO_HOPS), 2, 3, "0/1000000")
    assert "does not descend from timeline 5" in refused(History(TWO_HOPS), 6, 5, "0/1000000")
