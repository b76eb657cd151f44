"""A batch: whole source transactions, as an ordered list of operations.

Rows are grouped per table into COPY buffers; a TRUNCATE or a change of a
table's columns splits them, so the destination sees everything in stream
order: rows before it, the truncate (or ALTER), rows after it, all in one
destination transaction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .schema import MirrorTable


@dataclass
class TableRows:
    table: MirrorTable
    data: bytes           # a complete COPY BINARY stream of staging rows
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
    opened: float = field(default_factory=time.monotonic)

    @property
    def empty(self) -> bool:
        return self.txns == 0 and not self.ops

    def add_rows(self, taken: list[tuple[int, bytes, tuple]], tables: dict[int, MirrorTable]) -> None:
        """Append what Decoder.take() returned as one Rows operation."""
        if not taken:
            return
        out = []
        for relid, data, (rows, ins, upd, dele, unch, moves) in taken:
            out.append(TableRows(tables[relid], data, rows, ins, upd, dele, unch, moves))
            self.rows += rows
        self.ops.append(Rows(out))

    def commit(self, end_lsn: int, commit_ts: int) -> None:
        self.txns += 1
        self.end_lsn = end_lsn
        self.last_commit_ts = commit_ts
        if not self.first_commit_ts:
            self.first_commit_ts = commit_ts

    def table_rows(self):
        for op in self.ops:
            if isinstance(op, Rows):
                yield from op.tables
