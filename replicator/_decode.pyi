# The Python API of the compiled module replicator._decode (_decode.pyx).
from collections.abc import Iterator
from enum import IntEnum
from typing import Any, Final

class Event(IntEnum):
    EV_NONE = 0
    EV_WOULD_BLOCK = 1
    EV_COPY_DONE = 2
    EV_ERROR = 3
    EV_KEEPALIVE = 4
    EV_COMMIT = 5
    EV_RELATION = 6
    EV_TRUNCATE = 7
    EV_MESSAGE = 8
    EV_ORIGIN = 9
    EV_TYPE = 10
    EV_STREAM_START = 11
    EV_STREAM_STOP = 12
    EV_STREAM_COMMIT = 13
    EV_STREAM_ABORT = 14
    EV_LIMIT = 15
    EV_BEGIN = 16

# Plain ints equal to the Event members of the same name.
EV_NONE: Final[int]
EV_WOULD_BLOCK: Final[int]
EV_COPY_DONE: Final[int]
EV_ERROR: Final[int]
EV_KEEPALIVE: Final[int]
EV_COMMIT: Final[int]
EV_RELATION: Final[int]
EV_TRUNCATE: Final[int]
EV_MESSAGE: Final[int]
EV_ORIGIN: Final[int]
EV_TYPE: Final[int]
EV_STREAM_START: Final[int]
EV_STREAM_STOP: Final[int]
EV_STREAM_COMMIT: Final[int]
EV_STREAM_ABORT: Final[int]
EV_LIMIT: Final[int]
EV_BEGIN: Final[int]

COPY_HEADER: Final[bytes]
COPY_TRAILER: Final[bytes]

class DecodeError(Exception): ...

_Bytes = bytes | bytearray | memoryview

# (relid, a complete COPY BINARY stream, (rows, inserts, updates, deletes,
#  rows_with_unchanged_toast, key_changes))
_Taken = tuple[int, "bytes | Pieces", tuple[int, int, int, int, int, int]]

class Held: ...

class Span:
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Pieces:
    parts: list[bytes | Span]
    size: int
    def __init__(self, parts: list[bytes | Span]) -> None: ...
    def __len__(self) -> int: ...

class Decoder:
    @property
    def seq(self) -> int: ...
    skip_before: int
    @property
    def in_txn(self) -> int: ...
    @property
    def skipping(self) -> int: ...
    @property
    def in_stream(self) -> int: ...
    @property
    def xid(self) -> int: ...
    @property
    def stream_xid(self) -> int: ...
    @property
    def final_lsn(self) -> int: ...
    @property
    def commit_lsn(self) -> int: ...
    @property
    def end_lsn(self) -> int: ...
    @property
    def commit_ts(self) -> int: ...
    @property
    def txn_rows(self) -> int: ...
    @property
    def batch_rows(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    @property
    def wal_start(self) -> int: ...
    @property
    def wal_end(self) -> int: ...
    @property
    def send_time(self) -> int: ...
    @property
    def reply_requested(self) -> int: ...
    @property
    def taken_marks(self) -> tuple[list[tuple[int, int]], bool]:
        """Of the rows last taken in a streamed transaction: ([(seq, xid) where the
        rows' (sub)transaction changes], whether more changes than noted were lost)."""
    @property
    def event(self) -> Any:
        """The details of the last event (a tuple whose layout depends on the event), or None."""
    def __init__(self) -> None: ...
    def set_skip(self, relid: int, skip_before: int) -> None: ...
    def define(self, relid: int, ncols: int, key_idx: Any, active: bool,
               skip_before: int = 0) -> None: ...
    def reserve_seq(self, n: int) -> int: ...
    def take(self) -> list[_Taken]: ...
    def feed(self, data: _Bytes) -> int: ...
    def feed_frame(self, data: _Bytes) -> int: ...
    def attach(self, conn: int, getcopydata: int, consumeinput: int, freemem: int) -> None: ...
    def pump(self, max_messages: int = 1000000) -> int: ...

# In place in data: (bytes kept at its front, rows, inserts, updates, deletes,
# rows_with_unchanged_toast)
def restage(
    data: bytearray | memoryview, aborted: Any, lsn: int, delta: int
) -> tuple[int, int, int, int, int, int]: ...
# staging rows -> (the inserts as a COPY BINARY stream of the mirror's kept columns (keep: a
# byte per table column, nonzero to keep it), the other rows as a staging COPY BINARY
# stream, how many other rows); None if a row is a delete
def split_inserts(data: _Bytes, keep: bytes) -> tuple[bytearray, bytearray, int] | None: ...
# per piece: (offset, size, rows, inserts, updates, deletes); len(bounds) + 1 pieces
def cut_rows(
    data: _Bytes, bounds: list[int]
) -> list[tuple[int, int, int, int, int, int]]: ...
def iter_copy_binary(data: _Bytes) -> Iterator[tuple[bytes | None, ...]]: ...
