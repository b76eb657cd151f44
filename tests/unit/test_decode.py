"""Decoder tests on pgoutput bytes captured from real PostgreSQL 15 and 18 servers.

Every capture in tests/unit/data (see tools/capture_pgoutput.py for the workload and
the slot options) is replayed message by message through Decoder.feed(), with
each relation defined when its Relation message arrives, exactly as the
runtime does. What the decoder says is checked against an independent
pure-Python parse of the same bytes (written here, sharing nothing with the
Cython code), and the staging rows it buffers are checked field by field
against what that parse says they must be. The end state of the workload,
applied from the staging rows with MERGE semantics, is checked against what
the SQL of the workload leaves in the source.

Then the same bytes are mangled: every message truncated at every length and
bytes flipped at random (seeded), which must raise DecodeError or decode,
never crash, read out of bounds or leave a partial row behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

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
    xlogdata,
)

from replicator._decode import (
    EV_BEGIN,
    EV_COMMIT,
    EV_KEEPALIVE,
    EV_MESSAGE,
    EV_NONE,
    EV_ORIGIN,
    EV_RELATION,
    EV_STREAM_ABORT,
    EV_STREAM_COMMIT,
    EV_STREAM_START,
    EV_STREAM_STOP,
    EV_TRUNCATE,
    EV_TYPE,
    DecodeError,
    Decoder,
    iter_copy_binary,
)
from replicator.lsn import parse_lsn

DATA_DIR = Path(__file__).resolve().parent / "data"
CAPTURES = sorted(p.name for p in DATA_DIR.glob("pgoutput_*.json"))
STREAM_CAPTURES = [c for c in CAPTURES if "_stream" in c]
UNSTREAMED_CAPTURES = [c for c in CAPTURES if "_stream" not in c]

EVENT_OF_TAG = {
    "B": EV_BEGIN, "C": EV_COMMIT, "R": EV_RELATION, "I": EV_NONE, "U": EV_NONE, "D": EV_NONE,
    "T": EV_TRUNCATE, "M": EV_MESSAGE, "O": EV_ORIGIN, "Y": EV_TYPE, "S": EV_STREAM_START,
    "E": EV_STREAM_STOP, "c": EV_STREAM_COMMIT, "A": EV_STREAM_ABORT,
}

# The captured tables (tools/capture_pgoutput.py, SCHEMA): (column, type OID, typmod).
# The enum column's OID is whatever the server gave move_state (None here).
NUMERIC_16_2 = ((16 << 16) | 2) + 4
TABLE_COLUMNS = {
    "wide": [("id", 23, -1), ("amount", 1700, NUMERIC_16_2), ("code", 1043, 32 + 4),
             ("note", 25, -1), ("data", 3802, -1), ("active", 16, -1), ("day", 1082, -1),
             ("at", 1114, -1), ("blob", 17, -1), ("nums", 1007, -1), ("tags", 1009, -1)],
    "full_ident": [("a", 23, -1), ("b", 25, -1), ("c", 1700, -1)],
    "composite": [("company_id", 23, -1), ("code", 25, -1), ("qty", 23, -1), ("state", None, -1)],
    "bulk": [("id", 23, -1), ("payload", 25, -1)],
}
COMPOSITE_AFTER_ALTER = TABLE_COLUMNS["composite"] + [("note", 25, -1)]
# The real keys. full_ident has REPLICA IDENTITY FULL and no primary key: the
# workload addresses its rows by `a`, so that is the key the mirror uses.
TABLE_KEYS = {"wide": ("id",), "full_ident": ("a",), "composite": ("company_id", "code"), "bulk": ("id",)}
BULK_ROWS = {15: 450, 18: 30}


# -- an independent pgoutput parser ---------------------------------------------


class Short(Exception):
    """The message ends before its fields do."""


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Short(f"need {n} bytes at {self.pos}, have {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("!" + fmt, self.take(struct.calcsize("!" + fmt)))[0]

    def u8(self) -> int:
        return self.unpack("B")

    def u16(self) -> int:
        return self.unpack("H")

    def u32(self) -> int:
        return self.unpack("I")

    def i32(self) -> int:
        return self.unpack("i")

    def u64(self) -> int:
        return self.unpack("Q")

    def i64(self) -> int:
        return self.unpack("q")

    def cstr(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise Short("unterminated string")
        out = self.data[self.pos:end].decode()
        self.pos = end + 1
        return out

    def tuple_data(self) -> list[tuple[str, bytes | None]]:
        fields = []
        for _ in range(self.u16()):
            kind = chr(self.u8())
            if kind in "tb":
                fields.append((kind, self.take(self.i32())))
            elif kind in "nu":
                fields.append((kind, None))
            else:
                raise ValueError(f"field kind {kind!r}")
        return fields

    def left(self) -> int:
        return len(self.data) - self.pos


def parse_message(data: bytes, in_stream: bool) -> dict:
    """One pgoutput message as a dict; raises unless it is whole and exact."""
    r = Reader(data)
    tag = chr(r.u8())
    m: dict = {"tag": tag}

    def xid():
        return r.u32() if in_stream else None

    if tag == "B":
        m.update(final_lsn=r.u64(), ts=r.i64(), xid=r.u32())
    elif tag == "C":
        m.update(flags=r.u8(), commit_lsn=r.u64(), end_lsn=r.u64(), ts=r.i64())
    elif tag == "O":
        m.update(lsn=r.u64(), name=r.cstr())
    elif tag == "R":
        m.update(xid=xid(), relid=r.u32(), nspname=r.cstr(), relname=r.cstr(), replident=chr(r.u8()))
        m["cols"] = [(r.u8(), r.cstr(), r.u32(), r.i32()) for _ in range(r.u16())]
    elif tag == "Y":
        m.update(xid=xid(), oid=r.u32(), nspname=r.cstr(), name=r.cstr())
    elif tag in "IUD":
        m.update(xid=xid(), relid=r.u32(), old_kind=None, old=None, new=None)
        kind = chr(r.u8())
        if tag in "UD":
            if kind in "KO":
                m["old_kind"], m["old"] = kind, r.tuple_data()
                if tag == "U":
                    kind = chr(r.u8())
            elif tag == "D":
                raise ValueError("delete without an old tuple")
        if tag in "IU":
            if kind != "N":
                raise ValueError(f"expected a new tuple, got {kind!r}")
            m["new"] = r.tuple_data()
    elif tag == "T":
        m["xid"] = xid()
        n = r.u32()
        m["options"] = r.u8()
        m["relids"] = [r.u32() for _ in range(n)]
    elif tag == "M":
        m.update(xid=xid(), flags=r.u8(), lsn=r.u64(), prefix=r.cstr())
        m["content"] = r.take(r.u32())
    elif tag == "S":
        m.update(xid=r.u32(), first=r.u8())
    elif tag == "E":
        pass
    elif tag == "c":
        m.update(xid=r.u32(), flags=r.u8(), commit_lsn=r.u64(), end_lsn=r.u64(), ts=r.i64())
    elif tag == "A":
        m.update(xid=r.u32(), subxid=r.u32(), abort_lsn=None, abort_ts=None)
        if r.left():
            m.update(abort_lsn=r.u64(), abort_ts=r.i64())
    else:
        raise ValueError(f"message type {tag!r}")
    if r.left():
        raise ValueError(f"{r.left()} bytes left over in {tag!r}")
    return m


def parse_copy(data: bytes) -> list[tuple]:
    """A strict COPY BINARY reader, to check iter_copy_binary and the framing."""
    r = Reader(data)
    assert r.take(11) == b"PGCOPY\n\xff\r\n\x00"
    assert r.u32() == 0  # flags
    r.take(r.u32())  # header extension
    rows = []
    while True:
        nf = struct.unpack("!h", r.take(2))[0]
        if nf == -1:
            break
        row = []
        for _ in range(nf):
            n = r.i32()
            assert n >= -1
            row.append(None if n == -1 else r.take(n))
        rows.append(tuple(row))
    assert r.left() == 0, "bytes after the COPY trailer"
    return rows


# -- what the staging rows must be ---------------------------------------------


@dataclass(frozen=True)
class Layout:
    relid: int
    name: str
    ncols: int
    key_idx: tuple[int, ...]
    active: bool = True


@dataclass(frozen=True)
class Staged:
    seq: int
    lsn: int | None  # _lsn, when the decoder writes that column
    op: bytes
    cols: tuple
    old_key: tuple
    u: bytes | None


def _staging_lead() -> int:
    """How many columns come before the table's: 2 (_seq, _op) or 3 (_seq, _lsn, _op).

    The _lsn column (the transaction's commit LSN) is newer than the rest of
    the layout; the tests read both and check _lsn where it is written.
    """
    dec = Decoder()
    dec.define(1, 1, [0], True)
    dec.feed(insert(1, [b"k"]))
    (row,) = iter_copy_binary(dec.take()[0][1])
    lead = len(row) - 3  # one column, one old-key column, _u
    assert lead in (2, 3) and row[lead - 1] == b"I", row
    return lead


LEAD = _staging_lead()


def split_staged(row: tuple, layout: Layout) -> Staged:
    nkey, ncols = len(layout.key_idx), layout.ncols
    assert len(row) == LEAD + ncols + nkey + 1, "staging row width"
    assert row[0] is not None and len(row[0]) == 8
    lsn = None
    if LEAD == 3:
        assert row[1] is not None and len(row[1]) == 8
        lsn = struct.unpack("!Q", row[1])[0]
    op = row[LEAD - 1]
    assert op in (b"I", b"U", b"D")
    return Staged(struct.unpack("!q", row[0])[0], lsn, op, tuple(row[LEAD:LEAD + ncols]),
                  tuple(row[LEAD + ncols:LEAD + ncols + nkey]), row[-1])


def _value(field):
    kind, val = field
    return val if kind in "tb" else None


def _ubits(fields, ncols: int) -> bytes | None:
    bits = bytearray((ncols + 7) // 8)
    for i, (kind, _v) in enumerate(fields):
        if kind == "u":
            bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits) if any(bits) else None


def expected_staged(msg: dict, layout: Layout) -> list[tuple]:
    """(op, cols, old_key, u) of the staging rows a change message must produce."""
    ncols, keys = layout.ncols, layout.key_idx
    none_key = (None,) * len(keys)

    def key_only_row(fields):
        cols = tuple(_value(fields[i]) if i in keys else None for i in range(ncols))
        u = _ubits([fields[i] if i in keys else ("n", None) for i in range(ncols)], ncols)
        return (b"D", cols, none_key, u)

    tag = msg["tag"]
    if tag == "I":
        new = msg["new"]
        return [(b"I", tuple(_value(f) for f in new), none_key, _ubits(new, ncols))]
    if tag == "D":
        return [key_only_row(msg["old"])]
    old, new = msg["old"], msg["new"]
    rows = []
    moved = old is not None and any(
        new[k][0] != "u" and old[k][0] != "u" and _value(old[k]) != _value(new[k]) for k in keys)
    if moved:
        rows.append(key_only_row(old))
    if msg["old_kind"] == "O":
        new = [old[i] if f[0] == "u" and old[i][0] in "tb" else f for i, f in enumerate(new)]
    old_key = tuple(_value(old[k]) for k in keys) if moved else none_key
    rows.append((b"U", tuple(_value(f) for f in new), old_key, _ubits(new, ncols)))
    return rows


# -- replaying a capture ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[dict, tuple[dict, ...]]:
    doc = json.loads((DATA_DIR / name).read_text())
    msgs = tuple({"lsn": parse_lsn(m["lsn"]), "xid": m["xid"], "raw": bytes.fromhex(m["hex"])}
                 for m in doc["messages"])
    return doc["meta"], msgs


def server_major(name: str) -> int:
    return int(name.split("_")[1])


def proto(name: str) -> int:
    return int(load(name)[0]["slot_options"]["proto_version"])


def is_binary(name: str) -> bool:
    return load(name)[0]["slot_options"]["binary"] == "true"


def key_idx_of(event) -> tuple[int, ...]:
    """The key the runtime would use: the key flags, or the real key for FULL."""
    _relid, _nsp, relname, replident, cols, _xid = event
    names = [c[1] for c in cols]
    if replident == "f":
        key = TABLE_KEYS[relname]
    else:
        key = tuple(c[1] for c in cols if c[0] & 1)
    return tuple(names.index(k) for k in key)


DECODER_ATTRS = ("final_lsn", "commit_lsn", "end_lsn", "commit_ts", "xid", "in_txn", "in_stream",
                 "stream_xid", "skipping", "seq", "batch_rows")


@dataclass
class Step:
    index: int
    lsn: int
    json_xid: int
    raw: bytes
    msg: dict
    ev: int
    event: object
    attrs: dict
    layout: Layout | None   # the relation's layout when the message was fed (changes only)
    out: list               # what take() returned right after the message


def replay(name: str, skip_before: int = 0, inactive: frozenset = frozenset(),
           frames: bool = False) -> list[Step]:
    """Feed every message of a capture, defining relations as they come.

    Returns one Step per message; take() is called after every message so
    that each message's staging rows can be told apart. frames: wrap each
    message in an XLogData CopyData frame and use feed_frame().
    """
    _meta, msgs = load(name)
    dec = Decoder()
    dec.skip_before = skip_before
    layouts: dict[int, Layout] = {}
    in_stream = False
    steps = []
    for i, m in enumerate(msgs):
        raw = m["raw"]
        msg = parse_message(raw, in_stream)
        if msg["tag"] == "S":
            in_stream = True
        elif msg["tag"] == "E":
            in_stream = False
        layout = layouts.get(msg["relid"]) if msg["tag"] in "IUD" else None
        if frames:
            ev = dec.feed_frame(xlogdata(m["lsn"], m["lsn"] + len(raw), raw, ts=1000 + i))
            assert (dec.wal_start, dec.wal_end, dec.send_time) == (m["lsn"], m["lsn"] + len(raw), 1000 + i)
        else:
            ev = dec.feed(raw)
        event = dec.event
        attrs = {a: getattr(dec, a) for a in DECODER_ATTRS}
        if ev == EV_RELATION:
            relid, _nsp, relname, _ri, cols, _xid = event
            layouts[relid] = Layout(relid, relname, len(cols), key_idx_of(event), relname not in inactive)
            dec.define(relid, len(cols), list(layouts[relid].key_idx), layouts[relid].active)
        out = dec.take()
        assert dec.batch_rows == 0 and dec.buffered_bytes == 0
        steps.append(Step(i, m["lsn"], m["xid"], raw, msg, ev, event, attrs, layout, out))
    return steps


@functools.lru_cache(maxsize=None)
def replayed(name: str) -> tuple[Step, ...]:
    return tuple(replay(name))


def staged_of(step: Step) -> list[Staged]:
    """The staging rows a step produced (all of one relation)."""
    if not step.out:
        return []
    assert len(step.out) == 1
    relid, data, _counts = step.out[0]
    assert relid == step.layout.relid
    return [split_staged(row, step.layout) for row in iter_copy_binary(data)]


def steps_of(name: str, tag: str) -> list[Step]:
    return [s for s in replayed(name) if s.msg["tag"] == tag]


def relid_of(name: str, relname: str) -> int:
    return next(s.event[0] for s in steps_of(name, "R") if s.event[2] == relname)


def enc_int(name: str, v: int) -> bytes:
    """An int4 field as the capture's mode sends it."""
    return int4(v) if is_binary(name) else str(v).encode()


def dec_int(name: str, raw: bytes) -> int:
    return struct.unpack("!i", raw)[0] if is_binary(name) else int(raw)


# -- the captures themselves -----------------------------------------------------


def test_captures_are_there():
    assert len(CAPTURES) == 5, CAPTURES
    assert STREAM_CAPTURES and UNSTREAMED_CAPTURES
    for name in CAPTURES:
        meta, msgs = load(name)
        assert meta["server_version_num"] // 10000 == server_major(name)
        assert msgs


@pytest.mark.parametrize("name", CAPTURES)
def test_independent_parse_reads_every_message(name):
    steps = replayed(name)
    tags = {s.msg["tag"] for s in steps}
    expected = set("RIUDTMY") | (set("SEcA") if "_stream" in name else set("BC"))
    if server_major(name) == 15 and "_stream" in name:
        expected |= set("BC")  # 15 streams only the big transactions
    assert tags == expected


# -- events ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_event_codes_follow_message_types(name):
    for s in replayed(name):
        assert s.ev == EVENT_OF_TAG[s.msg["tag"]], (s.index, s.msg["tag"], s.ev)


@pytest.mark.parametrize("name", CAPTURES)
def test_transaction_and_stream_state(name):
    in_txn = in_stream = False
    stream_xid = None
    for s in replayed(name):
        tag = s.msg["tag"]
        if tag == "B":
            assert not in_txn and not in_stream
            in_txn = True
        elif tag == "C":
            assert in_txn
            in_txn = False
        elif tag == "S":
            assert not in_stream and not in_txn
            in_stream, stream_xid = True, s.msg["xid"]
            assert s.attrs["stream_xid"] == stream_xid
            assert s.event == (stream_xid, bool(s.msg["first"]))
        elif tag == "E":
            assert in_stream
            in_stream = False
            assert s.event is None
        elif tag in "IUDRYT" and in_stream:
            # Inside a stream every change carries its (sub)transaction's xid.
            assert s.msg["xid"] is not None
        assert s.attrs["in_txn"] == in_txn, s.index
        assert s.attrs["in_stream"] == in_stream, s.index
        if tag in "IUD":
            assert in_txn or in_stream, "a change outside any transaction"
    assert not in_txn and not in_stream


@pytest.mark.parametrize("name", CAPTURES)
def test_begin_and_commit_lsns(name):
    begin_msg = None
    commits = []
    for s in replayed(name):
        tag, m, a = s.msg["tag"], s.msg, s.attrs
        if tag == "B":
            assert (a["final_lsn"], a["commit_ts"], a["xid"]) == (m["final_lsn"], m["ts"], m["xid"])
            assert a["xid"] == s.json_xid
            assert s.event is None or s.ev == EV_BEGIN
            begin_msg = m
        elif tag == "C":
            assert begin_msg is not None
            assert a["commit_lsn"] == m["commit_lsn"] == begin_msg["final_lsn"]
            assert a["end_lsn"] == m["end_lsn"] > a["commit_lsn"]
            assert a["commit_ts"] == m["ts"] == begin_msg["ts"]
            assert s.event is None
            commits.append(m["commit_lsn"])
            begin_msg = None
        elif tag == "c":
            assert s.event == (m["xid"], m["flags"], m["commit_lsn"], m["end_lsn"], m["ts"])
            assert (a["commit_lsn"], a["end_lsn"], a["commit_ts"]) == (m["commit_lsn"], m["end_lsn"], m["ts"])
            assert a["end_lsn"] > a["commit_lsn"]
            assert s.json_xid == m["xid"]
            commits.append(m["commit_lsn"])
    assert commits, "no transaction committed"
    assert commits == sorted(commits) and len(set(commits)) == len(commits), "commits out of LSN order"


@pytest.mark.parametrize("name", CAPTURES)
def test_relation_events(name):
    type_oids = {s.event[2]: s.event[0] for s in steps_of(name, "Y")}
    assert set(type_oids) == {"move_state"}
    widths: dict[str, list[int]] = {}
    relids: dict[str, int] = {}
    for s in steps_of(name, "R"):
        m = s.msg
        relid, nspname, relname, replident, cols, xid = s.event
        assert (relid, nspname, relname, replident, cols) == (
            m["relid"], m["nspname"], m["relname"], m["replident"], m["cols"])
        # inside a stream: the (sub)transaction's xid, the stream's or a subxact's
        assert xid == m["xid"] and (xid is not None) == bool(s.attrs["in_stream"])
        assert nspname == "public"
        assert relname in TABLE_COLUMNS
        assert replident == ("f" if relname == "full_ident" else "d")
        spec = COMPOSITE_AFTER_ALTER if relname == "composite" and len(cols) == 5 else TABLE_COLUMNS[relname]
        want = [(n, type_oids["move_state"] if oid is None else oid, mod) for n, oid, mod in spec]
        assert [(n, oid, mod) for _f, n, oid, mod in cols] == want
        flagged = tuple(n for f, n, _o, _m in cols if f & 1)
        if replident == "f":
            assert flagged == tuple(n for n, _o, _m in want), "FULL flags every column"
        else:
            assert flagged == TABLE_KEYS[relname]
        widths.setdefault(relname, []).append(len(cols))
        assert relids.setdefault(relname, relid) == relid, "a table changed OID"
    assert set(widths) == set(TABLE_COLUMNS)
    # ALTER TABLE composite ADD COLUMN: a second layout, never the first again.
    w = widths["composite"]
    assert 5 in w and w.index(5) > w.index(4) and 4 not in w[w.index(5):]
    # The types the brief names, spelled out: int4, text, numeric, jsonb.
    first = steps_of(name, "R")[0].event
    assert first[2] == "wide"
    oids = {n: oid for _f, n, oid, _m in first[4]}
    assert (oids["id"], oids["note"], oids["amount"], oids["data"]) == (23, 25, 1700, 3802)


@pytest.mark.parametrize("name", CAPTURES)
def test_type_events(name):
    steps = steps_of(name, "Y")
    assert steps
    for s in steps:
        oid, nspname, typname, xid = s.event
        assert (oid, nspname, typname) == (s.msg["oid"], s.msg["nspname"], s.msg["name"])
        assert (oid >= 16384, nspname, typname) == (True, "public", "move_state")
        assert xid == s.msg["xid"] and (xid is not None) == bool(s.attrs["in_stream"])


# -- rows ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_rows_match_independent_parse(name):
    last_seq = -1
    changes = 0
    for s in replayed(name):
        if s.msg["tag"] not in "IUD":
            assert s.out == [], (s.index, s.msg["tag"])
            continue
        changes += 1
        assert s.layout is not None, "a change before its Relation message"
        assert len(s.msg["new"] or s.msg["old"]) == s.layout.ncols
        want = expected_staged(s.msg, s.layout)
        assert len(s.out) == 1
        relid, data, counts = s.out[0]
        rows = list(iter_copy_binary(data))
        assert rows == parse_copy(data)
        got = [split_staged(r, s.layout) for r in rows]
        assert [(g.op, g.cols, g.old_key, g.u) for g in got] == want, s.index
        for g in got:
            assert g.seq > last_seq
            last_seq = g.seq
            # A streamed change carries its (sub)transaction's xid until its commit.
            assert g.lsn == (s.msg["xid"] if s.attrs["in_stream"] else s.attrs["final_lsn"])
        assert s.attrs["seq"] == last_seq + 1
        tag = s.msg["tag"]
        moved = len(want) == 2
        assert counts == (len(want), tag == "I", tag == "U", tag == "D",
                          sum(w[3] is not None for w in want), moved)
    assert changes == sum(1 for m in load(name)[1] if m["raw"][:1] in (b"I", b"U", b"D"))


@pytest.mark.parametrize("name", CAPTURES)
def test_first_insert_field_values(name):
    """The fully populated row of wide, field by field, as each mode sends it."""
    s = next(s for s in steps_of(name, "I") if s.layout.name == "wide")
    (row,) = staged_of(s)
    assert row.op == b"I" and row.u is None and row.old_key == (None,)
    cols = dict(zip([c[0] for c in TABLE_COLUMNS["wide"]], row.cols))
    assert dec_int(name, cols["id"]) == 1
    assert cols["note"] == "héllo".encode()
    assert cols["code"] == b"A-1"
    if is_binary(name):
        assert cols["active"] == b"\x01"
        assert cols["blob"] == b"\xde\xad\xbe\xef"
        assert cols["data"] == b'\x01{"k": [1, "x"], "n": null}'  # jsonb send: version 1, then text
        # numeric 1234.50: ndigits 2, weight 0, sign +, dscale 2, digits 1234 and 5000
        assert cols["amount"] == struct.pack("!hhHH", 2, 0, 0, 2) + struct.pack("!hh", 1234, 5000)
        assert cols["day"] == struct.pack("!i", 8796)  # days since 2000-01-01
    else:
        assert cols["active"] == b"t"
        assert cols["blob"] == b"\\xdeadbeef"
        assert cols["data"] == b'{"k": [1, "x"], "n": null}'
        assert cols["amount"] == b"1234.50"
        assert cols["day"] == b"2024-01-31"
        assert cols["at"] == b"2024-01-31 12:34:56.789"
        assert cols["nums"] == b"{1,2,NULL}"
        assert cols["tags"] == b'{a,"b c",NULL}'
    # The row of NULLs right after: every column NULL but the key.
    nxt = next(t for t in steps_of(name, "I") if t.index > s.index and t.layout.name == "wide")
    (row2,) = staged_of(nxt)
    assert dec_int(name, row2.cols[0]) == 2 and row2.cols[1:] == (None,) * 10 and row2.u is None


@pytest.mark.parametrize("name", CAPTURES)
def test_unchanged_toast(name):
    hits = [s for s in steps_of(name, "U") if any(k == "u" for k, _v in s.msg["new"])]
    assert len(hits) == 1, "UPDATE wide SET code = 'toast-2' sends its note as unchanged TOAST"
    s = hits[0]
    assert s.layout.name == "wide"
    note = [c[0] for c in TABLE_COLUMNS["wide"]].index("note")
    assert [i for i, (k, _v) in enumerate(s.msg["new"]) if k == "u"] == [note]
    (row,) = staged_of(s)
    assert row.op == b"U" and row.old_key == (None,)
    assert dec_int(name, row.cols[0]) == 3 and row.cols[2] == b"toast-2"
    assert row.cols[note] is None
    assert row.u == bytes([1 << note, 0])  # 11 columns: two bytes, bit 3 of the first
    assert s.out[0][2][4] == 1  # rows_with_unchanged_toast
    # The value it stands for was sent whole by the insert.
    ins = next(t for t in steps_of(name, "I") if t.layout.name == "wide" and
               dec_int(name, staged_of(t)[0].cols[0]) == 3)
    assert staged_of(ins)[0].cols[note] == "".join(
        hashlib.md5(str(g).encode()).hexdigest() for g in range(1, 201)).encode()


@pytest.mark.parametrize("name", CAPTURES)
def test_key_changes(name):
    moves = [s for s in steps_of(name, "U") if len(staged_of(s)) == 2]
    assert sorted(s.layout.name for s in moves) == ["composite", "wide"]
    for s in moves:
        d, u = staged_of(s)
        assert s.msg["old_kind"] == "K"
        assert (d.op, u.op) == (b"D", b"U") and d.seq < u.seq
        assert d.u is None and d.old_key == (None,) * len(s.layout.key_idx)
        assert s.out[0][2] == (2, 0, 1, 0, 0, 1)
        keys = s.layout.key_idx
        assert all(d.cols[i] is None for i in range(s.layout.ncols) if i not in keys)
        old_key = tuple(d.cols[k] for k in keys)
        assert u.old_key == old_key
        if s.layout.name == "wide":
            assert old_key == (enc_int(name, 1),) and u.cols[0] == enc_int(name, 10)
            assert u.cols[2] == b"A-1b"
        else:
            assert old_key == (enc_int(name, 2), b"B")
            assert (u.cols[0], u.cols[1], u.cols[2]) == (enc_int(name, 2), b"C", enc_int(name, 6))
    # Updates that keep their key: one row, no old key.
    for s in steps_of(name, "U"):
        if s not in moves:
            (row,) = staged_of(s)
            assert row.old_key == (None,) * len(s.layout.key_idx)


@pytest.mark.parametrize("name", CAPTURES)
def test_deletes_carry_the_key(name):
    got = {}
    for s in steps_of(name, "D"):
        (row,) = staged_of(s)
        assert row.op == b"D" and row.u is None
        keys = s.layout.key_idx
        assert all(row.cols[i] is None for i in range(s.layout.ncols) if i not in keys)
        assert all(row.cols[k] is not None for k in keys)
        assert s.out[0][2] == (1, 0, 0, 1, 0, 0)
        got[s.layout.name] = (s.msg["old_kind"], tuple(row.cols[k] for k in keys))
    assert got == {
        "wide": ("K", (enc_int(name, 2),)),
        "full_ident": ("O", (enc_int(name, 2),)),  # the whole old row came, only `a` is kept
        "composite": ("K", (enc_int(name, 1), b"A")),
    }


@pytest.mark.parametrize("name", CAPTURES)
def test_replica_identity_full_update(name):
    (s,) = [s for s in steps_of(name, "U") if s.layout.name == "full_ident"]
    assert s.msg["old_kind"] == "O" and len(s.msg["old"]) == 3
    (row,) = staged_of(s)
    assert row.op == b"U" and row.old_key == (None,) and row.u is None
    assert dec_int(name, row.cols[0]) == 1 and row.cols[1] == b"x2"


@pytest.mark.parametrize("name", CAPTURES)
def test_truncate_events(name):
    steps = steps_of(name, "T")
    assert len(steps) == 2
    for s in steps:
        options, relids, xid = s.event
        assert (options, relids) == (s.msg["options"], s.msg["relids"])
        assert xid == s.msg["xid"] and (xid is not None) == bool(s.attrs["in_stream"])
    first, second = (s.event for s in steps)
    assert first[:2] == (0, [relid_of(name, "composite")])
    assert sorted(second[1]) == sorted([relid_of(name, "full_ident"), relid_of(name, "composite")])
    assert second[0] == 1 | 2  # CASCADE | RESTART IDENTITY


@pytest.mark.parametrize("name", CAPTURES)
def test_logical_messages(name):
    got = []
    for s in steps_of(name, "M"):
        transactional, lsn, prefix, content, xid = s.event
        m = s.msg
        assert (transactional, lsn, prefix, content) == (bool(m["flags"] & 1), m["lsn"], m["prefix"], m["content"])
        assert lsn > 0
        assert xid == m["xid"] and (xid is not None) == bool(s.attrs["in_stream"])
        if transactional:
            assert s.attrs["in_txn"] or s.attrs["in_stream"], "a transactional message outside its transaction"
        else:
            assert not s.attrs["in_stream"], "a non-transactional message inside a stream"
        got.append((transactional, prefix, content))
    assert sorted(got) == sorted([
        (True, "odoo-replicator", b"transactional hello"),
        (False, "odoo-replicator", b"\x00\xff"),
        (False, "odoo-replicator", b"standalone"),
        (True, "odoo-replicator", b"transactional, alone"),
    ])


@pytest.mark.parametrize("name", STREAM_CAPTURES)
def test_streams(name):
    steps = replayed(name)
    started, firsts = set(), []
    subxids: dict[int, set] = {}
    stream_rows = 0
    for s in steps:
        tag = s.msg["tag"]
        if tag == "S":
            xid, first = s.event
            if first:
                assert xid not in started
                firsts.append(xid)
            else:
                assert xid in started
            started.add(xid)
        elif tag in "IUD" and s.attrs["in_stream"]:
            # xid-prefixed changes decode like any other (checked field by field
            # in test_rows_match_independent_parse); note which subxacts they came from
            subxids.setdefault(s.attrs["stream_xid"], set()).add(s.msg["xid"])
            stream_rows += len(staged_of(s))
        elif tag == "c":
            assert s.event[0] in started
    assert stream_rows > 0
    aborts = [s for s in steps if s.msg["tag"] == "A"]
    commits = {s.event[0] for s in steps if s.msg["tag"] == "c"}
    whole = {s.event[0] for s in aborts if s.event[0] == s.event[1]}
    partial = [s.event for s in aborts if s.event[0] != s.event[1]]
    # Every streamed transaction ends once: committed or aborted whole.
    assert commits | whole == started and not commits & whole
    # A rolled-back savepoint with streamed rows: its subxid had changes in the
    # streams of the transaction that then committed.
    assert partial and all(xid in commits and sub in subxids.get(xid, ()) for xid, sub, _l, _t in partial)
    for s in aborts:
        xid, subxid, abort_lsn, abort_ts = s.event
        assert (xid, subxid) == (s.msg["xid"], s.msg["subxid"])
        if proto(name) >= 4:
            # streaming = parallel: the abort LSN and time come along.
            assert (abort_lsn, abort_ts) == (s.msg["abort_lsn"], s.msg["abort_ts"])
            assert abort_lsn > 0 and abort_ts > 0
            assert len(s.raw) == 25
        else:
            assert (abort_lsn, abort_ts) == (None, None)
            assert len(s.raw) == 9


# -- the workload's end state, applied from the staging rows ------------------------


def apply_staged(tables: dict, layout: Layout, staged: list[Staged]) -> None:
    """MERGE semantics: D deletes by key, I/U upsert; unchanged TOAST keeps the old value."""
    table = tables.setdefault(layout.name, {})
    gone = {}
    for row in staged:
        key = tuple(row.cols[k] for k in layout.key_idx)
        if row.op == b"D":
            gone[key] = table.pop(key, None)
            continue
        base = table.get(key)
        if base is None and any(v is not None for v in row.old_key):
            base = gone.get(row.old_key)
        cols = list(row.cols)
        for i in range(layout.ncols):
            if row.u is not None and row.u[i >> 3] >> (i & 7) & 1:
                assert base is not None, "unchanged TOAST for a row never seen"
                cols[i] = base[i]
        table[key] = tuple(cols)


def final_state(name: str) -> dict:
    """Apply the capture: transactions at their commit, aborted (sub)transactions dropped."""
    tables: dict = {}
    pending: dict = {}   # top-level xid (None: the open unstreamed transaction) -> [(subxid, op)]
    relnames = {}
    for s in replayed(name):
        tag = s.msg["tag"]
        top = s.attrs["stream_xid"] if s.attrs["in_stream"] else None
        sub = s.msg.get("xid") if s.attrs["in_stream"] else None
        if tag == "R":
            relnames[s.event[0]] = s.event[2]
        elif tag in "IUD" and s.out:
            pending.setdefault(top, []).append((sub, ("rows", s.layout, staged_of(s))))
        elif tag == "T":
            pending.setdefault(top, []).append((sub, ("truncate", [relnames[r] for r in s.event[1]])))
        elif tag in "Cc":
            for _sub, op in pending.pop(None if tag == "C" else s.event[0], []):
                if op[0] == "rows":
                    apply_staged(tables, op[1], op[2])
                else:
                    for t in op[1]:
                        tables[t] = {}
        elif tag == "A":
            xid, subxid = s.event[:2]
            if xid == subxid:
                pending.pop(xid, None)
            else:
                pending[xid] = [(u, op) for u, op in pending.get(xid, []) if u != subxid]
    assert not pending, "transactions left open"
    return tables


def readable(name: str, relname: str, rows: dict) -> dict:
    """key -> {column: python value} for the int4 and text-like columns."""
    cols = [c[0] for c in (COMPOSITE_AFTER_ALTER if relname == "composite" else TABLE_COLUMNS[relname])]
    ints = {"id", "a", "company_id", "qty"}
    texts = {"code", "note", "payload", "b", "state"}
    out = {}
    for row in rows.values():
        vals = {}
        for c, v in zip(cols, row):
            if c in ints:
                vals[c] = None if v is None else dec_int(name, v)
            elif c in texts:
                vals[c] = None if v is None else v.decode()
        k = tuple(vals[c] for c in TABLE_KEYS[relname])
        out[k[0] if len(k) == 1 else k] = {c: v for c, v in vals.items() if c not in TABLE_KEYS[relname]}
    return out


@pytest.mark.parametrize("name", CAPTURES)
def test_workload_end_state(name):
    tables = final_state(name)
    md5 = lambda g: hashlib.md5(str(g).encode()).hexdigest()  # noqa: E731
    toast_note = "".join(md5(g) for g in range(1, 201))
    n = BULK_ROWS[server_major(name)]
    wide = readable(name, "wide", tables["wide"])
    assert wide == {
        10: {"code": "A-1b", "note": "héllo"},
        3: {"code": "toast-2", "note": toast_note},
        4: {"code": "with-message", "note": None},
        20: {"code": "kept", "note": None},
        22: {"code": "kept too", "note": None},
        30: {"code": "session 1, first", "note": None},
        31: {"code": "session 1, second", "note": None},
        40: {"code": "session 2, first", "note": None},
        41: {"code": "session 2, second", "note": None},
    }
    assert tables["full_ident"] == {}
    assert readable(name, "composite", tables["composite"]) == {
        (5, "E"): {"qty": 1, "state": "draft", "note": None}}
    bulk = {g: {"payload": "updated" if g <= 5 else md5(g)} for g in range(1, n + 1)}
    bulk[100001] = {"payload": "before savepoint"}
    bulk[100002] = {"payload": "after savepoint"}
    assert readable(name, "bulk", tables["bulk"]) == bulk


# -- feed_frame --------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_feed_frame_matches_feed(name):
    """XLogData frames decode to the same events and the same bytes as bare messages.

    Begin, Insert, Update and Delete take the hot path, which does not stop
    for Python: feed_frame() returns EV_NONE for a Begin (pump() relies on it)
    and sets the transaction's attributes all the same.
    """
    framed = replay(name, frames=True)
    for a, b in zip(replayed(name), framed, strict=True):
        want = EV_NONE if a.msg["tag"] == "B" else a.ev
        assert b.ev == want, (a.index, a.msg["tag"])
        assert b.event == a.event
        assert b.attrs == a.attrs
        assert b.out == a.out


def test_feed_frame_xlogdata_and_keepalive():
    dec = Decoder()
    dec.define(7, 2, [0], True)
    assert dec.feed_frame(xlogdata(100, 200, begin(150, ts=5, xid=9), ts=11)) == EV_NONE
    assert (dec.wal_start, dec.wal_end, dec.send_time) == (100, 200, 11)
    assert (dec.in_txn, dec.final_lsn, dec.xid, dec.commit_ts) == (1, 150, 9, 5)
    assert dec.feed_frame(xlogdata(101, 201, insert(7, [int4(1), "x"]), ts=12)) == EV_NONE
    assert (dec.wal_start, dec.wal_end, dec.send_time) == (101, 201, 12)
    assert dec.feed_frame(keepalive(300, reply=True, ts=13)) == EV_KEEPALIVE
    assert (dec.wal_start, dec.wal_end, dec.send_time, dec.reply_requested) == (101, 300, 13, 1)
    assert dec.feed_frame(keepalive(301, reply=False, ts=14)) == EV_KEEPALIVE
    assert (dec.wal_end, dec.send_time, dec.reply_requested) == (301, 14, 0)
    assert dec.feed_frame(xlogdata(102, 302, commit(150, 160, ts=5), ts=15)) == EV_COMMIT
    assert (dec.wal_start, dec.wal_end, dec.commit_lsn, dec.end_lsn, dec.in_txn) == (102, 302, 150, 160, 0)
    (relid, data, counts), = dec.take()
    assert relid == 7 and counts == (1, 1, 0, 0, 0, 0)
    (row,) = [split_staged(r, Layout(7, "t", 2, (0,))) for r in iter_copy_binary(data)]
    assert (row.op, row.cols, row.old_key, row.u) == (b"I", (int4(1), b"x"), (None,), None)
    assert row.lsn in (None, 150)


@pytest.mark.parametrize("frame", [
    b"",
    b"w", b"w" + bytes(24),            # shorter than the 25-byte XLogData header
    b"k", b"k" + bytes(16),            # shorter than a keepalive
    b"x" + bytes(30),                  # not a replication CopyData message
    xlogdata(1, 2, b""),               # an XLogData frame with no message
    xlogdata(1, 2, b"Z"),              # an unknown message type
    xlogdata(1, 2, b"B" + bytes(19)),  # a short Begin on the hot path
    xlogdata(1, 2, b"I" + bytes(3)),   # a short change on the hot path
])
def test_bad_frames_raise(frame):
    with pytest.raises(DecodeError):
        Decoder().feed_frame(frame)


# -- skip_before and inactive relations -------------------------------------------


def sans_seq(out: list) -> list:
    """What take() returned, with each row's _seq left out (dropped rows shift it)."""
    return [(relid, [r[1:] for r in iter_copy_binary(data)], counts) for relid, data, counts in out]


def _txn_of_steps(steps) -> list:
    """For each step, the final_lsn of the transaction it is in (None outside one)."""
    out, final = [], None
    for s in steps:
        if s.msg["tag"] == "B":
            final = s.msg["final_lsn"]
        out.append(final)
        if s.msg["tag"] == "C":
            final = None
    return out


def _rows_by_txn(steps) -> dict[int, list]:
    """final_lsn -> what take() gave after each change, less _seq."""
    by = {}
    for s, final in zip(steps, _txn_of_steps(steps)):
        if s.msg["tag"] in "IUD":
            by.setdefault(final, []).append(sans_seq(s.out))
    return by


@pytest.mark.parametrize("name", UNSTREAMED_CAPTURES)
def test_skip_before_drops_whole_transactions(name):
    """skip_before at every transaction's final_lsn (kept) and one past it (dropped)."""
    normal = replayed(name)
    txns = _txn_of_steps(normal)
    finals = sorted({f for f in txns if f is not None})
    want_by_txn = _rows_by_txn(normal)
    assert any(s.msg["tag"] == "T" for s, f in zip(normal, txns) if f is not None)
    if len(normal) > 300:
        # the bulk transaction makes each replay slower: a seeded sample of boundaries
        finals = [finals[0], finals[-1], *random.Random(name).sample(finals[1:-1], 6)]
    for skip in sorted({f + d for f in finals for d in (0, 1)}):
        steps = replay(name, skip_before=skip)
        for s, f in zip(steps, _txn_of_steps(steps)):
            if s.msg["tag"] == "B":
                assert s.attrs["skipping"] == (f < skip)
            if f is None or s.msg["tag"] not in "IUDT":
                continue
            if f < skip:
                # Already applied: no row, and no truncate event either
                # (replaying one would wipe rows committed after it).
                assert s.out == [], (skip, s.index)
                assert s.ev == EV_NONE
            else:
                assert s.ev == EVENT_OF_TAG[s.msg["tag"]]
        got_by_txn = _rows_by_txn(steps)
        for f, outs in want_by_txn.items():
            if f < skip:
                assert all(o == [] for o in got_by_txn[f])
            else:
                assert got_by_txn[f] == outs, (skip, f)


@pytest.mark.parametrize("name", [CAPTURES[0], STREAM_CAPTURES[-1]])
def test_inactive_relations_drop_rows(name):
    normal = replayed(name)
    steps = replay(name, inactive=frozenset({"wide", "bulk"}))
    for a, b in zip(normal, steps, strict=True):
        assert b.ev == a.ev
        if a.msg["tag"] in "IUD":
            if a.layout.name in ("wide", "bulk"):
                assert b.out == [] and b.attrs["batch_rows"] == 0
            else:
                assert sans_seq(b.out) == sans_seq(a.out)
    assert any(s.out for s in steps)


# -- malformed input ---------------------------------------------------------------


def _fuzz_targets(name: str):
    """(step, layouts known before it) for every message, one per distinct shape.

    Shapes: the type, the stream state and the length; the bulk inserts of a
    capture differ only in their values, which truncation does not care about.
    """
    layouts: dict[int, Layout] = {}
    seen = set()
    for s in replayed(name):
        shape = (s.msg["tag"], s.attrs["in_stream"] if s.msg["tag"] not in "SE" else None,
                 len(s.raw), s.layout)
        if shape not in seen:
            seen.add(shape)
            yield s, dict(layouts)
        if s.ev == EV_RELATION:
            relid, _n, relname, _r, cols, _x = s.event
            layouts[relid] = Layout(relid, relname, len(cols), key_idx_of(s.event))


def _prepared(layouts: dict[int, Layout], in_stream: bool) -> Decoder:
    dec = Decoder()
    for lay in layouts.values():
        dec.define(lay.relid, lay.ncols, list(lay.key_idx), True)
    if in_stream:
        assert dec.feed(b"S\x00\x00\x00\x2a\x00") == EV_STREAM_START
    return dec


def _check_taken(dec: Decoder, layouts: dict[int, Layout]) -> int:
    """Whatever a decoder buffered must be a well-formed COPY of well-formed rows."""
    n = 0
    for relid, data, counts in dec.take():
        rows = parse_copy(data)
        assert rows == list(iter_copy_binary(data))
        assert counts[0] == len(rows)
        for r in rows:
            split_staged(r, layouts[relid])
        n += len(rows)
    return n


@pytest.mark.parametrize("name", CAPTURES)
def test_truncated_messages_raise(name):
    """Every message cut at every length: DecodeError or a clean decode, no partial row."""
    checked = 0
    for s, layouts in _fuzz_targets(name):
        in_stream = bool(s.attrs["in_stream"]) if s.msg["tag"] != "S" else False
        if s.msg["tag"] == "E":
            in_stream = True
        dec = _prepared(layouts, in_stream)
        for n in range(len(s.raw)):
            cut = s.raw[:n]
            try:
                dec.feed(cut)
            except DecodeError:
                pass
            else:
                # The only prefixes that decode: a Stream Abort cut after its
                # xids reads as one without the parallel-streaming LSN and time.
                assert s.msg["tag"] == "A" and 9 <= n < 25, (s.index, s.msg["tag"], n)
            assert dec.take() == [], (s.index, n)
            checked += 1
        # and the whole message still decodes on that decoder
        assert dec.feed(s.raw) == s.ev
        _check_taken(dec, layouts)
    assert checked > 1000


def _flip(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 3))):
        i = rng.randrange(len(b))
        if rng.random() < 0.5:
            b[i] ^= 1 << rng.randrange(8)
        else:
            b[i] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    return bytes(b)


@pytest.mark.parametrize("name", CAPTURES)
def test_flipped_bytes_raise_or_decode(name):
    """Random byte flips (seeded): DecodeError or a decode into well-formed rows, nothing else."""
    rng = random.Random(f"flip {name}")
    others = []
    tried = 0
    for s, layouts in _fuzz_targets(name):
        in_stream = bool(s.attrs["in_stream"]) if s.msg["tag"] != "S" else False
        if s.msg["tag"] == "E":
            in_stream = True
        for k in range(24):
            bad = _flip(s.raw, rng)
            dec = _prepared(layouts, in_stream)
            try:
                if k % 2:
                    dec.feed_frame(xlogdata(1, 2, bad))
                else:
                    dec.feed(bad)
            except DecodeError:
                pass
            except Exception as e:  # noqa: BLE001 - the point is to catch anything else
                others.append((s.index, s.msg["tag"], bad.hex(), type(e).__name__, str(e)))
            _check_taken(dec, layouts)
            tried += 1
    assert tried > 500
    kinds = {}
    for index, tag, bad, exc, text in others:
        kinds.setdefault((tag, exc, text.split(":")[0].split(" in position")[0]), (index, bad[:64]))
    assert not others, f"{len(others)} of {tried} mangled messages raised something else than " \
        f"DecodeError; (message type, exception, error) -> first (message index, bytes): " \
        f"{dict(list(kinds.items())[:8])}"


@pytest.mark.parametrize("name", CAPTURES)
def test_mangled_field_lengths_raise(name):
    """A field length past the end, or negative, in every change message's tuples."""
    for s, layouts in _fuzz_targets(name):
        if s.msg["tag"] not in "IUD":
            continue
        in_stream = bool(s.attrs["in_stream"])
        # find each field length position by walking the message
        r = Reader(s.raw)
        r.take(1 + (4 if in_stream else 0) + 4)
        positions = []
        while r.left():
            kind = chr(r.u8())
            if kind not in "KON":
                raise AssertionError(kind)
            for _ in range(r.u16()):
                fk = chr(r.u8())
                if fk in "tb":
                    positions.append(r.pos)
                    r.take(r.i32())
        assert positions
        for pos in positions:
            for v in (-2, -1, len(s.raw), 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0):
                bad = s.raw[:pos] + struct.pack("!I", v & 0xFFFFFFFF) + s.raw[pos + 4:]
                dec = _prepared(layouts, in_stream)
                with pytest.raises(DecodeError):
                    dec.feed(bad)
                assert dec.take() == []


@pytest.mark.parametrize("msg, why", [
    (b"", "empty"),
    (b"Z", "unknown type"),
    (b"B" + bytes(19), "short Begin"),
    (b"C" + bytes(24), "short Commit"),
    (insert(99, [int4(1)]), "relation never described"),
    (b"I\x00\x00\x00\x07", "change without tuple"),
    (b"I\x00\x00\x00\x07X" + b"\x00\x02nn", "insert without N"),
    (insert(7, [int4(1)]), "column count differs"),
    (insert(7, [int4(1), "x", None]), "column count differs"),
    (b"I\x00\x00\x00\x07N\x00\x02nx", "unknown field kind"),
    (b"I\x00\x00\x00\x07N\x00\x02n", "missing field"),
    (b"I\x00\x00\x00\x07N\x00\x02nt\x00\x00\x00\x05ab", "field past the end"),
    (b"I\x00\x00\x00\x07N\x00\x02nt\xff\xff\xff\xfe", "negative field length"),
    (b"U\x00\x00\x00\x07K\x00\x02nn", "update without new tuple"),
    (b"U\x00\x00\x00\x07K\x00\x02nnX\x00\x02nn", "update with a bad new tuple tag"),
    (b"U\x00\x00\x00\x07X\x00\x02nn", "update with a bad tuple tag"),
    (b"D\x00\x00\x00\x07N\x00\x02nn", "delete without old tuple"),
    (b"D\x00\x00\x00\x07K\x00\x03nnn", "delete with wrong column count"),
    (b"R\x00\x00\x00\x07public\x00t\x00d\x00\x01\x01id", "relation column cut"),
    (b"R\x00\x00\x00\x07public", "unterminated name"),
    (b"T\x00\x00\x00\x02\x00\x00\x00\x00\x07", "truncate with a missing relid"),
    (b"M\x01" + bytes(8) + b"p\x00\x00\x00\x00\x09abc", "message content cut"),
    (b"Y\x00\x00\x00\x07public\x00", "type without name"),
    (b"O" + bytes(8), "origin without name"),
    (b"S\x00\x00\x00\x01", "stream start cut"),
    (b"c\x00\x00\x00\x01\x00" + bytes(16), "stream commit cut"),
    (b"A\x00\x00\x00\x01", "stream abort cut"),
])
def test_malformed_messages_raise(msg, why):
    dec = Decoder()
    dec.define(7, 2, [0], True)
    with pytest.raises(DecodeError):
        dec.feed(msg)
    assert dec.take() == []


def test_define_rejects_bad_layouts():
    dec = Decoder()
    with pytest.raises(DecodeError):
        dec.define(1, 1665, [0], True)
    with pytest.raises(DecodeError):
        dec.define(1, 2, [2], True)
    with pytest.raises(DecodeError):
        dec.define(1, 2, [-1], True)
    dec.define(2, 2, [0], True)
    dec.feed(insert(2, [int4(1), "x"]))
    with pytest.raises(DecodeError):
        dec.define(2, 3, [0], True)  # rows of the old layout still buffered
    (relid, data, counts), = dec.take()
    assert relid == 2 and counts[0] == 1 and len(parse_copy(data)) == 1
    dec.define(2, 3, [0], True)  # fine once taken
    dec.feed(insert(2, [int4(1), "x", None]))
    (row,) = [split_staged(r, Layout(2, "t", 3, (0,))) for r in parse_copy(dec.take()[0][1])]
    assert (row.op, row.cols, row.old_key, row.u) == (b"I", (int4(1), b"x", None), (None,), None)


# -- decoder bugs found by these tests (kept failing until _decode.pyx is fixed) ------


@pytest.mark.parametrize("msg", [
    b"R\x00\x00\x00\x07public\x00\xff\x00d\x00\x01\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff",
    b"Y\x00\x00\x40\x00public\x00\xff\x00",
    b"M\x00" + bytes(8) + b"\xff\x00\x00\x00\x00\x00",
    b"O" + bytes(8) + b"\xff\x00",
], ids=["relation", "type", "message", "origin"])
def test_invalid_utf8_in_a_name_raises_decode_error(msg):
    """Names are decoded as UTF-8: a stray byte must be a DecodeError, not a UnicodeDecodeError."""
    with pytest.raises(DecodeError):
        Decoder().feed(msg)


@pytest.mark.parametrize("msg", [b"\x80", b"\xff" + bytes(30), xlogdata(1, 2, b"\xe9")],
                         ids=["0x80", "0xff+30", "xlogdata-0xe9"])
def test_unknown_high_message_type_raises_decode_error(msg):
    """A type byte >= 0x80 is an unknown message like any other, not a ValueError from chr()."""
    dec = Decoder()
    with pytest.raises(DecodeError):
        if msg[:1] == b"w":
            dec.feed_frame(msg)
        else:
            dec.feed(msg)


def test_rejected_define_leaves_no_half_defined_relation():
    """define() that raises must not leave a relation that later rows are written into."""
    dec = Decoder()
    with pytest.raises(DecodeError):
        dec.define(1, 2, [5], True)
    try:
        dec.feed(insert(1, [int4(1), "x"]))
    except DecodeError:
        return  # the relation stayed undefined: fine
    # Or it decoded: then what take() hands over must be a valid COPY stream.
    (_relid, data, _counts), = dec.take()
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00"), data[:20]


def test_redefine_never_drops_buffered_rows():
    """Redefining a relation with the same layout while rows are buffered keeps them (or refuses).

    The streaming protocol resends a Relation message at every stream chunk,
    so a consumer that defines on every Relation event hits exactly this.
    """
    dec = Decoder()
    dec.define(1, 2, [0], True)
    dec.feed(insert(1, [int4(1), "x"]))
    try:
        dec.define(1, 2, [0], True)
    except DecodeError:
        return
    out = dec.take()
    assert [c for _r, _d, c in out] == [(1, 1, 0, 0, 0, 0)], "the buffered insert was silently dropped"


# -- pgwire, the encoder the roundtrip tests rely on ---------------------------------


def test_pgwire_encodes_what_the_independent_parser_reads():
    m = parse_message(update(5, ["a", UNCHANGED, None, b"\x01"], old=[int4(1), None, None, None]), False)
    assert m == {"tag": "U", "xid": None, "relid": 5, "old_kind": "K",
                 "old": [("b", int4(1)), ("n", None), ("n", None), ("n", None)],
                 "new": [("t", b"a"), ("u", None), ("n", None), ("b", b"\x01")]}
    assert parse_message(delete(5, [b"k"], old_kind="O", xid=3), True)["old"] == [("b", b"k")]
    assert parse_message(truncate([1, 2], options=3), False)["relids"] == [1, 2]
    assert parse_message(relation(5, "s", "t", [(1, "id", 23, -1)], replident="f"), False)["cols"] == [
        (1, "id", 23, -1)]
