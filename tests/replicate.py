"""Running the replicator in-process from a test, and comparing tables."""

from __future__ import annotations

import contextlib
import threading

import pytest

from replicator.settings import Config
from replicator.runtime import Pipeline

PUBLICATION = "odoo_pub"


def make_config(source_db, dest_db, **overrides) -> Config:
    overrides.setdefault("flush_interval", 0.2)
    return Config.from_dsns(source_db.dsn, dest_db.dsn, PUBLICATION, **overrides)


def catch_up(source_db, dest_db, timeout: float = 120, **overrides) -> Pipeline:
    """Run the replicator in-process until everything committed so far is applied."""
    pipeline = Pipeline(make_config(source_db, dest_db, **overrides), until_caught_up=True)
    result: list = []

    def target():
        try:
            result.append(pipeline.run())
        except BaseException as exc:  # re-raised in the test's thread
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pipeline.stop_requested.set()
        thread.join(30)
        pytest.fail(f"replicator did not catch up within {timeout} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    assert result[0] == 0
    return pipeline


def table_rows(db, table: str, schema: str = "public", order: str = "id") -> list[tuple]:
    return db.fetchall(f'select * from "{schema}"."{table}" order by {order}')


@contextlib.contextmanager
def running(source_db, dest_db, **overrides):
    """The replicator running in a thread for the block; stopped (like SIGTERM) after it."""
    pipeline = Pipeline(make_config(source_db, dest_db, **overrides))
    errors: list = []

    def target():
        try:
            pipeline.run()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield pipeline
    finally:
        pipeline.stop_requested.set()
        thread.join(60)
    if thread.is_alive():
        pytest.fail("replicator did not stop within 60 s")
    if errors:
        raise errors[0]


def assert_same(source_db, dest_db, table: str, order: str = "id") -> list[tuple]:
    """The mirror table equals the source table, row for row."""
    src = table_rows(source_db, table, order=order)
    dst = table_rows(dest_db, table, "odoo_mirror", order=order)
    assert len(src) == len(dst), f"{table}: {len(src)} rows at the source, {len(dst)} in the mirror"
    assert src == dst
    return src


def write_config(path, source_db, dest_db, **extra) -> None:
    """An etl-config.toml for the test databases.

    Extra keywords are [destination] keys, or [source] keys with a source_ prefix.
    """
    import json

    from psycopg.conninfo import conninfo_to_dict

    def keys(prefix: bool) -> str:
        return "".join(f"{k.removeprefix('source_')} = {json.dumps(v)}\n" for k, v in extra.items()
                       if k.startswith("source_") == prefix)

    s, d = conninfo_to_dict(source_db.dsn), conninfo_to_dict(dest_db.dsn)
    path.write_text(f"""
[source]
type = "postgres"
host = "{s['host']}"
port = {s['port']}
database = "{s['dbname']}"
user = "{s['user']}"
password = "unused"
publication = "{PUBLICATION}"
{keys(True)}
[destination]
type = "postgres"
host = "{d['host']}"
port = {d['port']}
database = "{d['dbname']}"
user = "{d['user']}"
password = "unused"
{keys(False)}
[metrics]
enabled = false
""")
