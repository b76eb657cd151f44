"""Deterministic Odoo-17-like data for a test source database, and an Odoo-like OLTP write mix.

`seed()` creates the six tables of `replicator.odoo` (when missing) and fills them
with COPY, streaming: rows are generated in chunks, so memory stays flat however
large `scale` is (scale 1 is about 1,000 journal entries and 5,000 journal items).
`workload()` then writes to a seeded database the way Odoo does: invoices created
as drafts, posting that rewrites every line of the entry, payments, partner rank
counters, task edits that do or do not touch a large (TOASTed) description,
deleted drafts and the occasional rolled-back transaction.

Everything random comes from `random.Random` instances seeded from the `seed`
argument and a fixed name per stream, so the same seed gives the same rows on every
run and platform. `DataGenerator` exposes the row streams for tests.

Ids of records in tables the mirror does not carry (companies, journals, accounts,
taxes, products, users, employees...) are fixed small integers; no foreign keys are
created, but the load order would satisfy them between the six tables.
"""

from __future__ import annotations

import functools
import heapq
import random
import re
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .odoo import TABLES, column_names, create_index_statements, create_table_statement

__all__ = [
    "LOAD_ORDER",
    "DataGenerator",
    "copy_line",
    "seed",
    "workload",
]

# Load order: every reference between the six tables points to an earlier table
# (res_partner <- everything; hr_expense_sheet <- hr_expense, account_move;
# hr_expense <- account_move_line; account_move <- account_move_line).
# fmt: off
LOAD_ORDER = (
    "res_partner", "hr_expense_sheet", "hr_expense", "account_move", "account_move_line", "project_task",
)
# fmt: on

# --------------------------------------------------------------------------------------
# Fixed reference data: ids of records that live in tables we do not create.
# --------------------------------------------------------------------------------------

COMPANY_ID = 1
COMPANY_PARTNER_ID = 1
EUR, USD = 1, 2  # company currency is EUR
USERS = (2, 6, 7, 8, 9, 10)  # res_users: 2 is the administrator
SALESPEOPLE = (2, 6, 7)
N_EMPLOYEES = 25  # hr_employee ids 1..N; their work contacts are partners 4..N+3
FIRST_EMPLOYEE_PARTNER = 4

J_SALE, J_PURCHASE, J_MISC, J_BANK, J_CASH = 1, 2, 3, 4, 5

# account id -> code; the account_root id is Odoo's ord(code[0]) * 1000 + ord(code[1])
ACCOUNTS = {
    6: "121000",  # Account Receivable (reconcilable)
    11: "131000",  # Tax Paid
    14: "211000",  # Account Payable (reconcilable)
    17: "251000",  # Tax Received
    21: "400000",  # Product Sales
    22: "400100",  # Service Sales
    25: "600000",  # Expenses
    26: "610000",  # Travel & Accommodation
    27: "620000",  # Salaries
    28: "630000",  # Depreciation
    29: "613000",  # Rent
    30: "101401",  # Bank
    31: "101402",  # Outstanding Receipts (reconcilable)
    32: "101403",  # Outstanding Payments (reconcilable)
    33: "230000",  # Salaries payable
    34: "160000",  # Accumulated depreciation
    35: "450000",  # Other income
}
ACC_RECEIVABLE, ACC_PAYABLE = 6, 14
ACC_TAX_PAID, ACC_TAX_RECEIVED = 11, 17
ACC_SALES, ACC_SERVICES, ACC_EXPENSES, ACC_TRAVEL = 21, 22, 25, 26
ACC_BANK, ACC_OUT_RECEIPTS, ACC_OUT_PAYMENTS = 30, 31, 32
RECONCILABLE = frozenset({ACC_RECEIVABLE, ACC_PAYABLE, ACC_OUT_RECEIPTS, ACC_OUT_PAYMENTS})
ACCOUNT_ROOT = {a: ord(c[0]) * 1000 + ord(c[1]) for a, c in ACCOUNTS.items()}

# (tax id, rate %, tax group, repartition line of the tax amount, label)
SALE_TAXES = ((1, 15, 1, 2, "15%"), (3, 6, 2, 10, "6%"))
PURCHASE_TAXES = ((2, 15, 1, 6, "15%"), (4, 6, 2, 14, "6%"))

# payment term id -> installments as (percent, days after the invoice date)
PAYMENT_TERMS = {
    1: ((100, 0),),  # Immediate Payment
    2: ((100, 15),),  # 15 Days
    4: ((100, 30),),  # 30 Days
    5: ((100, 45),),  # 45 Days
    9: ((30, 0), (70, 60)),  # 30% Now, Balance 60 Days
}

# (product id, internal reference, name, list price in cents, uom id, service?)
PRODUCTS = (
    (5, "FURN_0096", "Customizable Desk (Steel, White)", 75000, 1, False),
    (6, "FURN_0097", "Customizable Desk (Aluminium, Black)", 80000, 1, False),
    (7, "FURN_7800", "Desk Combination", 45000, 1, False),
    (8, "FURN_0269", "Office Chair Black", 12050, 1, False),
    (9, "FURN_1118", "Corner Desk Left Sit", 8500, 1, False),
    (10, "FURN_8220", "Four Person Desk", 230000, 1, False),
    (11, "FURN_6741", "Large Meeting Table", 400000, 1, False),
    (12, "FURN_8888", "Office Lamp", 4000, 1, False),
    (13, "FURN_9999", "Office Design Software", 28000, 1, True),
    (14, "E-COM07", "Large Cabinet", 32000, 1, False),
    (15, "E-COM08", "Storage Box", 1570, 1, False),
    (16, "E-COM09", "Large Desk", 160000, 1, False),
    (17, "E-COM10", "Pedal Bin", 4700, 1, False),
    (18, "E-COM11", "Cabinet with Doors", 14000, 1, False),
    (19, "E-COM12", "Conference Chair (Steel)", 3300, 1, False),
    (20, "FURN_5555", "Cable Management Box", 10000, 1, False),
    (21, "FURN_7777", "Office Chair", 7000, 1, False),
    (22, "FURN_2333", "Acoustic Bloc Screens", 29500, 1, False),
    (23, "FURN_3333", "Drawer Black", 2500, 1, False),
    (24, "SERV_0001", "Installation", 6000, 4, True),
    (25, "SERV_0002", "Consulting (hours)", 12500, 4, True),
    (26, "SERV_0003", "Support contract (monthly)", 39900, 1, True),
    (27, "SERV_0004", "On-site training", 95000, 4, True),
    (28, "DELIV_001", "Standard delivery", 2000, 1, True),
)

# hr_expense products: (product id, name, typical amount in cents, account, mileage?)
EXPENSE_PRODUCTS = (
    (40, "Meals", 4500, ACC_TRAVEL, False),
    (41, "Hotel", 14000, ACC_TRAVEL, False),
    (42, "Travel", 32000, ACC_TRAVEL, False),
    (43, "Mileage", 30, ACC_TRAVEL, True),
    (44, "Taxi", 3500, ACC_TRAVEL, False),
    (45, "Office supplies", 6000, ACC_EXPENSES, False),
    (46, "Communication", 5000, ACC_EXPENSES, False),
)

# country id, code, cities (zip, city, state id), phone prefix, language, tz, ubl format, peppol eas
# fmt: off
COUNTRIES = (
    (20, "BE", (("1000", "Brussels", None), ("4000", "Liège", None), ("9000", "Gent", None)),
     "+32", "fr_BE", "Europe/Brussels", "ubl_bis3", "0208"),
    (75, "FR", (("75002", "Paris", None), ("69001", "Lyon", None), ("31000", "Toulouse", None)),
     "+33", "fr_FR", "Europe/Paris", "facturx", "0009"),
    (233, "US", (("94105", "San Francisco", 13), ("10001", "New York", 35), ("60601", "Chicago", 17)),
     "+1", "en_US", "America/New_York", None, None),
    (57, "DE", (("10115", "Berlin", None), ("80331", "München", None)),
     "+49", "de_DE", "Europe/Berlin", "xrechnung", "9930"),
    (165, "NL", (("1012", "Amsterdam", None), ("3011", "Rotterdam", None)),
     "+31", "nl_NL", "Europe/Amsterdam", "nlcius", "0106"),
    (44, "CH", (("8001", "Zürich", None), ("1201", "Genève", None)),
     "+41", "de_CH", "Europe/Zurich", None, None),
)
COUNTRY_WEIGHTS = (30, 20, 25, 10, 10, 5)

COMPANY_WORDS_A = (
    "Azure", "Deco", "Gemini", "Lumber", "Ready", "Wood", "Ironclad", "Silver", "Northwind", "Blue",
    "Granite", "Maple", "Orchid", "Pioneer", "Quantum", "Red", "Summit", "Vertex", "Willow", "Zenith",
    "Alpine", "Brightway", "Cobalt", "Delta", "Evergreen", "Falcon",
)
COMPANY_WORDS_B = (
    "Interior", "Addict", "Furniture", "Inc Supplies", "Mat", "Corner", "Logistics", "Systems", "Design",
    "Builders", "Office", "Trading", "Partners", "Consulting", "Studio", "Works", "Industries", "Solutions",
    "Labs", "Distribution",
)
COMPANY_SUFFIXES = ("", "", "", " SA", " SRL", " BV", " GmbH", " Ltd", " Inc.", " & Co", " LLC", " SAS")
FIRST_NAMES = (
    "Marc", "Jeff", "Brandon", "Colleen", "Edwin", "Floyd", "Jennie", "Kim", "Lorraine", "Oscar", "Theodore",
    "Toni", "Sandra", "Lucille", "Anita", "Douglas", "Chester", "Billy", "Julie", "Ernest", "Gemma", "Amélie",
    "Hélène", "Jürgen", "Søren", "Zoë", "Mitchell", "Addison", "Bruno", "Camille", "Dries", "Eline", "Fatima",
    "Hiroshi", "Inès", "Jasper", "Lars", "Noor",
)
LAST_NAMES = (
    "Demo", "Fletcher", "Freeman", "Diaz", "Shaw", "Miller", "Watson", "Jackson", "Lawson", "Olson",
    "Roberts", "Bennett", "Wells", "Walker", "Hayes", "Dubois", "Lambert", "Peeters", "Janssens", "Müller",
    "Schmidt", "De Smet", "Van den Berg", "Rossi", "García", "Nguyen", "Kowalski", "O'Brien", "Nakamura",
    "Johansson", "Martin", "Lefèvre",
)
FUNCTIONS = (
    "Sales Manager", "CEO", "Accountant", "Purchase Officer", "Office Manager", "CTO", "Project Manager",
    "Consultant", "Financial Controller", "Logistics",
)
STREETS = (
    "Rue de la Loi", "Avenue Louise", "Main Street", "Market Street", "Hauptstraße", "Keizersgracht",
    "Boulevard Haussmann", "Chaussée de Namur", "Rue du Commerce", "Broadway", "Elm Street", "Bahnhofstrasse",
    "Oak Avenue", "Stationsplein",
)

WORDS = (
    "the", "customer", "invoice", "delivery", "order", "please", "we", "would", "like", "to", "confirm",
    "meeting", "project", "deadline", "quote", "price", "update", "attached", "report", "schedule", "team",
    "review", "feedback", "design", "office", "desk", "chair", "install", "support", "issue", "ticket",
    "urgent", "next", "week", "monday", "friday", "thanks", "regards", "budget", "approval", "contract",
    "renewal", "warehouse", "shipment", "tracking", "error", "screen", "printer", "network", "access",
    "server", "backup", "migration", "data", "training", "session", "agenda", "minutes", "action", "items",
    "follow", "up", "call", "phone", "email", "address", "changed", "missing", "damaged", "replacement",
    "refund", "credit", "note", "payment", "reminder", "overdue", "balance", "statement", "account", "bank",
    "transfer", "reference", "number", "quantity", "unit", "measure", "product", "variant", "colour", "white",
    "black", "steel", "aluminium", "assembly", "instructions", "manual", "warranty", "repair", "technician",
    "visit", "on-site", "remote", "planning", "resources", "capacity", "forecast", "sprint", "milestone",
    "task", "subtask", "blocked", "done", "cancelled", "priority", "high", "low", "normal", "estimate",
    "hours", "timesheet", "approved", "rejected", "question", "answer", "documentation", "specification",
    "draft", "final", "version", "release", "deploy", "test", "bug", "fix", "regression", "performance",
    "slow", "fast", "login", "password", "reset", "portal", "website", "catalog", "stock", "inventory",
    "supplier", "vendor", "purchase", "receipt", "expense", "travel", "hotel", "taxi", "meal", "mileage",
    "conference", "Brussels", "Paris", "Berlin", "Amsterdam", "Q1", "Q2", "Q3", "Q4", "2023", "2024", "ASAP",
    "FYI", "cc", "re:", "fw:",
)
SECTION_NAMES = ("Hardware", "Services", "Consulting", "Licences", "Shipping", "Phase 1", "Phase 2", "Options")
NOTE_TEXTS = (
    "Delivery within 2 weeks after order confirmation.",
    "Installation on site by our technicians.",
    "Prices valid for 30 days.",
    "Please mention the invoice number on your transfer.",
    "Goods remain our property until full payment.",
)
MISC_TEMPLATES = (
    # (label, debit account, credit account, min, max in euros)
    ("Salaries", 27, 33, 8000, 60000),
    ("Depreciation", 28, 34, 500, 9000),
    ("Rent", 29, ACC_PAYABLE, 1500, 6000),
    ("Accrued expenses", ACC_EXPENSES, 33, 200, 5000),
    ("Other income", ACC_BANK, 35, 100, 3000),
)
TASK_NAMES = (
    "Install the new furniture", "Prepare the quotation", "Update the website catalog",
    "Customer meeting follow-up", "Fix the printer in the meeting room", "Plan the office move",
    "Review the supplier contract", "Organise the training session", "Migrate the mail server",
    "Design the new showroom", "Check the stock levels", "Answer the customer ticket",
    "Write the user documentation", "Prepare the quarterly report", "Order new chairs",
    "Call the carrier about the damaged shipment", "Set up the VPN access", "Test the new release",
)
# fmt: on
EXPENSE_NAMES = {
    40: ("Lunch with customer", "Team dinner", "Breakfast at the airport", "Business lunch"),
    41: ("Hotel {city} 2 nights", "Hotel {city} 3 nights", "Hotel {city}"),
    42: ("Train to {city}", "Flight to {city}", "Flight {city} - Brussels"),
    43: ("Mileage customer visit", "Mileage {city}"),
    44: ("Taxi to the airport", "Taxi {city}", "Uber to the customer"),
    45: ("Printer cartridges", "Notebooks and pens", "USB-C adapters"),
    46: ("Mobile subscription", "Roaming charges", "Internet at home"),
}
EXPENSE_CITIES = ("Paris", "Berlin", "Amsterdam", "London", "Madrid", "Milan", "Lyon", "Gent")

START_DATE = date(2023, 1, 1)
SPAN_DAYS = 730  # two years of history
_EPOCH = datetime(2022, 6, 1)

# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


_ZERO = Decimal("0.00")


def _money(cents: int) -> Decimal:
    """Cents as a numeric value with 2 decimals."""
    return Decimal(cents).scaleb(-2) if cents else _ZERO


# quantities, unit prices and discounts take few distinct values
_money_cached = functools.lru_cache(maxsize=4096)(_money)


def _rdiv(a: int, b: int) -> int:
    """a / b rounded half away from zero (b > 0), in integers."""
    if a >= 0:
        return (2 * a + b) // (2 * b)
    return -((-2 * a + b) // (2 * b))


def _ts(rng: random.Random, d: date, hour_from: int = 7, hour_to: int = 19) -> datetime:
    """A log-access timestamp on day d: Odoo writes now() at time zone 'UTC', with microseconds."""
    return datetime(
        d.year,
        d.month,
        d.day,
        rng.randrange(hour_from, hour_to),
        rng.randrange(60),
        rng.randrange(60),
        rng.randrange(1_000_000),
    )


def _token(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def _make_sentence(rng: random.Random, lo: int, hi: int) -> str:
    s = _words(rng, rng.randint(lo, hi))
    return s[0].upper() + s[1:] + "."


@functools.cache
def _text_pool() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Short sentences, long sentences and html blocks, built once from a fixed seed.

    Generated text picks from these pools (by index, from the caller's random
    stream) instead of drawing every word: large html stays cheap to make.
    """
    rng = random.Random("odoo-replicator/text-pool")
    short = tuple(_make_sentence(rng, 3, 8) for _ in range(1024))
    long = tuple(_make_sentence(rng, 6, 18) for _ in range(2048))
    blocks = []
    for _ in range(1024):
        r = rng.random()
        if r < 0.7:
            blocks.append("<p>" + " ".join(rng.choice(long) for _ in range(rng.randint(1, 4))) + "</p>")
        elif r < 0.85:
            blocks.append("<ul>" + "".join(f"<li>{rng.choice(short)}</li>" for _ in range(rng.randint(2, 5))) + "</ul>")
        else:
            blocks.append(
                f"<blockquote><p>On {rng.randint(1, 28)}/{rng.randint(1, 12)}/2024 {rng.choice(FIRST_NAMES)} "
                f"{rng.choice(LAST_NAMES)} wrote:</p><p>{rng.choice(long)}</p></blockquote>"
            )
    return short, long, tuple(blocks)


def _sentence(rng: random.Random, long: bool = True) -> str:
    pool = _text_pool()[1 if long else 0]
    return pool[rng.getrandbits(11) % len(pool)]


def _html_paragraphs(rng: random.Random, target: int) -> str:
    """Html of about `target` bytes: paragraphs, lists, quotes, and links with random tokens.

    The random tokens keep large values from compressing much, like real mail
    bodies full of tracking links: a large value is stored out of line (TOAST).
    """
    blocks = _text_pool()[2]
    parts: list[str] = []
    size = 0
    getrandbits = rng.getrandbits
    while size < target:
        if getrandbits(3) == 0:
            p = (
                f'<p><a href="https://track.example.com/c/{getrandbits(128):032x}?u={getrandbits(64):016x}" '
                f'target="_blank">{blocks[getrandbits(10)][3:30]}</a></p>'
            )
        else:
            p = blocks[getrandbits(10)]
        parts.append(p)
        size += len(p)
    return "".join(parts)


def _email_body(rng: random.Random, target: int) -> str:
    """A task description from an incoming email: 3 to 20 kB of html, not very compressible."""
    head = (
        f'<div data-oe-version="1.1"><p>Hello,</p>'
        f"<p>Message-Id: &lt;{_hex(rng, 24)}.{_hex(rng, 8)}@mail.example.com&gt;</p>"
    )
    tail = f"<p>--<br>{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}<br>{_hex(rng, 40)}</p></div>"
    return head + _html_paragraphs(rng, max(0, target - len(head) - len(tail))) + tail


def _analytic(rng: random.Random) -> dict[str, float]:
    r = rng.random()
    a = rng.randint(1, 12)
    if r < 0.7:
        return {str(a): 100.0}
    b, c = rng.sample([x for x in range(1, 13) if x != a], 2)
    if r < 0.9:
        return {f"{a},{b}": 60.0, str(c): 40.0}
    return {str(a): 50.0, str(b): 30.0, str(c): 20.0}


def _slug(name: str) -> str:
    return "".join(ch for ch in name.lower().replace(" ", "-") if ch.isascii() and (ch.isalnum() or ch == "-")).strip(
        "-"
    )


def _row(cols: tuple[str, ...], colset: frozenset[str], d: dict[str, Any]) -> tuple:
    """The dict as a tuple in table column order; absent keys are NULL, unknown keys an error."""
    if not colset.issuperset(d):
        raise KeyError(f"unknown columns {sorted(set(d) - colset)}")
    return tuple(map(d.get, cols))


_COLS = {t: tuple(column_names(t)) for t in TABLES}
_COLSET = {t: frozenset(c) for t, c in _COLS.items()}

# --------------------------------------------------------------------------------------
# COPY text format
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Partners: the layout (who is a company, whose child, customer or vendor) is computed
# once into compact arrays, so other tables can reference partners consistently
# without keeping partner rows around.
# --------------------------------------------------------------------------------------

K_SYSTEM, K_COMPANY, K_CHILD, K_PERSON, K_EMPLOYEE = range(5)
T_CONTACT, T_INVOICE, T_DELIVERY, T_OTHER = range(4)
_TYPE_NAMES = ("contact", "invoice", "delivery", "other")
_ADDRESS_LABEL = {T_INVOICE: "Invoice Address", T_DELIVERY: "Delivery Address", T_OTHER: "Other Address"}
R_CUSTOMER, R_VENDOR = 1, 2


class PartnerLayout:
    """Structure of the res_partner table for one seed: kinds, parents, roles, names."""

    def __init__(self, seed: int, n: int) -> None:
        rng = random.Random(f"odoo-replicator/{seed}/partner-layout")
        self.n = n
        self.kind = bytearray(n + 1)
        self.ptype = bytearray(n + 1)
        self.role = bytearray(n + 1)
        self.named = bytearray(n + 1)  # 0: an address without a name
        self.parent = array("i", bytes(4 * (n + 1)))
        self.nkids = array("i", bytes(4 * (n + 1)))
        self.name_code = array("i", bytes(4 * (n + 1)))  # indexes into the word lists
        self.country = bytearray(n + 1)  # index into COUNTRIES
        self.customers: list[int] = []  # commercial partners (companies, stand-alone people)
        self.vendors: list[int] = []
        # 1: the company itself, 2: OdooBot, 3: the administrator (child of the company)
        fixed = {1: (K_SYSTEM, 0), 2: (K_SYSTEM, 0), 3: (K_SYSTEM, 1)}
        for pid, (kind, parent) in fixed.items():
            if pid <= n:
                self.kind[pid], self.parent[pid], self.named[pid] = kind, parent, 1
        if n >= 1:
            self.nkids[1] = 1 if n >= 3 else 0
        pid = 4
        for _ in range(N_EMPLOYEES):
            if pid > n:
                break
            self.kind[pid], self.named[pid] = K_EMPLOYEE, 1
            self.name_code[pid] = rng.randrange(len(FIRST_NAMES)) * 1000 + rng.randrange(len(LAST_NAMES))
            self.country[pid] = 0
            pid += 1
        while pid <= n:
            r = rng.random()
            role = R_CUSTOMER if r < 0.65 else (R_VENDOR if r < 0.9 else R_CUSTOMER | R_VENDOR)
            country = rng.choices(range(len(COUNTRIES)), COUNTRY_WEIGHTS)[0]
            if rng.random() < 0.8:  # a company with 0-3 children
                company = pid
                self.kind[pid], self.role[pid], self.named[pid], self.country[pid] = K_COMPANY, role, 1, country
                self.name_code[pid] = (
                    rng.randrange(len(COMPANY_WORDS_A)) * 10000
                    + rng.randrange(len(COMPANY_WORDS_B)) * 100
                    + rng.randrange(len(COMPANY_SUFFIXES))
                )
                kids = min(rng.choice((0, 1, 1, 2, 2, 3)), n - pid)
                self.nkids[pid] = kids
                for k in range(kids):
                    pid += 1
                    ptype = T_CONTACT if k == 0 else rng.choice((T_CONTACT, T_INVOICE, T_DELIVERY, T_DELIVERY, T_OTHER))
                    self.kind[pid], self.parent[pid], self.ptype[pid], self.country[pid] = (
                        K_CHILD,
                        company,
                        ptype,
                        country,
                    )
                    self.named[pid] = 1 if ptype == T_CONTACT or rng.random() < 0.7 else 0
                    self.name_code[pid] = rng.randrange(len(FIRST_NAMES)) * 1000 + rng.randrange(len(LAST_NAMES))
                commercial = company
            else:  # a stand-alone person
                self.kind[pid], self.role[pid], self.named[pid], self.country[pid] = K_PERSON, role, 1, country
                self.name_code[pid] = rng.randrange(len(FIRST_NAMES)) * 1000 + rng.randrange(len(LAST_NAMES))
                commercial = pid
            if role & R_CUSTOMER:
                self.customers.append(commercial)
            if role & R_VENDOR:
                self.vendors.append(commercial)
            pid += 1
        if not self.customers:
            self.customers.append(1)
        if not self.vendors:
            self.vendors.append(1)

    def name(self, pid: int) -> str | None:
        kind = self.kind[pid]
        code = self.name_code[pid]
        if kind == K_SYSTEM:
            return ("YourCompany", "OdooBot", "Mitchell Admin")[pid - 1]
        if kind == K_COMPANY:
            return (
                f"{COMPANY_WORDS_A[code // 10000]} {COMPANY_WORDS_B[code // 100 % 100]}{COMPANY_SUFFIXES[code % 100]}"
            )
        if not self.named[pid]:
            return None
        return f"{FIRST_NAMES[code // 1000]} {LAST_NAMES[code % 1000]}"

    def commercial(self, pid: int) -> int:
        return self.parent[pid] if self.kind[pid] in (K_CHILD, K_SYSTEM) and self.parent[pid] else pid

    def complete_name(self, pid: int) -> str:
        name = self.name(pid)
        parent = self.parent[pid]
        if parent:
            own = name if name is not None else _ADDRESS_LABEL.get(self.ptype[pid], "")
            return f"{self.name(parent)}, {own}"
        return name or ""

    def child_of_type(self, company: int, ptype: int) -> int | None:
        for c in range(company + 1, company + 1 + self.nkids[company]):
            if self.ptype[c] == ptype:
                return c
        return None


# --------------------------------------------------------------------------------------
# Journal entries
# --------------------------------------------------------------------------------------

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


class _Entry:
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
        b = _money(balance_c)
        a = b if amount_currency_c == balance_c else _money(amount_currency_c)
        line["balance"] = b
        if balance_c > 0:
            line["debit"], line["credit"] = b, _ZERO
        elif balance_c < 0:
            line["debit"], line["credit"] = _ZERO, -b
        else:
            line["debit"] = line["credit"] = _ZERO
        line["amount_currency"] = a
        if line.get("account_id") in RECONCILABLE:
            line["amount_residual"], line["amount_residual_currency"] = b, a
        else:
            line["amount_residual"] = line["amount_residual_currency"] = _ZERO

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
    ) -> _Entry:
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
        created = created or _ts(rng, d)
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
                mv["narration"] = _html_paragraphs(rng, rng.choice((100, 300, 800, 2500, 4000)))
        else:
            if rng.random() < 0.6 and expense_sheet_id is None:
                mv["partner_bank_id"] = 100 + commercial % 50
            if expense_sheet_id is None:
                mv["ref"] = f"{rng.choice(('INV', 'F', 'FAC', 'RE'))}-{rng.randint(1, 999999):06d}"
                if rng.random() < 0.2:
                    mv["invoice_origin"] = f"P{rng.randint(1, 99999):05d}"
                if rng.random() < 0.05:
                    mv["invoice_source_email"] = f"billing@{_slug(vendor_name)}.example.com"
        if refund:
            mv["ref"] = None  # set by the caller when it knows the reversed entry
        if state == "posted" and sale:
            mv["payment_reference"] = name
            mv["is_move_sent"] = rng.random() < 0.7
            if rng.random() < 0.4:
                mv["access_token"] = _token(rng)
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
            sub_c = _rdiv(qty_c * price_c * (100 - disc), 10000)
            tax_c = _rdiv(sub_c * tax[1], 100) if tax else 0
            ac = psign * sub_c
            bal = ac if not foreign else _rdiv(ac * 10000, rate_e4)
            line = self._new_line(
                base,
                seq,
                display_type="product",
                account_id=account,
                account_root_id=ACCOUNT_ROOT[account],
                product_id=pid,
                product_uom_id=uom,
                name=label,
                quantity=_money_cached(qty_c),
                price_unit=_money_cached(price_c),
                discount=_money_cached(disc * 100),
                price_subtotal=_money(sub_c),
                price_total=_money(sub_c + tax_c),
                tax_base_amount=_money(0),
                expense_id=expense_id,
                tax_tag_invert=(sale and not refund) or (not sale and refund),
            )
            if rng.random() < 0.45:
                line["analytic_distribution"] = _analytic(rng)
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
                    label += "\n" + _sentence(rng, long=False)
                elif r < 0.28:
                    label += "\n" + " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))
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
            amt_c = _rdiv(base_c * tax[1], 100)
            ac = psign * amt_c
            bal = ac if not foreign else _rdiv(ac * 10000, rate_e4)
            line = self._new_line(
                base,
                seq,
                display_type="tax",
                account_id=ACC_TAX_RECEIVED if sale else ACC_TAX_PAID,
                tax_line_id=tax_id,
                tax_group_id=tax[2],
                tax_repartition_line_id=tax[3],
                name=tax[4],
                tax_base_amount=_money(-base_bal if sale else base_bal),
                price_subtotal=_money(0),
                price_total=_money(0),
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
        e = _Entry(mv, lines)
        remaining_c, remaining_bal = total_c, -balances_c
        for k, (pct, days) in enumerate(installments):
            last = k == len(installments) - 1
            part_c = remaining_c if last else _rdiv(total_c * pct, 100)
            part_bal = remaining_bal if last else _rdiv(-balances_c * pct, 100)
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
                price_subtotal=_money(0),
                price_total=_money(0),
                discount_amount_currency=_money(0),
                discount_balance=_money(0),
            )
            self._amounts(line, part_bal, -psign * part_c)
            lines.append(line)
            e.term_lines.append(line)
            seq += 1
        # company-currency totals come from the balances; *_signed are positive for customer invoices
        total_company_c = abs(balances_c)
        mv.update(
            amount_untaxed=_money(untaxed_c),
            amount_tax=_money(tax_c_total),
            amount_total=_money(total_c),
            amount_residual=_money(total_c),
            amount_untaxed_signed=_money(tsign * abs(product_bal_c)),
            amount_tax_signed=_money(tsign * abs(balances_c - product_bal_c)),
            amount_total_signed=_money(tsign * total_company_c),
            amount_total_in_currency_signed=_money(tsign * total_c),
            amount_residual_signed=_money(tsign * total_company_c),
        )
        e.total_c = total_c
        e.total_company_c = total_company_c
        return e

    def _zero_line(self, display_type: str, label: str) -> dict:
        z = _money(0)
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
    ) -> _Entry:
        """A registered payment (17.0: an 'entry' move owned by account.payment) with 2 lines."""
        rng = self.rng
        uid = uid or rng.choice(USERS)
        created = created or _ts(rng, d)
        mv = self._move_base(move_id, "entry", J_BANK, d, "posted", name, created, created, uid)
        sign = 1 if inbound else -1
        mv.update(
            currency_id=currency,
            partner_id=partner,
            commercial_partner_id=partner,
            payment_id=payment_id,
            ref=memo,
            amount_untaxed=_money(0),
            amount_tax=_money(0),
            amount_total=_money(amount_c),
            amount_residual=_money(0),
            amount_untaxed_signed=_money(0),
            amount_tax_signed=_money(0),
            amount_total_signed=_money(company_c),
            amount_total_in_currency_signed=_money(sign * amount_c),
            amount_residual_signed=_money(0),
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
        e = _Entry(mv, [liq, cp])
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
    ) -> _Entry:
        rng = self.rng
        uid = uid or rng.choice(USERS)
        created = created or _ts(rng, d)
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
            line["analytic_distribution"] = _analytic(rng)
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
        z = _money(0)
        mv.update(
            amount_untaxed=_money(total_c),
            amount_tax=z,
            amount_total=_money(total_c),
            amount_residual=z,
            amount_untaxed_signed=_money(total_c),
            amount_tax_signed=z,
            amount_total_signed=_money(total_c),
            amount_total_in_currency_signed=_money(total_c),
            amount_residual_signed=z,
        )
        e = _Entry(mv, lines)
        e.total_c = e.total_company_c = total_c
        return e


def _balance_c(line: dict) -> int:
    return int(line["balance"].scaleb(2))


def mark_paid(
    e: _Entry,
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
                amount_residual=_money(0),
                amount_residual_currency=_money(0),
                full_reconcile_id=full_reconcile_id,
                matching_number=str(full_reconcile_id),
            )
        mv.update(amount_residual=_money(0), amount_residual_signed=_money(0), payment_state=state)
    else:
        line = e.term_lines[0]
        left_c = e.total_c - paid_c
        left_company_c = e.total_company_c - paid_company_c
        sign = 1 if _balance_c(line) > 0 else -1
        line.update(
            amount_residual=_money(sign * left_company_c),
            amount_residual_currency=_money(sign * left_c),
            matching_number=f"P{partial_id}",
        )
        mv.update(
            amount_residual=_money(left_c),
            amount_residual_signed=_money(tsign * left_company_c),
            payment_state="partial",
        )
    mv["write_date"] = max(mv["write_date"], when)
    for line in e.lines:
        line["write_date"] = mv["write_date"]


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


class DataGenerator:
    """Deterministic row streams for the six tables.

    Each stream has its own `random.Random`, seeded from (seed, stream name), so a
    stream gives the same rows whatever else was generated before. Rows are tuples
    in table column order (`replicator.odoo.column_names`), with Python values:
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
        cols, colset = _COLS["res_partner"], _COLSET["res_partner"]
        n = lay.n
        for pid in range(1, n + 1):
            kind = lay.kind[pid]
            parent = lay.parent[pid]
            commercial = lay.commercial(pid)
            country_id, ccode, cities, phone_prefix, lang, tz, ubl, eas = COUNTRIES[lay.country[pid]]
            zip_, city, state_id = rng.choice(cities)
            created = _ts(rng, (_EPOCH + timedelta(days=pid * 900 // n)).date())
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
                "type": _TYPE_NAMES[lay.ptype[pid]],
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
                base = _slug(lay.name(commercial) or "example")
                if person:
                    first, _, last = name.partition(" ")
                    email = f"{_slug(first)}.{_slug(last)}@{base if kind == K_CHILD else 'example'}.com"
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
                    d["website"] = f"https://www.{_slug(name or 'example')}.com"
                if rng.random() < 0.5:
                    d["industry_id"] = rng.randint(1, 20)
                if rng.random() < 0.05:
                    d["partner_gid"] = rng.randint(1_000_000, 9_999_999)
                    d["additional_info"] = f'{{"name": "{name}", "website": "{_slug(name or "x")}.com"}}'
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
                    d["comment"] = _html_paragraphs(rng, rng.choice((80, 300, 1500, 3000)))
                if rng.random() < 0.02:
                    d["invoice_warn"] = "warning"
                    d["invoice_warn_msg"] = _sentence(rng)
                if rng.random() < 0.1:
                    d["debit_limit"] = _money(rng.randint(10, 500) * 10000)
                if rng.random() < 0.1:
                    d["partner_latitude"] = Decimal(f"{rng.uniform(35, 60):.7f}")
                    d["partner_longitude"] = Decimal(f"{rng.uniform(-120, 20):.7f}")
                if rng.random() < 0.2:
                    d["last_time_entries_checked"] = _ts(rng, START_DATE + timedelta(days=rng.randrange(SPAN_DAYS)))
            if rng.random() < 0.01:
                d["signup_type"] = "signup"
                d["signup_token"] = _hex(rng, 20)
                d["signup_expiration"] = created + timedelta(days=1)
            yield _row(cols, colset, d)

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
                total_c = _rdiv(qty_c * price_c, 100)
                taxed = not mileage and rng.random() < 0.6
                tax_c = _rdiv(total_c * 15, 115) if taxed else 0
                created = _ts(rng, edate)
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
                    "quantity": _money(qty_c),
                    "price_unit": _money(price_c),
                    "total_amount_currency": _money(total_c),
                    "total_amount": _money(total_c),
                    "untaxed_amount_currency": _money(total_c - tax_c),
                    "tax_amount_currency": _money(tax_c),
                    "tax_amount": _money(tax_c),
                    "create_date": created,
                    "write_date": created + timedelta(days=rng.randint(0, 10)),
                }
                if rng.random() < 0.7:
                    attachment_id += 1
                    row["message_main_attachment_id"] = attachment_id
                if rng.random() < 0.4:
                    row["analytic_distribution"] = _analytic(rng)
                if rng.random() < 0.1:
                    row["description"] = _sentence(rng)
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
                    total_amount=_money(total_c),
                    untaxed_amount=_money(total_c - tax_c),
                    total_tax_amount=_money(tax_c),
                    amount_residual=_money(0 if state == "done" or not posted else total_c),
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
        cols, colset = _COLS["hr_expense_sheet"], _COLSET["hr_expense_sheet"]
        for sheet, _ in self._expense_bundles():
            if sheet is not None:
                yield _row(cols, colset, sheet)

    def hr_expense(self) -> Iterator[tuple]:
        cols, colset = _COLS["hr_expense"], _COLSET["hr_expense"]
        for _, expenses in self._expense_bundles():
            for x in expenses:
                yield _row(cols, colset, x)

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
        mcols, mset = _COLS["account_move"], _COLSET["account_move"]
        lcols, lset = _COLS["account_move_line"], _COLSET["account_move_line"]
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
                    reconciled=kind != "partial", amount_residual=_money(0), amount_residual_currency=_money(0)
                )
                if kind == "paid":  # the outstanding line is matched with a bank statement line too
                    full_rec += 1
                    e.lines[0].update(
                        reconciled=True,
                        amount_residual=_money(0),
                        amount_residual_currency=_money(0),
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
                        _rdiv(int(x["untaxed_amount_currency"].scaleb(2)) * 100, int(x["quantity"].scaleb(2))),
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
                            paid_c = _rdiv(e.total_c * rng.randint(30, 80), 100)
                            paid_company_c = _rdiv(e.total_company_c * paid_c, e.total_c) if e.total_c else 0
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
                lines.append(_row(lcols, lset, line))
            yield _row(mcols, mset, m), lines

    def _fresh_move(
        self,
        rng: random.Random,
        builder: EntryBuilder,
        move_id: int,
        slot: int,
        d: date,
        name_for: Any,
        recent: dict[bool, deque],
    ) -> _Entry:
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
        cols, colset = _COLS["project_task"], _COLSET["project_task"]
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
            created = _ts(rng, d)
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
                "name": rng.choice(TASK_NAMES) + (f" ({_words(rng, 2)})" if rng.random() < 0.4 else ""),
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
                    f"{_slug(rng.choice(FIRST_NAMES))}@example.com" for _ in range(rng.randint(1, 3))
                )
            if rng.random() < 0.1:
                t["access_token"] = _token(rng)
            if rng.random() < 0.05:
                t["task_properties"] = {_hex(rng, 16): rng.choice(("foo", "bar", True, 3, "2024-05-01"))}
            if rng.random() < 0.02:
                t["displayed_image_id"] = rng.randint(5000, 9000)
            r = rng.random()
            if r < 0.12:
                t["description"] = _email_body(rng, rng.randint(3000, 20000))
            elif r < 0.55:
                t["description"] = _html_paragraphs(rng, rng.randint(30, 400))
            assigned = rng.random() < 0.8
            if assigned:
                t["date_assign"] = created + timedelta(hours=rng.randint(0, 48))
                t["working_hours_open"] = _money(rng.randint(0, 4000))
                t["working_days_open"] = round(rng.uniform(0, 5), 2)
            if state in ("1_done", "1_canceled"):
                t["date_end"] = last_stage
                t["working_hours_close"] = _money(rng.randint(100, 40000))
                t["working_days_close"] = round(rng.uniform(0.1, 50), 2)
                if rng.random() < 0.2:
                    t["rating_last_value"] = float(rng.choice((1, 3, 5)))
            if rng.random() < 0.4:
                t["date_deadline"] = datetime.combine(
                    d + timedelta(days=rng.randint(1, 60)), datetime.min.time()
                ) + timedelta(hours=rng.choice((0, 9, 17)))
            if project_id and parent is None and not recurring:
                parents.append(tid)
            yield _row(cols, colset, t)


# --------------------------------------------------------------------------------------
# seed()
# --------------------------------------------------------------------------------------

_CHUNK_ROWS = 5000


def _copy(cur: psycopg.Cursor, schema: str, table: str, rows: Iterable[tuple]) -> int:
    stmt = sql.SQL("copy {} ({}) from stdin").format(
        sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, _COLS[table]))
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


def _copy_moves(cur: psycopg.Cursor, schema: str, gen: DataGenerator, chunk_moves: int = 2000) -> tuple[int, int]:
    """Moves and their lines, alternating COPYs per chunk of moves (memory stays flat)."""
    n_moves = n_lines = 0
    moves: list[tuple] = []
    lines: list[tuple] = []
    for move, move_lines in gen.moves():
        moves.append(move)
        lines.extend(move_lines)
        if len(moves) >= chunk_moves:
            n_moves += _copy(cur, schema, "account_move", moves)
            n_lines += _copy(cur, schema, "account_move_line", lines)
            moves.clear()
            lines.clear()
    if moves:
        n_moves += _copy(cur, schema, "account_move", moves)
        n_lines += _copy(cur, schema, "account_move_line", lines)
    return n_moves, n_lines


def _index_and_analyze(dsn: str, schema: str, created: list[str], extensions: set[str], workers: int = 2) -> None:
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
                counts["res_partner"] = _copy(cur, schema, "res_partner", gen.res_partner())
            with conn.transaction():
                counts["hr_expense_sheet"] = _copy(cur, schema, "hr_expense_sheet", gen.hr_expense_sheet())
                counts["hr_expense"] = _copy(cur, schema, "hr_expense", gen.hr_expense())
            with conn.transaction():
                counts["account_move"], counts["account_move_line"] = _copy_moves(cur, schema, gen)
            with conn.transaction():
                counts["project_task"] = _copy(cur, schema, "project_task", gen.project_task())
        for table in LOAD_ORDER:
            qname = sql.Identifier(schema, table)
            conn.execute(
                sql.SQL(
                    "select setval(pg_get_serial_sequence(%s, 'id'), coalesce(max(id), 0) + 1, false) from {}"
                ).format(qname),
                (qname.as_string(conn),),
            )
        _index_and_analyze(dsn, schema, created, extensions)
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


# --------------------------------------------------------------------------------------
# workload()
# --------------------------------------------------------------------------------------

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
        cols = tuple(c for c in _COLS[table] if c != "id" and d.get(c) is not None)
        vals = [Jsonb(d[c]) if isinstance(d[c], dict) else d[c] for c in cols]
        return self.conn.execute(self._insert_sql(table, cols), vals).fetchone()[0]

    def _insert_lines(self, move_id: int, lines: list[dict]) -> None:
        cols = tuple(c for c in _COLS["account_move_line"] if c != "id")
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
        p = dict(zip(_COLS["res_partner"], row))
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
        m = dict(zip(_COLS["account_move"], row))
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
        m = dict(zip(_COLS["account_move"], row))
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
            amount_residual=_ZERO,
            amount_residual_currency=_ZERO,
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
                desc = _email_body(rng, rng.randint(3000, 20000))
            else:
                desc = _html_paragraphs(rng, rng.randint(30, 400))
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
        sheet = dict(zip(_COLS["hr_expense_sheet"], row))
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
