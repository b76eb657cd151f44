"""A pgoutput message encoder for tests: the inverse of what the decoder reads.

Field values: None (null, 'n'), UNCHANGED (unchanged TOAST, 'u'), bytes (a
binary field, 'b') or str (a text field, 't').
"""

from __future__ import annotations

import struct

UNCHANGED = object()


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def tuple_data(fields) -> bytes:
    out = [struct.pack("!H", len(fields))]
    for f in fields:
        if f is None:
            out.append(b"n")
        elif f is UNCHANGED:
            out.append(b"u")
        elif isinstance(f, str):
            raw = f.encode()
            out.append(b"t" + struct.pack("!i", len(raw)) + raw)
        else:
            out.append(b"b" + struct.pack("!i", len(f)) + bytes(f))
    return b"".join(out)


def _xid(xid):
    return b"" if xid is None else struct.pack("!I", xid)


def begin(final_lsn: int, ts: int = 0, xid: int = 1) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, ts, xid)


def commit(commit_lsn: int, end_lsn: int, ts: int = 0) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, commit_lsn, end_lsn, ts)


def relation(relid: int, ns: str, name: str, cols, replident: str = "d", xid=None) -> bytes:
    """cols: (flags, name, type_oid, typmod) tuples."""
    out = [b"R", _xid(xid), struct.pack("!I", relid), _cstr(ns), _cstr(name),
           replident.encode(), struct.pack("!H", len(cols))]
    for flags, cname, oid, typmod in cols:
        out += [struct.pack("!B", flags), _cstr(cname), struct.pack("!Ii", oid, typmod)]
    return b"".join(out)


def insert(relid: int, fields, xid=None) -> bytes:
    return b"I" + _xid(xid) + struct.pack("!I", relid) + b"N" + tuple_data(fields)


def update(relid: int, fields, old=None, old_kind: str = "K", xid=None) -> bytes:
    head = b"U" + _xid(xid) + struct.pack("!I", relid)
    if old is not None:
        head += old_kind.encode() + tuple_data(old)
    return head + b"N" + tuple_data(fields)


def delete(relid: int, old, old_kind: str = "K", xid=None) -> bytes:
    return b"D" + _xid(xid) + struct.pack("!I", relid) + old_kind.encode() + tuple_data(old)


def truncate(relids, options: int = 0, xid=None) -> bytes:
    return (b"T" + _xid(xid) + struct.pack("!IB", len(relids), options)
            + b"".join(struct.pack("!I", r) for r in relids))


def xlogdata(start: int, end: int, msg: bytes, ts: int = 0) -> bytes:
    return b"w" + struct.pack("!QQq", start, end, ts) + msg


def keepalive(end: int, reply: bool = False, ts: int = 0) -> bytes:
    return b"k" + struct.pack("!QqB", end, ts, 1 if reply else 0)


def int4(v: int) -> bytes:
    return struct.pack("!i", v)
