"""Integration tests share tests/replicate.py (importable as `replicate`)."""

from replicate import PUBLICATION, catch_up, make_config, table_rows  # noqa: F401
