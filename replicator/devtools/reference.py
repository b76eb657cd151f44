"""Fixed reference data of the seeded Odoo company: ids, accounts, taxes, products, word lists.

Ids of records in tables the mirror does not carry (companies, journals, accounts,
taxes, products, users, employees...) are fixed small integers; the generator and
the workload refer to them, and no foreign keys are created for them.
"""

from __future__ import annotations

from datetime import date, datetime

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
EPOCH = datetime(2022, 6, 1)
