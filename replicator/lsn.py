"""LSNs as integers, and PostgreSQL's text form of them."""

from datetime import datetime, timedelta, timezone

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def parse_lsn(text: str | None) -> int:
    """'16/B374D848' -> int; None or '' -> 0."""
    if not text:
        return 0
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def pg_time(micros: int) -> datetime:
    """A replication-protocol timestamp (microseconds since 2000-01-01 UTC)."""
    return PG_EPOCH + timedelta(microseconds=micros)


def pg_now() -> int:
    return int((datetime.now(timezone.utc) - PG_EPOCH) / timedelta(microseconds=1))
