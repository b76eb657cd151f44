#!/usr/bin/env python
"""Initial-copy benchmark: the replicator's backfill against a raw COPY pipe and native table sync.

On one pair of throwaway PostgreSQL 15 servers (a source with wal_level=logical and
a destination), in one run, this copies the same seeded `account_move_line` table
(about N rows) three ways and reports the median of `--repeat` runs of each:

1. the replicator: a fresh `Pipeline(..., until_caught_up=True).run()` (what
   `replicator run --until-caught-up` does), from the call until it returns, with
   copy_indexes=False and with copy_indexes=True; the run is split into phases
   (slot creation, the copy itself, the index build, the hand-over to the stream)
   by timing the replicator's own methods from outside;
2. the raw pipe: `psql -c "COPY ... TO STDOUT (FORMAT BINARY)" | psql -c "COPY ...
   FROM STDIN (FORMAT BINARY)"` into a pre-created table with the same columns and
   primary key: the physical limit for one stream;
3. native logical replication: `CREATE SUBSCRIPTION ... WITH (copy_data = true,
   streaming = off)` into a pre-created table with the primary key, timed until
   `pg_subscription_rel.srsubstate` is 'r' (ready);
4. `pgcopydb clone --table-jobs 2 --index-jobs 2` of the table alone (Debian's
   pgcopydb; in the default ways when it is installed): schema, data, primary key and
   the source's secondary indexes.

Every run starts from a freshly created destination database. The source is seeded
once (replicator.devtools.seed, scale N/5000, about five lines per journal entry), then
CHECKPOINTed and VACUUM ANALYZEd, so all runs read the same warm table. Only
account_move_line is published.

`--tune` adds an experiment: the replicator's copy phase alone (Backfill.run with
its primary key replaced by a no-op, then built and timed on its own) for each
worker count in `--tune-workers` (set on the Backfill after construction) and each
`replicator.pipeline.backfill.PAGES_PER_RANGE` in `--tune-pages` (0: never split),
interleaved over `--tune-repeat` rounds.

Each timed run also reports the CPU seconds of the source cluster, the
destination cluster and this process (with its psql children), and the share of
the CPUs other processes used meanwhile: a sample taken while someone else was
busy shows it.

    python bench/backfill.py [--rows 1000000] [--repeat 3] [--json] [--keep] [--tune]

Nothing here changes the replicator: phases are timed by wrapping its methods in
this process, and the tuning knobs are set on a Backfill object after construction.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from replicator.config.load import from_dsns  # noqa: E402
from replicator.config.settings import Config  # noqa: E402
from replicator.destination import shadow as shadow_mod  # noqa: E402
from replicator.destination import state  # noqa: E402
from replicator.devtools import odoo, seed  # noqa: E402
from replicator.devtools.localpg import DURABLE_SETTINGS  # noqa: E402
from replicator.pipeline import backfill as backfill_mod  # noqa: E402
from replicator.pipeline.supervisor import Pipeline  # noqa: E402
from replicator.schema import MirrorTable, read_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Servers,
    add_run_options,
    emit,
    machine_info,
    median,
    median_cpu,
    replicator_commit,
    say,
)

TABLE = "account_move_line"
PUBLICATION = "bench_pub"
SLOT = "bench_slot"
SUBSCRIPTION = "bench_sub"
SRC_DB = "bench_src"
DST_DB = "bench_dst"
PG_VERSION = 15
LINES_PER_SCALE = 5000          # seed: scale 1 is about 5,000 journal items

WAY_RAW = "raw pipe"
WAY_NATIVE = "native subscription"
WAY_REPL = "replicator (copy_indexes=false)"
WAY_REPL_IDX = "replicator (copy_indexes=true)"
WAY_REPL_COPY = "  its copy phase only"
WAY_PGCOPYDB = "pgcopydb clone"
WAY_RESYNC = "replicator resync (1% drift)"
RESYNC_DRIFT = 0.01             # share of the mirror's rows changed by hand before a resync
PGCOPYDB_JOBS = 2               # --table-jobs and --index-jobs: one per CPU here
PGCOPYDB_SRC_DB = "bench_pgcopydb_src"

log = logging.getLogger("bench")


# -- timing the replicator's phases from outside ----------------------------


class PhaseTimer:
    """Wraps methods of replicator classes to record when each call starts and ends.

    The copy and the index build both happen inside Backfill._copy (a table's
    indexes are queued when its last range is in), so the split between them
    comes from the TableCopy objects: `started` (first range) and `finished`
    (last range). A method that a newer replicator no longer has is skipped.
    """

    # (module, class, method, phase name)
    TARGETS = [
        ("replicator.source.connection", "ReplicationConnection", "create_slot", "create_slot"),
        ("replicator.pipeline.backfill", "Backfill", "run", "backfill"),
        ("replicator.pipeline.backfill", "Backfill", "_plan", "plan"),
        ("replicator.pipeline.backfill", "Backfill", "_copy", "copy"),
        # older replicators built the indexes after _copy, in _finish
        ("replicator.pipeline.backfill", "Backfill", "_finish", "finish"),
    ]

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self.workers: list[int] = []
        self.ranges: list[int] = []
        self.copies: list[tuple[float, float]] = []    # (started, finished) per table
        self._saved: list[tuple[type, str, Any]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> PhaseTimer:
        import importlib

        for module, cls_name, meth, phase in self.TARGETS:
            cls = getattr(importlib.import_module(module), cls_name, None)
            orig = cls.__dict__.get(meth) if cls is not None else None
            if orig is None:
                if phase != "finish":
                    say(f"note: {cls_name}.{meth} not found, phase {phase!r} is not timed")
                continue
            self._saved.append((cls, meth, orig))
            setattr(cls, meth, self._wrap(orig, phase))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, meth, orig in reversed(self._saved):
            setattr(cls, meth, orig)
        self._saved.clear()

    def _wrap(self, orig, phase: str):
        timer = self

        @functools.wraps(orig)
        def wrapper(obj, *args, **kw):
            if phase == "copy":
                timer.workers.append(getattr(obj, "workers", 0))
                timer.ranges.append(sum(len(c.ranges) for c in getattr(obj, "copies", [])))
            t0 = time.monotonic()
            try:
                return orig(obj, *args, **kw)
            finally:
                t1 = time.monotonic()
                with timer._lock:
                    timer.spans.append((phase, t0, t1))
                    if phase == "copy":
                        timer.copies += [(getattr(c, "started", 0.0) or t0,
                                          getattr(c, "finished", 0.0) or t1)
                                         for c in getattr(obj, "copies", [])]

        return wrapper

    def total(self, phase: str) -> float:
        return sum(t1 - t0 for p, t0, t1 in self.spans if p == phase)

    def first(self, phase: str) -> tuple[float, float] | None:
        for p, t0, t1 in self.spans:
            if p == phase:
                return t0, t1
        return None

    def rows_in(self) -> float | None:
        """When the last range of the last table was committed."""
        return max((f for _, f in self.copies), default=None)

    def copy_seconds(self) -> float:
        """The copy phase: from Backfill._copy's start until every range is in.

        It includes the workers' connections and snapshot import, not the index build.
        """
        span, done = self.first("copy"), self.rows_in()
        if span is None:
            return float("nan")
        return (done if done is not None else span[1]) - span[0]


def pipeline_phases(timer: PhaseTimer, t_start: float, t_end: float) -> dict[str, float]:
    """Where a pipeline run's time went, in seconds (phases that were timed)."""
    out: dict[str, float] = {}
    bf = timer.first("backfill")
    plan = timer.first("plan")
    copy = timer.first("copy")
    if bf is None:
        return out
    out["start (connect, discover, create the slot)"] = bf[0] - t_start
    out["  of which CREATE_REPLICATION_SLOT (permanent)"] = timer.total("create_slot")
    if plan is not None:
        out["temporary slot + exported snapshot"] = plan[0] - bf[0]
        out["plan (create mirror without key)"] = plan[1] - plan[0]
    if copy is not None:
        out["copy (parallel COPY BINARY pipes)"] = timer.copy_seconds()
        out["primary key, mark copied"] = (
            copy[1] - copy[0] - timer.copy_seconds() + timer.total("finish"))
    out["stream start until caught up"] = t_end - bf[1]
    return out


# -- the benchmark ----------------------------------------------------------


class Bench(Servers):
    def __init__(self, rows: int, keep: bool, base: Path | None = None) -> None:
        super().__init__(PG_VERSION, keep, base, dbnames=(SRC_DB, DST_DB))
        self.requested_rows = rows
        self.rows = 0
        self.table_mb = 0.0
        self.pages = 0
        self.psql = self._find_psql()
        self.pgcopydb_source = ""     # a copy of the source with only the table, made once

    @property
    def src_dsn(self) -> str:
        return self.src.dsn(SRC_DB)

    @property
    def dst_dsn(self) -> str:
        return self.dst.dsn(DST_DB)

    def _find_psql(self) -> str:
        for cand in (self.src.bin_dir / "psql", Path(f"/usr/lib/postgresql/{PG_VERSION}/bin/psql")):
            if cand.exists():
                return str(cand)
        found = shutil.which("psql")
        if not found:
            raise SystemExit("psql not found: apt-get install postgresql-client-15")
        return found

    def seed(self) -> None:
        scale = self.requested_rows / LINES_PER_SCALE
        say(f"seeding the source: replicator.devtools.seed scale {scale:g} (about "
            f"{self.requested_rows:,} account_move_line rows)")
        t0 = time.monotonic()
        self.src.create_database(SRC_DB)
        counts = seed.seed(self.src_dsn, scale=scale, seed=42, publication=None)
        with self.src.connect(SRC_DB) as conn:
            conn.execute(sql.SQL("create publication {} for table {}").format(
                sql.Identifier(PUBLICATION), sql.Identifier("public", TABLE)))
            conn.execute(sql.SQL("vacuum (analyze) {}").format(sql.Identifier("public", TABLE)))
            conn.execute("checkpoint")
            self.rows = conn.execute(
                sql.SQL("select count(*) from {}").format(sql.Identifier("public", TABLE))).fetchone()[0]
            self.pages, size = conn.execute(
                "select relpages, pg_table_size(oid) from pg_class where oid = %s::regclass",
                [f"public.{TABLE}"]).fetchone()
            self.table_mb = size / 1e6
        assert self.rows == counts[TABLE], (self.rows, counts)
        say(f"seeded in {time.monotonic() - t0:.1f} s: {self.rows:,} rows, "
            f"{self.table_mb:.0f} MB, {self.pages:,} pages")

    def fresh_destination(self, with_table: bool) -> None:
        """An empty destination database; with the table (columns + primary key) if asked."""
        self.dst.drop_database(DST_DB)
        self.dst.create_database(DST_DB)
        if with_table:
            with self.dst.connect(DST_DB) as conn:
                conn.execute(odoo.create_table_statement(TABLE, "public"))
        with self.dst.connect() as conn:
            conn.execute("checkpoint")

    def dest_rows(self, qualname: str) -> int:
        with self.dst.connect(DST_DB) as conn:
            return conn.execute(f"select count(*) from {qualname}").fetchone()[0]

    def check_rows(self, qualname: str, way: str) -> None:
        got = self.dest_rows(qualname)
        if got != self.rows:
            raise RuntimeError(f"{way}: {got:,} rows at the destination, {self.rows:,} at the source")

    # -- way 2: the raw pipe

    def run_raw(self) -> dict[str, Any]:
        self.fresh_destination(with_table=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        base = [self.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        out_cmd = base + ["-d", self.src_dsn, "-c", f"COPY public.{TABLE} TO STDOUT (FORMAT BINARY)"]
        in_cmd = base + ["-d", self.dst_dsn, "-c", f"COPY public.{TABLE} FROM STDIN (FORMAT BINARY)"]
        snap = self.meter.snapshot()
        t0 = time.monotonic()
        p_out = subprocess.Popen(out_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        p_in = subprocess.Popen(in_cmd, stdin=p_out.stdout, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        p_out.stdout.close()
        in_out, in_err = p_in.communicate()
        out_err = p_out.stderr.read()
        p_out.wait()
        secs = time.monotonic() - t0
        cpu = self.meter.since(snap)
        p_out.stderr.close()
        if p_out.returncode or p_in.returncode:
            raise RuntimeError(f"raw pipe failed: {out_err.decode()} {in_err.decode()}")
        self.check_rows(f"public.{TABLE}", WAY_RAW)
        return {"seconds": secs, **cpu}

    # -- way 4: pgcopydb clone, the table and its indexes (Debian's pgcopydb)

    def run_pgcopydb(self) -> dict[str, Any]:
        binary = shutil.which("pgcopydb")
        if binary is None:
            raise SystemExit("pgcopydb is not installed: apt-get install pgcopydb "
                             "(or leave pgcopydb out of --ways)")
        if not self.pgcopydb_source:
            # A database holding only the table: pgcopydb 0.10's filters keep the other
            # tables' sequence defaults, and the restore fails on them.
            self.src.drop_database(PGCOPYDB_SRC_DB)
            self.src.create_database(PGCOPYDB_SRC_DB, template=SRC_DB)
            with self.src.connect(PGCOPYDB_SRC_DB) as conn:
                for t in odoo.TABLE_NAMES:
                    if t != TABLE:
                        conn.execute(sql.SQL("drop table {} cascade").format(
                            sql.Identifier("public", t)))
                conn.execute(sql.SQL("drop publication if exists {}").format(
                    sql.Identifier(PUBLICATION)))
                conn.execute("vacuum analyze")
                conn.execute("checkpoint")
            self.pgcopydb_source = self.src.dsn(PGCOPYDB_SRC_DB)
        self.fresh_destination(with_table=False)
        work = self.base / "pgcopydb"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o755)
        cmd = [binary, "clone", "--source", self.pgcopydb_source, "--target", self.dst_dsn,
               "--table-jobs", str(PGCOPYDB_JOBS), "--index-jobs", str(PGCOPYDB_JOBS),
               "--dir", str(work), "--no-owner", "--no-acl", "--skip-extensions"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # pg_dump and pg_restore of the servers' own version.
        env["PATH"] = f"{self.src.bin_dir}:{env.get('PATH', '')}"
        snap = self.meter.snapshot()
        t0 = time.monotonic()
        # Its own session: pgcopydb signals its whole process group when its workers end.
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              start_new_session=True)
        secs = time.monotonic() - t0
        cpu = self.meter.since(snap)
        if proc.returncode:
            raise RuntimeError(f"pgcopydb clone failed ({proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        self.check_rows(f"public.{TABLE}", WAY_PGCOPYDB)
        with self.dst.connect(DST_DB) as conn:
            indexes = conn.execute("select count(*) from pg_indexes where schemaname = 'public' "
                                   "and tablename = %s", [TABLE]).fetchone()[0]
        return {"seconds": secs, **cpu, "indexes": indexes}

    # -- way 3: native table sync

    def run_native(self) -> dict[str, Any]:
        self.fresh_destination(with_table=True)
        conninfo = self.src.dsn(SRC_DB)
        seen: dict[str, float] = {}
        with self.dst.connect(DST_DB) as conn:
            snap = self.meter.snapshot()
            t0 = time.monotonic()
            conn.execute(sql.SQL(
                "create subscription {} connection {} publication {} "
                "with (copy_data = true, streaming = off)").format(
                sql.Identifier(SUBSCRIPTION), sql.Literal(conninfo), sql.Identifier(PUBLICATION)))
            created = time.monotonic()
            while True:
                row = conn.execute(
                    "select srsubstate from pg_subscription_rel where srrelid = %s::regclass",
                    [f"public.{TABLE}"]).fetchone()
                now = time.monotonic()
                st = row[0] if row else "?"
                seen.setdefault(st, now - t0)
                if st == "r":
                    break
                if now - t0 > 3600:
                    raise RuntimeError("native table sync did not reach 'r' within an hour")
                time.sleep(0.02)
            secs = time.monotonic() - t0
            cpu = self.meter.since(snap)
            substream, subbinary = conn.execute(
                "select substream::text, subbinary from pg_subscription where subname = %s",
                [SUBSCRIPTION]).fetchone()
            conn.execute(sql.SQL("drop subscription {}").format(sql.Identifier(SUBSCRIPTION)))
        self.check_rows(f"public.{TABLE}", WAY_NATIVE)
        streaming = {"f": "off", "false": "off", "t": "on", "true": "on", "p": "parallel"}.get(
            str(substream), str(substream))
        return {"seconds": secs, **cpu, "streaming": streaming, "binary": bool(subbinary),
                "create_subscription_s": created - t0,
                "states_first_seen_s": {k: round(v, 3) for k, v in seen.items()}}

    # -- way 1: the replicator

    def config(self, **overrides: Any) -> Config:
        overrides.setdefault("slot", SLOT)
        return from_dsns(self.src_dsn, self.dst_dsn, PUBLICATION, **overrides)

    def drop_source_slots(self) -> None:
        with self.src.connect() as conn:
            for (name,) in conn.execute(
                    "select slot_name from pg_replication_slots where database = %s", [SRC_DB]
            ).fetchall():
                with contextlib.suppress(psycopg.Error):
                    conn.execute("select pg_drop_replication_slot(%s)", [name])

    def run_replicator(self, copy_indexes: bool) -> dict[str, Any]:
        self.fresh_destination(with_table=False)
        self.drop_source_slots()
        cfg = self.config(copy_indexes=copy_indexes)
        with PhaseTimer() as timer:
            snap = self.meter.snapshot()
            t0 = time.monotonic()
            rc = Pipeline(cfg, until_caught_up=True).run()
            t1 = time.monotonic()
            cpu = self.meter.since(snap)
        if rc != 0:
            raise RuntimeError(f"replicator run returned {rc}")
        self.drop_source_slots()
        self.check_rows(f"odoo_mirror.{TABLE}", WAY_REPL)
        with self.dst.connect(DST_DB) as conn:
            n_idx = conn.execute(
                "select count(*) from pg_indexes where schemaname = 'odoo_mirror' and tablename = %s",
                [TABLE]).fetchone()[0]
            # Secondary indexes are built while the stream runs, after the copy: a run
            # that ends once caught up leaves them owed to the next run.
            owed = conn.execute("select count(*) from replicator.index_builds").fetchone()[0]
        return {"seconds": t1 - t0, **cpu, "copy_seconds": timer.copy_seconds(),
                "phases": pipeline_phases(timer, t0, t1),
                "workers": timer.workers[0] if timer.workers else None,
                "ranges": timer.ranges[0] if timer.ranges else None,
                "mirror_indexes": n_idx, "indexes_owed": owed}

    def run_resync(self) -> dict[str, Any]:
        """`replicator resync --table` of a mirror that has its rows, then a run until caught
        up: the copy goes into a shadow table and one transaction brings the mirror to it.
        Before it, RESYNC_DRIFT of the mirror's rows are changed and half as many deleted by
        hand, so the swap has work to do; the first copy is not timed."""
        self.fresh_destination(with_table=False)
        self.drop_source_slots()
        cfg = self.config(copy_indexes=False)
        if Pipeline(cfg, until_caught_up=True).run() != 0:
            raise RuntimeError("the replicator's first copy failed")
        every = max(2, int(1 / RESYNC_DRIFT))
        with self.dst.connect(DST_DB) as conn:
            conn.execute(f"update odoo_mirror.{TABLE} set name = 'drift' where id % {every} = 0")
            conn.execute(f"delete from odoo_mirror.{TABLE} where id % {2 * every} = 1")
            conn.execute(f"vacuum analyze odoo_mirror.{TABLE}")
            state.request_resync(conn, "replicator", SLOT, [f"public.{TABLE}"])
            conn.execute("checkpoint")
        swaps: list[float] = []
        original = shadow_mod.swap_in

        def timed_swap(*args: Any, **kw: Any) -> Any:
            t = time.monotonic()
            try:
                return original(*args, **kw)
            finally:
                swaps.append(time.monotonic() - t)

        backfill_mod.shadow.swap_in = timed_swap   # type: ignore[attr-defined]
        try:
            snap = self.meter.snapshot()
            t0 = time.monotonic()
            rc = Pipeline(cfg, until_caught_up=True).run()
            t1 = time.monotonic()
            cpu = self.meter.since(snap)
        finally:
            backfill_mod.shadow.swap_in = original   # type: ignore[attr-defined]
        if rc != 0:
            raise RuntimeError(f"replicator run returned {rc}")
        self.drop_source_slots()
        self.check_rows(f"odoo_mirror.{TABLE}", WAY_RESYNC)
        with self.dst.connect(DST_DB) as conn:
            drift = conn.execute(
                f"select count(*) from odoo_mirror.{TABLE} where name = 'drift'").fetchone()[0]
        if drift or len(swaps) != 1:
            raise RuntimeError(f"resync: {drift} drifted rows left, {len(swaps)} swap(s)")
        return {"seconds": t1 - t0, **cpu, "swap_seconds": swaps[0]}

    # -- the tuning experiment: the copy phase alone

    def run_copy_only(self, workers: int | None, pages_per_range: int | None) -> dict[str, Any]:
        """Backfill.run directly (no permanent slot, no stream, no primary key build)."""
        self.fresh_destination(with_table=False)
        cfg = self.config(copy_indexes=False)
        dst = cfg.destination
        with psycopg.connect(cfg.source.conninfo(), autocommit=True) as catalog:
            src_table = read_table(catalog, "public", TABLE)
        binary = all(c.builtin for c in src_table.columns)
        mirror = MirrorTable(src_table, *cfg.target("public", TABLE),
                             state_schema=dst.state_schema, binary=binary)
        with psycopg.connect(dst.conninfo(), autocommit=True) as conn:
            state.setup(conn, dst.state_schema)
        saved_pages = backfill_mod.PAGES_PER_RANGE
        saved_pk = backfill_mod.primary_key_sql
        if pages_per_range is not None:
            backfill_mod.PAGES_PER_RANGE = pages_per_range if pages_per_range > 0 else 1 << 40
        # The primary key is not part of the copy phase: build a no-op instead.
        backfill_mod.primary_key_sql = lambda t: sql.SQL("select 1")
        try:
            bf = backfill_mod.Backfill(cfg, [mirror], SLOT)
            if workers is not None:
                bf.workers = workers
            with PhaseTimer() as timer:
                snap = self.meter.snapshot()
                t0 = time.monotonic()
                bf.run()
                t1 = time.monotonic()
                cpu = self.meter.since(snap)
        finally:
            backfill_mod.PAGES_PER_RANGE = saved_pages
            backfill_mod.primary_key_sql = saved_pk
        self.drop_source_slots()
        self.check_rows(f"odoo_mirror.{TABLE}", "copy only")
        # What the skipped primary key costs on its own, as Backfill builds it.
        with self.dst.connect(DST_DB) as conn:
            with conn.transaction():
                conn.execute("set local maintenance_work_mem = '256MB'")
                t_pk = time.monotonic()
                conn.execute(sql.SQL("alter table {} add primary key ({})").format(
                    mirror.dest, sql.SQL(", ").join(map(sql.Identifier, src_table.key))))
                pk_secs = time.monotonic() - t_pk
        return {"seconds": timer.copy_seconds(), "backfill_seconds": t1 - t0, **cpu,
                "pk_build_s": pk_secs,
                "workers": timer.workers[0] if timer.workers else workers,
                "ranges": timer.ranges[0] if timer.ranges else None}


# -- reporting --------------------------------------------------------------


def summarize(bench: Bench, samples: dict[str, list[dict]]) -> dict[str, Any]:
    rows = bench.rows
    ways: dict[str, dict[str, Any]] = {}
    for way, runs in samples.items():
        if not runs:
            continue
        secs = median([r["seconds"] for r in runs])
        entry: dict[str, Any] = {"seconds": secs, "rows_per_s": rows / secs,
                                 "samples_s": [round(r["seconds"], 3) for r in runs],
                                 "foreign_cpu_max": max(r.get("foreign_cpu", 0.0) for r in runs),
                                 "cpu_s": median_cpu(runs)}
        if "phases" in runs[0]:
            names = list(runs[0]["phases"])
            entry["phases_s"] = {n: round(median([r["phases"].get(n, 0.0) for r in runs]), 3)
                                 for n in names}
            entry["workers"] = runs[0]["workers"]
            entry["ranges"] = runs[0]["ranges"]
            entry["mirror_indexes"] = runs[0]["mirror_indexes"]
            entry["indexes_owed"] = runs[0].get("indexes_owed", 0)
        if way == WAY_PGCOPYDB:
            entry["indexes"] = runs[0]["indexes"]
        if way == WAY_RESYNC:
            entry["swap_s"] = median([r["swap_seconds"] for r in runs])
        if way == WAY_NATIVE:
            entry["streaming"] = runs[0]["streaming"]
            entry["binary"] = runs[0]["binary"]
            entry["states_first_seen_s"] = runs[len(runs) // 2]["states_first_seen_s"]
        ways[way] = entry
    # the copy phase of the copy_indexes=false runs, as a way of its own
    repl = samples.get(WAY_REPL) or []
    if repl:
        secs = median([r["copy_seconds"] for r in repl])
        ways[WAY_REPL_COPY] = {"seconds": secs, "rows_per_s": rows / secs,
                               "samples_s": [round(r["copy_seconds"], 3) for r in repl]}
    raw = ways.get(WAY_RAW, {}).get("rows_per_s")
    native = ways.get(WAY_NATIVE, {}).get("rows_per_s")
    pgcopydb = ways.get(WAY_PGCOPYDB, {}).get("rows_per_s")
    for entry in ways.values():
        entry["vs_raw_pipe"] = entry["rows_per_s"] / raw if raw else None
        entry["vs_native"] = entry["rows_per_s"] / native if native else None
        entry["vs_pgcopydb"] = entry["rows_per_s"] / pgcopydb if pgcopydb else None
    return ways


def print_table(report: dict[str, Any], out=sys.stdout) -> None:
    m = report["machine"]
    p = print
    p(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, "
      f"kernel {m['kernel']}, Python {m['python']}", file=out)
    p(f"PostgreSQL: source {report['postgres']['source']}, destination "
      f"{report['postgres']['destination']} (LocalCluster: "
      + ", ".join(f"{k}={v}" for k, v in DURABLE_SETTINGS.items())
      + ", shared_buffers=128MB, loopback TCP)",
      file=out)
    p(f"load average: {m['load_avg']} at start, {report['load_avg_end']} at end; other "
      f"processes used at most {report['foreign_cpu_max']:.0%} of the CPUs during a timed run",
      file=out)
    p(f"replicator commit: {report.get('replicator_commit')}", file=out)
    t = report["table"]
    p(f"table: {t['name']}, {t['rows']:,} rows ({t['mb']:.0f} MB, {t['pages']:,} pages), "
      f"median of {report['repeat']} run(s) per way", file=out)
    ways = report["ways"]
    repl = ways.get(WAY_REPL) or ways.get(WAY_REPL_IDX) or {}
    if repl:
        p(f"replicator workers: {repl.get('workers')} (ctid ranges: {repl.get('ranges')}, "
          f"PAGES_PER_RANGE={report['pages_per_range']})", file=out)
    if WAY_NATIVE in ways:
        n = ways[WAY_NATIVE]
        p(f"native subscription: streaming = {n['streaming']} (pinned), binary = "
          f"{'on' if n['binary'] else 'off'}", file=out)
    p("", file=out)

    def fmt_ratio(x):
        return f"{x:.2f}x" if x else "-"

    p(f"{'way':36} {'seconds':>9} {'rows/s':>10} {'vs raw pipe':>12} {'vs native':>10} "
      f"{'vs pgcopydb':>12}   CPU s: source/destination/bench", file=out)
    order = [WAY_REPL, WAY_REPL_COPY, WAY_REPL_IDX, WAY_RESYNC, WAY_RAW, WAY_NATIVE,
             WAY_PGCOPYDB]
    for way in order:
        if way not in ways:
            continue
        e = ways[way]
        cpu = e.get("cpu_s")
        cpu_text = (f"{cpu.get('source', 0):.1f} / {cpu.get('destination', 0):.1f} / "
                    f"{cpu.get('bench', 0):.1f}") if cpu else ""
        p(f"{way:36} {e['seconds']:9.2f} {e['rows_per_s']:10,.0f} {fmt_ratio(e['vs_raw_pipe']):>12} "
          f"{fmt_ratio(e['vs_native']):>10} {fmt_ratio(e.get('vs_pgcopydb')):>12}   {cpu_text}",
          file=out)
    if WAY_PGCOPYDB in ways:
        p(f"(pgcopydb clone: --table-jobs {PGCOPYDB_JOBS} --index-jobs {PGCOPYDB_JOBS}, the "
          f"table with its {ways[WAY_PGCOPYDB].get('indexes')} indexes; the replicator with "
          "copy_indexes=true builds the secondary ones after its copy, while it streams)",
          file=out)
    for way in (WAY_REPL, WAY_REPL_IDX):
        if way in ways and ways[way].get("phases_s"):
            p(f"\n{way}: where the time goes (medians, s)", file=out)
            for name, secs in ways[way]["phases_s"].items():
                p(f"  {name:48} {secs:8.2f}", file=out)
    if WAY_RESYNC in ways:
        r = ways[WAY_RESYNC]
        first = ways.get(WAY_REPL, {}).get("seconds")
        p(f"\n{WAY_RESYNC}: {r['seconds']:.2f} s, of which the swap into the mirror "
          f"{r['swap_s']:.2f} s" + (f"; {r['seconds'] / first:.2f}x the first copy's time"
                                    if first else ""), file=out)
    if WAY_NATIVE in ways:
        st = ways[WAY_NATIVE].get("states_first_seen_s") or {}
        p(f"\nnative: srsubstate first seen at (s) {st}", file=out)
    if report.get("targets"):
        p("", file=out)
        for line in report["targets"]:
            p(line, file=out)
    if report.get("tuning"):
        p("\ntuning: the replicator's copy phase alone (median s, rows/s)", file=out)
        p(f"  {'workers':>7} {'pages/range':>11} {'ranges':>6} {'streams':>7} {'seconds':>8} {'rows/s':>9} "
          f"{'samples':>20}  CPU s src/dst/bench  PK build s", file=out)
        for r in report["tuning"]:
            cpu = r["cpu_s"]
            p(f"  {r['workers']:>7} {r['pages_per_range_label']:>11} {str(r['ranges']):>6} "
              f"{r['streams']:>7} {r['seconds']:8.2f} {r['rows_per_s']:9,.0f} "
              f"{' '.join(f'{x:.2f}' for x in r['samples_s']):>20}  "
              f"{cpu.get('source', 0):5.1f} /{cpu.get('destination', 0):5.1f} /{cpu.get('bench', 0):4.1f}"
              f"  {r['pk_build_s']:9.2f}", file=out)
        best = min(report["tuning"], key=lambda r: r["seconds"])
        p(f"  fastest: {best['workers']} worker(s), PAGES_PER_RANGE={best['pages_per_range_label']}",
          file=out)


def targets(ways: dict[str, Any]) -> list[str]:
    out = []
    repl = ways.get(WAY_REPL)
    if repl and repl.get("vs_raw_pipe"):
        ok = repl["vs_raw_pipe"] >= 1.0
        out.append(f"target replicator >= raw pipe:      {'MET' if ok else 'NOT MET'} "
                   f"({repl['vs_raw_pipe']:.2f}x)")
    for way in (WAY_REPL, WAY_REPL_IDX):
        e = ways.get(way)
        if e and e.get("vs_pgcopydb"):
            ok = e["vs_pgcopydb"] >= 1.3
            out.append(f"target {way} >= 1.3x pgcopydb: {'MET' if ok else 'NOT MET'} "
                       f"({e['vs_pgcopydb']:.2f}x)")
    if repl and repl.get("vs_native"):
        ok = repl["vs_native"] >= 1.3
        out.append(f"target replicator >= 1.3x native:   {'MET' if ok else 'NOT MET'} "
                   f"({repl['vs_native']:.2f}x)")
    return out


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="account_move_line rows (about)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per way; the median is reported")
    ap.add_argument("--ways", default="raw,native,replicator,replicator-indexes,resync"
                    + (",pgcopydb" if shutil.which("pgcopydb") else ""),
                    help="comma-separated subset of raw,native,replicator,replicator-indexes,"
                         "resync,pgcopydb (default: all of them, pgcopydb when it is "
                         "installed; none: only the --tune experiment)")
    ap.add_argument("--tune", action="store_true",
                    help="also time the copy phase for each --tune-workers x --tune-pages")
    ap.add_argument("--tune-workers", type=parse_int_list, default=[1, 2, 3, 4])
    ap.add_argument("--tune-pages", type=parse_int_list, default=[2048, 4096, 8192, 0],
                    help="PAGES_PER_RANGE values; 0 means one range for the whole table")
    ap.add_argument("--tune-repeat", type=int, default=None, help="runs per combination (--repeat)")
    add_run_options(ap, "print the report as JSON on stdout (and the table on stderr)")
    args = ap.parse_args(argv)
    if args.rows < 100 or args.repeat < 1:
        ap.error("--rows must be >= 100 and --repeat >= 1")
    wanted = [w.strip() for w in args.ways.split(",") if w.strip() and w.strip() != "none"]
    way_names = {"raw": WAY_RAW, "native": WAY_NATIVE, "replicator": WAY_REPL,
                 "replicator-indexes": WAY_REPL_IDX, "pgcopydb": WAY_PGCOPYDB,
                 "resync": WAY_RESYNC}
    unknown = [w for w in wanted if w not in way_names]
    if unknown:
        ap.error(f"unknown way(s) {unknown}: choose from {', '.join(way_names)}")

    # The replicator's progress lines are noise here; warnings and errors still show.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    machine = machine_info()
    bench = Bench(args.rows, args.keep, args.base_dir)
    try:
        bench.start()
        versions = bench.versions()
        bench.seed()
        runners = {
            WAY_RAW: bench.run_raw,
            WAY_NATIVE: bench.run_native,
            WAY_REPL: lambda: bench.run_replicator(copy_indexes=False),
            WAY_REPL_IDX: lambda: bench.run_replicator(copy_indexes=True),
            WAY_PGCOPYDB: bench.run_pgcopydb,
            WAY_RESYNC: bench.run_resync,
        }
        order = [way_names[w] for w in wanted]
        samples: dict[str, list[dict]] = {w: [] for w in order}
        for i in range(args.repeat):
            # Rotate the order so no way always runs first (or right after another).
            rot = order[i % len(order):] + order[:i % len(order)] if order else []
            for way in rot:
                say(f"round {i + 1}/{args.repeat}: {way}")
                res = runners[way]()
                samples[way].append(res)
                say(f"  {res['seconds']:.2f} s, {bench.rows / res['seconds']:,.0f} rows/s "
                    f"(other processes used {res['foreign_cpu']:.0%} of the CPUs)")
        ways = summarize(bench, samples)

        tuning = []
        if args.tune:
            reps = args.tune_repeat or args.repeat
            combos = [(w, p) for w in args.tune_workers for p in args.tune_pages]
            tune_runs: dict[tuple[int, int], list[dict]] = {c: [] for c in combos}
            # Interleaved (every combination once per round), so a slow spell of
            # the machine does not land on one combination only.
            for i in range(reps):
                for workers, pages in combos[i % len(combos):] + combos[:i % len(combos)]:
                    res = bench.run_copy_only(workers, pages)
                    tune_runs[(workers, pages)].append(res)
                    label = str(pages) if pages > 0 else "no split"
                    say(f"tune {i + 1}/{reps}: {workers} worker(s), PAGES_PER_RANGE={label} "
                        f"({res['ranges']} ranges): copy {res['seconds']:.2f} s, "
                        f"{bench.rows / res['seconds']:,.0f} rows/s")
            for (workers, pages), runs in tune_runs.items():
                secs = median([r["seconds"] for r in runs])
                tuning.append({"workers": workers, "pages_per_range": pages,
                               "pages_per_range_label": str(pages) if pages > 0 else "no split",
                               "ranges": runs[0]["ranges"],
                               "streams": min(workers, runs[0]["ranges"] or 1),
                               "seconds": secs, "rows_per_s": bench.rows / secs,
                               "samples_s": [round(r["seconds"], 3) for r in runs],
                               "foreign_cpu_max": max(r["foreign_cpu"] for r in runs),
                               "cpu_s": median_cpu(runs),
                               "pk_build_s": median([r["pk_build_s"] for r in runs])})

        report = {
            "replicator_commit": replicator_commit(),
            "machine": machine,
            "postgres": versions,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "foreign_cpu_max": max([e.get("foreign_cpu_max", 0.0) for e in ways.values()]
                                   + [r["foreign_cpu_max"] for r in tuning]),
            "rows_requested": args.rows,
            "repeat": args.repeat,
            "table": {"name": f"public.{TABLE}", "rows": bench.rows, "mb": round(bench.table_mb, 1),
                      "pages": bench.pages},
            "pages_per_range": backfill_mod.PAGES_PER_RANGE,
            "ways": ways,
            "targets": targets(ways),
            "tuning": tuning,
        }
        emit(report, args.json, lambda r: print_table(r, out=sys.stderr if args.json
                                                      else sys.stdout))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
