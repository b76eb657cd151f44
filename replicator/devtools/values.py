"""Column values shared by the generator and the workload.

Money in cents as numeric, Odoo log-access timestamps, random tokens, text and html
(large, barely compressible html for TOASTed descriptions), analytic
distributions, and a column dict turned into a row tuple in table column order.
"""

from __future__ import annotations

import functools
import random
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from .odoo import TABLES, column_names
from .reference import FIRST_NAMES, LAST_NAMES, WORDS

ZERO = Decimal("0.00")


def money(cents: int) -> Decimal:
    """Cents as a numeric value with 2 decimals."""
    return Decimal(cents).scaleb(-2) if cents else ZERO


# quantities, unit prices and discounts take few distinct values
money_cached = functools.lru_cache(maxsize=4096)(money)


def rdiv(a: int, b: int) -> int:
    """a / b rounded half away from zero (b > 0), in integers."""
    if a >= 0:
        return (2 * a + b) // (2 * b)
    return -((-2 * a + b) // (2 * b))


def log_timestamp(rng: random.Random, d: date, hour_from: int = 7, hour_to: int = 19) -> datetime:
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


def token(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def hex_digits(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def _make_sentence(rng: random.Random, lo: int, hi: int) -> str:
    s = words(rng, rng.randint(lo, hi))
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


def sentence(rng: random.Random, long: bool = True) -> str:
    pool = _text_pool()[1 if long else 0]
    return pool[rng.getrandbits(11) % len(pool)]


def html_paragraphs(rng: random.Random, target: int) -> str:
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


def email_body(rng: random.Random, target: int) -> str:
    """A task description from an incoming email: 3 to 20 kB of html, not very compressible."""
    head = (
        f'<div data-oe-version="1.1"><p>Hello,</p>'
        f"<p>Message-Id: &lt;{hex_digits(rng, 24)}.{hex_digits(rng, 8)}@mail.example.com&gt;</p>"
    )
    tail = f"<p>--<br>{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}<br>{hex_digits(rng, 40)}</p></div>"
    return head + html_paragraphs(rng, max(0, target - len(head) - len(tail))) + tail


def analytic(rng: random.Random) -> dict[str, float]:
    r = rng.random()
    a = rng.randint(1, 12)
    if r < 0.7:
        return {str(a): 100.0}
    b, c = rng.sample([x for x in range(1, 13) if x != a], 2)
    if r < 0.9:
        return {f"{a},{b}": 60.0, str(c): 40.0}
    return {str(a): 50.0, str(b): 30.0, str(c): 20.0}


def slug(name: str) -> str:
    return "".join(ch for ch in name.lower().replace(" ", "-") if ch.isascii() and (ch.isalnum() or ch == "-")).strip(
        "-"
    )


def as_row(cols: tuple[str, ...], colset: frozenset[str], d: dict[str, Any]) -> tuple:
    """The dict as a tuple in table column order; absent keys are NULL, unknown keys an error."""
    if not colset.issuperset(d):
        raise KeyError(f"unknown columns {sorted(set(d) - colset)}")
    return tuple(map(d.get, cols))


COLS = {t: tuple(column_names(t)) for t in TABLES}
COLSET = {t: frozenset(c) for t, c in COLS.items()}
