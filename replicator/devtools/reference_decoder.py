"""A pure-Python pgoutput decoder: the yardstick for replicator._decode.Decoder.

Written the straightforward way on purpose: every message is sliced out as bytes, every
field is read with struct.unpack_from into a Python object (a (kind, bytes | None) pair
per column), and every staging row is built with struct.pack and joined. It produces the
same COPY BINARY staging rows as the Cython decoder, byte for byte, with the same
Python API for decoding bytes (define, set_skip, feed, feed_frame, take, the event and
position attributes), so that bench/test_decoder_bench.py compares two decoders doing
the same work; tests/unit/test_reference_decoder.py proves the output identical on the
captured streams. What it leaves out: attach() and pump() (reading libpq's socket).

A staging row is: _seq int8, _lsn int8 (its transaction's commit LSN), _op "char", the
table's columns, the old key (set only when an UPDATE changed the key), _u bytea (bit i
set when column i was sent as unchanged TOAST; NULL when none was).
"""

from __future__ import annotations

import struct
from typing import Any

# The event codes are the API both decoders share: taken from the one place they are written.
from .._decode import (
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
)

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
COPY_TRAILER = b"\xff\xff"
MAX_COLS = 1664
NULL = struct.pack("!i", -1)

Field = tuple[bytes, bytes | None]


class DecodeError(Exception):
    """The stream does not look like pgoutput as we understand it."""


class _Rel:
    def __init__(self, relid: int) -> None:
        self.relid = relid
        self.reset(0, [], False, 0)

    def reset(self, ncols: int, keys: list[int], active: bool, skip_before: int) -> None:
        self.ncols = ncols
        self.key_idx = keys
        self.is_key = [i in keys for i in range(ncols)]
        self.active = active
        self.skip_before = skip_before
        self.rows_data: list[bytes] = []
        self.size = 0
        self.rows = self.n_insert = self.n_update = self.n_delete = 0
        self.n_unchanged = self.n_moves = 0


class _Reader:
    """Bounds-checked reads of one message's fields."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise DecodeError("truncated pgoutput message")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def u8(self) -> int:
        return self._unpack("!B")

    def u16(self) -> int:
        return self._unpack("!H")

    def u32(self) -> int:
        return self._unpack("!I")

    def i32(self) -> int:
        return self._unpack("!i")

    def u64(self) -> int:
        return self._unpack("!Q")

    def i64(self) -> int:
        return self._unpack("!q")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DecodeError("truncated pgoutput message")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def cstr(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError("unterminated string in pgoutput message")
        try:
            s = self.data[self.pos:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in a name of a pgoutput message: {exc}") from None
        self.pos = end + 1
        return s


def parse_tuple(data: bytes, pos: int, ncols: int) -> tuple[list[Field], int]:
    """A TupleData at `pos`: one (kind, value) per column, and the position after it."""
    end = len(data)
    if pos + 2 > end:
        raise DecodeError("malformed tuple")
    (n,) = struct.unpack_from("!H", data, pos)
    if n != ncols:
        raise DecodeError("malformed tuple")
    pos += 2
    fields: list[Field] = []
    for _ in range(ncols):
        if pos >= end:
            raise DecodeError("malformed tuple")
        kind = data[pos:pos + 1]
        pos += 1
        if kind == b"t" or kind == b"b":
            if pos + 4 > end:
                raise DecodeError("malformed tuple")
            (flen,) = struct.unpack_from("!i", data, pos)
            pos += 4
            if flen < 0 or pos + flen > end:
                raise DecodeError("malformed tuple")
            fields.append((kind, data[pos:pos + flen]))
            pos += flen
        elif kind == b"n" or kind == b"u":
            fields.append((kind, None))
        else:
            raise DecodeError("malformed tuple")
    return fields, pos


def key_changed(r: _Rel, old: list[Field], new: list[Field]) -> bool:
    for i in r.key_idx:
        (ok, ov), (nk, nv) = old[i], new[i]
        if nk == b"u" or ok == b"u" or (ok == b"n" and nk == b"n"):
            continue
        if (ov is None) != (nv is None) or ov != nv:
            return True
    return False


class ReferenceDecoder:
    """Decodes one pgoutput stream into per-relation COPY BINARY buffers, in Python."""

    def __init__(self) -> None:
        self.rels: dict[int, _Rel] = {}     # in definition order, as take() returns them
        self.seq = 0
        self.skip_before = 0
        self.event: Any = None
        self.in_txn = self.skipping = self.in_stream = 0
        self.xid = self.stream_xid = 0
        self.final_lsn = self.commit_lsn = self.end_lsn = self.commit_ts = 0
        self.row_lsn = 0
        self.txn_rows = self.batch_rows = self.buffered_bytes = 0
        self.wal_start = self.wal_end = self.send_time = self.reply_requested = 0

    # -- relations

    def set_skip(self, relid: int, skip_before: int) -> None:
        r = self.rels.get(relid)
        if r is None:
            raise DecodeError(f"relation {relid} was never defined")
        r.skip_before = skip_before

    def define(self, relid: int, ncols: int, key_idx: Any, active: bool,
               skip_before: int = 0) -> None:
        keys = [int(k) for k in key_idx]
        if ncols < 0 or ncols > MAX_COLS:
            raise DecodeError(f"relation {relid} has {ncols} columns, at most {MAX_COLS} "
                              "are supported")
        if len(set(keys)) != len(keys) or any(not 0 <= k < ncols for k in keys):
            raise DecodeError(f"relation {relid}: key columns {keys} out of range or repeated")
        r = self.rels.get(relid)
        if r is not None:
            if r.ncols == ncols and r.key_idx == keys and (r.active == bool(active)
                                                            or not r.rows):
                r.active = bool(active)
                r.skip_before = skip_before
                return
            if r.rows:
                raise DecodeError(f"relation {relid} redefined with rows still buffered")
        else:
            r = self.rels[relid] = _Rel(relid)
        r.reset(ncols, keys, bool(active), skip_before)

    def take(self) -> list[tuple[int, bytes, tuple[int, int, int, int, int, int]]]:
        out = []
        for r in self.rels.values():
            if not r.rows:
                continue
            data = COPY_HEADER + b"".join(r.rows_data) + COPY_TRAILER
            out.append((r.relid, data, (r.rows, r.n_insert, r.n_update, r.n_delete,
                                        r.n_unchanged, r.n_moves)))
            r.rows_data = []
            r.size = 0
            r.rows = r.n_insert = r.n_update = r.n_delete = r.n_unchanged = r.n_moves = 0
        self.batch_rows = 0
        self.buffered_bytes = 0
        return out

    # -- rows

    def _write_row(self, r: _Rel, op: bytes, src: list[Field], key_only: bool,
                   okey: list[Field] | None, fill: list[Field] | None) -> None:
        parts = [struct.pack("!hiqiQi", 3 + r.ncols + len(r.key_idx) + 1, 8, self.seq, 8,
                             self.row_lsn, 1), op]
        ulen = (r.ncols + 7) >> 3
        ubits = bytearray(ulen)
        nbits = 0
        for i in range(r.ncols):
            if key_only and not r.is_key[i]:
                parts.append(NULL)
                continue
            kind, value = src[i]
            if kind == b"u" and fill is not None and fill[i][1] is not None:
                kind, value = fill[i]
            if value is not None:
                parts.append(struct.pack("!i", len(value)))
                parts.append(value)
            else:
                if kind == b"u":
                    ubits[i >> 3] |= 1 << (i & 7)
                    nbits += 1
                parts.append(NULL)
        for k in r.key_idx:
            value = okey[k][1] if okey is not None else None
            if value is not None:
                parts.append(struct.pack("!i", len(value)))
                parts.append(value)
            else:
                parts.append(NULL)
        if nbits:
            parts.append(struct.pack("!i", ulen))
            parts.append(bytes(ubits))
            r.n_unchanged += 1
        else:
            parts.append(NULL)
        row = b"".join(parts)
        r.rows_data.append(row)
        r.size += len(row)
        r.rows += 1
        self.seq += 1

    def _row(self, msg: bytes, tag: int) -> None:
        q = 5 if self.in_stream else 1     # in a stream: the (sub)transaction's xid first
        if q + 5 > len(msg):
            raise DecodeError("truncated change message")
        # A streamed row carries its (sub)transaction's xid until the commit restages it.
        self.row_lsn = struct.unpack_from("!I", msg, 1)[0] if self.in_stream else self.final_lsn
        (relid,) = struct.unpack_from("!I", msg, q)
        q += 4
        r = self.rels.get(relid)
        if r is None:
            raise DecodeError("change for a relation that was never described")
        if not r.active or self.skipping:
            return
        if not self.in_stream and self.final_lsn < r.skip_before:
            return
        before = r.size
        c = msg[q]
        q += 1
        if tag == 0x49:     # I
            if c != 0x4E:
                raise DecodeError("insert without a new tuple")
            try:
                new, _ = parse_tuple(msg, q, r.ncols)
            except DecodeError:
                raise DecodeError("malformed tuple in insert") from None
            self._write_row(r, b"I", new, False, None, None)
            r.n_insert += 1
        elif tag == 0x55:   # U
            old: list[Field] | None = None
            full_old = False
            if c == 0x4B or c == 0x4F:      # K, O
                full_old = c == 0x4F
                try:
                    old, q = parse_tuple(msg, q, r.ncols)
                except DecodeError:
                    raise DecodeError("malformed old tuple in update") from None
                if q >= len(msg):
                    raise DecodeError("malformed old tuple in update")
                c = msg[q]
                q += 1
            if c != 0x4E:
                raise DecodeError("malformed new tuple in update")
            try:
                new, _ = parse_tuple(msg, q, r.ncols)
            except DecodeError:
                raise DecodeError("malformed new tuple in update") from None
            moved = old is not None and key_changed(r, old, new)
            if moved:
                assert old is not None
                self._write_row(r, b"D", old, True, None, None)
                self.batch_rows += 1
                r.n_moves += 1
            self._write_row(r, b"U", new, False, old if moved else None,
                            old if full_old else None)
            r.n_update += 1
        else:               # D
            if c != 0x4B and c != 0x4F:
                raise DecodeError("delete without an old tuple")
            try:
                old, _ = parse_tuple(msg, q, r.ncols)
            except DecodeError:
                raise DecodeError("malformed old tuple in delete") from None
            self._write_row(r, b"D", old, True, None, None)
            r.n_delete += 1
        self.txn_rows += 1
        self.batch_rows += 1
        self.buffered_bytes += r.size - before

    def _begin(self, msg: bytes) -> None:
        if len(msg) < 21:
            raise DecodeError("truncated Begin")
        self.final_lsn, self.commit_ts, self.xid = struct.unpack_from("!QqI", msg, 1)
        self.in_txn = 1
        self.txn_rows = 0
        self.skipping = int(self.final_lsn < self.skip_before)

    # -- messages

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Decode one pgoutput message (no XLogData header): an event code."""
        msg = bytes(data)
        if not msg:
            raise DecodeError("empty pgoutput message")
        return self._message(msg)

    def feed_frame(self, data: bytes | bytearray | memoryview) -> int:
        """Decode one CopyData frame of the replication stream ('w' or 'k')."""
        frame = bytes(data)
        if not frame:
            raise DecodeError("empty CopyData frame")
        if frame[0] == 0x77:        # w
            if len(frame) < 26:
                raise DecodeError("truncated XLogData frame")
            self.wal_start, self.wal_end, self.send_time = struct.unpack_from("!QQq", frame, 1)
            msg = frame[25:]
            tag = msg[0]
            if tag in (0x49, 0x55, 0x44):
                self._row(msg, tag)
                return EV_NONE
            if tag == 0x42:
                self._begin(msg)
                return EV_NONE
            return self._message(msg)
        if frame[0] == 0x6B:        # k
            if len(frame) < 18:
                raise DecodeError("truncated keepalive")
            self.wal_end, self.send_time = struct.unpack_from("!Qq", frame, 1)
            self.reply_requested = int(frame[17] != 0)
            return EV_KEEPALIVE
        raise DecodeError(f"unexpected CopyData message type 0x{frame[0]:02x}")

    def _message(self, msg: bytes) -> int:
        tag = msg[0]
        if tag in (0x49, 0x55, 0x44):
            self._row(msg, tag)
            return EV_NONE
        if tag == 0x42:
            self._begin(msg)
            return EV_BEGIN
        r = _Reader(msg[1:])
        kind = chr(tag)
        if kind == "C":
            r.u8()
            self.commit_lsn, self.end_lsn, self.commit_ts = r.u64(), r.u64(), r.i64()
            self.in_txn = 0
            self.event = None
            return EV_COMMIT
        if kind == "R":
            xid = r.u32() if self.in_stream else None
            relid, nspname, relname, replident = r.u32(), r.cstr(), r.cstr(), chr(r.u8())
            cols = [(r.u8(), r.cstr(), r.u32(), r.i32()) for _ in range(r.u16())]
            self.event = (relid, nspname, relname, replident, cols, xid)
            return EV_RELATION
        if kind == "Y":
            xid = r.u32() if self.in_stream else None
            self.event = (r.u32(), r.cstr(), r.cstr(), xid)
            return EV_TYPE
        if kind == "T":
            xid = r.u32() if self.in_stream else None
            nrels = r.u32()
            options = r.u8()
            relids = [r.u32() for _ in range(nrels)]
            if self.skipping:
                return EV_NONE
            self.event = (options, relids, xid)
            return EV_TRUNCATE
        if kind == "M":
            xid = r.u32() if self.in_stream else None
            flags, lsn, prefix = r.u8(), r.u64(), r.cstr()
            content = r.take(r.u32())
            self.event = (bool(flags & 1), lsn, prefix, content, xid)
            return EV_MESSAGE
        if kind == "O":
            self.event = (r.u64(), r.cstr())
            return EV_ORIGIN
        if kind == "S":
            self.stream_xid = r.u32()
            first = r.u8()
            self.in_stream = 1
            self.skipping = 0
            self.event = (self.stream_xid, bool(first))
            return EV_STREAM_START
        if kind == "E":
            self.in_stream = 0
            self.event = None
            return EV_STREAM_STOP
        if kind == "c":
            xid, flags = r.u32(), r.u8()
            self.commit_lsn, self.end_lsn, self.commit_ts = r.u64(), r.u64(), r.i64()
            self.event = (xid, flags, self.commit_lsn, self.end_lsn, self.commit_ts)
            return EV_STREAM_COMMIT
        if kind == "A":
            xid, subxid = r.u32(), r.u32()
            # Protocol 4 with streaming = parallel adds the abort LSN and time.
            abort_lsn = r.u64() if r.left() >= 16 else None
            abort_ts = r.i64() if abort_lsn is not None else None
            self.event = (xid, subxid, abort_lsn, abort_ts)
            return EV_STREAM_ABORT
        raise DecodeError(f"unsupported pgoutput message type 0x{tag:02x}")
