"""split_inserts(): a table's staged inserts as the mirror's own COPY BINARY rows, the rest
left as staging rows.

Staging rows are built field by field as in test_restage (the decoder's layout), and the
results are read back with iter_copy_binary and compared with the plain statement of the
rule: the kept columns of each insert, in order, nothing of staging's own fields; every
other row unchanged and in order; nothing at all when a row is a delete.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator._decode import (
    COPY_HEADER,
    COPY_TRAILER,
    DecodeError,
    iter_copy_binary,
    split_inserts,
)
from tests.unit.test_restage import staging_row

value = st.one_of(st.none(), st.binary(max_size=40))


@st.composite
def tables(draw):
    ncols = draw(st.integers(1, 6))
    nkey = draw(st.integers(1, 2))
    keep = draw(st.lists(st.booleans(), min_size=ncols, max_size=ncols))
    rows = draw(st.lists(st.tuples(
        st.integers(0, 1 << 40), st.sampled_from([b"I", b"I", b"U", b"D"]),
        st.lists(value, min_size=ncols, max_size=ncols),
        st.one_of(st.none(), st.binary(min_size=1, max_size=2))), max_size=20))
    # An insert never carries unchanged-TOAST columns (_u).
    rows = [(seq, op, cols, None if op == b"I" else u) for seq, op, cols, u in rows]
    return ncols, nkey, keep, rows


def staged(rows, nkey):
    return [staging_row(seq, 7, op, [*cols, *[None] * nkey], u) for seq, op, cols, u in rows]


@given(tables())
def test_split_inserts_keeps_the_kept_columns_of_inserts_and_the_rest_as_it_was(table):
    ncols, nkey, keep, rows = table
    data = staged(rows, nkey)
    split = split_inserts(b"".join(data), bytes(keep))
    if any(op == b"D" for _s, op, _c, _u in rows):
        assert split is None
        return
    assert split is not None
    inserts, rest, nrest = split
    assert list(iter_copy_binary(inserts)) == [
        tuple(v for v, k in zip(cols, keep) if k) for _s, op, cols, _u in rows if op == b"I"]
    others = [r for r, (_s, op, _c, _u) in zip(data, rows) if op != b"I"]
    assert bytes(rest) == COPY_HEADER + b"".join(others) + COPY_TRAILER
    assert nrest == len(others)


def test_split_inserts_refuses_an_insert_with_unchanged_toast():
    good = staging_row(1, 7, b"I", [b"a", b"b", None], None)
    other = staging_row(2, 7, b"I", [b"a", b"b", None], b"\x01")
    with pytest.raises(DecodeError):
        split_inserts(good + other, b"\x01\x01")


@pytest.mark.parametrize("op", [b"I", b"U"])
@pytest.mark.parametrize("cut", [1, 2, 10, 30, 33, 40])
def test_split_inserts_refuses_torn_rows(op, cut):
    row = staging_row(1, 7, op, [b"abc", b"de", None], None)
    with pytest.raises(DecodeError):
        split_inserts(row + row[:cut], b"\x01\x01")


def test_split_inserts_refuses_a_row_of_another_shape():
    row = staging_row(1, 7, b"I", [b"abc", None], None)   # one column and the key: not two
    with pytest.raises(DecodeError):
        split_inserts(row, b"\x01\x01")
