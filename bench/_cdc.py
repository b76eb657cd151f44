"""What the two CDC benchmarks (cdc_bulk.py, cdc_oltp.py) share: a seeded source template
with a marker table, fresh databases per way, the native subscription, markers, the
replicator child, the mirror comparison and the report's header.

Not a benchmark: imported by the scripts next to it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    Servers,
    load_avg,
    replicator_commit,
    say,
    table_digest,
)
from _replicator import ReplicatorChild
from psycopg import sql

from replicator.config.settings import DestinationSettings
from replicator.destination import state
from replicator.devtools import odoo, seed

PG_VERSION = 15
MARKER = "bench_marker"
PUBLICATION = "bench_pub"
SLOT = "bench_slot"
SUBSCRIPTION = "bench_sub"
TEMPLATE_DB = "bench_seeded"
SRC_DB = "bench_src"
DST_DB = "bench_dst"
MIRROR = "odoo_mirror"

MARKER_DDL = (f"create table {MARKER} (id int primary key, "
              "at timestamptz not null default clock_timestamp())")
# The values CREATE SUBSCRIPTION's streaming takes on PostgreSQL 15 (16 adds parallel).
NATIVE_STREAMING = ("off", "on")
SUBSCRIPTION_STREAMING = {"f": "off", "false": "off", "t": "on", "true": "on", "p": "parallel"}


class CdcBench(Servers):
    """The servers, and a source database seeded once and copied for every way."""

    def __init__(self, keep: bool, base: Path | None, timeout: float,
                 tables: tuple[str, ...]) -> None:
        super().__init__(PG_VERSION, keep, base, dbnames=(SRC_DB, DST_DB))
        self.timeout = timeout
        self.odoo_tables = tables           # published, with the marker table
        self.tables = (*tables, MARKER)
        self.seeded: dict[str, int] = {}
        self.run_no = 0
        self.native_streaming = "off"       # --native-streaming
        # --no-indexes: primary keys only on both destinations. By default both get the
        # source's secondary indexes (the replicator's copy_indexes = true), so that the
        # native subscription maintains the same indexes as the replicator's mirror.
        self.copy_indexes = True
        # --set: the replicator's settings beyond its defaults, for every run (printed).
        self.replicator_settings: dict[str, dict[str, Any]] = {}

    def seed(self, scale: float) -> None:
        """The six Odoo tables and the marker table in a template database, published."""
        say(f"seeding the source template: scale {scale:g}")
        self.src.create_database(TEMPLATE_DB)
        dsn = self.src.dsn(TEMPLATE_DB)
        self.seeded = seed.seed(dsn, scale=scale, seed=42, publication=None)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(MARKER_DDL)
            conn.execute(sql.SQL("create publication {} for table {}").format(
                sql.Identifier(PUBLICATION),
                sql.SQL(", ").join(sql.Identifier("public", t) for t in self.tables)))
            conn.execute("vacuum analyze")
        say("seeded: " + ", ".join(f"{t} {n:,}" for t, n in self.seeded.items()))

    def fresh(self, native: bool) -> None:
        """A new source database from the seeded template, and an empty destination
        (with the published tables when a native subscription will fill them)."""
        self.src.drop_database(SRC_DB)
        self.src.create_database(SRC_DB, template=TEMPLATE_DB)
        self.dst.drop_database(DST_DB)
        self.dst.create_database(DST_DB)
        if native:
            with self.src.connect(SRC_DB) as conn:
                indexes = conn.execute(
                    "select pg_get_indexdef(i.indexrelid) from pg_index i "
                    "join pg_class c on c.oid = i.indrelid "
                    "join pg_namespace n on n.oid = c.relnamespace "
                    "where n.nspname = 'public' and c.relname = any(%s) "
                    "and not i.indisprimary", [list(self.odoo_tables)]).fetchall()
            with self.dst.connect(DST_DB) as conn:
                for t in self.odoo_tables:
                    conn.execute(odoo.create_table_statement(t, "public"))
                conn.execute(MARKER_DDL)
                if self.copy_indexes:
                    for (definition,) in indexes:
                        conn.execute(definition)
        for c in (self.src, self.dst):
            with c.connect() as conn:
                conn.execute("checkpoint")

    def insert_marker(self, marker_id: int) -> tuple[float, str]:
        """Commit a marker row: when the commit returned, and the WAL position after it."""
        with self.src.connect(SRC_DB) as conn:
            conn.execute(sql.SQL("insert into {} (id) values (%s)").format(
                sql.Identifier(MARKER)), [marker_id])
            committed = time.monotonic()
            lsn = conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        return committed, lsn

    def wait_marker(self, schema: str, marker_id: int, poll_s: float, check=None) -> float:
        """Poll the destination until the marker is there: when it was first seen.

        `check` runs between polls (a replicator child that died ends the wait).
        """
        q = sql.SQL("select 1 from {} where id = %s").format(sql.Identifier(schema, MARKER))
        deadline = time.monotonic() + self.timeout
        with self.dst.connect(DST_DB) as conn:
            while True:
                try:
                    if conn.execute(q, [marker_id]).fetchone():
                        return time.monotonic()
                except psycopg.errors.UndefinedTable:
                    pass       # the replicator has not created the mirror table yet
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise SystemExit(f"marker {marker_id} not in {schema}.{MARKER} after "
                                     f"{self.timeout:g} s")
                time.sleep(poll_s)

    def wait_synced(self, check=None) -> None:
        """Until every published table is streaming in the replicator's state: a marker can
        be seen before that, copied with its table."""
        deadline = time.monotonic() + self.timeout
        with self.dst.connect(DST_DB) as conn:
            while True:
                try:
                    done = conn.execute("select count(*) filter (where state = %s) "
                                        "from replicator.tables", [state.STREAMING]
                                        ).fetchone()[0]
                except psycopg.errors.UndefinedTable:
                    done = 0
                if done >= len(self.tables):
                    return
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise SystemExit(f"the replicator's tables not streaming after "
                                     f"{self.timeout:g} s")
                time.sleep(0.1)

    def ready(self, child: ReplicatorChild) -> None:
        """Until the replicator child streams with every table synced and its mirror's
        secondary indexes built: the state a way is timed from."""
        self.insert_marker(0)
        self.wait_marker(MIRROR, 0, 0.05, child.check_alive)
        self.wait_synced(child.check_alive)
        self.wait_indexes(child.check_alive)

    @staticmethod
    def stop_child(child: ReplicatorChild, way: str) -> None:
        """SIGTERM the replicator child; a way whose replicator exits otherwise than 0 is not
        a result."""
        code = child.stop()
        if code != 0:
            raise SystemExit(f"{way}: the replicator exited {code} on SIGTERM")

    def indexes_owed(self) -> int:
        with self.dst.connect(DST_DB) as conn:
            return conn.execute("select count(*) from replicator.index_builds").fetchone()[0]

    def wait_indexes(self, check=None) -> None:
        """Until the replicator has built the mirror's secondary indexes (it builds them
        while streaming, after the copy): the CDC is timed with them all in place, as the
        native way's are."""
        deadline = time.monotonic() + self.timeout
        with self.dst.connect(DST_DB) as conn:
            while conn.execute("select count(*) from replicator.index_builds").fetchone()[0]:
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise SystemExit(f"mirror indexes not built after {self.timeout:g} s")
                time.sleep(0.2)

    def check_mirror(self, schema: str, way: str) -> None:
        """Every published table at the destination equals the source's, row for row."""
        with self.src.connect(SRC_DB) as s, self.dst.connect(DST_DB) as d:
            for t in self.tables:
                want, got = table_digest(s, "public", t), table_digest(d, schema, t)
                if want != got:
                    raise SystemExit(f"{way}: {schema}.{t} differs from the source "
                                     f"({got[0]:,} rows against {want[0]:,})")

    def subscribe_native(self, streaming: str) -> dict[str, Any]:
        """CREATE SUBSCRIPTION (copy_data, `streaming` pinned) until every table is 'r'.

        Returns what the server says the subscription uses: streaming and binary.
        """
        if streaming not in NATIVE_STREAMING:
            raise ValueError(f"streaming = {streaming!r}")
        with self.dst.connect(DST_DB) as conn:
            conn.execute(sql.SQL(
                "create subscription {} connection {} publication {} "
                "with (copy_data = true, streaming = {})").format(
                sql.Identifier(SUBSCRIPTION), sql.Literal(self.src.dsn(SRC_DB)),
                sql.Identifier(PUBLICATION), sql.SQL(streaming)))
            deadline = time.monotonic() + self.timeout
            while conn.execute("select count(*) filter (where srsubstate <> 'r') + "
                               "(count(*) < %s)::int from pg_subscription_rel",
                               [len(self.tables)]).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the native subscription did not sync its tables in "
                                     f"{self.timeout:g} s")
                time.sleep(0.05)
            substream, subbinary = conn.execute(
                "select substream::text, subbinary from pg_subscription where subname = %s",
                [SUBSCRIPTION]).fetchone()
        return {"streaming": SUBSCRIPTION_STREAMING.get(substream, substream),
                "binary": bool(subbinary)}

    def drop_subscription(self) -> None:
        with self.dst.connect(DST_DB) as conn:
            conn.execute(sql.SQL("drop subscription {}").format(sql.Identifier(SUBSCRIPTION)))

    def child(self) -> ReplicatorChild:
        """A config for `replicator run` against this way's databases (its own directory)."""
        self.run_no += 1
        return ReplicatorChild(self.base / f"replicator-{self.run_no}", self.src, SRC_DB,
                               self.dst, DST_DB, PUBLICATION, SLOT, self.copy_indexes,
                               self.replicator_settings)

    def destination_indexes(self, schema: str) -> int:
        """Indexes on this way's destination tables (both ways must have the same)."""
        with self.dst.connect(DST_DB) as conn:
            return conn.execute("select count(*) from pg_indexes where schemaname = %s "
                                "and tablename = any(%s)",
                                [schema, list(self.tables)]).fetchone()[0]


def report_base(bench: CdcBench, machine: dict[str, Any], versions: dict[str, str],
                ways: dict[str, Any]) -> dict[str, Any]:
    """The fields every CDC report starts with."""
    defaults = DestinationSettings.__dataclass_fields__
    return {
        "replicator_commit": replicator_commit(),
        "machine": machine,
        "postgres": versions,
        "durability": bench.durability(),
        "load_avg_end": load_avg(),
        "foreign_cpu_max": max(e.get("foreign_cpu_max", e.get("foreign_cpu", 0.0))
                               for e in ways.values()),
        "seeded": bench.seeded,
        "destination_indexes": "the source's" if bench.copy_indexes else "primary keys only",
        "replicator_settings": {k: defaults[k].default
                                for k in ("batch_size", "flush_interval", "max_memory_mb")},
        "replicator_set": {f"{side}.{k}": v for side, keys in bench.replicator_settings.items()
                           for k, v in keys.items()},
    }


def print_header(report: dict[str, Any], out) -> None:
    m = report["machine"]
    s = report["replicator_settings"]
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, "
        f"kernel {m['kernel']}, Python {m['python']}",
        f"PostgreSQL: source {report['postgres']['source']}, destination "
        f"{report['postgres']['destination']} ({report['durability']})",
        f"load average: {m['load_avg']} at start, {report['load_avg_end']} at end; other "
        f"processes used at most {report['foreign_cpu_max']:.0%} of the CPUs during a run",
        f"replicator commit: {report['replicator_commit']}; destination batch_size "
        f"{s['batch_size']}, flush_interval {s['flush_interval']} s (defaults); --set: "
        + (", ".join(f"{k} = {v}" for k, v in report["replicator_set"].items()) or "none"),
        f"destination tables: {report['destination_indexes']} indexes on both ways "
        "(replicator copy_indexes = " + ("true" if report["destination_indexes"] ==
                                          "the source's" else "false") + ")",
    ]
    for line in lines:
        print(line, file=out)

