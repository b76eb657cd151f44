"""replicator/devtools/reference_decoder.py decodes exactly like replicator._decode.Decoder.

The decoder benchmark (bench/test_decoder_bench.py) compares the two: that is fair only
if they do the same work and give the same result. Here every captured stream (the unit
captures of tests/unit/data, with streaming, TOAST, key changes and REPLICA IDENTITY FULL,
and the six Odoo tables of bench/data) goes through both, message by message, and what
each says after every message (event code, event details, positions and counters, the
COPY BINARY staging buffers take() hands over) must be identical, byte for byte.
"""

from __future__ import annotations

import pytest
from pgwire import (
    UNCHANGED,
    begin,
    commit,
    delete,
    insert,
    int4,
    keepalive,
    relation,
    truncate,
    update,
)

from replicator import _decode
from replicator._decode import EV_KEEPALIVE, EV_RELATION, Decoder
from replicator.devtools import pgoutput_replay, reference_decoder
from replicator.devtools.pgoutput_replay import (
    ODOO_CAPTURE,
    UNIT_CAPTURES,
    frames,
    key_of,
    load_capture,
)
from replicator.devtools.reference_decoder import ReferenceDecoder

CAPTURES = [*UNIT_CAPTURES, ODOO_CAPTURE]
ATTRS = ("seq", "skip_before", "in_txn", "skipping", "in_stream", "xid", "stream_xid",
         "final_lsn", "commit_lsn", "end_lsn", "commit_ts", "txn_rows", "batch_rows",
         "buffered_bytes", "wal_start", "wal_end", "send_time", "reply_requested")


def test_constants_are_the_decoders():
    assert reference_decoder.COPY_HEADER == _decode.COPY_HEADER
    assert reference_decoder.COPY_TRAILER == _decode.COPY_TRAILER


def lockstep(messages, *, framed: bool, skip_before: int = 0, inactive_relid=None) -> int:
    """Both decoders fed the same messages; everything they say compared after each."""
    ours, ref = Decoder(), ReferenceDecoder()
    ours.skip_before = ref.skip_before = skip_before
    relids = []
    rows = 0
    stream = frames(messages) if framed else [m for _lsn, m in messages]
    for i, data in enumerate(stream):
        if framed:
            ev, ev_ref = ours.feed_frame(data), ref.feed_frame(data)
        else:
            ev, ev_ref = ours.feed(data), ref.feed(data)
        where = f"message {i} ({chr(messages[i][1][0])})"
        assert ev_ref == ev, where
        assert ref.event == ours.event, where
        assert {a: getattr(ref, a) for a in ATTRS} == {a: getattr(ours, a) for a in ATTRS}, where
        if ev == EV_RELATION:
            relid, _nsp, _name, _ident, cols, _xid = ours.event
            relids.append(relid)
            active = relid != inactive_relid
            ours.define(relid, len(cols), key_of(cols), active)
            ref.define(relid, len(cols), key_of(cols), active)
        taken, taken_ref = ours.take(), ref.take()
        assert taken_ref == taken, where
        rows += sum(counts[0] for _relid, _data, counts in taken)
    return rows


@pytest.mark.parametrize("framed", [True, False], ids=["feed_frame", "feed"])
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_same_output_message_by_message(path, framed):
    assert lockstep(load_capture(path), framed=framed) > 0


@pytest.mark.parametrize("path", [UNIT_CAPTURES[0], ODOO_CAPTURE], ids=lambda p: p.name)
def test_same_output_when_skipping_and_with_an_inactive_relation(path):
    messages = load_capture(path)
    middle = messages[len(messages) // 2][0]
    relids = [int.from_bytes(m[1:5], "big") for _lsn, m in messages if m[:1] == b"R"]
    full = lockstep(messages, framed=True)
    skipped = lockstep(messages, framed=True, skip_before=middle, inactive_relid=relids[0])
    assert 0 < skipped < full


def test_odoo_capture_is_the_six_tables_through_the_bench_replay():
    """What the benchmark runs, once per decoder: the same staging buffers."""
    messages = load_capture(ODOO_CAPTURE)
    names = {m[5:].split(b"\0")[1].decode() for _lsn, m in messages if m[:1] == b"R"}
    assert names == {"account_move", "account_move_line", "res_partner", "project_task",
                     "hr_expense", "hr_expense_sheet"}
    stream = frames(messages)
    got = pgoutput_replay.replay(Decoder(), stream)
    want = pgoutput_replay.replay(ReferenceDecoder(), stream)
    assert want == got
    tags = [m[:1] for _lsn, m in messages]
    assert sum(counts[0] for _r, _d, counts in got) >= tags.count(b"I") + tags.count(b"U")


def handmade() -> list[tuple[int, bytes]]:
    """What the captures lack: unchanged TOAST filled from a FULL old image, a key change
    that leaves TOAST unchanged, NULL keys, a FULL delete, a truncate, a keepalive-free mix."""
    t = [(1, "id", 23, -1), (1, "code", 25, -1), (0, "body", 25, -1)]
    f = [(1, "a", 23, -1), (0, "b", 25, -1), (0, "c", 23, -1)]
    big = "x" * 3000
    msgs = [
        relation(1, "public", "t", t),
        relation(2, "public", "f", f, replident="f"),
        begin(100, 1, 7),
        insert(1, [int4(1), "A", big]),
        insert(1, [int4(2), None, "small"]),
        update(1, [int4(3), "A", UNCHANGED], old=[int4(1), "A", None]),
        update(1, [int4(2), None, UNCHANGED], old=[int4(2), None, None]),
        update(1, [int4(3), "B", "new body"]),
        delete(1, [int4(3), "B", None]),
        insert(2, [int4(1), big, int4(1)]),
        update(2, [int4(1), UNCHANGED, int4(2)], old=[int4(1), big, int4(1)], old_kind="O"),
        delete(2, [int4(1), big, int4(2)], old_kind="O"),
        commit(100, 120, 1),
        begin(200, 2, 8),
        truncate([1, 2], options=1),
        insert(1, [int4(9), "Z", UNCHANGED]),
        commit(200, 220, 2),
    ]
    return [(10 * i + 1, m) for i, m in enumerate(msgs)]


@pytest.mark.parametrize("skip_before", [0, 150, 300])
@pytest.mark.parametrize("framed", [True, False], ids=["feed_frame", "feed"])
def test_same_output_on_handmade_corner_cases(framed, skip_before):
    assert lockstep(handmade(), framed=framed, skip_before=skip_before) == \
        {0: 11, 150: 1, 300: 0}[skip_before]


def test_keepalive_and_bad_input_alike():
    ours, ref = Decoder(), ReferenceDecoder()
    frame = keepalive(12345, reply=True, ts=99)
    assert ref.feed_frame(frame) == ours.feed_frame(frame) == EV_KEEPALIVE
    assert (ref.wal_end, ref.send_time, ref.reply_requested) == \
        (ours.wal_end, ours.send_time, ours.reply_requested) == (12345, 99, 1)
    for bad in (b"", b"w" + b"\0" * 10, b"x123"):
        with pytest.raises(_decode.DecodeError):
            ours.feed_frame(bad)
        with pytest.raises(reference_decoder.DecodeError):
            ref.feed_frame(bad)
