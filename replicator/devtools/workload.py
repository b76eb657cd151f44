"""An Odoo-like OLTP write mix against a seeded database (`workload()`).

Invoices created as drafts, posting that rewrites every line of the entry,
payments, partner rank counters, task edits that do or do not touch a large
(TOASTed) description, deleted drafts and the occasional rolled-back transaction.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .entries import EntryBuilder, format_name, sequence_prefix
from .odoo import TABLES
from .reference import COMPANY_PARTNER_ID, FIRST_EMPLOYEE_PARTNER, J_BANK, N_EMPLOYEES, USERS
from .values import COLS, ZERO, email_body, html_paragraphs

__all__ = ["WORKLOAD_MIX", "workload"]

_LOCK_BASE = 0x0D00_0000  # advisory lock keys: base + journal id (sequence numbers)

WORKLOAD_MIX = (
    ("create_invoice", 28),
    ("post_draft", 20),
    ("register_payment", 14),
    ("partner_rank", 10),
    ("edit_task", 16),
    ("delete_draft", 5),
    ("approve_expense", 4),
    ("rollback", 3),
)


class _Workload:
    def __init__(self, conn: psycopg.Connection, rng: random.Random, schema: str) -> None:
        self.conn = conn
        self.rng = rng
        self.schema = schema
        self.t = {name: sql.Identifier(schema, name) for name in TABLES}
        self._cache: dict[Any, bytes] = {}
        # partners are read from the database, so the builder needs no layout
        self.builder = EntryBuilder(rng, None)
        self.max_ids = {}
        for name in ("account_move", "project_task", "res_partner", "hr_expense_sheet"):
            q = sql.SQL("select coalesce(max(id), 0) from {}").format(self.t[name])
            self.max_ids[name] = conn.execute(q).fetchone()[0]

    def _q(self, key: Any, text: str, *tables: str) -> bytes:
        """`text` with `{}` replaced by the schema-qualified tables, composed once per key."""
        q = self._cache.get(key)
        if q is None:
            composed = sql.SQL(text).format(*(self.t[t] for t in tables))  # type: ignore[arg-type]
            q = self._cache[key] = composed.as_bytes(self.conn)
        return q

    def _run(self, key: str, text: str, table: str, params: Any = None) -> psycopg.Cursor:
        return self.conn.execute(self._q(key, text, table), params)

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _now() -> datetime:
        # Odoo's log-access columns: now() at time zone 'UTC'
        return datetime.now(UTC).replace(tzinfo=None)

    def _insert_sql(self, table: str, cols: tuple[str, ...]) -> bytes:
        key = ("insert", table, cols)
        q = self._cache.get(key)
        if q is None:
            composed = sql.SQL("insert into {} ({}) values ({}) returning id").format(
                self.t[table],
                sql.SQL(", ").join(map(sql.Identifier, cols)),
                sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            )
            q = self._cache[key] = composed.as_bytes(self.conn)
        return q

    def _insert(self, table: str, d: dict) -> int:
        """Insert the row (id from the sequence, NULL columns left to their default); its id."""
        cols = tuple(c for c in COLS[table] if c != "id" and d.get(c) is not None)
        vals = [Jsonb(d[c]) if isinstance(d[c], dict) else d[c] for c in cols]
        return self.conn.execute(self._insert_sql(table, cols), vals).fetchone()[0]

    def _insert_lines(self, move_id: int, lines: list[dict]) -> None:
        cols = tuple(c for c in COLS["account_move_line"] if c != "id")
        params = []
        for line in lines:
            line["move_id"] = move_id
            params.append([Jsonb(line[c]) if isinstance(line.get(c), dict) else line.get(c) for c in cols])
        with self.conn.cursor() as cur:
            cur.executemany(self._insert_sql("account_move_line", cols), params)

    def _pick(self, table: str, where: str, params: tuple = ()) -> tuple | None:
        """A row matching `where` (SQL text), from a random id onwards (wrapping around)."""
        top = max(1, self.max_ids.get(table, 1))
        start = self.rng.randint(1, top)
        q = self._q(
            ("pick", table, where), f"select * from {{}} where id >= %s and ({where}) order by id limit 1", table
        )
        for lo in (start, 1):
            row = self.conn.execute(q, (lo, *params)).fetchone()
            if row is not None:
                return row
        return None

    def _lock(self, move_id: int, condition: str) -> bool:
        """Lock the move row if it still matches `condition` (another workload may have got there first)."""
        q = self._q(
            ("lock", condition), f"select 1 from {{}} where id = %s and ({condition}) for update", "account_move"
        )
        return self.conn.execute(q, (move_id,)).fetchone() is not None

    def _next_name(self, move_type: str, journal: int, d: date) -> tuple[str, str, int]:
        """The next sequence number of the journal, like Odoo's sequence.mixin (serialized per journal)."""
        self.conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK_BASE + journal,))
        prefix = sequence_prefix(move_type, journal, d)
        last = self._run(
            "last_number",
            "select coalesce(max(sequence_number), 0) from {} where journal_id = %s and sequence_prefix = %s",
            "account_move",
            (journal, prefix),
        ).fetchone()[0]
        return format_name(prefix, last + 1), prefix, last + 1

    def _partner(self) -> tuple[int, str]:
        """A commercial partner (company or stand-alone person): (id, complete name)."""
        row = self._pick("res_partner", "parent_id is null and id >= %s", (FIRST_EMPLOYEE_PARTNER + N_EMPLOYEES,))
        if row is None:
            row = self._pick("res_partner", "true")
        if row is None:
            return COMPANY_PARTNER_ID, "YourCompany"
        p = dict(zip(COLS["res_partner"], row))
        return p["id"], p["complete_name"] or p["name"] or ""

    # -- operations ----------------------------------------------------------------------
    def create_invoice(self) -> str:
        """A draft invoice or bill: the move and its ~5 lines in one transaction."""
        rng = self.rng
        now = self._now()
        move_type = rng.choices(("out_invoice", "in_invoice", "out_refund"), (70, 25, 5))[0]
        uid = rng.choice(USERS)
        e = self.builder.invoice(
            move_type, now.date(), "draft", "/", None, created=now, written=now, uid=uid, partner=self._partner()
        )
        move_id = self._insert("account_move", e.move)
        self._insert_lines(move_id, e.lines)
        self.max_ids["account_move"] = max(self.max_ids["account_move"], move_id)
        return "create_invoice"

    def post_draft(self) -> str:
        """Posting: name from the journal sequence, and every line rewritten; the partner's rank counter."""
        draft = "state = 'draft' and move_type <> 'entry'"
        row = self._pick("account_move", draft)
        if row is None:
            return self.create_invoice()
        m = dict(zip(COLS["account_move"], row))
        if not self._lock(m["id"], draft):
            return "skipped"
        now = self._now()
        uid = self.rng.choice(USERS)
        name, prefix, number = self._next_name(m["move_type"], m["journal_id"], m["date"])
        sale = m["move_type"].startswith("out")
        self._run(
            "post_move",
            "update {} set state = 'posted', name = %s, sequence_prefix = %s, sequence_number = %s, "
            "posted_before = true, payment_reference = coalesce(payment_reference, %s), "
            "invoice_date = coalesce(invoice_date, date), write_date = %s, write_uid = %s where id = %s",
            "account_move",
            (name, prefix, number, name if sale else None, now, uid, m["id"]),
        )
        # posting rewrites every line: stored related copies of the move (name, state), labels
        self._run(
            "post_lines",
            "update {} set parent_state = 'posted', move_name = %s, "
            "name = case when display_type = 'payment_term' then %s else name end, "
            "write_date = %s, write_uid = %s where move_id = %s",
            "account_move_line",
            (name, name if sale else (m["ref"] or ""), now, uid, m["id"]),
        )
        if m["commercial_partner_id"]:
            rank = "customer_rank" if sale else "supplier_rank"
            self._run(
                ("rank", rank),
                f"update {{}} set {rank} = coalesce({rank}, 0) + 1, write_date = %s where id = %s",
                "res_partner",
                (now, m["commercial_partner_id"]),
            )
        return "post_draft"

    def register_payment(self) -> str:
        """A payment entry (2 lines) reconciled with a posted invoice's payment-term lines."""
        unpaid = "state = 'posted' and payment_state = 'not_paid' and move_type in ('out_invoice', 'in_invoice')"
        row = self._pick("account_move", unpaid)
        if row is None:
            return "skipped"
        m = dict(zip(COLS["account_move"], row))
        if not self._lock(m["id"], unpaid):
            return "skipped"
        now = self._now()
        uid = self.rng.choice(USERS)
        inbound = m["move_type"] == "out_invoice"
        name, _, _ = self._next_name("entry", J_BANK, now.date())
        amount_c = int(m["amount_total"].scaleb(2))
        company_c = abs(int(m["amount_total_signed"].scaleb(2)))
        last_payment = self._run("last_payment", "select max(payment_id) from {}", "account_move").fetchone()[0]
        last_rec = self._run("last_reconcile", "select max(full_reconcile_id) from {}", "account_move_line").fetchone()[
            0
        ]
        payment_id, full_rec = (last_payment or 0) + 1, (last_rec or 0) + 1
        partner = m["commercial_partner_id"] or m["partner_id"] or self._partner()[0]
        e = self.builder.payment(
            now.date(), name, payment_id, partner, inbound, amount_c, company_c, m["currency_id"], m["name"],
            created=now, uid=uid,
        )  # fmt: skip
        e.term_lines[0].update(
            reconciled=True,
            amount_residual=ZERO,
            amount_residual_currency=ZERO,
            full_reconcile_id=full_rec,
            matching_number=str(full_rec),
        )
        move_id = self._insert("account_move", e.move)
        self._insert_lines(move_id, e.lines)
        self.max_ids["account_move"] = max(self.max_ids["account_move"], move_id)
        self._run(
            "reconcile_lines",
            "update {} set reconciled = true, amount_residual = 0, amount_residual_currency = 0, "
            "full_reconcile_id = %s, matching_number = %s, write_date = %s, write_uid = %s "
            "where move_id = %s and display_type = 'payment_term'",
            "account_move_line",
            (full_rec, str(full_rec), now, uid, m["id"]),
        )
        self._run(
            "paid_move",
            "update {} set amount_residual = 0, amount_residual_signed = 0, payment_state = 'in_payment', "
            "write_date = %s, write_uid = %s where id = %s",
            "account_move",
            (now, uid, m["id"]),
        )
        return "register_payment"

    def partner_rank(self) -> str:
        """The customer_rank counter that invoicing increments."""
        n = self._run(
            "partner_rank",
            "update {} set customer_rank = coalesce(customer_rank, 0) + 1, write_date = %s, write_uid = %s "
            "where id = %s",
            "res_partner",
            (self._now(), self.rng.choice(USERS), self._partner()[0]),
        ).rowcount
        return "partner_rank" if n else "skipped"

    def edit_task(self) -> str:
        """A stage change (description untouched), a new description, or other small edits."""
        rng = self.rng
        now = self._now()
        uid = rng.choice(USERS)
        r = rng.random()
        if r < 0.55:
            # a stage change: the (often large, TOASTed) description is not touched
            row = self._pick("project_task", "octet_length(description) > 2000") if rng.random() < 0.6 else None
            row = row or self._pick("project_task", "true")
            if row is None:
                return "skipped"
            stage_id, state = rng.choice(
                ((1, "01_in_progress"), (4, "03_approved"), (5, "1_done"), (7, "04_waiting_normal"))
            )
            self._run(
                "task_stage",
                "update {} set stage_id = %s, state = %s, date_last_stage_update = %s, date_end = %s, "
                "write_date = %s, write_uid = %s where id = %s",
                "project_task",
                (stage_id, state, now, now if state == "1_done" else None, now, uid, row[0]),
            )
            return "edit_task_stage"
        row = self._pick("project_task", "true")
        if row is None:
            return "skipped"
        if r < 0.8:
            if rng.random() < 0.5:
                desc = email_body(rng, rng.randint(3000, 20000))
            else:
                desc = html_paragraphs(rng, rng.randint(30, 400))
            self._run(
                "task_description",
                "update {} set description = %s, write_date = %s, write_uid = %s where id = %s",
                "project_task",
                (desc, now, uid, row[0]),
            )
            return "edit_task_description"
        deadline = now + timedelta(days=rng.randint(1, 30))
        self._run(
            "task_other",
            "update {} set priority = %s, allocated_hours = %s, date_deadline = %s, write_date = %s, "
            "write_uid = %s where id = %s",
            "project_task",
            (rng.choice(("0", "1")), rng.choice((0.0, 2.0, 8.0)), deadline, now, uid, row[0]),
        )
        return "edit_task_other"

    def delete_draft(self) -> str:
        """A draft entry deleted with its lines."""
        draft = "state = 'draft'"
        row = self._pick("account_move", draft)
        if row is None or not self._lock(row[0], draft):
            return "skipped"
        # Odoo deletes the lines through ON DELETE CASCADE; there is no foreign key here
        self._run("delete_lines", "delete from {} where move_id = %s", "account_move_line", (row[0],))
        self._run("delete_move", "delete from {} where id = %s", "account_move", (row[0],))
        return "delete_draft"

    def approve_expense(self) -> str:
        """An expense report submitted or approved, with its expenses."""
        row = self._pick("hr_expense_sheet", "state in ('draft', 'submit')")
        if row is None:
            return "skipped"
        sheet = dict(zip(COLS["hr_expense_sheet"], row))
        now = self._now()
        uid = self.rng.choice(USERS)
        if sheet["state"] == "draft":
            new_state, e_state, approval_date = "submit", "submitted", sheet["approval_date"]
        else:
            new_state, e_state, approval_date = "approve", "approved", now
        self._run(
            "sheet_state",
            "update {} set state = %s, approval_state = %s, approval_date = %s, write_date = %s, "
            "write_uid = %s where id = %s",
            "hr_expense_sheet",
            (new_state, new_state, approval_date, now, uid, sheet["id"]),
        )
        self._run(
            "expense_state",
            "update {} set state = %s, write_date = %s, write_uid = %s where sheet_id = %s",
            "hr_expense",
            (e_state, now, uid, sheet["id"]),
        )
        return "approve_expense"


def workload(
    dsn: str,
    seconds: float | None = None,
    transactions: int | None = None,
    seed: int = 42,
    schema: str = "public",
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Run an Odoo-like OLTP write mix against a seeded database.

    Stops after `seconds`, after `transactions` attempts, or when `stop` is set,
    whichever comes first (at least one bound is required); it can run in a thread.
    Returns counts: one per operation kind ("create_invoice", "post_draft",
    "register_payment", "partner_rank", "edit_task_stage" (a large description left
    untouched: unchanged TOAST), "edit_task_description", "edit_task_other",
    "delete_draft", "approve_expense"), plus "transactions" (committed writes),
    "rolled_back" (deliberately), "skipped" (nothing to operate on) and "conflicts"
    (deadlocks or lock failures, rolled back: possible when several workloads run
    at once). transactions + rolled_back + skipped + conflicts = attempts.
    """
    if seconds is None and transactions is None and stop is None:
        raise ValueError("workload needs a bound: seconds, transactions or stop")
    rng = random.Random(f"odoo-replicator/{seed}/workload")
    ops, weights = zip(*WORKLOAD_MIX)
    counts: dict[str, int] = {"transactions": 0, "rolled_back": 0, "skipped": 0, "conflicts": 0}
    deadline = None if seconds is None else time.monotonic() + seconds
    with psycopg.connect(dsn, application_name="odoo-replicator-workload") as conn:
        w = _Workload(conn, rng, schema)
        conn.commit()
        done = 0
        while True:
            if transactions is not None and done >= transactions:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if stop is not None and stop.is_set():
                break
            op = rng.choices(ops, weights)[0]
            done += 1
            try:
                with conn.transaction() as tx:
                    if op == "rollback":
                        # an Odoo request that fails after writing (a constraint, a user error...)
                        w.create_invoice()
                        raise psycopg.Rollback(tx)
                    result = getattr(w, op)()
            except (
                psycopg.errors.SerializationFailure,
                psycopg.errors.DeadlockDetected,
                psycopg.errors.LockNotAvailable,
                psycopg.errors.UniqueViolation,
            ):
                counts["conflicts"] += 1
                continue
            if op == "rollback":
                counts["rolled_back"] += 1
                continue
            if result == "skipped":
                counts["skipped"] += 1
                continue
            counts[result] = counts.get(result, 0) + 1
            counts["transactions"] += 1
    return counts
