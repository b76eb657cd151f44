"""The pure parts of setting rejected changes aside: which keys go together."""

from __future__ import annotations

import datetime

from replicator.destination.dead_letters import Letter, _queues
from replicator.destination.reject_sql import group_keys, rejects


def test_keys_without_links_are_one_group_each():
    assert group_keys(4, [], set()) == ([0, 1, 2, 3], 4)


def test_key_changes_link_keys_into_one_group_numbered_by_first_key():
    # 4 -> 1 and 1 -> 3 (a chain), 0 alone, 2 alone.
    groups, count = group_keys(5, [(1, 4), (3, 1)], set())
    assert groups == [0, 1, 2, 1, 1] and count == 3


def test_a_queued_key_takes_its_whole_group_aside():
    groups, count = group_keys(5, [(1, 4)], {4})
    assert groups == [0, -1, 1, 2, -1] and count == 3


def test_only_data_errors_are_rejections():
    import psycopg.errors as e

    assert rejects(e.CheckViolation()) and rejects(e.NumericValueOutOfRange())
    assert not rejects(e.UndefinedTable()) and not rejects(e.AdminShutdown())
    assert not rejects(ValueError())


def letter(i: int, key: str, old: str | None = None, table: str = "m.t") -> Letter:
    return Letter(i, table, 0, "U", key, old, "", None, datetime.datetime.now(), 0)


def test_retry_queues_follow_keys_and_key_changes_in_id_order():
    letters = [letter(1, '{"id": 1}'), letter(2, '{"id": 2}'), letter(3, '{"id":1}'),
               letter(4, '{"id": 11}', old='{"id": 2}'), letter(5, '{"id": 1}', table="m.u")]
    assert [[q.id for q in queue] for queue in _queues(letters)] == [[1, 3], [2, 4], [5]]


def test_dead_letters_help(capsys):
    from replicator.commands.cli import main

    assert main(["dead-letters", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--retry" in out and "--json" in out and "--table" in out
    assert "in order" in out and "beside a running" in out
    assert main(["--help"]) == 0
    assert "dead-letters" in capsys.readouterr().out
