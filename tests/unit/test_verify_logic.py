"""The pure parts of `replicator verify`: cutting key ranges, naming differing keys, and the
re-check rule that tells drift from a change in flight; the text report (no server needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.commands.verify import Range, Recheck, diff_rows, key_order, kind, split
from replicator.commands.verify_report import DriftRange, Report, TableResult, render


def test_split_cuts_at_each_bound_and_keeps_the_edges():
    assert split(Range(), []) == [Range()]
    assert split(Range(), [("5",)]) == [Range(None, ("5",)), Range(("5",), None)]
    assert split(Range(("1",), ("9",)), [("3",), ("6",)]) == [
        Range(("1",), ("3",)), Range(("3",), ("6",)), Range(("6",), ("9",))]


@given(st.lists(st.integers(0, 50), unique=True).map(sorted))
def test_split_ranges_are_contiguous(bounds):
    keys = [(str(b),) for b in bounds]
    parts = split(Range(), keys)
    assert len(parts) == len(bounds) + 1
    assert parts[0].lo is None and parts[-1].hi is None
    assert all(a.hi == b.lo for a, b in zip(parts, parts[1:]))


def test_diff_rows_names_changed_missing_and_extra_keys():
    source = {("1",): 10, ("2",): 20, ("3",): 30}
    mirror = {("1",): 10, ("2",): 21, ("4",): 40}
    found = diff_rows(source, mirror)
    assert found == {("2",): (20, 21), ("3",): (30, None), ("4",): (None, 40)}
    assert [kind(found[k]) for k in sorted(found)] == ["changed", "missing", "extra"]


def test_recheck_confirms_a_pair_seen_twice_drops_agreement_keeps_a_moving_key_open():
    check = Recheck({("1",): (1, 2), ("2",): (3, None), ("3",): (5, 6)})
    check.update({("1",): (1, 2), ("2",): (4, 4), ("3",): (7, 6)})
    assert check.confirmed == {("1",): (1, 2)}      # neither side moved: drift
    assert ("2",) not in check.pairs                # the mirror caught up: in flight
    assert check.open == [("3",)]                   # the source moved on: look again
    check.update({("3",): (7, 6)})
    assert check.confirmed == {("1",): (1, 2), ("3",): (7, 6)} and check.open == []
    assert check.rounds == 2


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=8))
def test_recheck_confirms_only_a_pair_repeated_in_consecutive_rounds(rounds):
    first, *later = rounds
    check = Recheck({("k",): first} if first[0] != first[1] else {})
    seen = [first]
    for pair in later:
        if not check.open:
            break
        check.update({("k",): pair})
        seen.append(pair)
    if ("k",) in check.confirmed:
        # Confirmed in the last round read, by the same unequal pair as the round before.
        assert seen[-1] == seen[-2] and seen[-1][0] != seen[-1][1]
        assert all(a != b for a, b in zip(seen, seen[1:-1]))
    if any(a == b for a, b in seen):
        assert ("k",) not in check.confirmed


def test_render_lists_drift_ranges_keys_and_caps_the_list():
    keys = [{"key": {"id": str(i)}, "kind": "changed"} for i in range(25)]
    drifted = TableResult("public.t", "odoo_mirror.t", "drift", source_rows=10, mirror_rows=9,
                          ranges=1, drift_ranges=[DriftRange(None, {"id": "100"}, 10, 9)],
                          keys=keys + [{"key": {"id": "99"}, "kind": "missing"}], keys_total=26)
    fine = TableResult("public.u", "odoo_mirror.u", "ok", source_rows=5, mirror_rows=5, ranges=1,
                       unsettled=1)
    skipped = TableResult("public.v", "odoo_mirror.v", "skipped", "sync state copying")
    out = render(Report("slot", [drifted, fine, skipped]))
    assert "DRIFT (26 keys)" in out and "skipped: sync state copying" in out
    assert "1 keys still changing" in out
    assert "range [start .. id=100): 10 rows at the source, 9 in the mirror" in out
    assert "key id=0: changed" in out and "key id=19: changed" in out
    assert "key id=20: changed" not in out and "... and 6 more keys" in out
    assert out.endswith("drift found")
    assert Report("slot", [fine]).as_dict()["drift"] is False


def test_keys_are_listed_by_number_when_they_are_numbers():
    keys = [("100001",), ("12000",), ("-3",), ("b",), ("a",)]
    assert sorted(keys, key=key_order) == [("-3",), ("12000",), ("100001",), ("a",), ("b",)]


def test_table_names_resolve_against_the_state_or_say_which_are_unknown():
    from replicator.destination.state import named_tables
    from replicator.errors import ConfigError

    known = {"public.account_move": 1, "sales.orders": 2}
    assert named_tables(["account_move", "sales.orders"], known, "odoo_pub") == [
        "public.account_move", "sales.orders"]
    with pytest.raises(ConfigError) as info:
        named_tables(["account_mov", "sales.orders"], known, "odoo_pub")
    assert info.value.message == "--table: public.account_mov is not replicated by slot 'odoo_pub'"
    assert info.value.hint == "known tables: public.account_move, sales.orders"
    with pytest.raises(ConfigError) as info:
        named_tables(["x"], {}, "odoo_pub")
    assert info.value.hint == "known tables: none yet (run first)"
