"""Captured pgoutput streams, replayed through a decoder as the receive loop drives it.

A capture (tools/capture_pgoutput.py: tests/unit/data/pgoutput_*.json, and
bench/data/pgoutput_15_v3_binary_odoo.json.gz for the six Odoo tables) is a list of
pgoutput messages with their LSNs. `frames()` wraps each in the XLogData CopyData frame
a walsender sends; `replay()` feeds them to a decoder (replicator._decode.Decoder or
devtools.reference_decoder.ReferenceDecoder: the same API), defining each relation when
its Relation message arrives with the key the message flags, and taking the buffered
rows at a commit once `batch_rows` rows are pending, as the receiver closes a batch.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

from .._decode import EV_COMMIT, EV_RELATION
from ..lsn import parse_lsn

# The captures live in the checkout, beside the tests and benchmarks that replay them.
ROOT = Path(__file__).resolve().parents[2]
ODOO_CAPTURE = ROOT / "bench" / "data" / "pgoutput_15_v3_binary_odoo.json.gz"
UNIT_CAPTURES = sorted((ROOT / "tests" / "unit" / "data").glob("pgoutput_*.json"))


def load_capture(path: Path) -> list[tuple[int, bytes]]:
    """(lsn, message) for every message of a capture file (.json or .json.gz)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    doc = json.loads(raw)
    return [(parse_lsn(m["lsn"]), bytes.fromhex(m["hex"])) for m in doc["messages"]]


def frames(messages: list[tuple[int, bytes]]) -> list[bytes]:
    """Each message in an XLogData frame: 'w', WAL start and end, send time, message."""
    return [struct.pack("!cQQq", b"w", lsn, lsn + len(msg), 1000 + i) + msg
            for i, (lsn, msg) in enumerate(messages)]


def key_of(cols: list[tuple[int, str, int, int]]) -> list[int]:
    """The columns the Relation message flags as part of the key."""
    return [i for i, c in enumerate(cols) if c[0] & 1]


def replay(decoder: Any, stream: list[bytes], batch_rows: int = 1000) -> list[tuple]:
    """Feed every frame; everything take() returned, in order."""
    out: list[tuple] = []
    feed = decoder.feed_frame
    for frame in stream:
        ev = feed(frame)
        if ev == EV_RELATION:
            relid, _nsp, _name, _ident, cols, _xid = decoder.event
            decoder.define(relid, len(cols), key_of(cols), True)
        elif ev == EV_COMMIT and decoder.batch_rows >= batch_rows:
            out.extend(decoder.take())
    out.extend(decoder.take())
    return out
