"""A batch: whole source transactions, as an ordered list of operations.

Rows are grouped per table into COPY buffers; a TRUNCATE or a change of a
table's columns splits them, so the destination sees everything in stream
order: rows before it, the truncate (or ALTER), rows after it, all in one
destination transaction.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ._decode import COPY_HEADER, COPY_TRAILER
from .schema import MirrorTable


class SpilledRows:
    """Staging rows that did not fit in memory: a temporary file of COPY BINARY
    tuples (no header, no trailer), deleted when closed or collected."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="replicator-spill-")
        self.size = 0

    def append(self, copy_stream: bytes) -> None:
        rows = memoryview(copy_stream)[len(COPY_HEADER):-len(COPY_TRAILER)]
        self.file.write(rows)
        self.size += len(rows)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The whole COPY BINARY stream, a chunk at a time."""
        yield COPY_HEADER
        self.file.seek(0)
        while chunk := self.file.read(size):
            yield chunk
        yield COPY_TRAILER

    def close(self) -> None:
        self.file.close()


@dataclass
class TableRows:
    table: MirrorTable
    data: bytes | SpilledRows   # a complete COPY BINARY stream of staging rows, or a spill
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

    @property
    def empty(self) -> bool:
        return self.txns == 0 and not self.ops and not self._spilled

    def add_rows(
        self, taken: list[tuple[int, bytes, tuple]], tables: dict[int, MirrorTable]
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
        for relid, (rows, counts) in spilled.items():
            out.append(TableRows(tables[relid], rows, *counts))
            self.rows += counts[0]
        if out:
            self.ops.append(Rows(out))

    def spill(self, taken: list[tuple[int, bytes, tuple]]) -> int:
        """Move what Decoder.take() returned to temporary files (memory is short).

        The rows stay in their place in the stream: the next add_rows() puts
        them, followed by the rows taken then, into the same Rows operation.
        """
        moved = 0
        for relid, data, counts in taken:
            entry = self._spilled.setdefault(relid, [SpilledRows(), [0] * len(counts)])
            entry[0].append(data)
            entry[1] = [a + b for a, b in zip(entry[1], counts)]
            moved += len(data)
        return moved

    @property
    def spilled_rows(self) -> int:
        return sum(counts[0] for _, counts in self._spilled.values())

    def close(self) -> None:
        """Delete the batch's spill files."""
        for tr in self.table_rows():
            if isinstance(tr.data, SpilledRows):
                tr.data.close()
        for rows, _ in self._spilled.values():
            rows.close()

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
        return sum(len(tr.data) for tr in self.table_rows() if isinstance(tr.data, bytes))

    def table_rows(self) -> Iterator[TableRows]:
        for op in self.ops:
            if isinstance(op, Rows):
                yield from op.tables
