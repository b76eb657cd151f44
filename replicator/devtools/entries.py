"""Odoo-like journal entries (account_move + account_move_line as column dicts).

`EntryBuilder` makes invoices, bills, refunds, payments and miscellaneous entries
with balanced lines; `mark_paid` reconciles an invoice with its payment. Used by
the generator (explicit ids) and by the workload (ids from the sequences).
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from typing import Any

from .partners import K_COMPANY, T_DELIVERY, T_INVOICE, PartnerLayout
from .reference import (
    ACC_EXPENSES,
    ACC_OUT_PAYMENTS,
    ACC_OUT_RECEIPTS,
    ACC_PAYABLE,
    ACC_RECEIVABLE,
    ACC_SALES,
    ACC_SERVICES,
    ACC_TAX_PAID,
    ACC_TAX_RECEIVED,
    ACCOUNT_ROOT,
    COMPANY_ID,
    EUR,
    J_BANK,
    J_CASH,
    J_MISC,
    J_PURCHASE,
    J_SALE,
    MISC_TEMPLATES,
    NOTE_TEXTS,
    PAYMENT_TERMS,
    PRODUCTS,
    PURCHASE_TAXES,
    RECONCILABLE,
    SALE_TAXES,
    SALESPEOPLE,
    SECTION_NAMES,
    USD,
    USERS,
)
from .values import (
    ZERO,
    analytic,
    html_paragraphs,
    log_timestamp,
    money,
    money_cached,
    rdiv,
    sentence,
    slug,
    token,
)

_PRODUCT_SIGN = {"out_invoice": -1, "in_invoice": 1, "out_refund": 1, "in_refund": -1}
_TOTAL_SIGN = {"out_invoice": 1, "in_invoice": -1, "out_refund": -1, "in_refund": 1}
_PREFIX = {"out_invoice": "INV", "out_refund": "RINV", "in_invoice": "BILL", "in_refund": "RBILL"}


def sequence_prefix(move_type: str, journal_id: int, d: date) -> str:
    """The sequence prefix of a posted entry: 'INV/2024/', 'BILL/2024/10/', 'PBNK1/2024/'..."""
    if move_type in ("in_invoice", "in_refund"):
        return f"{_PREFIX[move_type]}/{d.year}/{d.month:02d}/"
    if move_type in _PREFIX:
        return f"{_PREFIX[move_type]}/{d.year}/"
    return {J_BANK: "PBNK1", J_CASH: "CSH1", J_MISC: "MISC"}.get(journal_id, "MISC") + f"/{d.year}/"


def format_name(prefix: str, number: int) -> str:
    return f"{prefix}{number:0{4 if prefix.count('/') == 3 else 5}d}"


class Entry:
    """One journal entry being built: the move dict, its line dicts, and what a payment needs."""

    __slots__ = ("currency", "lines", "move", "move_type", "partner", "term_lines", "total_c", "total_company_c")

    def __init__(self, move: dict, lines: list[dict]) -> None:
        self.move = move
        self.lines = lines
        self.term_lines: list[dict] = []
        self.total_c = 0
        self.total_company_c = 0
        self.partner = move.get("commercial_partner_id")
        self.move_type = move["move_type"]
        self.currency = move["currency_id"]


class EntryBuilder:
    """Builds Odoo-like journal entries (move + lines as column dicts) from a random stream.

    Shared by the seed generator (explicit ids) and the workload (ids from the
    sequences: `move_id`/line ids left None).
    """

    def __init__(self, rng: random.Random, layout: PartnerLayout | None) -> None:
        self.rng = rng
        self.layout = layout

    # -- common ------------------------------------------------------------------------
    @staticmethod
    def _line_base(move: dict, **kw: Any) -> dict:
        """What every line of the move shares (stored related copies of the move, log access)."""
        base = {
            "move_id": move.get("id"),
            "journal_id": move["journal_id"],
            "company_id": COMPANY_ID,
            "company_currency_id": EUR,
            "currency_id": move["currency_id"],
            "move_name": move["name"],
            "parent_state": move["state"],
            "ref": move.get("ref"),
            "date": move["date"],
            "invoice_date": move.get("invoice_date"),
            "create_uid": move["create_uid"],
            "write_uid": move["write_uid"],
            "create_date": move["create_date"],
            "write_date": move["write_date"],
            "blocked": False,
            "reconciled": False,
            "tax_tag_invert": False,
        }
        base.update(kw)
        return base

    @staticmethod
    def _new_line(base: dict, seq: int, **kw: Any) -> dict:
        line = base.copy()
        line["sequence"] = seq
        line.update(kw)
        return line

    @staticmethod
    def _amounts(line: dict, balance_c: int, amount_currency_c: int) -> None:
        b = money(balance_c)
        a = b if amount_currency_c == balance_c else money(amount_currency_c)
        line["balance"] = b
        if balance_c > 0:
            line["debit"], line["credit"] = b, ZERO
        elif balance_c < 0:
            line["debit"], line["credit"] = ZERO, -b
        else:
            line["debit"] = line["credit"] = ZERO
        line["amount_currency"] = a
        if line.get("account_id") in RECONCILABLE:
            line["amount_residual"], line["amount_residual_currency"] = b, a
        else:
            line["amount_residual"] = line["amount_residual_currency"] = ZERO

    def _move_base(
        self,
        move_id: int | None,
        move_type: str,
        journal_id: int,
        d: date,
        state: str,
        name: str,
        created: datetime,
        written: datetime,
        uid: int,
    ) -> dict:
        if state == "draft" or name == "/":
            prefix, number = "", 0
        else:
            prefix, _, num = name.rpartition("/")
            prefix, number = prefix + "/", int(num)
        return {
            "id": move_id,
            "sequence_prefix": prefix,
            "sequence_number": number,
            "journal_id": journal_id,
            "company_id": COMPANY_ID,
            "currency_id": EUR,
            "create_uid": uid,
            "write_uid": uid,
            "name": name,
            "state": state,
            "move_type": move_type,
            "auto_post": "no",
            "date": d,
            "is_storno": False,
            "always_tax_exigible": move_type == "entry",
            "to_check": False,
            "posted_before": state != "draft" and name != "/",
            "is_move_sent": False,
            "payment_state": "not_paid",
            "create_date": created,
            "write_date": written,
        }

    # -- invoices and bills ------------------------------------------------------------
    def invoice(
        self,
        move_type: str,
        d: date,
        state: str = "draft",
        name: str = "/",
        move_id: int | None = None,
        created: datetime | None = None,
        written: datetime | None = None,
        uid: int | None = None,
        partner: tuple[int, str] | None = None,
        items: list[tuple] | None = None,
        expense_sheet_id: int | None = None,
    ) -> Entry:
        """A customer invoice/refund or vendor bill/refund with product, tax and payment-term lines.

        `partner`: (commercial partner id, display name) instead of one from the layout.
        `items`: (product id, label, qty in hundredths, price in cents, account, expense id,
        taxed) tuples instead of random catalogue products (expense reports).
        """
        rng, lay = self.rng, self.layout
        sale = move_type.startswith("out")
        refund = move_type.endswith("refund")
        psign = _PRODUCT_SIGN[move_type]
        tsign = _TOTAL_SIGN[move_type]
        journal = J_SALE if sale else J_PURCHASE
        uid = uid or rng.choice(USERS)
        created = created or log_timestamp(rng, d)
        written = written or created
        mv = self._move_base(move_id, move_type, journal, d, state, name, created, written, uid)
        if partner is None:
            commercial = rng.choice(lay.customers if sale else lay.vendors)
            is_company = lay.kind[commercial] == K_COMPANY
            inv_addr = lay.child_of_type(commercial, T_INVOICE) if is_company else None
            partner_id = inv_addr if inv_addr and rng.random() < 0.5 else commercial
            ship = lay.child_of_type(commercial, T_DELIVERY) if is_company and sale else None
            display_name = lay.complete_name(partner_id)
            vendor_name = lay.name(commercial) or "vendor"
        else:
            commercial, display_name = partner
            partner_id, ship, vendor_name = commercial, None, display_name
        foreign = expense_sheet_id is None and rng.random() < 0.12
        rate_e4 = rng.randint(10500, 11200) if foreign else 10000  # USD per EUR, 4 decimals
        currency = USD if foreign else EUR
        term_id = None if expense_sheet_id else rng.choices((1, 2, 4, 5, 9, None), (15, 20, 35, 5, 10, 15))[0]
        installments = PAYMENT_TERMS[term_id] if term_id else ((100, 0 if sale else 30),)
        invoice_date = d
        mv.update(
            currency_id=currency,
            partner_id=partner_id,
            commercial_partner_id=commercial,
            invoice_partner_display_name=display_name,
            invoice_date=invoice_date,
            invoice_date_due=invoice_date + timedelta(days=installments[-1][1]),
            invoice_payment_term_id=term_id,
            invoice_user_id=rng.choice(SALESPEOPLE) if sale else uid,
            expense_sheet_id=expense_sheet_id,
        )
        if sale:
            mv["partner_shipping_id"] = ship or partner_id
            mv["partner_bank_id"] = 1
            if rng.random() < 0.25:
                mv["invoice_origin"] = f"S{rng.randint(1, 99999):05d}"
            if rng.random() < 0.2:
                mv["ref"] = f"PO-{rng.randint(1000, 99999)}"
            if rng.random() < 0.2:
                mv["narration"] = html_paragraphs(rng, rng.choice((100, 300, 800, 2500, 4000)))
        else:
            if rng.random() < 0.6 and expense_sheet_id is None:
                mv["partner_bank_id"] = 100 + commercial % 50
            if expense_sheet_id is None:
                mv["ref"] = f"{rng.choice(('INV', 'F', 'FAC', 'RE'))}-{rng.randint(1, 999999):06d}"
                if rng.random() < 0.2:
                    mv["invoice_origin"] = f"P{rng.randint(1, 99999):05d}"
                if rng.random() < 0.05:
                    mv["invoice_source_email"] = f"billing@{slug(vendor_name)}.example.com"
        if refund:
            mv["ref"] = None  # set by the caller when it knows the reversed entry
        if state == "posted" and sale:
            mv["payment_reference"] = name
            mv["is_move_sent"] = rng.random() < 0.7
            if rng.random() < 0.4:
                mv["access_token"] = token(rng)
        elif state == "posted":
            mv["payment_reference"] = mv.get("ref")
        if rng.random() < 0.03 and move_type == "out_invoice":
            mv["fiscal_position_id"] = rng.choice((1, 2, 3))

        taxes = SALE_TAXES if sale else PURCHASE_TAXES
        lines: list[dict] = []
        base = self._line_base(mv, partner_id=commercial)
        seq = 10
        tax_base: dict[int, list] = {}
        untaxed_c = 0
        balances_c = 0

        def add_product(
            pid: int | None,
            label: str,
            qty_c: int,
            price_c: int,
            account: int,
            uom: int | None,
            tax: tuple | None,
            disc: int = 0,
            expense_id: int | None = None,
        ) -> None:
            nonlocal seq, untaxed_c, balances_c
            sub_c = rdiv(qty_c * price_c * (100 - disc), 10000)
            tax_c = rdiv(sub_c * tax[1], 100) if tax else 0
            ac = psign * sub_c
            bal = ac if not foreign else rdiv(ac * 10000, rate_e4)
            line = self._new_line(
                base,
                seq,
                display_type="product",
                account_id=account,
                account_root_id=ACCOUNT_ROOT[account],
                product_id=pid,
                product_uom_id=uom,
                name=label,
                quantity=money_cached(qty_c),
                price_unit=money_cached(price_c),
                discount=money_cached(disc * 100),
                price_subtotal=money(sub_c),
                price_total=money(sub_c + tax_c),
                tax_base_amount=money(0),
                expense_id=expense_id,
                tax_tag_invert=(sale and not refund) or (not sale and refund),
            )
            if rng.random() < 0.45:
                line["analytic_distribution"] = analytic(rng)
            self._amounts(line, bal, ac)
            lines.append(line)
            seq += 1
            untaxed_c += sub_c
            balances_c += bal
            if tax:
                acc = tax_base.setdefault(tax[0], [tax, 0, 0])
                acc[1] += sub_c
                acc[2] += bal

        if items is None:
            n_products = min(60, 1 + int(rng.expovariate(1 / 4.4)))
            if rng.random() < 0.12:
                lines.append(self._new_line(base, seq, **self._zero_line("line_section", rng.choice(SECTION_NAMES))))
                seq += 1
            for _ in range(n_products):
                pid, code, pname, price_c, uom, service = rng.choice(PRODUCTS)
                if not sale:
                    price_c = price_c * 6 // 10
                label = f"[{code}] {pname}"
                r = rng.random()
                if r < 0.25:
                    label += "\n" + sentence(rng, long=False)
                elif r < 0.28:
                    label += "\n" + " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))
                qty_c = (
                    rng.choice((100, 100, 100, 200, 300, 500, 1000, 1200)) if not service else rng.randint(2, 80) * 50
                )
                disc = rng.choice((0, 0, 0, 0, 0, 5, 10, 20))
                tax = None if rng.random() < 0.05 else (taxes[0] if rng.random() < 0.8 else taxes[1])
                account = (ACC_SERVICES if service else ACC_SALES) if sale else ACC_EXPENSES
                add_product(pid, label, qty_c, price_c, account, uom, tax, disc)
            if rng.random() < 0.08:
                lines.append(self._new_line(base, seq, **self._zero_line("line_note", rng.choice(NOTE_TEXTS))))
                seq += 1
        else:
            for pid, label, qty_c, price_c, account, expense_id, taxed in items:
                add_product(pid, label, qty_c, price_c, account, 1, taxes[0] if taxed else None, 0, expense_id)

        tax_c_total = 0
        product_bal_c = balances_c
        for tax_id, (tax, base_c, base_bal) in tax_base.items():
            amt_c = rdiv(base_c * tax[1], 100)
            ac = psign * amt_c
            bal = ac if not foreign else rdiv(ac * 10000, rate_e4)
            line = self._new_line(
                base,
                seq,
                display_type="tax",
                account_id=ACC_TAX_RECEIVED if sale else ACC_TAX_PAID,
                tax_line_id=tax_id,
                tax_group_id=tax[2],
                tax_repartition_line_id=tax[3],
                name=tax[4],
                tax_base_amount=money(-base_bal if sale else base_bal),
                price_subtotal=money(0),
                price_total=money(0),
                tax_tag_invert=(sale and not refund) or (not sale and refund),
            )
            line["account_root_id"] = ACCOUNT_ROOT[line["account_id"]]
            self._amounts(line, bal, ac)
            lines.append(line)
            seq += 1
            tax_c_total += amt_c
            balances_c += bal

        total_c = untaxed_c + tax_c_total
        term_account = ACC_RECEIVABLE if sale else ACC_PAYABLE
        e = Entry(mv, lines)
        remaining_c, remaining_bal = total_c, -balances_c
        for k, (pct, days) in enumerate(installments):
            last = k == len(installments) - 1
            part_c = remaining_c if last else rdiv(total_c * pct, 100)
            part_bal = remaining_bal if last else rdiv(-balances_c * pct, 100)
            remaining_c -= part_c
            remaining_bal -= part_bal
            line = self._new_line(
                base,
                seq,
                display_type="payment_term",
                account_id=term_account,
                account_root_id=ACCOUNT_ROOT[term_account],
                name=mv.get("payment_reference") or "",
                date_maturity=invoice_date + timedelta(days=days),
                price_subtotal=money(0),
                price_total=money(0),
                discount_amount_currency=money(0),
                discount_balance=money(0),
            )
            self._amounts(line, part_bal, -psign * part_c)
            lines.append(line)
            e.term_lines.append(line)
            seq += 1
        # company-currency totals come from the balances; *_signed are positive for customer invoices
        total_company_c = abs(balances_c)
        mv.update(
            amount_untaxed=money(untaxed_c),
            amount_tax=money(tax_c_total),
            amount_total=money(total_c),
            amount_residual=money(total_c),
            amount_untaxed_signed=money(tsign * abs(product_bal_c)),
            amount_tax_signed=money(tsign * abs(balances_c - product_bal_c)),
            amount_total_signed=money(tsign * total_company_c),
            amount_total_in_currency_signed=money(tsign * total_c),
            amount_residual_signed=money(tsign * total_company_c),
        )
        e.total_c = total_c
        e.total_company_c = total_company_c
        return e

    def _zero_line(self, display_type: str, label: str) -> dict:
        z = money(0)
        return {
            "display_type": display_type,
            "name": label,
            "debit": z,
            "credit": z,
            "balance": z,
            "amount_currency": z,
            "amount_residual": z,
            "amount_residual_currency": z,
            "price_subtotal": z,
            "price_total": z,
            "partner_id": None,
        }

    # -- payments ------------------------------------------------------------------------
    def payment(
        self,
        d: date,
        name: str,
        payment_id: int,
        partner: int,
        inbound: bool,
        amount_c: int,
        company_c: int,
        currency: int,
        memo: str,
        move_id: int | None = None,
        created: datetime | None = None,
        uid: int | None = None,
    ) -> Entry:
        """A registered payment (17.0: an 'entry' move owned by account.payment) with 2 lines."""
        rng = self.rng
        uid = uid or rng.choice(USERS)
        created = created or log_timestamp(rng, d)
        mv = self._move_base(move_id, "entry", J_BANK, d, "posted", name, created, created, uid)
        sign = 1 if inbound else -1
        mv.update(
            currency_id=currency,
            partner_id=partner,
            commercial_partner_id=partner,
            payment_id=payment_id,
            ref=memo,
            amount_untaxed=money(0),
            amount_tax=money(0),
            amount_total=money(amount_c),
            amount_residual=money(0),
            amount_untaxed_signed=money(0),
            amount_tax_signed=money(0),
            amount_total_signed=money(company_c),
            amount_total_in_currency_signed=money(sign * amount_c),
            amount_residual_signed=money(0),
        )
        cur = "€" if currency == EUR else "$"
        label = f"{'Customer' if inbound else 'Vendor'} Payment {cur} {amount_c / 100:,.2f} - {memo}"
        base = self._line_base(mv, partner_id=partner, payment_id=payment_id, date_maturity=d)
        liquidity_acc = ACC_OUT_RECEIPTS if inbound else ACC_OUT_PAYMENTS
        counter_acc = ACC_RECEIVABLE if inbound else ACC_PAYABLE
        liq = self._new_line(
            base,
            10,
            display_type="product",
            account_id=liquidity_acc,
            account_root_id=ACCOUNT_ROOT[liquidity_acc],
            name=label,
        )
        self._amounts(liq, sign * company_c, sign * amount_c)
        cp = self._new_line(
            base,
            11,
            display_type="product",
            account_id=counter_acc,
            account_root_id=ACCOUNT_ROOT[counter_acc],
            name=label,
        )
        self._amounts(cp, -sign * company_c, -sign * amount_c)
        e = Entry(mv, [liq, cp])
        e.term_lines.append(cp)
        e.total_c, e.total_company_c = amount_c, company_c
        return e

    # -- miscellaneous entries -------------------------------------------------------------
    def misc(
        self,
        d: date,
        state: str,
        name: str,
        move_id: int | None = None,
        created: datetime | None = None,
        uid: int | None = None,
    ) -> Entry:
        rng = self.rng
        uid = uid or rng.choice(USERS)
        created = created or log_timestamp(rng, d)
        mv = self._move_base(move_id, "entry", J_MISC, d, state, name, created, created, uid)
        label, debit_acc, credit_acc, lo, hi = rng.choice(MISC_TEMPLATES)
        total_c = rng.randint(lo * 100, hi * 100)
        mv["ref"] = f"{label} {d:%B %Y}"
        splits = rng.choice((1, 1, 1, 2, 3))
        lines = []
        base = self._line_base(mv)
        line = self._new_line(
            base, 10, display_type="product", account_id=debit_acc, account_root_id=ACCOUNT_ROOT[debit_acc], name=label
        )
        if debit_acc in (ACC_EXPENSES, 27, 28, 29) and rng.random() < 0.5:
            line["analytic_distribution"] = analytic(rng)
        self._amounts(line, total_c, total_c)
        lines.append(line)
        left = total_c
        for k in range(splits):
            part = left if k == splits - 1 else rng.randint(1, max(1, left // 2))
            left -= part
            line = self._new_line(
                base,
                11 + k,
                display_type="product",
                account_id=credit_acc,
                account_root_id=ACCOUNT_ROOT[credit_acc],
                name=label if splits == 1 else f"{label} ({k + 1})",
            )
            self._amounts(line, -part, -part)
            lines.append(line)
        z = money(0)
        mv.update(
            amount_untaxed=money(total_c),
            amount_tax=z,
            amount_total=money(total_c),
            amount_residual=z,
            amount_untaxed_signed=money(total_c),
            amount_tax_signed=z,
            amount_total_signed=money(total_c),
            amount_total_in_currency_signed=money(total_c),
            amount_residual_signed=z,
        )
        e = Entry(mv, lines)
        e.total_c = e.total_company_c = total_c
        return e


def _balance_c(line: dict) -> int:
    return int(line["balance"].scaleb(2))


def mark_paid(
    e: Entry,
    full_reconcile_id: int | None,
    partial_id: int | None,
    paid_c: int,
    paid_company_c: int,
    state: str,
    when: datetime,
) -> None:
    """Reconcile an invoice's payment-term lines with a payment (fully, or partially)."""
    mv = e.move
    tsign = _TOTAL_SIGN[e.move_type]
    if full_reconcile_id is not None:
        for line in e.term_lines:
            line.update(
                reconciled=True,
                amount_residual=money(0),
                amount_residual_currency=money(0),
                full_reconcile_id=full_reconcile_id,
                matching_number=str(full_reconcile_id),
            )
        mv.update(amount_residual=money(0), amount_residual_signed=money(0), payment_state=state)
    else:
        line = e.term_lines[0]
        left_c = e.total_c - paid_c
        left_company_c = e.total_company_c - paid_company_c
        sign = 1 if _balance_c(line) > 0 else -1
        line.update(
            amount_residual=money(sign * left_company_c),
            amount_residual_currency=money(sign * left_c),
            matching_number=f"P{partial_id}",
        )
        mv.update(
            amount_residual=money(left_c),
            amount_residual_signed=money(tsign * left_company_c),
            payment_state="partial",
        )
    mv["write_date"] = max(mv["write_date"], when)
    for line in e.lines:
        line["write_date"] = mv["write_date"]
