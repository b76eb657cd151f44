"""Property tests of the decoder: random relations and changes, encoded with
pgwire, decoded, read back with iter_copy_binary and compared with what the
staging row layout says they must be.

The model here is written from the layout's specification, not from the
decoder: _seq strictly increasing in stream order; _op; the table's columns
exactly as sent (NULL for 'n' and for unchanged TOAST 'u'); one old-key column
per key column, set only on the new row of an UPDATE that changed the key;
_u, a bitmask of the columns sent as 'u' (NULL when none was). A key-changing
UPDATE is a 'D' of the old key followed by the 'U'; a DELETE carries only the
key; an 'O' old tuple (REPLICA IDENTITY FULL) fills the new tuple's 'u'
fields. Inactive relations and transactions before skip_before leave nothing.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgwire import UNCHANGED, begin, commit, delete, insert, keepalive, relation, update, xlogdata

from replicator._decode import (
    EV_BEGIN,
    EV_COMMIT,
    EV_KEEPALIVE,
    EV_NONE,
    EV_RELATION,
    EV_STREAM_COMMIT,
    EV_STREAM_START,
    EV_STREAM_STOP,
    Decoder,
    iter_copy_binary,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _staging_lead() -> int:
    """Columns before the table's: 2 (_seq, _op) or 3 (_seq, _lsn, _op), whichever the decoder writes."""
    dec = Decoder()
    dec.define(1, 1, [0], True)
    dec.feed(insert(1, [b"k"]))
    (row,) = iter_copy_binary(dec.take()[0][1])
    lead = len(row) - 3
    assert lead in (2, 3) and row[lead - 1] == b"I", row
    return lead


LEAD = _staging_lead()


# -- scenarios ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rel:
    relid: int
    fmts: tuple[str, ...]      # 't' (str values) or 'b' (bytes values), per column
    key_idx: tuple[int, ...]
    active: bool

    @property
    def ncols(self) -> int:
        return len(self.fmts)


@dataclass(frozen=True)
class Change:
    rel: int                   # index into the scenario's relations
    tag: str                   # 'I', 'U' or 'D'
    new: tuple | None
    old: tuple | None
    old_kind: str              # 'K' or 'O' (with old)


@dataclass(frozen=True)
class Txn:
    final_lsn: int
    changes: tuple[Change, ...]
    take_after: bool


@dataclass(frozen=True)
class Scenario:
    rels: tuple[Rel, ...]
    txns: tuple[Txn, ...]
    skip_before: int
    streamed: bool


# Field values are drawn a row at a time, not a field at a time: one byte
# string picks each field's kind, one picks its length, one seed fills the
# values. Drawing up to 40 fields of up to 5000 bytes one by one is what makes
# Hypothesis slow; these three draws shrink just as well (kinds to 0 = NULL or
# the first key, lengths to 0, the seed to 0).
TEXT_ALPHABET = "abc xyz019,{}\"\\\x01é€😀"  # 1- to 4-byte UTF-8 characters
KEY_DOMAIN = {"b": (b"", b"\x00", b"\x01", b"\x00\x01"), "t": ("", "a", "é", "aé")}
NULL, SHORT, LONG, UNCH = range(4)


TEXT_POOL = "".join(random.Random(0).choices(TEXT_ALPHABET, k=10000))


def _make(fmt: str, n: int, rng: random.Random):
    if fmt == "b":
        return rng.randbytes(n)
    start = rng.randrange(len(TEXT_POOL) - n)
    return TEXT_POOL[start:start + n]


# Strategies are built once: building and validating one per draw costs more
# than the draw.
BOOLS = st.booleans()
SEEDS = st.integers(0, 2**32 - 1)
CHANGE_KINDS = st.sampled_from(["I", "U", "UK", "UO", "D", "DO"])
_BYTES: dict[int, st.SearchStrategy] = {}


def _exactly(n: int) -> st.SearchStrategy:
    if n not in _BYTES:
        _BYTES[n] = st.binary(min_size=n, max_size=n)
    return _BYTES[n]


def draw_row(draw, rel: Rel, allow_u: bool, need_value=frozenset()) -> tuple:
    """One tuple's fields. Keys from a small domain (old and new keys often
    coincide); other fields NULL, short (0-12), long (up to 5000) or, when
    allowed, unchanged TOAST; `need_value` positions always get a value."""
    kinds = draw(_exactly(rel.ncols))
    sizes = draw(_exactly(rel.ncols))
    rng = random.Random(draw(SEEDS))
    out = []
    for i, fmt in enumerate(rel.fmts):
        if i in rel.key_idx:
            out.append(KEY_DOMAIN[fmt][kinds[i] % 4])
            continue
        kind = kinds[i] % (4 if allow_u else 3)
        if i in need_value:
            kind = SHORT if kind % 2 == 0 else LONG
        if kind == NULL:
            out.append(None)
        elif kind == UNCH:
            out.append(UNCHANGED)
        else:
            out.append(_make(fmt, sizes[i] % 13 if kind == SHORT else min(5000, sizes[i] * 20), rng))
    return tuple(out)


def draw_relation(draw, relid: int, active=None) -> Rel:
    ncols = draw(st.integers(1, 40))
    nkey = draw(st.integers(1, min(3, ncols)))
    key_idx = tuple(draw(st.lists(st.integers(0, ncols - 1), min_size=nkey, max_size=nkey, unique=True)))
    fmts = tuple("tb"[b & 1] for b in draw(_exactly(ncols)))
    return Rel(relid, fmts, key_idx, draw(BOOLS) if active is None else active)


def draw_change(draw, rels: tuple[Rel, ...]) -> Change:
    ri = draw(st.integers(0, len(rels) - 1)) if len(rels) > 1 else 0
    rel = rels[ri]
    keys = rel.key_idx
    kind = draw(CHANGE_KINDS)
    if kind == "I":
        return Change(ri, "I", draw_row(draw, rel, False), None, "K")
    new = draw_row(draw, rel, True) if kind[0] == "U" else None
    if kind == "U":
        return Change(ri, "U", new, None, "K")
    old = draw_row(draw, rel, False, frozenset(i for i, v in enumerate(new or ()) if v is UNCHANGED))
    if new is not None and draw(BOOLS):
        # the same key: most updates do not move their row
        old = tuple(new[i] if i in keys else v for i, v in enumerate(old))
    if kind in ("UK", "D"):
        old = tuple(v if i in keys else None for i, v in enumerate(old))
    return Change(ri, kind[0], new, old, "O" if kind.endswith("O") else "K")


@st.composite
def relations(draw, relid: int, active=None) -> Rel:
    return draw_relation(draw, relid, active)


@st.composite
def changes(draw, rels: tuple[Rel, ...]) -> Change:
    return draw_change(draw, rels)


@st.composite
def scenarios(draw, streamed=None) -> Scenario:
    nrels = draw(st.integers(1, 3))
    rels = tuple(draw_relation(draw, 16384 + 7 * i, active=True if i == 0 else None) for i in range(nrels))
    txns = []
    lsn = draw(st.integers(1, 1 << 40))
    for _ in range(draw(st.integers(1, 4))):
        lsn += draw(st.integers(1, 1000))
        chs = tuple(draw_change(draw, rels) for _ in range(draw(st.integers(1, 8))))
        txns.append(Txn(lsn, chs, draw(BOOLS)))
    streamed = draw(BOOLS) if streamed is None else streamed
    skip = 0
    if not streamed and draw(BOOLS):
        t = draw(st.sampled_from(txns))
        skip = t.final_lsn + draw(st.integers(0, 1))
    return Scenario(rels, tuple(txns), skip, streamed)


# -- the model -----------------------------------------------------------------------


def _enc(v) -> bytes | None:
    if v is None or v is UNCHANGED:
        return None
    return v.encode() if isinstance(v, str) else bytes(v)


def _ubits(fields, ncols: int) -> bytes | None:
    bits = bytearray((ncols + 7) // 8)
    for i, v in enumerate(fields):
        if v is UNCHANGED:
            bits[i // 8] |= 1 << (i % 8)
    return bytes(bits) if any(bits) else None


def expected_rows(rel: Rel, ch: Change) -> list[tuple]:
    """(op, cols, old_key, u) of the staging rows one change must produce."""
    keys, ncols = rel.key_idx, rel.ncols
    no_key = (None,) * len(keys)

    def key_only(row):
        return (b"D", tuple(_enc(row[i]) if i in keys else None for i in range(ncols)), no_key, None)

    if ch.tag == "I":
        return [(b"I", tuple(_enc(v) for v in ch.new), no_key, _ubits(ch.new, ncols))]
    if ch.tag == "D":
        return [key_only(ch.old)]
    out = []
    moved = ch.old is not None and any(_enc(ch.old[k]) != _enc(ch.new[k]) for k in keys)
    if moved:
        out.append(key_only(ch.old))
    new = ch.new
    if ch.old_kind == "O" and ch.old is not None:
        new = tuple(ch.old[i] if v is UNCHANGED else v for i, v in enumerate(new))
    old_key = tuple(_enc(ch.old[k]) for k in keys) if moved else no_key
    out.append((b"U", tuple(_enc(v) for v in new), old_key, _ubits(new, ncols)))
    return out


def counts_of(rows_and_changes) -> tuple:
    rows = ins = upd = dels = unch = moves = 0
    for ch, rows_ in rows_and_changes:
        rows += len(rows_)
        ins += ch.tag == "I"
        upd += ch.tag == "U"
        dels += ch.tag == "D"
        unch += sum(r[3] is not None for r in rows_)
        moves += ch.tag == "U" and len(rows_) == 2
    return (rows, ins, upd, dels, unch, moves)


# -- running a scenario ----------------------------------------------------------------


def stream_start(xid: int, first: bool) -> bytes:
    return b"S" + struct.pack("!IB", xid, 1 if first else 0)


def stream_stop() -> bytes:
    return b"E"


def stream_commit(xid: int, commit_lsn: int, end_lsn: int, ts: int = 0) -> bytes:
    return b"c" + struct.pack("!IBQQq", xid, 0, commit_lsn, end_lsn, ts)


def encode_change(rel: Rel, ch: Change, xid) -> bytes:
    if ch.tag == "I":
        return insert(rel.relid, list(ch.new), xid=xid)
    if ch.tag == "U":
        return update(rel.relid, list(ch.new), old=None if ch.old is None else list(ch.old),
                      old_kind=ch.old_kind, xid=xid)
    return delete(rel.relid, list(ch.old), old_kind=ch.old_kind, xid=xid)


class Feeder:
    """Feeds messages bare or as XLogData frames (with keepalives in between)."""

    def __init__(self, dec: Decoder, framed: bool) -> None:
        self.dec = dec
        self.framed = framed
        self.pos = 1 << 32
        self.n = 0

    def __call__(self, msg: bytes) -> int:
        if not self.framed:
            return self.dec.feed(msg)
        self.n += 1
        start, end, ts = self.pos, self.pos + len(msg), 1_000_000 + self.n
        self.pos = end
        ev = self.dec.feed_frame(xlogdata(start, end, msg, ts=ts))
        assert (self.dec.wal_start, self.dec.wal_end, self.dec.send_time) == (start, end, ts)
        if self.n % 5 == 0:
            assert self.dec.feed_frame(keepalive(end + 1, reply=self.n % 2 == 0, ts=ts + 1)) == EV_KEEPALIVE
            assert (self.dec.wal_start, self.dec.wal_end, self.dec.send_time) == (start, end + 1, ts + 1)
            assert self.dec.reply_requested == (self.n % 2 == 0)
        # Begin and the changes stay on the hot path: no event for Python.
        if msg[:1] == b"B":
            assert ev == EV_NONE
            return EV_BEGIN
        return ev


def run(scn: Scenario, framed: bool) -> None:
    dec = Decoder()
    dec.skip_before = scn.skip_before
    feed = Feeder(dec, framed)

    # Describe the relations with Relation messages; define them from the events.
    for rel in scn.rels:
        cols = [(1 if i in rel.key_idx else 0, f"c{i}", 17 if f == "b" else 25, -1)
                for i, f in enumerate(rel.fmts)]
        assert feed(relation(rel.relid, "public", f"t{rel.relid}", cols)) == EV_RELATION
        assert dec.event == (rel.relid, "public", f"t{rel.relid}", "d", cols, None)
        key_idx = [i for i, c in enumerate(dec.event[4]) if c[0] & 1]
        assert sorted(key_idx) == sorted(rel.key_idx)
        dec.define(rel.relid, rel.ncols, list(rel.key_idx), rel.active)

    last_seq = -1
    window: list = []  # (rel, change, expected rows, lsn) since the last take()
    for t_i, txn in enumerate(scn.txns):
        xid = 1000 + t_i
        skipped = txn.final_lsn < scn.skip_before
        if scn.streamed:
            assert feed(stream_start(xid, True)) == EV_STREAM_START
            assert (dec.in_stream, dec.stream_xid) == (1, xid)
        else:
            assert feed(begin(txn.final_lsn, ts=txn.final_lsn, xid=xid)) == EV_BEGIN
            assert (dec.in_txn, dec.final_lsn, dec.xid, dec.skipping) == (1, txn.final_lsn, xid, skipped)
        for c_i, ch in enumerate(txn.changes):
            rel = scn.rels[ch.rel]
            if scn.streamed and c_i and c_i % 3 == 0:
                # a new chunk of the same streamed transaction
                assert feed(stream_stop()) == EV_STREAM_STOP
                assert feed(stream_start(xid, False)) == EV_STREAM_START
            assert feed(encode_change(rel, ch, xid if scn.streamed else None)) == EV_NONE
            if rel.active and not skipped:
                window.append((rel, ch, expected_rows(rel, ch), None if scn.streamed else txn.final_lsn))
        if scn.streamed:
            assert feed(stream_stop()) == EV_STREAM_STOP
            assert feed(stream_commit(xid, txn.final_lsn, txn.final_lsn + 8)) == EV_STREAM_COMMIT
        else:
            assert feed(commit(txn.final_lsn, txn.final_lsn + 8, ts=txn.final_lsn)) == EV_COMMIT
            assert (dec.in_txn, dec.commit_lsn, dec.end_lsn) == (0, txn.final_lsn, txn.final_lsn + 8)
        if txn.take_after or t_i == len(scn.txns) - 1:
            last_seq = check_take(dec, scn, window, last_seq)
            window = []


def check_take(dec: Decoder, scn: Scenario, window: list, last_seq: int) -> int:
    assert (dec.batch_rows > 0) == bool(window)
    out = dec.take()
    assert dec.batch_rows == 0 and dec.take() == []
    by_rel = {}
    for rel, ch, rows, lsn in window:
        by_rel.setdefault(rel.relid, []).append((rel, ch, rows, lsn))
    assert sorted(relid for relid, _d, _c in out) == sorted(r for r, w in by_rel.items() if any(x[2] for x in w))

    got_order = []
    for relid, data, counts in out:
        items = by_rel[relid]
        rel = items[0][0]
        assert counts == counts_of((ch, rows) for _r, ch, rows, _l in items)
        want = [(row, lsn) for _r, _ch, rows, lsn in items for row in rows]
        rows = list(iter_copy_binary(data))
        assert len(rows) == len(want)
        seqs = []
        for row, (w, lsn) in zip(rows, want):
            assert len(row) == LEAD + rel.ncols + len(rel.key_idx) + 1
            seq = struct.unpack("!q", row[0])[0]
            if LEAD == 3 and lsn is not None:
                assert struct.unpack("!Q", row[1])[0] == lsn  # _lsn: the transaction's commit LSN
            op, cols = row[LEAD - 1], row[LEAD:LEAD + rel.ncols]
            old_key, u = row[LEAD + rel.ncols:-1], row[-1]
            assert (op, cols, old_key, u) == w
            seqs.append(seq)
            got_order.append((seq, relid))
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Across relations, _seq orders the rows as the changes came.
    got_order.sort()
    assert [relid for _s, relid in got_order] == [rel.relid for rel, _c, rows, _l in window for _ in rows]
    if got_order:
        assert got_order[0][0] > last_seq
        last_seq = got_order[-1][0]
    return last_seq


@SETTINGS
@given(scenarios())
def test_roundtrip_feed(scn):
    run(scn, framed=False)


@SETTINGS
@given(scenarios())
def test_roundtrip_feed_frame(scn):
    run(scn, framed=True)


@SETTINGS
@given(relations(16384, active=True), st.data())
def test_single_change(rel, data):
    """One change at a time, each taken on its own: the shrinker's best friend."""
    dec = Decoder()
    dec.define(rel.relid, rel.ncols, list(rel.key_idx), True)
    dec.feed(begin(100, xid=5))
    ch = data.draw(changes((rel,)))
    dec.feed(encode_change(rel, ch, None))
    out = dec.take()
    want = expected_rows(rel, ch)
    assert len(out) == 1
    relid, payload, counts = out[0]
    assert relid == rel.relid
    assert counts == counts_of([(ch, want)])
    got = [(r[LEAD - 1], r[LEAD:LEAD + rel.ncols], r[LEAD + rel.ncols:-1], r[-1]) for r in iter_copy_binary(payload)]
    assert got == want


# -- where a streamed transaction's rows change (sub)transaction -------------------------


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([900, 901, 902, 905]), BOOLS, BOOLS, BOOLS),
                min_size=1, max_size=40))
def test_taken_marks_note_each_change_of_subtransaction(steps):
    """Each step: a row of that xid into a replicated table (or not), then maybe a new
    block, maybe a take(). A mark is the first written row whose xid differs from the
    previous written row's in its block; a block starts from the top transaction (900)."""
    dec = Decoder()
    dec.define(1, 1, [0], True)
    dec.define(2, 1, [0], False)
    assert dec.feed(relation(1, "public", "a", [(1, "k", 25, -1)])) == EV_RELATION
    assert dec.feed(stream_start(900, True)) == EV_STREAM_START
    prev, want, n = 900, [], 0
    for i, (xid, replicated, new_block, take) in enumerate(steps):
        if replicated:
            seq = dec.seq
            assert dec.feed(insert(1, [str(i).encode()], xid=xid)) == EV_NONE
            if xid != prev:
                want.append((seq, xid))
            prev = xid
            n += 1
        else:
            dec.feed(insert(2, [b"x"], xid=xid))
        if new_block:
            assert dec.feed(stream_stop()) == EV_STREAM_STOP
            assert dec.feed(stream_start(900, False)) == EV_STREAM_START
            prev = 900
        if take:
            dec.take()
            assert dec.taken_marks == (want, False)
            want = []
    dec.take()
    assert dec.taken_marks == (want, False)


def test_taken_marks_past_their_room_are_lost():
    dec = Decoder()
    dec.define(1, 1, [0], True)
    dec.feed(stream_start(900, True))
    for i in range(1100):
        dec.feed(insert(1, [str(i).encode()], xid=900 + i % 2 + 1))
    dec.take()
    marks, lost = dec.taken_marks
    assert len(marks) == 1024 and lost
    assert marks[:2] == [(0, 901), (1, 902)]
    dec.feed(insert(1, [b"z"], xid=901))
    dec.take()
    assert dec.taken_marks == ([(1100, 901)], False)
