"""A batch: whole source transactions, as an ordered list of operations.

Rows are grouped per table into COPY buffers; a TRUNCATE or a change of a
table's columns splits them, so the destination sees everything in stream
order: rows before it, the truncate (or ALTER), rows after it, all in one
destination transaction.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._decode import COPY_HEADER, COPY_TRAILER, Pieces, restage
from .schema import MirrorTable


class SpilledRows:
    """Staging rows that did not fit in memory: a temporary file of COPY BINARY
    tuples (no header, no trailer), deleted when closed or collected."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="replicator-spill-")
        self.size = 0
        self.blocks: list[int] = []   # sizes of the appends: each holds whole rows

    def append(self, copy_stream: bytes | Pieces) -> None:
        parts = [memoryview(p) for p in copy_stream.parts] if isinstance(copy_stream, Pieces) \
            else [memoryview(copy_stream)]
        parts[0] = parts[0][len(COPY_HEADER):]
        parts[-1] = parts[-1][:len(parts[-1]) - len(COPY_TRAILER)]
        self.append_rows(*parts)

    def append_rows(self, *parts: bytes | memoryview) -> None:
        """Whole rows, in one or more parts: one block."""
        size = sum(len(p) for p in parts)
        if not size:
            return
        self.file.seek(0, 2)
        for part in parts:
            self.file.write(part)
        # Out of Python's buffer: a SpilledSlice reads the file from another thread.
        self.file.flush()
        self.size += size
        self.blocks.append(size)

    def row_blocks(self) -> Iterator[bytearray]:
        """The rows, a block of whole rows at a time (as they were appended), each in a
        buffer of its own that the caller may change."""
        self.file.seek(0)
        for size in self.blocks:
            block = bytearray(size)
            if self.file.readinto(block) != size:
                raise OSError(f"spill file ends before its block of {size} bytes")
            yield block

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The whole COPY BINARY stream, a chunk at a time."""
        yield COPY_HEADER
        self.file.seek(0)
        while chunk := self.file.read(size):
            yield chunk
        yield COPY_TRAILER

    def close(self) -> None:
        self.file.close()


class SpilledSlice:
    """Rows appended to a SpilledRows in one go, read back while it may still grow."""

    def __init__(self, spill: SpilledRows, offset: int, size: int) -> None:
        self.spill, self.offset, self.size = spill, offset, size

    def read(self) -> bytes:
        """The rows themselves (no COPY header or trailer): one chunk's worth."""
        rows = os.pread(self.spill.file.fileno(), self.size, self.offset)
        if len(rows) != self.size:
            raise OSError(f"spill file ends at {self.offset + len(rows)}, "
                          f"before {self.offset + self.size}")
        return rows

    def part(self, offset: int, size: int) -> SpilledSlice:
        return SpilledSlice(self.spill, self.offset + offset, size)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        yield COPY_HEADER
        fd = self.spill.file.fileno()
        pos, end = self.offset, self.offset + self.size
        while pos < end:
            chunk = os.pread(fd, min(size, end - pos), pos)
            if not chunk:
                raise OSError(f"spill file ends at {pos}, before {end}")
            pos += len(chunk)
            yield chunk
        yield COPY_TRAILER


@dataclass
class TableRows:
    table: MirrorTable
    # a COPY BINARY stream of staging rows (Pieces: with big values left where they came),
    # or on disk
    data: bytes | Pieces | SpilledRows | SpilledSlice
    rows: int
    inserts: int
    updates: int
    deletes: int
    unchanged: int        # rows carrying unchanged-TOAST columns
    moves: int            # primary-key changes


@dataclass
class Rows:
    tables: list[TableRows]


@dataclass
class Truncate:
    tables: list[MirrorTable]
    cascade: bool
    restart_identity: bool
    lsn: int = 0          # its transaction's commit LSN and its place in the stream,
    seq: int = 0          # for a table whose changes are held during a copy
    xid: int = 0          # in a streamed transaction: its (sub)transaction, until the commit


@dataclass
class AlterTable:
    table: MirrorTable    # the new layout; the mirror is brought up to it
    origins: tuple = ()   # schema.Origin per column: attnums and fast defaults at the source
    alter: bool = True    # False: only its staging table (a skipped transaction's layout)


@dataclass
class SyncStart:
    """From here on, hold the table's changes: its copy is about to start."""
    table: MirrorTable
    applied: threading.Event = field(default_factory=threading.Event)


@dataclass
class SyncDone:
    """The table's copy (as of sync_lsn) is in: merge what was held since, then stream."""
    table: MirrorTable
    sync_lsn: int


Op = Rows | Truncate | AlterTable | SyncStart | SyncDone


@dataclass
class Batch:
    ops: list[Op] = field(default_factory=list)
    txns: int = 0
    rows: int = 0
    end_lsn: int = 0              # end_lsn of the last transaction in the batch
    last_commit_ts: int = 0       # source commit time of that transaction
    first_commit_ts: int = 0
    # A transaction's commit LSN (staging's _r_lsn) -> its source commit time, for
    # soft deletes and history rows.
    commit_times: dict[int, int] = field(default_factory=dict)
    opened: float = field(default_factory=time.monotonic)
    _spilled: dict[int, list] = field(default_factory=dict, repr=False)
    # A streamed transaction's own batch: the thread whose open destination transaction
    # holds it (stream_apply.StreamApply), and how to apply it from its files instead:
    # (StreamedTxn, commit LSN, sequence base, keep).
    stream: Any = None
    fallback: Any = None

    @property
    def empty(self) -> bool:
        return self.txns == 0 and not self.ops and not self._spilled

    def add_rows(
        self, taken: list[tuple[int, bytes | Pieces, tuple]], tables: dict[int, MirrorTable]
    ) -> None:
        """Append what Decoder.take() returned (and what was spilled before) as one Rows
        operation."""
        spilled, self._spilled = self._spilled, {}
        out = []
        for relid, data, counts in taken:
            if relid in spilled:
                spilled[relid][0].append(data)
                spilled[relid][1] = [a + b for a, b in zip(spilled[relid][1], counts)]
            else:
                out.append(TableRows(tables[relid], data, *counts))
                self.rows += counts[0]
        for relid, (rows, counts, table) in spilled.items():
            out.append(TableRows(table or tables[relid], rows, *counts))
            self.rows += counts[0]
        if out:
            self.ops.append(Rows(out))

    def spill(self, taken: list[tuple[int, bytes | Pieces, tuple]],
              tables: dict[int, MirrorTable] | None = None) -> int:
        """Move what Decoder.take() returned to temporary files (memory is short).

        The rows stay in their place in the stream: the next add_rows() puts
        them, followed by the rows taken then, into the same Rows operation.
        ``tables``, when given, names each relation's table now rather than then.
        """
        return sum(size for _entry, _offset, size, _counts in self._append(taken, tables))

    def spill_slices(self, taken: list[tuple[int, bytes | Pieces, tuple]],
                     tables: dict[int, MirrorTable]) -> list[TableRows]:
        """spill(), returning where each table's rows went (to be read back meanwhile)."""
        return [TableRows(entry[2], SpilledSlice(entry[0], offset, size), *counts)
                for entry, offset, size, counts in self._append(taken, tables)]

    def _append(self, taken: list[tuple[int, bytes | Pieces, tuple]],
                tables: dict[int, MirrorTable] | None) -> list[tuple[list, int, int, tuple]]:
        out = []
        for relid, data, counts in taken:
            entry = self._spilled.setdefault(
                relid, [SpilledRows(), [0] * len(counts),
                        tables[relid] if tables is not None else None])
            offset = entry[0].size
            entry[0].append(data)
            entry[1] = [a + b for a, b in zip(entry[1], counts)]
            out.append((entry, offset, entry[0].size - offset, counts))
        return out

    @property
    def spilled_rows(self) -> int:
        return sum(entry[1][0] for entry in self._spilled.values())

    def close(self) -> None:
        """Delete the batch's spill files."""
        for tr in self.table_rows():
            if isinstance(tr.data, SpilledRows):
                tr.data.close()
        for entry in self._spilled.values():
            entry[0].close()
        if self.fallback is not None:
            self.fallback[0].close()

    def commit(self, end_lsn: int, commit_ts: int, commit_lsn: int = 0) -> None:
        self.txns += 1
        if commit_lsn:
            self.commit_times[commit_lsn] = commit_ts
        self.end_lsn = end_lsn
        self.last_commit_ts = commit_ts
        if not self.first_commit_ts:
            self.first_commit_ts = commit_ts

    @property
    def memory_bytes(self) -> int:
        """Staging rows held in memory (what was spilled is on disk)."""
        return sum(len(tr.data) for tr in self.table_rows()
                   if isinstance(tr.data, (bytes, Pieces)))

    def table_rows(self) -> Iterator[TableRows]:
        for op in self.ops:
            if isinstance(op, Rows):
                yield from op.tables


@dataclass
class StreamedTxn:
    """An in-progress source transaction the server streams in chunks (protocol 2+).

    Its changes are kept on disk, in the order they arrived, until Stream
    Commit makes them one committed transaction of a batch, or Stream Abort
    drops them. Memory stays bounded by a chunk, not by the transaction.
    Staging rows carry their (sub)transaction's xid in _lsn until then.
    """
    xid: int
    first_seq: int                     # the decoder's sequence at its first chunk
    last_seq: int = 0                  # and after its latest chunk
    pending: Batch = field(default_factory=Batch)
    aborted: set[int] = field(default_factory=set)   # rolled-back subtransactions
    chunks: int = 0
    worker: Any = None    # stream_apply.StreamApply applying it while it runs, if any

    def abort_subxact(self, subxid: int) -> None:
        self.aborted.add(subxid)

    def commit(self, commit_lsn: int, seq_base: int,
               keep: Callable[[MirrorTable], bool]) -> list[Op]:
        """Its operations as those of a transaction committed at commit_lsn.

        Rows get commit_lsn and are renumbered from seq_base on (keeping their
        order), rows and truncates of aborted subtransactions go, and so do a
        table's rows when ``keep`` says its copy already has this transaction.
        """
        self.pending.add_rows([], {})
        delta = seq_base - self.first_seq
        out: list[Op] = []
        for op in self.pending.ops:
            if isinstance(op, Rows):
                tables = []
                for tr in op.tables:
                    if keep(tr.table):
                        moved = _restage(tr, self.aborted, commit_lsn, delta)
                        if moved is not None:
                            tables.append(moved)
                    if isinstance(tr.data, SpilledRows):
                        tr.data.close()
                if tables:
                    out.append(Rows(tables))
            elif isinstance(op, Truncate):
                if op.xid in self.aborted:
                    continue
                truncated = [t for t in op.tables if keep(t)]
                if truncated:
                    out.append(Truncate(truncated, op.cascade, op.restart_identity,
                                        lsn=commit_lsn, seq=op.seq + delta))
            else:
                out.append(op)
        self.pending = Batch()
        return out

    @property
    def span(self) -> int:
        return self.last_seq - self.first_seq

    def close(self) -> None:
        self.pending.close()


def _restage(tr: TableRows, aborted: set[int], commit_lsn: int, delta: int) -> TableRows | None:
    out = SpilledRows()
    counts = [0, 0, 0, 0, 0]
    assert isinstance(tr.data, SpilledRows), "streamed rows are always spilled"
    for block in tr.data.row_blocks():
        size, *n = restage(block, aborted, commit_lsn, delta)
        out.append_rows(memoryview(block)[:size])
        counts = [a + b for a, b in zip(counts, n)]
    if not counts[0]:
        out.close()
        return None
    if counts[0] == tr.rows:
        # Nothing dropped: the decoder's counts are exact (restage counts a key
        # change's old-key row as a delete).
        return TableRows(tr.table, out, tr.rows, tr.inserts, tr.updates, tr.deletes,
                         tr.unchanged, tr.moves)
    rows, inserts, updates, deletes, unchanged = counts
    return TableRows(tr.table, out, rows, inserts, updates, deletes, unchanged,
                     min(tr.moves, updates))
