"""`seed()`: create the six Odoo tables on a test source and fill them with generated rows.

The tables of `replicator.devtools.odoo` are created when missing and filled with
COPY, streaming: rows are generated in chunks, so memory stays flat however large
`scale` is (scale 1 is about 1,000 journal entries and 5,000 journal items). Then
indexes, id sequences, analyze and (optionally) a publication. `replicator seed`
runs it.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from .generator import DataGenerator
from .loader import copy_moves, copy_rows, index_and_analyze
from .odoo import TABLES, create_table_statement

__all__ = ["LOAD_ORDER", "seed"]

# Load order: every reference between the six tables points to an earlier table
# (res_partner <- everything; hr_expense_sheet <- hr_expense, account_move;
# hr_expense <- account_move_line; account_move <- account_move_line).
# fmt: off
LOAD_ORDER = (
    "res_partner", "hr_expense_sheet", "hr_expense", "account_move", "account_move_line", "project_task",
)
# fmt: on


def publication_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select exists (select 1 from pg_publication where pubname = %s)",
                           [name]).fetchone()
    return bool(row and row[0])


def seed(
    dsn: str,
    scale: float = 1,
    seed: int = 42,
    schema: str = "public",
    publication: str | None = "odoo_pub_scout",
) -> dict[str, int]:
    """Create the six Odoo tables in `schema` (if missing) and fill them; returns rows per table.

    The tables must be empty. Secondary indexes of tables created here are built
    after the load (faster); Odoo's trigram indexes only when pg_trgm is installed.
    Id sequences are moved past the loaded ids. With `publication`, a publication
    FOR TABLE the six tables is created unless one of that name exists.
    """
    gen = DataGenerator(scale, seed)
    counts: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set synchronous_commit = off")
        extensions = {r[0] for r in conn.execute("select extname from pg_extension")}
        if conn.execute("select to_regnamespace(%s) is null", (sql.Identifier(schema).as_string(conn),)).fetchone()[0]:
            conn.execute(sql.SQL("create schema {}").format(sql.Identifier(schema)))
        created = []
        with conn.transaction():
            for table in LOAD_ORDER:
                exists = conn.execute(
                    "select to_regclass(%s) is not null", (sql.Identifier(schema, table).as_string(conn),)
                ).fetchone()[0]
                if not exists:
                    conn.execute(create_table_statement(table, schema))
                    created.append(table)
                elif conn.execute(
                    sql.SQL("select exists (select from {})").format(sql.Identifier(schema, table))
                ).fetchone()[0]:
                    raise ValueError(f"{schema}.{table} already has rows: seed needs empty tables")
        with conn.cursor() as cur:
            with conn.transaction():
                counts["res_partner"] = copy_rows(cur, schema, "res_partner", gen.res_partner())
            with conn.transaction():
                counts["hr_expense_sheet"] = copy_rows(cur, schema, "hr_expense_sheet", gen.hr_expense_sheet())
                counts["hr_expense"] = copy_rows(cur, schema, "hr_expense", gen.hr_expense())
            with conn.transaction():
                counts["account_move"], counts["account_move_line"] = copy_moves(cur, schema, gen)
            with conn.transaction():
                counts["project_task"] = copy_rows(cur, schema, "project_task", gen.project_task())
        for table in LOAD_ORDER:
            qname = sql.Identifier(schema, table)
            conn.execute(
                sql.SQL(
                    "select setval(pg_get_serial_sequence(%s, 'id'), coalesce(max(id), 0) + 1, false) from {}"
                ).format(qname),
                (qname.as_string(conn),),
            )
        index_and_analyze(dsn, schema, created, extensions)
        if publication:
            exists = conn.execute("select 1 from pg_publication where pubname = %s", (publication,)).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("create publication {} for table {}").format(
                        sql.Identifier(publication),
                        sql.SQL(", ").join(sql.Identifier(schema, t) for t in TABLES),
                    )
                )
    return {t: counts[t] for t in TABLES}
