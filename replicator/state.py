"""The state schema in the destination: applied LSN, table sync state, dead letters.

It sits outside the mirror schema (analysts never see it) and is written in
the same transaction as the data it describes.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from .lsn import format_lsn, parse_lsn

_SETUP = [
    "create schema if not exists {state}",
    """create table if not exists {state}.pipelines (
        slot text primary key,
        applied_lsn pg_lsn not null,
        source_system_id text,
        updated_at timestamptz not null default now()
    )""",
    """create table if not exists {state}.tables (
        slot text not null,
        source_table text not null,
        mirror_table text not null,
        state text not null,
        sync_lsn pg_lsn,
        rows_copied bigint not null default 0,
        updated_at timestamptz not null default now(),
        primary key (slot, source_table)
    )""",
    """create table if not exists {state}.dead_letters (
        id bigserial primary key,
        slot text not null,
        mirror_table text not null,
        lsn pg_lsn not null,
        reason text not null,
        row_data jsonb,
        created_at timestamptz not null default now()
    )""",
]


def setup(conn: psycopg.Connection, state_schema: str) -> None:
    with conn.transaction():
        for stmt in _SETUP:
            conn.execute(sql.SQL(stmt).format(state=sql.Identifier(state_schema)))


def applied_lsn(conn: psycopg.Connection, state_schema: str, slot: str) -> int | None:
    row = conn.execute(
        sql.SQL("select applied_lsn::text from {}.pipelines where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return parse_lsn(row[0]) if row else None


def record_applied(cur: psycopg.Cursor, state_schema: str, slot: str, lsn: int,
                   system_id: str | None = None) -> None:
    """Inside the batch's transaction: the batch and its position commit together."""
    cur.execute(
        sql.SQL(
            "insert into {}.pipelines as p (slot, applied_lsn, source_system_id) "
            "values (%s, %s::pg_lsn, %s) on conflict (slot) do update set "
            "applied_lsn = excluded.applied_lsn, "
            "source_system_id = coalesce(excluded.source_system_id, p.source_system_id), "
            "updated_at = now()"
        ).format(sql.Identifier(state_schema)),
        [slot, format_lsn(lsn), system_id],
    )


def system_id(conn: psycopg.Connection, state_schema: str, slot: str) -> str | None:
    row = conn.execute(
        sql.SQL("select source_system_id from {}.pipelines where slot = %s").format(
            sql.Identifier(state_schema)), [slot]).fetchone()
    return row[0] if row else None
