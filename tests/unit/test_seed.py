"""The Odoo table definitions and the seed data generator, without a database."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from datetime import date, datetime
from decimal import Decimal
from importlib import resources

import pytest

from replicator.devtools import odoo
from replicator.devtools.generator import DataGenerator
from replicator.devtools.loader import copy_line
from replicator.devtools.seed import LOAD_ORDER

PY_TYPES = {
    "integer": int,
    "character varying": str,
    "text": str,
    "numeric": Decimal,
    "jsonb": dict,
    "boolean": bool,
    "date": date,
    "timestamp without time zone": datetime,
    "double precision": float,
}
SECTION_TYPES = ("line_section", "line_note")


@pytest.fixture(scope="module")
def gen() -> DataGenerator:
    return DataGenerator(scale=1, seed=42)


@pytest.fixture(scope="module")
def tables(gen: DataGenerator) -> dict[str, list[dict]]:
    """Every row of scale 1, as dicts (about 7,000 rows: cheap)."""
    out: dict[str, list[dict]] = {t: [] for t in odoo.TABLES}
    for t in ("res_partner", "hr_expense_sheet", "hr_expense", "project_task"):
        cols = odoo.column_names(t)
        out[t] = [dict(zip(cols, r)) for r in gen.rows(t)]
    mcols, lcols = odoo.column_names("account_move"), odoo.column_names("account_move_line")
    for move, lines in gen.moves():
        out["account_move"].append(dict(zip(mcols, move)))
        out["account_move_line"].extend(dict(zip(lcols, line)) for line in lines)
    return out


def _lines_by_move(tables: dict[str, list[dict]]) -> dict[int, list[dict]]:
    by_move: dict[int, list[dict]] = defaultdict(list)
    for line in tables["account_move_line"]:
        by_move[line["move_id"]].append(line)
    return by_move


# ---------------------------------------------------------------------------------------
# replicator.devtools.odoo: the table definitions and their DDL
# ---------------------------------------------------------------------------------------


def test_tables_hold_only_columns_primary_key_and_indexes() -> None:
    raw = json.loads(resources.files("replicator.devtools").joinpath("data/odoo17_tables.json").read_text("utf-8"))
    assert list(raw) == [
        "account_move",
        "account_move_line",
        "res_partner",
        "project_task",
        "hr_expense",
        "hr_expense_sheet",
    ]
    assert odoo.TABLE_NAMES == tuple(raw)
    for name, spec in raw.items():
        assert set(spec) == {"columns", "primary_key", "indexes"}, name
        assert spec["primary_key"] == ["id"]
        assert spec["columns"][0] == {"name": "id", "type": "integer", "not_null": True}
        for col in spec["columns"]:
            assert set(col) == {"name", "type", "not_null"}
            assert col["type"] in odoo.SQL_TYPES
        names = [c["name"] for c in spec["columns"]]
        assert len(names) == len(set(names))
        for ix in spec["indexes"]:
            assert not ix["name"].endswith("_pkey"), "the primary key is not a secondary index"
    assert len(odoo.TABLES["account_move"]["columns"]) == 65
    assert len(odoo.TABLES["account_move_line"]["columns"]) == 54


def test_create_tables_sql_quotes_identifiers_and_makes_id_a_serial() -> None:
    stmts = odoo.create_tables_sql('odd "schema"')
    creates = [s for s in stmts if s.startswith("create table")]
    assert len(creates) == 6
    first = creates[0]
    assert first.startswith('create table if not exists "odd ""schema"""."account_move" ("id" serial not null, ')
    assert '"journal_id" integer not null' in first
    assert '"send_and_print_values" jsonb' in first
    assert '"create_date" timestamp without time zone' in first
    assert first.endswith('constraint "account_move_pkey" primary key ("id"))')
    assert all(s == s.replace("CREATE", "").replace("INDEX", "") for s in stmts), "lower-case SQL"
    assert not any("references" in s or "foreign key" in s for s in stmts)


def test_trigram_indexes_need_pg_trgm() -> None:
    plain = odoo.create_tables_sql()
    with_trgm = odoo.create_tables_sql(extensions=["pg_trgm"])
    assert not any("gin_trgm_ops" in s for s in plain)
    trgm = [s for s in with_trgm if "gin_trgm_ops" in s]
    assert len(trgm) == 7
    assert len(with_trgm) - len(plain) == 7
    # expression index and partial index templates are rendered with quoted columns
    (seq3,) = [s for s in plain if '"account_move_sequence_index3"' in s]
    assert seq3.endswith('("journal_id", "sequence_prefix" desc, ("sequence_number" + 1) desc)')
    (uniq,) = [s for s in plain if '"account_move_unique_name"' in s]
    assert uniq.startswith("create unique index")
    assert uniq.endswith("""where (("state")::text = 'posted'::text) and (("name")::text <> '/'::text)""")


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------


def _first(gen: DataGenerator, table: str, n: int) -> list[tuple]:
    return list(itertools.islice(gen.rows(table), n))


@pytest.mark.parametrize("table", list(odoo.TABLES))
def test_same_seed_same_rows(table: str) -> None:
    a = _first(DataGenerator(scale=1, seed=7), table, 200)
    b = _first(DataGenerator(scale=1, seed=7), table, 200)
    assert len(a) >= 50
    assert a == b


@pytest.mark.parametrize("table", list(odoo.TABLES))
def test_different_seed_different_rows(table: str) -> None:
    a = _first(DataGenerator(scale=1, seed=7), table, 50)
    b = _first(DataGenerator(scale=1, seed=8), table, 50)
    assert a != b


def test_streams_do_not_depend_on_what_was_generated_before() -> None:
    g1 = DataGenerator(scale=1, seed=3)
    tasks_first = _first(g1, "project_task", 100)
    g2 = DataGenerator(scale=1, seed=3)
    list(g2.moves())
    list(g2.res_partner())
    assert _first(g2, "project_task", 100) == tasks_first
    assert _first(g1, "account_move_line", 100) == _first(g2, "account_move_line", 100)


def test_known_first_rows() -> None:
    """A pinned sample: a change in the generator's random stream shows up here."""
    g = DataGenerator(scale=1, seed=42)
    move = dict(zip(odoo.column_names("account_move"), next(g.rows("account_move"))))
    partner = dict(zip(odoo.column_names("res_partner"), _first(g, "res_partner", 30)[-1]))
    assert (move["id"], move["date"], move["state"]) == (1, date(2023, 1, 1), "posted")
    assert re.fullmatch(r"(INV|BILL|MISC|RINV|RBILL)/2023/(\d\d/\d{4}|\d{5})", move["name"])
    assert partner["id"] == 30
    # same values on every run and platform (random.Random with a str seed is sha512-based)
    assert _first(DataGenerator(1, 42), "res_partner", 30)[-1] == _first(g, "res_partner", 30)[-1]


# ---------------------------------------------------------------------------------------
# Counts and coverage
# ---------------------------------------------------------------------------------------


def test_scale_one_cardinalities(tables: dict[str, list[dict]]) -> None:
    n = {t: len(rows) for t, rows in tables.items()}
    assert 1000 <= n["account_move"] <= 1030
    assert 4500 <= n["account_move_line"] <= 5500
    assert n["res_partner"] == 200
    assert n["project_task"] == 500
    assert n["hr_expense"] == 200
    assert 50 <= n["hr_expense_sheet"] <= 85
    assert [r["id"] for r in tables["account_move"]] == list(range(1, n["account_move"] + 1))
    assert [r["id"] for r in tables["account_move_line"]] == list(range(1, n["account_move_line"] + 1))


@pytest.mark.parametrize("table", list(odoo.TABLES))
def test_not_null_columns_filled_and_types_right(tables: dict[str, list[dict]], table: str) -> None:
    columns = odoo.TABLES[table]["columns"]
    for row in tables[table]:
        assert len(row) == len(columns)
        for col in columns:
            value = row[col["name"]]
            if value is None:
                assert not col["not_null"], f"{table}.{col['name']} is NULL in row {row['id']}"
                continue
            expected = PY_TYPES[col["type"]]
            assert type(value) is expected, f"{table}.{col['name']} = {value!r} in row {row['id']}"
            if expected is Decimal:
                assert value.is_finite()


@pytest.mark.parametrize("table", ["account_move", "account_move_line", "res_partner", "project_task"])
def test_optional_columns_are_often_null(tables: dict[str, list[dict]], table: str) -> None:
    rows = tables[table]
    nullable = [c["name"] for c in odoo.TABLES[table]["columns"] if not c["not_null"]]
    null_share = sum(r[c] is None for r in rows for c in nullable) / (len(rows) * len(nullable))
    assert null_share > 0.25, "Odoo leaves many optional columns empty"


def test_some_columns_are_set_somewhere(tables: dict[str, list[dict]]) -> None:
    expect = {
        "account_move": [
            "narration",
            "reversed_entry_id",
            "payment_id",
            "expense_sheet_id",
            "access_token",
            "invoice_origin",
            "partner_shipping_id",
            "invoice_payment_term_id",
        ],
        "account_move_line": [
            "analytic_distribution",
            "full_reconcile_id",
            "matching_number",
            "tax_line_id",
            "date_maturity",
            "product_id",
            "expense_id",
            "payment_id",
        ],
        "res_partner": ["parent_id", "vat", "mobile", "comment", "peppol_eas", "signup_token"],
        "project_task": ["parent_id", "description", "task_properties", "date_end", "email_cc"],
        "hr_expense": ["sheet_id", "analytic_distribution", "accounting_date", "description"],
        "hr_expense_sheet": ["journal_id", "approval_date", "accounting_date"],
    }
    for table, cols in expect.items():
        for col in cols:
            assert any(r[col] is not None for r in tables[table]), f"{table}.{col} is never set"


# ---------------------------------------------------------------------------------------
# Accounting invariants
# ---------------------------------------------------------------------------------------


def test_every_move_balances(tables: dict[str, list[dict]]) -> None:
    by_move = _lines_by_move(tables)
    for move in tables["account_move"]:
        lines = by_move[move["id"]]
        assert lines, f"move {move['id']} has no lines"
        assert sum(x["debit"] for x in lines) == sum(x["credit"] for x in lines), move["id"]
        assert sum(x["balance"] for x in lines) == 0
        for x in lines:
            assert x["debit"] - x["credit"] == x["balance"]
            assert x["debit"] * x["credit"] == 0
            assert x["balance"].as_tuple().exponent == -2, "2 decimals"


def test_lines_satisfy_odoo_check_constraints(tables: dict[str, list[dict]]) -> None:
    zero = Decimal(0)
    for x in tables["account_move_line"]:
        if x["display_type"] in SECTION_TYPES:
            assert x["account_id"] is None
            assert x["debit"] == x["credit"] == x["amount_currency"] == zero
            assert x["analytic_distribution"] is None
        else:
            assert x["account_id"] is not None
            assert (x["balance"] <= 0 and x["amount_currency"] <= 0) or (
                x["balance"] >= 0 and x["amount_currency"] >= 0
            )
    for t in tables["project_task"]:
        assert not (t["project_id"] is None and t["parent_id"] is not None)
        assert not (t["recurring_task"] and t["parent_id"] is not None)
    for s in tables["hr_expense_sheet"]:
        assert s["state"] not in ("post", "done") or s["journal_id"] is not None
    for p in tables["res_partner"]:
        assert p["type"] != "contact" or p["name"] is not None


def test_invoice_totals_match_lines(tables: dict[str, list[dict]]) -> None:
    by_move = _lines_by_move(tables)
    invoices = [m for m in tables["account_move"] if m["move_type"] != "entry"]
    assert len(invoices) > 400
    for m in invoices:
        lines = by_move[m["id"]]
        products = [x for x in lines if x["display_type"] == "product"]
        taxes = [x for x in lines if x["display_type"] == "tax"]
        terms = [x for x in lines if x["display_type"] == "payment_term"]
        assert products and terms
        assert m["amount_untaxed"] == sum(x["price_subtotal"] for x in products)
        assert m["amount_untaxed"] == abs(sum(x["amount_currency"] for x in products))
        assert m["amount_tax"] == abs(sum(x["amount_currency"] for x in taxes))
        assert m["amount_total"] == m["amount_untaxed"] + m["amount_tax"]
        assert m["amount_total"] == abs(sum(x["amount_currency"] for x in terms))
        assert abs(m["amount_total_signed"]) == abs(sum(x["balance"] for x in terms))
        residual = sum(x["amount_residual_currency"] for x in terms)
        assert m["amount_residual"] == abs(residual)
        if m["payment_state"] in ("paid", "in_payment"):
            assert all(x["reconciled"] and x["full_reconcile_id"] for x in terms)
            assert m["amount_residual"] == 0
        if m["payment_state"] == "partial":
            assert 0 < m["amount_residual"] < m["amount_total"]
            assert terms[0]["matching_number"].startswith("P")


def test_line_mix_and_move_mix(tables: dict[str, list[dict]]) -> None:
    moves = tables["account_move"]
    types = Counter(m["move_type"] for m in moves)
    assert {"out_invoice", "in_invoice", "entry", "out_refund", "in_refund"} <= set(types)
    assert types["out_invoice"] > types["in_invoice"] > types["out_refund"]
    states = Counter(m["state"] for m in moves)
    assert states["posted"] > 0.85 * len(moves) and states["draft"] > 10 and states["cancel"] > 5
    display = Counter(x["display_type"] for x in tables["account_move_line"])
    assert {"product", "tax", "payment_term", "line_section", "line_note"} == set(display)
    ratio = len(tables["account_move_line"]) / len(moves)
    assert 4.5 <= ratio <= 5.5
    assert any(len(x["name"] or "") > 200 for x in tables["account_move_line"]), "some long product labels"
    assert any("\n" in (x["name"] or "") for x in tables["account_move_line"]), "multi-line labels"


def test_move_names_follow_odoo_sequences(tables: dict[str, list[dict]]) -> None:
    seen = set()
    for m in tables["account_move"]:
        if m["name"] == "/":
            assert m["state"] in ("draft", "cancel")
            assert (m["sequence_prefix"], m["sequence_number"]) == ("", 0)
            continue
        assert re.fullmatch(r"(INV|RINV|MISC|PBNK1)/20(23|24|25)/\d{5}|(BILL|RBILL)/20(23|24|25)/\d\d/\d{4}", m["name"])
        assert (
            m["name"] == f"{m['sequence_prefix']}{m['sequence_number']:0{len(m['name']) - len(m['sequence_prefix'])}d}"
        )
        assert (m["name"], m["journal_id"]) not in seen, "account_move_unique_name"
        seen.add((m["name"], m["journal_id"]))
    by_move = _lines_by_move(tables)
    for m in tables["account_move"]:
        for x in by_move[m["id"]]:
            assert (x["move_name"], x["parent_state"], x["date"], x["journal_id"]) == (
                m["name"],
                m["state"],
                m["date"],
                m["journal_id"],
            )


def test_dates_span_two_years(tables: dict[str, list[dict]]) -> None:
    dates = [m["date"] for m in tables["account_move"]]
    assert min(dates) == date(2023, 1, 1)
    assert max(dates) >= date(2024, 12, 1)
    for m in tables["account_move"]:
        assert m["write_date"] >= m["create_date"]


def test_analytic_distribution_shapes(tables: dict[str, list[dict]]) -> None:
    seen_multi_plan = False
    for x in tables["account_move_line"]:
        dist = x["analytic_distribution"]
        if dist is None:
            continue
        assert x["display_type"] == "product"
        assert sum(dist.values()) == 100.0
        assert all(re.fullmatch(r"\d+(,\d+)*", k) for k in dist)
        seen_multi_plan |= any("," in k for k in dist)
    assert seen_multi_plan


def test_references_between_tables(tables: dict[str, list[dict]]) -> None:
    partners = {p["id"]: p for p in tables["res_partner"]}
    sheets = {s["id"]: s for s in tables["hr_expense_sheet"]}
    expenses = {e["id"] for e in tables["hr_expense"]}
    moves = {m["id"] for m in tables["account_move"]}
    for p in partners.values():
        if p["parent_id"]:
            parent = partners[p["parent_id"]]
            assert p["commercial_partner_id"] == parent["commercial_partner_id"]
            assert p["complete_name"].startswith(parent["name"] + ", ")
    for m in tables["account_move"]:
        for col in ("partner_id", "commercial_partner_id", "partner_shipping_id"):
            assert m[col] is None or m[col] in partners
        if m["expense_sheet_id"] is not None:
            assert sheets[m["expense_sheet_id"]]["state"] in ("post", "done")
        if m["reversed_entry_id"] is not None:
            assert m["reversed_entry_id"] < m["id"]
    for x in tables["account_move_line"]:
        assert x["move_id"] in moves
        assert x["partner_id"] is None or x["partner_id"] in partners
        assert x["expense_id"] is None or x["expense_id"] in expenses
    for e in tables["hr_expense"]:
        assert e["sheet_id"] is None or e["sheet_id"] in sheets
    tasks = {t["id"] for t in tables["project_task"]}
    for t in tables["project_task"]:
        assert t["parent_id"] is None or (t["parent_id"] in tasks and t["parent_id"] < t["id"])
        assert t["partner_id"] is None or t["partner_id"] in partners


def test_payments_reconcile_their_invoices(tables: dict[str, list[dict]]) -> None:
    by_rec: dict[int, list[dict]] = defaultdict(list)
    for x in tables["account_move_line"]:
        if x["full_reconcile_id"] is not None:
            by_rec[x["full_reconcile_id"]].append(x)
    payments = [m for m in tables["account_move"] if m["payment_id"] is not None]
    assert len(payments) > 200
    balanced = 0
    for lines in by_rec.values():
        if len({x["move_id"] for x in lines}) > 1:
            assert sum(x["balance"] for x in lines) == 0
            balanced += 1
    assert balanced > 150


def test_large_values(tables: dict[str, list[dict]]) -> None:
    sizes = [len(t["description"].encode()) for t in tables["project_task"] if t["description"]]
    large = [s for s in sizes if s > 3000]
    assert len(large) > 30
    assert max(sizes) <= 21000
    assert any(s < 500 for s in sizes)
    narrations = [len(m["narration"]) for m in tables["account_move"] if m["narration"]]
    assert narrations and min(narrations) >= 100 and max(narrations) > 2000
    assert len(narrations) < len(tables["account_move"]) / 3, "narration is NULL on most entries"


def test_load_order_is_reference_order() -> None:
    assert set(LOAD_ORDER) == set(odoo.TABLES)
    pos = {t: i for i, t in enumerate(LOAD_ORDER)}
    assert pos["res_partner"] < pos["hr_expense_sheet"] < pos["hr_expense"] < pos["account_move_line"]
    assert pos["account_move"] < pos["account_move_line"]


# ---------------------------------------------------------------------------------------
# COPY text format
# ---------------------------------------------------------------------------------------


def test_copy_line_escapes_and_nulls() -> None:
    cols = odoo.TABLES["project_task"]["columns"]
    values = {
        "id": 5,
        "name": "a\tb\\c",
        "state": "1_done",
        "description": "<p>x</p>\r\n<p>y</p>",
        "task_properties": {"k": "line\nbreak"},
        "active": True,
        "recurring_task": False,
        "working_hours_open": Decimal("1.50"),
        "allocated_hours": 2.5,
        "create_date": datetime(2024, 1, 2, 3, 4, 5, 6),
        "date_deadline": datetime(2024, 2, 1),
    }
    row = tuple(values.get(c["name"]) for c in cols)
    fields = copy_line("project_task", row).rstrip("\n").split("\t")
    got = {c["name"]: f for c, f in zip(cols, fields)}
    assert len(fields) == len(cols)
    assert got["id"] == "5"
    assert got["name"] == "a\\tb\\\\c"
    assert got["description"] == "<p>x</p>\\r\\n<p>y</p>"
    assert got["task_properties"] == '{"k":"line\\\\nbreak"}'
    assert (got["active"], got["recurring_task"]) == ("t", "f")
    assert got["working_hours_open"] == "1.50"
    assert got["allocated_hours"] == "2.5"
    assert got["create_date"] == "2024-01-02 03:04:05.000006"
    assert got["date_deadline"] == "2024-02-01 00:00:00"
    assert got["parent_id"] == "\\N"


def test_scale_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DataGenerator(scale=0)
