"""restage(): a streamed transaction's staging rows turned into a committed one's.

Rows are built here field by field (the layout the decoder writes: _seq int8, _lsn int8
holding the (sub)transaction xid, _op "char", columns, old key, _u), independently of the
decoder; what restage keeps, and how it renumbers and stamps it, is checked against a
plain-Python statement of the rule.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator._decode import (
    COPY_HEADER,
    COPY_TRAILER,
    DecodeError,
    cut_rows,
    iter_copy_binary,
    restage,
)


def staging_row(seq: int, xid: int, op: bytes, cols: list[bytes | None], u: bytes | None) -> bytes:
    fields = [struct.pack("!q", seq), struct.pack("!Q", xid), op, *cols, u]
    out = [struct.pack("!h", len(fields))]
    for f in fields:
        out.append(struct.pack("!i", -1) if f is None else struct.pack("!i", len(f)) + f)
    return b"".join(out)


rows_strategy = st.lists(st.tuples(
    st.integers(0, 1 << 40),                         # seq
    st.sampled_from([700, 701, 702, 950]),           # the xid of the row's (sub)transaction
    st.sampled_from([b"I", b"U", b"D"]),
    st.lists(st.one_of(st.none(), st.binary(max_size=40)), min_size=1, max_size=4),
    st.one_of(st.none(), st.binary(min_size=1, max_size=2)),
), max_size=30)


@given(rows=rows_strategy, aborted=st.sets(st.sampled_from([700, 701, 702, 950, 4])),
       lsn=st.integers(1, (1 << 63) - 1), delta=st.integers(0, 1 << 40))
def test_restage_keeps_committed_rows_renumbered_and_stamped(rows, aborted, lsn, delta):
    data = bytearray(b"".join(staging_row(*r) for r in rows))
    size, n, ins, upd, dels, unch = restage(data, aborted, lsn, delta)
    out = bytes(data[:size])
    kept = [r for r in rows if r[1] not in aborted]
    assert out == b"".join(staging_row(seq + delta, lsn, op, cols, u)
                           for seq, _x, op, cols, u in kept)
    assert (n, ins, upd, dels, unch) == (
        len(kept), sum(r[2] == b"I" for r in kept), sum(r[2] == b"U" for r in kept),
        sum(r[2] == b"D" for r in kept), sum(r[4] is not None for r in kept))
    # Still whole COPY BINARY rows: the stream the applier sends reads back.
    assert len(list(iter_copy_binary(COPY_HEADER + out + COPY_TRAILER))) == len(kept)


def test_restage_of_nothing():
    assert restage(bytearray(), {1}, 5, 0) == (0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("cut", [1, 2, 10, 25, 31, 33])
def test_restage_refuses_torn_rows(cut):
    row = staging_row(1, 700, b"I", [b"abc", None], None)
    with pytest.raises(DecodeError):
        restage(bytearray(row + row[:cut]), set(), 9, 0)


# -- cut_rows(): a streamed chunk cut where subtransactions begin -------------------

@given(seqs=st.lists(st.integers(0, 1000), max_size=30, unique=True),
       bounds=st.lists(st.integers(-5, 1005), max_size=5))
def test_cut_rows_splits_before_each_bound(seqs, bounds):
    seqs.sort()
    bounds.sort()
    ops = [b"IUD"[s % 3:s % 3 + 1] for s in seqs]
    rows = [staging_row(s, 700, op, [b"x" * (s % 7)], None) for s, op in zip(seqs, ops)]
    data = b"".join(rows)
    pieces = cut_rows(data, bounds)
    assert len(pieces) == len(bounds) + 1
    # The pieces tile the data in order, and piece i holds the rows in [bound i-1, bound i).
    assert b"".join(data[o:o + n] for o, n, *_ in pieces) == data
    edges = [float("-inf"), *bounds, float("inf")]
    for (o, n, count, ins, upd, dels), lo, hi in zip(pieces, edges, edges[1:]):
        inside = [(r, op) for s, r, op in zip(seqs, rows, ops) if lo <= s < hi]
        assert data[o:o + n] == b"".join(r for r, _ in inside)
        assert (count, ins, upd, dels) == (len(inside), sum(op == b"I" for _, op in inside),
                                           sum(op == b"U" for _, op in inside),
                                           sum(op == b"D" for _, op in inside))


def test_cut_rows_refuses_torn_rows_and_unsorted_bounds():
    row = staging_row(1, 700, b"I", [b"abc"], None)
    with pytest.raises(DecodeError):
        cut_rows(row + row[:20], [5])
    with pytest.raises(ValueError):
        cut_rows(row, [3, 2])
