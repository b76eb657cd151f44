"""The six Odoo 17 tables the mirror carries by default, and their DDL on a source.

`TABLES` is loaded from `data/odoo17_tables.json`, a trimmed copy of the shared
Odoo 17 schema description: per table, the ordered columns (name, PostgreSQL type
as PostgreSQL spells it, not_null), the primary key and the secondary indexes.
Foreign keys, CHECK constraints, comments and Odoo field metadata are left out on
purpose: the tables are built to look like Odoo's on a test source, not to host
Odoo.

An index entry is structured so that every identifier in it can be quoted:
`keys` is a list of `{"column": name}` or `{"expression": template}` items,
optionally with `"descending": true` and an `"opclass"`; `where` is a template.
A template is a SQL fragment from this package's own data file in which every
column reference is written `{column}` (literal braces doubled), rendered with
`psycopg.sql.SQL(template).format(column=sql.Identifier(column), ...)`.
Indexes with `"requires_extension"` (Odoo's trigram indexes need pg_trgm) are
created only when that extension is named in `extensions`, like Odoo does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from typing import Any

from psycopg import sql

__all__ = [
    "SQL_TYPES",
    "TABLES",
    "TABLE_NAMES",
    "column_names",
    "create_index_statements",
    "create_table_statement",
    "create_tables_sql",
]


def _load_tables() -> dict[str, dict[str, Any]]:
    text = resources.files("replicator.devtools").joinpath("data/odoo17_tables.json").read_text("utf-8")
    return json.loads(text)


TABLES: dict[str, dict[str, Any]] = _load_tables()
"""table name -> {"columns": [{"name", "type", "not_null"}], "primary_key": [...], "indexes": [...]}.

Tables in the order of the shared schema: account_move, account_move_line,
res_partner, project_task, hr_expense, hr_expense_sheet.
"""

TABLE_NAMES: tuple[str, ...] = tuple(TABLES)
"""The six table names, in `TABLES` order: the one list tests, demo and bench use."""

# The only type spellings the data file may use: they are SQL keywords, not
# identifiers, so they are checked against this list before reaching SQL text.
SQL_TYPES = frozenset(
    {
        "integer",
        "character varying",
        "text",
        "numeric",
        "jsonb",
        "boolean",
        "date",
        "timestamp without time zone",
        "double precision",
    }
)
_INDEX_METHODS = frozenset({"btree", "gin", "gist", "hash", "brin"})


def column_names(table: str) -> list[str]:
    """The table's column names, in table order."""
    return [c["name"] for c in TABLES[table]["columns"]]


def _template(text: str, columns: Iterable[str]) -> sql.Composed:
    return sql.SQL(text).format(**{c: sql.Identifier(c) for c in columns})


def create_table_statement(table: str, schema: str = "public") -> sql.Composed:
    """`create table if not exists` with the primary key; an integer `id` key is a serial like Odoo's."""
    spec = TABLES[table]
    pk = spec["primary_key"]
    serial = pk == ["id"]
    parts = []
    for col in spec["columns"]:
        ctype = col["type"]
        if ctype not in SQL_TYPES:
            raise ValueError(f"{table}.{col['name']}: unsupported type {ctype!r}")
        if serial and col["name"] == "id":
            if ctype != "integer":
                raise ValueError(f"{table}.id is {ctype}, expected integer")
            ctype = "serial"
        part = sql.SQL("{} {}").format(sql.Identifier(col["name"]), sql.SQL(ctype))
        if col["not_null"]:
            part = sql.SQL("{} not null").format(part)
        parts.append(part)
    parts.append(
        sql.SQL("constraint {} primary key ({})").format(
            sql.Identifier(f"{table}_pkey"), sql.SQL(", ").join(map(sql.Identifier, pk))
        )
    )
    return sql.SQL("create table if not exists {} ({})").format(
        sql.Identifier(schema, table), sql.SQL(", ").join(parts)
    )


def create_index_statements(table: str, schema: str = "public", extensions: Iterable[str] = ()) -> list[sql.Composed]:
    """`create index if not exists` for the table's secondary indexes.

    Indexes that need an extension not listed in `extensions` are skipped.
    """
    spec = TABLES[table]
    available = set(extensions)
    columns = column_names(table)
    out = []
    for ix in spec["indexes"]:
        need = ix.get("requires_extension")
        if need and need not in available:
            continue
        method = ix["using"]
        if method not in _INDEX_METHODS:
            raise ValueError(f"index {ix['name']}: unsupported method {method!r}")
        keys = []
        for key in ix["keys"]:
            if "column" in key:
                if key["column"] not in columns:
                    raise ValueError(f"index {ix['name']}: unknown column {key['column']!r}")
                k: sql.Composable = sql.Identifier(key["column"])
            else:
                k = sql.SQL("({})").format(_template(key["expression"], columns))
            if key.get("opclass"):
                k = sql.SQL("{} {}").format(k, sql.Identifier(key["opclass"]))
            if key.get("descending"):
                k = sql.SQL("{} desc").format(k)
            keys.append(k)
        stmt = sql.SQL("create {}index if not exists {} on {} using {} ({})").format(
            sql.SQL("unique " if ix.get("unique") else ""),
            sql.Identifier(ix["name"]),
            sql.Identifier(schema, table),
            sql.Identifier(method),
            sql.SQL(", ").join(keys),
        )
        if ix.get("where"):
            stmt = sql.SQL("{} where {}").format(stmt, _template(ix["where"], columns))
        out.append(stmt)
    return out


def create_tables_sql(schema: str = "public", extensions: Iterable[str] = ()) -> list[str]:
    """CREATE TABLE then CREATE INDEX statements for the six tables, as SQL strings.

    `extensions`: extensions present on the target (e.g. `("pg_trgm",)`), which
    enables the indexes that need them.
    """
    extensions = tuple(extensions)
    stmts = [create_table_statement(t, schema) for t in TABLES]
    for t in TABLES:
        stmts.extend(create_index_statements(t, schema, extensions))
    return [s.as_string(None) for s in stmts]
