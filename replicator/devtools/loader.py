"""Bulk loading of generated rows: COPY text format, chunked COPY, then indexes and analyze.

Rows are formatted and sent in chunks, so memory stays flat however many rows
a generator yields.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson
import psycopg
from psycopg import sql

from .generator import DataGenerator
from .odoo import TABLES, create_index_statements
from .values import COLS

_NULL = "\\N"
_NEEDS_ESCAPE = re.compile(r"[\\\n\t\r]").search


def _f_text(v: str) -> str:
    """Escape a value for COPY text format (replace is memchr-fast; translate is slow on long strings)."""
    if _NEEDS_ESCAPE(v) is None:
        return v
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _f_json(v: Any) -> str:
    return _f_text(orjson.dumps(v).decode())


def _row_formatter(table: str) -> Any:
    """row tuple -> one COPY text line (without the newline).

    str() already gives PostgreSQL's input syntax for int, Decimal, date, datetime
    (space separator, microseconds) and float (repr); text, jsonb and boolean
    columns are fixed up by position. This runs for every row, so it avoids a
    function call per value.
    """
    types = [c["type"] for c in TABLES[table]["columns"]]
    text_idx = tuple(i for i, t in enumerate(types) if t in ("character varying", "text"))
    json_idx = tuple(i for i, t in enumerate(types) if t == "jsonb")
    bool_idx = tuple(i for i, t in enumerate(types) if t == "boolean")
    null, needs_escape, join = _NULL, _NEEDS_ESCAPE, "\t".join

    def fmt(row: tuple) -> str:
        vals = [null if v is None else v for v in row]
        for i in text_idx:
            v = vals[i]
            if v is not null and needs_escape(v) is not None:
                vals[i] = _f_text(v)
        for i in json_idx:
            if vals[i] is not null:
                vals[i] = _f_json(vals[i])
        for i in bool_idx:
            if vals[i] is not null:
                vals[i] = "t" if vals[i] else "f"
        return join(map(str, vals))

    return fmt


_ROW_FORMATTERS = {t: _row_formatter(t) for t in TABLES}


def copy_line(table: str, row: tuple) -> str:
    """One row in COPY text format (tab-separated, \\N for NULL, newline-terminated)."""
    return _ROW_FORMATTERS[table](row) + "\n"


_CHUNK_ROWS = 5000


def copy_rows(cur: psycopg.Cursor, schema: str, table: str, rows: Iterable[tuple]) -> int:
    """COPY the rows into schema.table, sent in chunks of _CHUNK_ROWS lines; the row count."""
    stmt = sql.SQL("copy {} ({}) from stdin").format(
        sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, COLS[table]))
    )
    fmt = _ROW_FORMATTERS[table]
    count = 0
    buf: list[str] = []
    with cur.copy(stmt) as cp:
        for row in rows:
            buf.append(fmt(row))
            if len(buf) >= _CHUNK_ROWS:
                buf.append("")
                cp.write("\n".join(buf))
                count += len(buf) - 1
                buf.clear()
        if buf:
            buf.append("")
            cp.write("\n".join(buf))
            count += len(buf) - 1
    return count


def copy_moves(cur: psycopg.Cursor, schema: str, gen: DataGenerator, chunk_moves: int = 2000) -> tuple[int, int]:
    """Moves and their lines, alternating COPYs per chunk of moves (memory stays flat)."""
    n_moves = n_lines = 0
    moves: list[tuple] = []
    lines: list[tuple] = []
    for move, move_lines in gen.moves():
        moves.append(move)
        lines.extend(move_lines)
        if len(moves) >= chunk_moves:
            n_moves += copy_rows(cur, schema, "account_move", moves)
            n_lines += copy_rows(cur, schema, "account_move_line", lines)
            moves.clear()
            lines.clear()
    if moves:
        n_moves += copy_rows(cur, schema, "account_move", moves)
        n_lines += copy_rows(cur, schema, "account_move_line", lines)
    return n_moves, n_lines


def index_and_analyze(dsn: str, schema: str, created: list[str], extensions: set[str], workers: int = 2) -> None:
    """Build the indexes of the tables created by seed(), then analyze the six tables.

    Statements are shared out over `workers` connections (index builds on one
    table do not block each other), biggest table first.
    """
    order = ("account_move_line", "account_move", "project_task", "res_partner", "hr_expense", "hr_expense_sheet")
    todo: deque[sql.Composable] = deque()
    for table in order:
        if table in created:
            todo.extend(create_index_statements(table, schema, extensions))
    analyze = deque(sql.SQL("analyze {}").format(sql.Identifier(schema, t)) for t in order)
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def take(queue: deque[sql.Composable]) -> sql.Composable | None:
        with lock:
            return queue.popleft() if queue and not errors else None

    def run() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("set maintenance_work_mem = '256MB'")
                while (stmt := take(todo)) is not None:
                    conn.execute(stmt)
                barrier.wait()
                while (stmt := take(analyze)) is not None:
                    conn.execute(stmt)
        except BaseException as exc:  # re-raised in the calling thread
            with lock:
                errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, name=f"seed-index-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
