"""The res_partner layout of one seed: who is a company, whose child, customer or vendor.

Computed once into compact arrays, so other tables can reference partners
consistently without keeping partner rows around.
"""

from __future__ import annotations

import random
from array import array

from .reference import (
    COMPANY_SUFFIXES,
    COMPANY_WORDS_A,
    COMPANY_WORDS_B,
    COUNTRIES,
    COUNTRY_WEIGHTS,
    FIRST_NAMES,
    LAST_NAMES,
    N_EMPLOYEES,
)

K_SYSTEM, K_COMPANY, K_CHILD, K_PERSON, K_EMPLOYEE = range(5)
T_CONTACT, T_INVOICE, T_DELIVERY, T_OTHER = range(4)
TYPE_NAMES = ("contact", "invoice", "delivery", "other")
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
