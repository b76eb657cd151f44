"""A table's staged changes the mirror refuses, found and set aside (reject_sql.py has the
statements): the batch runs again with each table's MERGE under a savepoint, and a table that
fails has its staged keys bisected, under savepoints, down to the keys that fail. With
[destination] on_error = "stop" the first such key stops the pipeline; with "dead_letter"
its changes go to the dead letter table, in order, and the other keys are applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
from psycopg import sql

from ..errors import ErrorKind, ReplicatorError
from ..lsn import format_lsn
from ..schema import MirrorTable
from .apply_result import ApplyResult
from .batch_sql import clear_staging_sql
from .reject_sql import (
    ISOLATE,
    group_keys,
    isolate_groups_sql,
    isolate_keys_sql,
    isolate_ops_sql,
    isolate_sql,
    rejects,
)

log = logging.getLogger(__name__)


class KeyIsolation:
    """One table's staged keys, bisected in the batch's transaction.

    stmt: the applier's statement of a kind for a table; merge: its MERGE of what is staged
    (returns the unchanged-TOAST rows it set aside); lettered: the mirror tables that may
    have waiting dead letters (None: not read yet).
    """

    def __init__(self, stmt: Callable[[str, MirrorTable], sql.SQL],
                 merge: Callable[[psycopg.Cursor, MirrorTable, bool, int], int], slot: str,
                 on_error: str, lettered: set[str] | None) -> None:
        self.stmt, self.merge = stmt, merge
        self.slot, self.on_error, self._lettered = slot, on_error, lettered

    def run(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool, end_lsn: int,
            res: ApplyResult, failed: psycopg.Error | None) -> dict[str, int]:
        """Apply the staged keys that the mirror accepts, set the others aside.

        failed: the error of merging everything staged, if that was tried.
        """
        for stmt in isolate_sql(t):
            cur.execute(stmt)
        cur.execute(sql.SQL("select coalesce(max(_r_kn) + 1, 0) from {}").format(ISOLATE))
        counted = cur.fetchone()
        n = int(counted[0]) if counted else 0
        cur.execute(self.stmt("isolate_links", t))
        links = [(int(a), int(b)) for a, b in cur.fetchall()]
        queued: set[int] = set()
        if self._lettered is not None and t.qualname in self._lettered:
            cur.execute(self.stmt("isolate_queued", t), {"slot": self.slot, "table": t.qualname})
            queued = {int(r[0]) for r in cur.fetchall()}
        groups, count = list(range(n)), n
        if links or queued:
            groups, count = group_keys(n, links, queued)
            cur.execute(isolate_groups_sql(), [list(range(n)), groups])
        bad: list[int] = []
        if queued:
            if self.on_error == "stop":
                raise ReplicatorError(ErrorKind.DESTINATION_REJECTED, (
                    f"{t.qualname}: {self._keys(cur, -1)} has a waiting dead letter, and "
                    f"[destination] on_error is \"stop\""), "retry or delete its dead letters "
                    "(`replicator dead-letters --retry`), or set on_error = \"dead_letter\"")
            self._letter(cur, t, [-1], "queued behind an earlier dead letter of the same key",
                         None, res)
            bad.append(-1)
        if count:
            res.dead(t.qualname, self._bisect(cur, t, unchanged, end_lsn, 0, count, failed, bad,
                                              res))
        out: dict[str, int] = {}
        if bad:
            cur.execute(isolate_ops_sql(), [bad])
            out = {op: int(c) for op, c in cur.fetchall()}
        cur.execute(sql.SQL("drop table pg_temp.{}").format(ISOLATE))
        return out

    def _bisect(self, cur: psycopg.Cursor, t: MirrorTable, unchanged: bool, end_lsn: int,
                lo: int, hi: int, failed: psycopg.Error | None, bad: list[int],
                res: ApplyResult) -> int:
        """Merge groups lo..hi-1, halving what fails; returns unchanged-TOAST dead rows."""
        if failed is None:
            try:
                with cur.connection.transaction():
                    cur.execute(self.stmt("isolate_stage", t), [lo, hi])
                    dead = self.merge(cur, t, unchanged, end_lsn)
                    cur.execute(clear_staging_sql(t))
                return dead
            except psycopg.Error as exc:
                if not rejects(exc):
                    raise
                failed = exc
        if hi - lo > 1:
            mid = (lo + hi) // 2
            return (self._bisect(cur, t, unchanged, end_lsn, lo, mid, None, bad, res)
                    + self._bisect(cur, t, unchanged, end_lsn, mid, hi, None, bad, res))
        reason = failed.diag.message_primary or type(failed).__name__
        if self.on_error == "stop":
            raise ReplicatorError(
                ErrorKind.DESTINATION_REJECTED,
                f"the destination rejected a change of {t.qualname} key {self._keys(cur, lo)}: "
                f"{reason} (SQLSTATE {failed.sqlstate})")
        self._letter(cur, t, [lo], reason, failed, res)
        bad.append(lo)
        return 0

    def _letter(self, cur: psycopg.Cursor, t: MirrorTable, groups: list[int], reason: str,
                failed: psycopg.Error | None, res: ApplyResult) -> None:
        cur.execute(self.stmt("letter", t), {
            "slot": self.slot, "table": t.qualname, "reason": reason, "groups": groups,
            "sqlstate": failed.sqlstate if failed is not None else None})
        rows = max(cur.rowcount, 0)
        res.dead(t.qualname, rows)
        res.lettered.add(t.qualname)
        # Neither key nor row values here (the dead letter table has them): the log is read
        # by more people than the mirror is.
        log.warning("changes the destination rejected were written to the dead letter table",
                    extra={"table": t.qualname, "rows": rows, "sqlstate":
                           failed.sqlstate if failed is not None else None,
                           "condition": type(failed).__name__ if failed is not None
                           else "queued behind a dead letter",
                           "constraint": failed.diag.constraint_name if failed is not None
                           else None})

    def _keys(self, cur: psycopg.Cursor, group: int) -> str:
        """The keys of one group, with their commit LSNs, for an error line."""
        cur.execute(isolate_keys_sql(), [group])
        found = [f"{k} (LSN {format_lsn(int(lsn))})" for k, lsn in cur.fetchall()]
        return ", ".join(found) or "?"
