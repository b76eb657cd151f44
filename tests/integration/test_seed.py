"""seed() and workload() against a real PostgreSQL source (each source version)."""

from __future__ import annotations

import psycopg
import pytest
from plugins.servers import ONE_VERSION

from replicator.devtools import odoo
from replicator.devtools.seed import seed
from replicator.devtools.workload import workload

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


SIX = sorted(odoo.TABLES)

# Odoo 17's CHECK constraints on these tables, as "rows that violate it" queries
# (the seed does not create them; the data must satisfy them anyway).
_ACCOUNTABLE = "display_type not in ('line_section', 'line_note')"
VIOLATIONS = {
    "account_move_line_check_accountable_required_fields": (
        f"select count(*) from {{s}}.account_move_line where {_ACCOUNTABLE} and account_id is null"
    ),
    "account_move_line_check_credit_debit": (
        f"select count(*) from {{s}}.account_move_line where {_ACCOUNTABLE} and credit * debit <> 0"
    ),
    "account_move_line_check_amount_currency_balance_sign": (
        f"select count(*) from {{s}}.account_move_line where {_ACCOUNTABLE} and not "
        "((balance <= 0 and amount_currency <= 0) or (balance >= 0 and amount_currency >= 0))"
    ),
    "account_move_line_check_non_accountable_fields_null": (
        f"select count(*) from {{s}}.account_move_line where not {_ACCOUNTABLE} and not "
        "(amount_currency = 0 and debit = 0 and credit = 0 and account_id is null)"
    ),
    "res_partner_check_name": "select count(*) from {s}.res_partner where type = 'contact' and name is null",
    "project_task_private_task_has_no_parent": (
        "select count(*) from {s}.project_task where project_id is null and parent_id is not null"
    ),
    "hr_expense_sheet_journal_id_required_posted": (
        "select count(*) from {s}.hr_expense_sheet where state in ('post', 'done') and journal_id is null"
    ),
}
UNBALANCED = (
    "select count(*) from (select move_id from {s}.account_move_line group by move_id "
    "having sum(debit) <> sum(credit) or sum(balance) <> 0) x"
)


def _counts(db, schema: str = "public") -> dict[str, int]:
    return {t: db.fetchall(f"select count(*) from {schema}.{t}")[0][0] for t in SIX}


def test_seed_then_workload(source_db) -> None:
    counts = seed(source_db.dsn, scale=1)
    assert sorted(counts) == SIX
    assert counts == _counts(source_db)
    assert 1000 <= counts["account_move"] <= 1030
    assert 4500 <= counts["account_move_line"] <= 5500
    assert counts["res_partner"] == 200
    assert counts["project_task"] == 500
    assert counts["hr_expense"] == 200
    assert 50 <= counts["hr_expense_sheet"] <= 85

    # accounting invariants and Odoo's CHECK constraints
    assert source_db.fetchall(UNBALANCED.format(s="public")) == [(0,)]
    for name, query in VIOLATIONS.items():
        assert source_db.fetchall(query.format(s="public")) == [(0,)], name

    # the posted-name uniqueness index exists (created after the load, so the data satisfies it)
    index_count = source_db.fetchall(
        "select count(*) from pg_indexes where schemaname = 'public' and tablename = any(%s)", (SIX,)
    )[0][0]
    secondary = [s for s in odoo.create_tables_sql() if not s.startswith("create table")]
    assert index_count == len(secondary) + 6  # and a primary key each

    # large task descriptions, stored out of line
    big, stored_big = source_db.fetchall(
        "select count(*) filter (where octet_length(description) > 2048), "
        "count(*) filter (where pg_column_size(description) > 2048) from project_task"
    )[0]
    assert big >= 30 and stored_big >= 20
    toast_bytes = source_db.fetchall(
        "select pg_relation_size(reltoastrelid) from pg_class where oid = 'public.project_task'::regclass"
    )[0][0]
    assert toast_bytes > 100_000

    # the publication covers the six tables
    published = source_db.fetchall(
        "select tablename from pg_publication_tables where pubname = 'odoo_pub_scout' order by 1"
    )
    assert [r[0] for r in published] == SIX

    # sequences continue after the seeded ids
    new_id = source_db.fetchall(
        "insert into res_partner (name, complete_name, type, active) values ('New', 'New', 'contact', true) "
        "returning id"
    )[0][0]
    assert new_id == counts["res_partner"] + 1

    # an Odoo-like write mix runs on top of it
    done = workload(source_db.dsn, transactions=100, seed=1)
    assert done["transactions"] + done["rolled_back"] + done["skipped"] + done["conflicts"] == 100
    assert done["conflicts"] == 0
    assert done["transactions"] >= 90
    for op in ("create_invoice", "post_draft", "register_payment", "edit_task_stage"):
        assert done.get(op, 0) > 0, (op, done)
    assert source_db.fetchall(UNBALANCED.format(s="public")) == [(0,)]
    for name, query in VIOLATIONS.items():
        assert source_db.fetchall(query.format(s="public")) == [(0,)], name
    after = _counts(source_db)
    assert after["account_move"] > counts["account_move"]
    # posted names stay unique (the partial unique index would have failed the posting otherwise)
    dup = source_db.fetchall(
        "select count(*) from (select name, journal_id from account_move where state = 'posted' "
        "group by 1, 2 having count(*) > 1) x"
    )
    assert dup == [(0,)]


def test_same_seed_same_data_in_other_schemas(source_db) -> None:
    digest = "select md5(string_agg(t::text, '|' order by t.id)) from {s}.{t} t"
    a = seed(source_db.dsn, scale=0.05, seed=5, schema="seed a", publication=None)
    b = seed(source_db.dsn, scale=0.05, seed=5, schema="seed_b", publication="pub_b")
    seed(source_db.dsn, scale=0.05, seed=6, schema="seed_c", publication=None)
    assert a == b
    for t in SIX:
        da = source_db.fetchall(digest.format(s='"seed a"', t=t))
        db = source_db.fetchall(digest.format(s="seed_b", t=t))
        dc = source_db.fetchall(digest.format(s="seed_c", t=t))
        assert da == db, t
        assert da != dc, t
    assert source_db.fetchall("select count(*) from pg_publication where pubname = 'odoo_pub_scout'") == [(0,)]
    assert source_db.fetchall(
        "select count(*) from pg_publication_tables where pubname = 'pub_b' and schemaname = 'seed_b'"
    ) == [(6,)]


def test_seed_refuses_tables_with_rows(source_db) -> None:
    seed(source_db.dsn, scale=0.02, publication=None)
    with pytest.raises(ValueError, match="already has rows"):
        seed(source_db.dsn, scale=0.02, publication=None)


def test_workload_needs_a_bound(source_db) -> None:
    with pytest.raises(ValueError):
        workload(source_db.dsn)
    with psycopg.connect(source_db.dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
