"""What the fault tests share: a workload on the source in a thread, a whole-mirror
comparison that explains its differences, a source seeded after its slot exists, and the
status code of the metrics server's endpoints."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import psycopg

from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    TEXT_ONLY_DIFFERENCE,
    table_difference,
)
from replicator.devtools.odoo import TABLE_NAMES, TABLES, create_table_statement


class Workload(threading.Thread):
    """replicator.devtools.workload.workload until stopped; its counts, or its error, are kept."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(name="workload", daemon=True)
        self.dsn = dsn
        self.seed = seed
        self.stop_event = threading.Event()
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        from replicator.devtools.workload import workload

        try:
            self.counts = workload(self.dsn, seed=self.seed, stop=self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    @property
    def transactions(self) -> int:
        return self.counts.get("transactions", 0)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive(), "the workload did not stop"
        if self.error is not None:
            raise AssertionError(f"the workload failed: {self.error!r}") from self.error


def _snapshot(conn: psycopg.Connection, schema: str, table: str) -> tuple[list[str], list[tuple]]:
    cur = conn.execute(f'select * from "{schema}"."{table}" order by id')
    return [d.name for d in cur.description], cur.fetchall()


def mirror_diff(source_db, dest_db, tables=TABLE_NAMES) -> tuple[list[str], dict[str, int]]:
    """Differences between each source table and its mirror (empty if equal), and row counts."""
    problems: list[str] = []
    counts: dict[str, int] = {}
    with source_db.connect() as src, dest_db.connect() as dst:
        for table in tables:
            counts[table] = src.execute(f'select count(*) from "public"."{table}"').fetchone()[0]
            problem = table_difference(src, dst, table)
            if problem is None:
                continue
            if "source rows" not in problem:    # the schema: no rows to tell apart
                problems.append(problem)
                continue
            # Different rows: load them to tell how.
            src_cols, src_rows = _snapshot(src, "public", table)
            _dst_cols, dst_rows = _snapshot(dst, MIRROR_SCHEMA, table)
            dups = dst.execute(
                f'select id, count(*) from "{MIRROR_SCHEMA}"."{table}" '
                "group by id having count(*) > 1 order by id limit 5"
            ).fetchall()
            if dups:
                problems.append(f"{table}: duplicate ids in the mirror (id, count): {dups}")
            if src_rows == dst_rows:
                problems.append(f"{table}: {TEXT_ONLY_DIFFERENCE}")
                continue
            src_by_id = {r[0]: r for r in src_rows}
            dst_by_id = {r[0]: r for r in dst_rows}
            missing = sorted(src_by_id.keys() - dst_by_id.keys())
            extra = sorted(dst_by_id.keys() - src_by_id.keys())
            differ = sorted(k for k in src_by_id.keys() & dst_by_id.keys() if src_by_id[k] != dst_by_id[k])
            detail = ""
            if differ:
                k = differ[0]
                cols = [c for c, a, b in zip(src_cols, src_by_id[k], dst_by_id[k]) if a != b]
                detail = f"; id {k} differs in {cols}"
            problems.append(
                f"{table}: source {len(src_rows)} rows, mirror {len(dst_rows)}; "
                f"missing ids {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
                f"extra ids {extra[:10]} ({len(extra)}), differing ids {differ[:10]} "
                f"({len(differ)}){detail}"
            )
    return problems, counts


def seed_source(source_db, scale: float, seed: int = 42) -> dict[str, int]:
    """Tables, publication and slot first, then the rows: every seeded row is in the stream."""
    from replicator.devtools.seed import seed as seed_rows

    with source_db.connect() as conn:
        for table in TABLES:
            conn.execute(create_table_statement(table))
        conn.execute(f"create publication {PUBLICATION} for table {', '.join(TABLE_NAMES)}")
        conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (PUBLICATION,))
    return seed_rows(source_db.dsn, scale=scale, seed=seed, publication=PUBLICATION)


def scrape(port: int) -> str:
    """The replicator's /metrics page ("" while it does not listen yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return ""


def http_status(port: int, path: str = "/health", timeout: float = 2) -> int:
    """The status code of GET ``path`` on the metrics server; 0 if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
