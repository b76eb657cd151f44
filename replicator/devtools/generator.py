"""Deterministic row streams for the six tables (`DataGenerator`).

Everything random comes from `random.Random` instances seeded from the `seed`
argument and a fixed name per stream, so the same seed gives the same rows on every
run and platform. No foreign keys are created, but the load order would satisfy
them between the six tables.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from .entries import Entry, EntryBuilder, format_name, mark_paid, sequence_prefix
from .partners import (
    K_CHILD,
    K_COMPANY,
    K_EMPLOYEE,
    K_PERSON,
    K_SYSTEM,
    R_CUSTOMER,
    R_VENDOR,
    T_CONTACT,
    TYPE_NAMES,
    PartnerLayout,
)
from .reference import (
    COMPANY_ID,
    COMPANY_PARTNER_ID,
    COUNTRIES,
    EPOCH,
    EUR,
    EXPENSE_CITIES,
    EXPENSE_NAMES,
    EXPENSE_PRODUCTS,
    FIRST_EMPLOYEE_PARTNER,
    FIRST_NAMES,
    FUNCTIONS,
    J_BANK,
    J_MISC,
    J_PURCHASE,
    J_SALE,
    N_EMPLOYEES,
    SALESPEOPLE,
    SPAN_DAYS,
    START_DATE,
    STREETS,
    TASK_NAMES,
    USERS,
)
from .values import (
    COLS,
    COLSET,
    analytic,
    as_row,
    email_body,
    hex_digits,
    html_paragraphs,
    log_timestamp,
    money,
    rdiv,
    sentence,
    slug,
    token,
    words,
)


class DataGenerator:
    """Deterministic row streams for the six tables.

    Each stream has its own `random.Random`, seeded from (seed, stream name), so a
    stream gives the same rows whatever else was generated before. Rows are tuples
    in table column order (`replicator.devtools.odoo.column_names`), with Python values:
    int, str, bool, Decimal (numeric), date, datetime (timestamp), float (double
    precision), dict (jsonb) or None.
    """

    def __init__(self, scale: float = 1, seed: int = 42) -> None:
        if scale <= 0:
            raise ValueError("scale must be positive")
        self.scale = scale
        self.seed = seed
        self.n_moves = max(20, round(1000 * scale))
        self.n_partners = max(40, round(self.n_moves / 5))
        self.n_tasks = max(10, round(self.n_moves / 2))
        self.n_expenses = max(6, round(self.n_moves / 5))
        self.layout = PartnerLayout(seed, self.n_partners)

    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"odoo-replicator/{self.seed}/{stream}")

    def _day(self, i: int, n: int) -> date:
        return START_DATE + timedelta(days=i * SPAN_DAYS // max(1, n))

    def rows(self, table: str) -> Iterator[tuple]:
        """The rows of one table (for account_move_line this regenerates the moves too)."""
        if table == "account_move":
            return (m for m, _ in self.moves())
        if table == "account_move_line":
            return (line for _, lines in self.moves() for line in lines)
        return getattr(self, table)()

    # -- res_partner ---------------------------------------------------------------------
    def res_partner(self) -> Iterator[tuple]:
        rng = self._rng("res_partner")
        lay = self.layout
        cols, colset = COLS["res_partner"], COLSET["res_partner"]
        n = lay.n
        for pid in range(1, n + 1):
            kind = lay.kind[pid]
            parent = lay.parent[pid]
            commercial = lay.commercial(pid)
            country_id, ccode, cities, phone_prefix, lang, tz, ubl, eas = COUNTRIES[lay.country[pid]]
            zip_, city, state_id = rng.choice(cities)
            created = log_timestamp(rng, (EPOCH + timedelta(days=pid * 900 // n)).date())
            written = created + timedelta(seconds=rng.choice((0, 0, 5, 3600, 86400 * rng.randint(1, 200))))
            name = lay.name(pid)
            is_company = kind == K_COMPANY or pid == COMPANY_PARTNER_ID
            d: dict[str, Any] = {
                "id": pid,
                "create_date": created,
                "write_date": written,
                "create_uid": 1 if kind == K_SYSTEM else rng.choice(USERS),
                "write_uid": 1 if kind == K_SYSTEM else rng.choice(USERS),
                "name": name,
                "complete_name": lay.complete_name(pid),
                "parent_id": parent or None,
                "commercial_partner_id": commercial,
                "commercial_company_name": lay.name(commercial) if lay.kind[commercial] == K_COMPANY else None,
                "type": TYPE_NAMES[lay.ptype[pid]],
                "is_company": is_company,
                "active": rng.random() > 0.03 or kind == K_SYSTEM,
                "employee": False,
                "partner_share": kind not in (K_SYSTEM, K_EMPLOYEE),
                "lang": lang,
                "tz": tz,
                "color": 0,
                "message_bounce": 0,
                "country_id": country_id,
                "state_id": state_id,
                "street": f"{rng.randint(1, 250)} {rng.choice(STREETS)}",
                "zip": zip_,
                "city": city,
                "invoice_warn": "no-message",
                "customer_rank": 0,
                "supplier_rank": 0,
            }
            if kind == K_CHILD and lay.ptype[pid] == T_CONTACT:
                # a contact shares the company's address; Odoo copies it
                d["street"] = None if rng.random() < 0.3 else d["street"]
            if rng.random() < 0.2:
                d["street2"] = f"{rng.choice(('Floor', 'Box', 'Suite', 'Building'))} {rng.randint(1, 40)}"
            person = kind in (K_CHILD, K_PERSON, K_EMPLOYEE) or pid in (2, 3)
            if name is not None:
                base = slug(lay.name(commercial) or "example")
                if person:
                    first, _, last = name.partition(" ")
                    email = f"{slug(first)}.{slug(last)}@{base if kind == K_CHILD else 'example'}.com"
                else:
                    email = f"info@{base}.com"
                d["email"] = email
                d["email_normalized"] = email.lower()
            if rng.random() < 0.7:
                local = f"{rng.randint(100, 999)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}"
                d["phone"] = f"{phone_prefix} {local}"
                d["phone_sanitized"] = phone_prefix + local.replace(" ", "")
            if person and rng.random() < 0.35:
                digits = " ".join(str(rng.randint(10, 99)) for _ in range(3))
                d["mobile"] = f"{phone_prefix} {rng.randint(400, 499)} {digits}"
            if person and kind != K_EMPLOYEE and rng.random() < 0.5:
                d["function"] = rng.choice(FUNCTIONS)
            if person and rng.random() < 0.3:
                d["title"] = rng.choice((1, 2, 3))
            if kind == K_EMPLOYEE:
                d["company_id"] = COMPANY_ID
            if is_company:
                if rng.random() < 0.7:
                    d["vat"] = f"{ccode}{rng.randint(10**9, 10**10 - 1)}"
                    if ubl and kind == K_COMPANY:
                        d["ubl_cii_format"] = ubl
                        d["peppol_eas"] = eas
                        d["peppol_endpoint"] = d["vat"][2:]
                if rng.random() < 0.6:
                    d["website"] = f"https://www.{slug(name or 'example')}.com"
                if rng.random() < 0.5:
                    d["industry_id"] = rng.randint(1, 20)
                if rng.random() < 0.05:
                    d["partner_gid"] = rng.randint(1_000_000, 9_999_999)
                    d["additional_info"] = f'{{"name": "{name}", "website": "{slug(name or "x")}.com"}}'
            role = lay.role[commercial]
            if kind in (K_COMPANY, K_PERSON):
                if role & R_CUSTOMER:
                    d["customer_rank"] = rng.randint(1, 40)
                if role & R_VENDOR:
                    d["supplier_rank"] = rng.randint(1, 25)
                if rng.random() < 0.15:
                    d["ref"] = f"{'C' if role & R_CUSTOMER else 'V'}{pid:05d}"
                if rng.random() < 0.3:
                    d["user_id"] = rng.choice(SALESPEOPLE)
                if rng.random() < 0.05:
                    d["comment"] = html_paragraphs(rng, rng.choice((80, 300, 1500, 3000)))
                if rng.random() < 0.02:
                    d["invoice_warn"] = "warning"
                    d["invoice_warn_msg"] = sentence(rng)
                if rng.random() < 0.1:
                    d["debit_limit"] = money(rng.randint(10, 500) * 10000)
                if rng.random() < 0.1:
                    d["partner_latitude"] = Decimal(f"{rng.uniform(35, 60):.7f}")
                    d["partner_longitude"] = Decimal(f"{rng.uniform(-120, 20):.7f}")
                if rng.random() < 0.2:
                    d["last_time_entries_checked"] = log_timestamp(rng, START_DATE + timedelta(days=rng.randrange(SPAN_DAYS)))
            if rng.random() < 0.01:
                d["signup_type"] = "signup"
                d["signup_token"] = hex_digits(rng, 20)
                d["signup_expiration"] = created + timedelta(days=1)
            yield as_row(cols, colset, d)

    # -- expenses ------------------------------------------------------------------------
    def _expense_bundles(self) -> Iterator[tuple[dict | None, list[dict]]]:
        """Expense reports with their expenses, and unreported expenses, in date order."""
        rng = self._rng("hr_expense")
        n = self.n_expenses
        expense_id = 0
        sheet_id = 0
        attachment_id = 1000
        while expense_id < n:
            d = self._day(expense_id, n)
            employee = rng.randint(1, N_EMPLOYEES)
            emp_uid = USERS[employee % len(USERS)]
            if rng.random() < 0.15:
                k, sheet = 1, None
            else:
                k = min(n - expense_id, rng.choices((1, 2, 3, 4, 5, 6), (30, 25, 20, 12, 8, 5))[0])
                sheet_id += 1
                sheet = {"id": sheet_id}
            mode = "own_account" if rng.random() < 0.8 else "company_account"
            if sheet is not None:
                state = rng.choices(("draft", "submit", "approve", "post", "done", "cancel"), (8, 10, 10, 20, 47, 5))[0]
            else:
                state = None
            expenses = []
            for _ in range(k):
                expense_id += 1
                pid, _, typical_c, account, mileage = rng.choice(EXPENSE_PRODUCTS)
                city = rng.choice(EXPENSE_CITIES)
                edate = d - timedelta(days=rng.randint(0, 20))
                if mileage:
                    qty_c = rng.randint(10, 600) * 100
                    price_c = typical_c
                else:
                    qty_c = 100
                    price_c = max(100, int(typical_c * rng.uniform(0.3, 2.5)))
                total_c = rdiv(qty_c * price_c, 100)
                taxed = not mileage and rng.random() < 0.6
                tax_c = rdiv(total_c * 15, 115) if taxed else 0
                created = log_timestamp(rng, edate)
                e_state = {
                    None: "draft",
                    "draft": "reported",
                    "submit": "submitted",
                    "approve": "approved",
                    "post": "done",
                    "done": "done",
                    "cancel": "refused",
                }[state]
                row = {
                    "id": expense_id,
                    "employee_id": employee,
                    "company_id": COMPANY_ID,
                    "product_id": pid,
                    "product_uom_id": 1,
                    "sheet_id": sheet["id"] if sheet else None,
                    "currency_id": EUR,
                    "account_id": account,
                    "create_uid": emp_uid,
                    "write_uid": emp_uid,
                    "name": rng.choice(EXPENSE_NAMES[pid]).format(city=city),
                    "state": e_state,
                    "payment_mode": mode,
                    "date": edate,
                    "quantity": money(qty_c),
                    "price_unit": money(price_c),
                    "total_amount_currency": money(total_c),
                    "total_amount": money(total_c),
                    "untaxed_amount_currency": money(total_c - tax_c),
                    "tax_amount_currency": money(tax_c),
                    "tax_amount": money(tax_c),
                    "create_date": created,
                    "write_date": created + timedelta(days=rng.randint(0, 10)),
                }
                if rng.random() < 0.7:
                    attachment_id += 1
                    row["message_main_attachment_id"] = attachment_id
                if rng.random() < 0.4:
                    row["analytic_distribution"] = analytic(rng)
                if rng.random() < 0.1:
                    row["description"] = sentence(rng)
                expenses.append(row)
            if sheet is not None:
                total_c = sum(int(x["total_amount"].scaleb(2)) for x in expenses)
                tax_c = sum(int(x["tax_amount"].scaleb(2)) for x in expenses)
                created = max(x["create_date"] for x in expenses) + timedelta(hours=rng.randint(1, 72))
                posted = state in ("post", "done")
                accounting_date = (created + timedelta(days=rng.randint(1, 10))).date() if posted else None
                sheet.update(
                    company_id=COMPANY_ID,
                    employee_id=employee,
                    department_id=1 + employee % 5,
                    user_id=SALESPEOPLE[employee % len(SALESPEOPLE)],
                    currency_id=EUR,
                    employee_journal_id=J_PURCHASE,
                    journal_id=J_PURCHASE if mode == "own_account" else J_BANK,
                    payment_method_line_id=2 if mode == "company_account" else None,
                    create_uid=emp_uid,
                    write_uid=emp_uid,
                    name=rng.choice(
                        ("Expenses {m}", "Business trip to {c}", "Customer visit {c}", "{m} expenses")
                    ).format(m=f"{d:%B %Y}", c=rng.choice(EXPENSE_CITIES)),
                    state=state,
                    approval_state={"draft": None, "submit": "submit", "cancel": "cancel"}.get(state, "approve"),
                    payment_state="paid" if state == "done" else "not_paid",
                    accounting_date=accounting_date,
                    total_amount=money(total_c),
                    untaxed_amount=money(total_c - tax_c),
                    total_tax_amount=money(tax_c),
                    amount_residual=money(0 if state == "done" or not posted else total_c),
                    approval_date=created + timedelta(days=1, hours=rng.randint(0, 8))
                    if state in ("approve", "post", "done")
                    else None,
                    create_date=created,
                    write_date=created + timedelta(days=rng.randint(1, 15)),
                    message_main_attachment_id=next(
                        (x.get("message_main_attachment_id") for x in expenses if x.get("message_main_attachment_id")),
                        None,
                    ),
                )
                if accounting_date is not None:
                    for x in expenses:
                        x["accounting_date"] = accounting_date
            yield sheet, expenses

    def hr_expense_sheet(self) -> Iterator[tuple]:
        cols, colset = COLS["hr_expense_sheet"], COLSET["hr_expense_sheet"]
        for sheet, _ in self._expense_bundles():
            if sheet is not None:
                yield as_row(cols, colset, sheet)

    def hr_expense(self) -> Iterator[tuple]:
        cols, colset = COLS["hr_expense"], COLSET["hr_expense"]
        for _, expenses in self._expense_bundles():
            for x in expenses:
                yield as_row(cols, colset, x)

    # -- journal entries -----------------------------------------------------------------
    def moves(self) -> Iterator[tuple[tuple, list[tuple]]]:
        """Each journal entry (account_move row) with its journal items (account_move_line rows).

        Entries come in date order over two years. Each "slot" is one entry: a
        payment that has fallen due for an earlier invoice, the bill of a posted
        expense report, or a fresh invoice, bill, refund or miscellaneous entry.
        """
        rng = self._rng("account_move")
        lay = self.layout
        builder = EntryBuilder(rng, lay)
        n = self.n_moves
        mcols, mset = COLS["account_move"], COLSET["account_move"]
        lcols, lset = COLS["account_move_line"], COLSET["account_move_line"]
        counters: dict[str, int] = {}
        # payments to come: (due slot, tiebreak, partner, inbound, currency, invoice name,
        # amount, company amount, kind, reconcile id); bounded by the 40-slot horizon
        pending: list[tuple] = []
        recent: dict[bool, deque] = {True: deque(maxlen=64), False: deque(maxlen=64)}  # sale? -> (id, name)
        sheets = (
            b
            for b in self._expense_bundles()
            if b[0] is not None and b[0]["state"] in ("post", "done") and b[0]["journal_id"] == J_PURCHASE
        )
        next_sheet = next(sheets, None)
        line_id = 0
        full_rec = partial_rec = payment_no = 0
        slot = 0

        def name_for(move_type: str, journal: int, d: date) -> str:
            prefix = sequence_prefix(move_type, journal, d)
            counters[prefix] = counters.get(prefix, 0) + 1
            return format_name(prefix, counters[prefix])

        while slot < n or pending or next_sheet is not None:
            move_id = slot + 1
            d = self._day(min(slot, n - 1), n)
            if pending and (pending[0][0] <= slot or slot >= n):
                _, _, partner, inbound, currency, memo, amount_c, company_c, kind, rec_id = heapq.heappop(pending)
                payment_no += 1
                e = builder.payment(
                    d,
                    name_for("entry", J_BANK, d),
                    payment_no,
                    partner,
                    inbound,
                    amount_c,
                    company_c,
                    currency,
                    memo,
                    move_id=move_id,
                )
                counterpart = e.term_lines[0]
                if kind == "partial":
                    counterpart.update(matching_number=f"P{rec_id}")
                else:
                    counterpart.update(full_reconcile_id=rec_id, matching_number=str(rec_id))
                counterpart.update(
                    reconciled=kind != "partial", amount_residual=money(0), amount_residual_currency=money(0)
                )
                if kind == "paid":  # the outstanding line is matched with a bank statement line too
                    full_rec += 1
                    e.lines[0].update(
                        reconciled=True,
                        amount_residual=money(0),
                        amount_residual_currency=money(0),
                        full_reconcile_id=full_rec,
                        matching_number=str(full_rec),
                    )
            elif next_sheet is not None and (next_sheet[0]["accounting_date"] <= d or slot >= n):
                sheet, expenses = next_sheet
                next_sheet = next(sheets, None)
                items = [
                    (
                        x["product_id"],
                        x["name"],
                        int(x["quantity"].scaleb(2)),
                        rdiv(int(x["untaxed_amount_currency"].scaleb(2)) * 100, int(x["quantity"].scaleb(2))),
                        x["account_id"],
                        x["id"],
                        x["tax_amount"] > 0,
                    )
                    for x in expenses
                ]
                sd = sheet["accounting_date"]
                emp_partner = FIRST_EMPLOYEE_PARTNER + sheet["employee_id"] - 1
                e = builder.invoice(
                    "in_invoice",
                    sd,
                    "posted",
                    name_for("in_invoice", J_PURCHASE, sd),
                    move_id,
                    partner=(emp_partner, lay.complete_name(emp_partner)),
                    items=items,
                    expense_sheet_id=sheet["id"],
                )
                e.move["ref"] = sheet["name"]
                for line in e.lines:
                    line["ref"] = sheet["name"]
                if sheet["state"] == "done":
                    full_rec += 1
                    mark_paid(e, full_rec, None, e.total_c, e.total_company_c, "paid", sheet["write_date"])
            else:
                e = self._fresh_move(rng, builder, move_id, slot, d, name_for, recent)
                mv = e.move
                if (
                    mv["state"] == "posted"
                    and mv["move_type"] in ("out_invoice", "in_invoice")
                    and mv.get("expense_sheet_id") is None
                ):
                    recent[mv["move_type"] == "out_invoice"].append((move_id, mv["name"]))
                    r = rng.random()
                    if slot < n - 45 and r < 0.67:
                        kind = "paid" if r < 0.40 else ("in_payment" if r < 0.60 else "partial")
                        if kind == "partial" and len(e.term_lines) > 1:
                            kind = "in_payment"
                        due = slot + rng.randint(2, 40)
                        # the invoice row is written now, already reconciled with its payment to come
                        when = datetime.combine(self._day(min(due, n - 1), n), mv["create_date"].time())
                        if kind == "partial":
                            partial_rec += 1
                            rec_id = partial_rec
                            paid_c = rdiv(e.total_c * rng.randint(30, 80), 100)
                            paid_company_c = rdiv(e.total_company_c * paid_c, e.total_c) if e.total_c else 0
                            mark_paid(e, None, rec_id, paid_c, paid_company_c, kind, when)
                        else:
                            full_rec += 1
                            rec_id = full_rec
                            paid_c, paid_company_c = e.total_c, e.total_company_c
                            mark_paid(e, rec_id, None, paid_c, paid_company_c, kind, when)
                        heapq.heappush(
                            pending,
                            (
                                due,
                                move_id,
                                e.partner,
                                mv["move_type"] == "out_invoice",
                                e.currency,
                                mv["name"],
                                paid_c,
                                paid_company_c,
                                kind,
                                rec_id,
                            ),
                        )
            slot += 1
            m = e.move
            m["id"] = move_id
            lines = []
            for line in e.lines:
                line_id += 1
                line["id"] = line_id
                line["move_id"] = move_id
                lines.append(as_row(lcols, lset, line))
            yield as_row(mcols, mset, m), lines

    def _fresh_move(
        self,
        rng: random.Random,
        builder: EntryBuilder,
        move_id: int,
        slot: int,
        d: date,
        name_for: Any,
        recent: dict[bool, deque],
    ) -> Entry:
        n = self.n_moves
        r = rng.random()
        # recent entries are more often still drafts
        draft_p = 0.05 if slot < n - n // 20 else 0.35
        state = "draft" if rng.random() < draft_p else ("cancel" if rng.random() < 0.03 else "posted")
        if r < 0.62:
            move_type = "out_invoice" if r < 0.42 else "in_invoice"
        elif r < 0.68:
            move_type = "out_refund" if r < 0.655 else "in_refund"
        else:
            move_type = "entry"
        if move_type.endswith("refund") and not recent[move_type == "out_refund"]:
            move_type = move_type.replace("refund", "invoice")  # nothing to reverse yet
        # drafts are named '/'; so are half the cancelled entries (cancelled before posting)
        unnamed = state == "draft" or (state == "cancel" and rng.random() < 0.5)
        if move_type == "entry":
            return builder.misc(d, state, "/" if unnamed else name_for("entry", J_MISC, d), move_id=move_id)
        journal = J_SALE if move_type.startswith("out") else J_PURCHASE
        e = builder.invoice(move_type, d, state, "/" if unnamed else name_for(move_type, journal, d), move_id)
        sale = move_type.startswith("out")
        if move_type.endswith("refund") and recent[sale]:
            rid, rname = rng.choice(recent[sale])
            reason = rng.choice(("wrong quantity", "damaged goods", "price correction", "duplicate"))
            e.move["reversed_entry_id"] = rid
            e.move["ref"] = f"Reversal of: {rname}, {reason}"
            for line in e.lines:
                line["ref"] = e.move["ref"]
        return e

    # -- project_task --------------------------------------------------------------------
    def project_task(self) -> Iterator[tuple]:
        rng = self._rng("project_task")
        cols, colset = COLS["project_task"], COLSET["project_task"]
        n = self.n_tasks
        lay = self.layout
        stages = (  # stage id, state
            (1, "01_in_progress"),
            (2, "01_in_progress"),
            (3, "02_changes_requested"),
            (4, "03_approved"),
            (5, "1_done"),
            (6, "1_canceled"),
            (7, "04_waiting_normal"),
        )
        parents: deque[int] = deque(maxlen=50)
        for tid in range(1, n + 1):
            d = self._day(tid - 1, n)
            created = log_timestamp(rng, d)
            stage_id, state = rng.choices(stages, (20, 15, 5, 10, 35, 5, 10))[0]
            private = rng.random() < 0.05
            project_id = None if private else rng.randint(1, 8)
            parent = None
            if not private and parents and rng.random() < 0.15:
                parent = rng.choice(parents)
            recurring = parent is None and not private and rng.random() < 0.03
            last_stage = created + timedelta(days=rng.randint(0, 60), seconds=rng.randint(0, 86399))
            t: dict[str, Any] = {
                "id": tid,
                "sequence": 10,
                "stage_id": None if private else stage_id,
                "project_id": project_id,
                "company_id": None if private else COMPANY_ID,
                "parent_id": parent,
                "create_uid": rng.choice(USERS),
                "write_uid": rng.choice(USERS),
                "name": rng.choice(TASK_NAMES) + (f" ({words(rng, 2)})" if rng.random() < 0.4 else ""),
                "priority": "1" if rng.random() < 0.2 else "0",
                "state": state,
                "active": state != "1_canceled" or rng.random() < 0.5,
                "display_in_project": parent is None or rng.random() < 0.3,
                "recurring_task": recurring,
                "create_date": created,
                "write_date": max(created, last_stage) + timedelta(seconds=rng.randint(0, 3600)),
                "date_last_stage_update": last_stage,
                "color": rng.choice((0, 0, 0, 0, 1, 2, 4, 10)),
                "rating_last_value": 0.0,
                "allocated_hours": rng.choice((0.0, 0.0, 1.0, 2.5, 4.0, 8.0, 16.0, 40.0)),
            }
            if rng.random() < 0.6:
                t["partner_id"] = rng.choice(lay.customers)
            if project_id and rng.random() < 0.3:
                t["milestone_id"] = project_id * 10 + rng.randint(1, 4)
            if project_id and rng.random() < 0.5:
                t["analytic_account_id"] = project_id
            if recurring:
                t["recurrence_id"] = tid
            if rng.random() < 0.05:
                t["email_cc"] = ", ".join(
                    f"{slug(rng.choice(FIRST_NAMES))}@example.com" for _ in range(rng.randint(1, 3))
                )
            if rng.random() < 0.1:
                t["access_token"] = token(rng)
            if rng.random() < 0.05:
                t["task_properties"] = {hex_digits(rng, 16): rng.choice(("foo", "bar", True, 3, "2024-05-01"))}
            if rng.random() < 0.02:
                t["displayed_image_id"] = rng.randint(5000, 9000)
            r = rng.random()
            if r < 0.12:
                t["description"] = email_body(rng, rng.randint(3000, 20000))
            elif r < 0.55:
                t["description"] = html_paragraphs(rng, rng.randint(30, 400))
            assigned = rng.random() < 0.8
            if assigned:
                t["date_assign"] = created + timedelta(hours=rng.randint(0, 48))
                t["working_hours_open"] = money(rng.randint(0, 4000))
                t["working_days_open"] = round(rng.uniform(0, 5), 2)
            if state in ("1_done", "1_canceled"):
                t["date_end"] = last_stage
                t["working_hours_close"] = money(rng.randint(100, 40000))
                t["working_days_close"] = round(rng.uniform(0.1, 50), 2)
                if rng.random() < 0.2:
                    t["rating_last_value"] = float(rng.choice((1, 3, 5)))
            if rng.random() < 0.4:
                t["date_deadline"] = datetime.combine(
                    d + timedelta(days=rng.randint(1, 60)), datetime.min.time()
                ) + timedelta(hours=rng.choice((0, 9, 17)))
            if project_id and parent is None and not recurring:
                parents.append(tid)
            yield as_row(cols, colset, t)
