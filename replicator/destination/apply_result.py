"""What applying one batch did: rows and operations per table, dead letters, timings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ApplyResult:
    rows: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    dead_letters: int = 0
    copies: int = 0       # COPYs into staging: one per table with rows, unless a truncate splits
    seconds: float = 0.0
    # With Applier.defer_flush: a destination WAL position at or past the batch's commit
    # record, and the destination's WAL flush position, both read after the commit.
    wal_lsn: int = 0
    wal_flushed: int = 0
    per_op: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_per_table: dict[str, int] = field(default_factory=dict)
    lettered: set[str] = field(default_factory=set)   # tables given retryable dead letters

    def count(self, table: str, inserts: int = 0, updates: int = 0, deletes: int = 0) -> None:
        ops = self.per_op.setdefault(table, {"insert": 0, "update": 0, "delete": 0})
        ops["insert"] += inserts
        ops["update"] += updates
        ops["delete"] += deletes
        self.inserts += inserts
        self.updates += updates
        self.deletes += deletes

    def dead(self, table: str, n: int) -> None:
        if n > 0:
            self.dead_letters += n
            self.dead_per_table[table] = self.dead_per_table.get(table, 0) + n
