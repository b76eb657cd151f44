#!/usr/bin/env python
"""Odoo-invoicing OLTP benchmark: replication lag and source throughput under pgbench.

On one pair of throwaway PostgreSQL 15 servers with production durability (fsync,
full_page_writes, synchronous_commit on), the source has the six Odoo tables (seeded
with replicator.devtools.seed) and `bench_marker (id, at)`, all published. Each way
starts from a fresh copy of the seeded source database and an empty destination (the
source's secondary indexes on both ways' tables; `--no-indexes`: primary keys only), is
synced and streaming first, and then for `--seconds`:

- pgbench runs `--clients` clients at the source's top rate (no rate limit) with a
  script shaped like Odoo invoicing: one transaction inserts a draft account_move (a
  copy of a random seeded one), its journal items (copies of that entry's lines, about
  five) and bumps the partner's customer_rank;
- a marker writer commits one `bench_marker` row every 100 ms;
- a poller reads the destination's marker table every `--poll-ms` and records when
  each marker appears: lag = seen - commit returned (one clock: both in this process).

Ways, one after the other in the same run: native subscription first (`copy_data =
true, streaming = off`, or `--native-streaming on`: pinned and printed), then the replicator (`python -m replicator
run` as a child process, its peak resident memory read from /proc at the end). After
each way the destination is compared with the source, table by table.

Reported: marker lag p50 / p95 / p99 / max, the source's tps (pgbench's own count) and
ours / native, CPU seconds per side; `--csv` writes every marker as (t, lag_ms, way).

`--backlog ROWS` measures the apply ceiling instead: with each way synced and then
stopped (the subscription disabled; the replicator stopped by SIGTERM), pgbench writes
about ROWS row changes in the firehose's small transactions (40 journal items inserted and
10 updated per invoice, unless --lines/--updates say otherwise) and a marker; then the way
starts again (ENABLE; `replicator run`) and is timed until the marker is visible: rows/s
applied cold, timed from the moment the way's slot is active (its start, printed apart:
the native launcher may wait seconds before it starts a worker).

    python bench/cdc_oltp.py [--seconds 60] [--clients 4] [--csv lag.csv] [--json]
    python bench/cdc_oltp.py --backlog 1000000 [--no-indexes]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from _cdc import (  # noqa: E402
    DST_DB,
    MARKER,
    MIRROR,
    NATIVE_STREAMING,
    SLOT,
    SRC_DB,
    SUBSCRIPTION,
    TEMPLATE_DB,
    CdcBench,
    print_header,
    report_base,
)
from _common import add_cdc_options, add_run_options, clean_env, emit, machine_info, say  # noqa: E402
from _replicator import parse_settings  # noqa: E402
from psycopg import sql  # noqa: E402

from replicator.devtools import odoo  # noqa: E402

MARKER_EVERY_S = 0.1

WAY_NATIVE = "native subscription"
WAY_OURS = "replicator"

NOW = "(now() at time zone 'utc')"
# Columns of the copies that are not the template's: a new draft entry, new log times.
MOVE_OVERRIDES = {"state": "'draft'", "name": "'/'", "posted_before": "false",
                  "create_date": NOW, "write_date": NOW}
LINE_OVERRIDES = {"move_id": ":move", "parent_state": "'draft'", "move_name": "'/'",
                  "create_date": NOW, "write_date": NOW}


def pgbench_script(lines: int = 0, updates: int = 0) -> str:
    """One Odoo invoice per transaction: the entry, its lines, the partner's rank.

    ``lines``: journal items inserted per invoice (0: the template entry's own, about five;
    more: its lines repeated up to that many); ``updates``: existing journal items updated
    per transaction besides (the firehose's shape: 40 and 10)."""

    def select_list(table: str, overrides: dict[str, str]) -> tuple[str, str]:
        cols = [c for c in odoo.column_names(table) if c != "id"]
        return (", ".join(cols), ", ".join(overrides.get(c, c) for c in cols))

    move_cols, move_vals = select_list("account_move", MOVE_OVERRIDES)
    line_cols, line_vals = select_list("account_move_line", LINE_OVERRIDES)
    # Seeded ids have no gaps, but the first id at or above a random one is a safe pick
    # whatever the seed does; \gset needs exactly one row back.
    source = ("account_move_line where move_id = (select min(id) from account_move where id >= "
              ":tmpl)")
    if lines:
        source = (f"(select l.* from account_move_line l cross join generate_series(1, {lines}) g "
                  f"where l.move_id = (select min(id) from account_move where id >= :tmpl) "
                  f"limit {lines}) account_move_line")
    touched = (f"update account_move_line set write_date = {NOW} where id in (select id from "
               f"account_move_line where id >= :line order by id limit {updates});\n"
               if updates else "")
    return f"""\
\\set tmpl random(1, :max_move)
\\set partner random(1, :max_partner)
\\set line random(1, :max_line)
begin;
insert into account_move ({move_cols}) select {move_vals} from account_move where id = (select min(id) from account_move where id >= :tmpl) returning id as move \\gset
insert into account_move_line ({line_cols}) select {line_vals} from {source};
{touched}update res_partner set customer_rank = customer_rank + 1, write_date = {NOW} where id = (select min(id) from res_partner where id >= :partner);
end;
"""


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


class Markers:
    """Commits a marker every 100 ms on the source; sees them arrive on the destination."""

    def __init__(self, src_dsn: str, dst_dsn: str, schema: str, poll_s: float) -> None:
        self.src_dsn, self.dst_dsn, self.schema, self.poll_s = src_dsn, dst_dsn, schema, poll_s
        self.committed: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.stop_writing = threading.Event()
        self.stop_polling = threading.Event()
        self.errors: list[BaseException] = []
        self.t0 = 0.0
        self.threads = [threading.Thread(target=self._guard(self._write), daemon=True),
                        threading.Thread(target=self._guard(self._poll), daemon=True)]

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by finish(): a thread cannot raise
                self.errors.append(exc)
                self.stop_writing.set()
                self.stop_polling.set()
        return run

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def _write(self) -> None:
        q = sql.SQL("insert into {} (id) values (%s)").format(sql.Identifier(MARKER))
        with psycopg.connect(self.src_dsn, autocommit=True) as conn:
            n = 1
            while not self.stop_writing.is_set():
                conn.execute(q, [n])
                self.committed[n] = time.monotonic()
                n += 1
                # On a schedule, not "100 ms after the last one": a slow commit does not
                # stretch the sampling.
                delay = self.t0 + (n - 1) * MARKER_EVERY_S - time.monotonic()
                if delay > 0:
                    self.stop_writing.wait(delay)

    def _poll(self) -> None:
        q = sql.SQL("select id from {} where id > %s order by id").format(
            sql.Identifier(self.schema, MARKER))
        last = 0
        with psycopg.connect(self.dst_dsn, autocommit=True) as conn:
            while not self.stop_polling.is_set():
                rows = conn.execute(q, [last]).fetchall()
                now = time.monotonic()
                for (marker_id,) in rows:
                    self.seen[marker_id] = now
                    last = max(last, marker_id)
                if self.stop_writing.is_set() and self.committed and \
                        all(k in self.seen for k in list(self.committed)):
                    return
                time.sleep(self.poll_s)

    def finish(self, timeout: float) -> None:
        """Stop writing, wait until every marker written was seen."""
        self.stop_writing.set()
        self.threads[0].join()
        self.threads[1].join(timeout)
        self.stop_polling.set()
        if self.errors:
            raise self.errors[0]
        missing = [k for k in self.committed if k not in self.seen]
        if missing:
            raise SystemExit(f"{len(missing)} marker(s) not seen at the destination within "
                             f"{timeout:g} s after the load")

    def lags_ms(self) -> list[tuple[float, float]]:
        """(seconds since the start, lag in ms) per marker, in commit order."""
        return [(round(c - self.t0, 3), round((self.seen[k] - c) * 1000, 2))
                for k, c in sorted(self.committed.items())]


class Bench(CdcBench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.keep, args.base_dir, args.timeout, odoo.TABLE_NAMES)
        self.args = args
        self.pgbench = str(self.src.bin_dir / "pgbench")
        self.script = self.base / "odoo_invoice.sql"
        self.max_ids: dict[str, int] = {}

    def seed(self, scale: float) -> None:
        super().seed(scale)
        with self.src.connect(TEMPLATE_DB) as conn:
            self.max_ids = {t: conn.execute(sql.SQL("select max(id) from {}").format(
                sql.Identifier(t))).fetchone()[0]
                for t in ("account_move", "res_partner", "account_move_line")}
        self.script.write_text(pgbench_script(self.args.lines, self.args.updates))

    def pgbench_cmd(self, *length: str) -> list[str]:
        """pgbench running the invoice script with --clients; ``length``: ("-T", seconds) or
        ("-t", transactions per client)."""
        a = self.args
        return [self.pgbench, "-n", "-M", "prepared", "-c", str(a.clients),
                "-j", str(min(a.clients, 2)), *length, "-f", str(self.script),
                "--random-seed=42", "-D", f"max_move={self.max_ids['account_move']}",
                "-D", f"max_partner={self.max_ids['res_partner']}",
                "-D", f"max_line={self.max_ids['account_move_line']}",
                "-h", self.src.host, "-p", str(self.src.port), "-U", "postgres", SRC_DB]

    def wait_streaming(self, schema: str, check=None) -> None:
        """A marker before the load, seen at the destination: the way is streaming."""
        self.insert_marker(0)
        self.wait_marker(schema, 0, 0.05, check)

    def load(self, schema: str, check=None) -> dict[str, Any]:
        """pgbench for --seconds with the markers going; lag samples, tps, CPU."""
        a = self.args
        cmd = self.pgbench_cmd("-T", str(a.seconds))
        markers = Markers(self.src.dsn(SRC_DB), self.dst.dsn(DST_DB), schema, a.poll_ms / 1000)
        snap = self.meter.snapshot()
        markers.start()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=clean_env())
        while proc.poll() is None:
            if check is not None:
                check()
            time.sleep(0.5)
        out, err = proc.communicate()
        load_end = time.monotonic()
        markers.finish(a.timeout)
        # Drained: from the end of the load until its last marker was visible.
        drained = max(markers.seen.values()) - load_end
        cpu = self.meter.since(snap, settle=False)
        if proc.returncode != 0:
            raise SystemExit(f"pgbench failed ({proc.returncode}): {err[-2000:]}")
        tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
        done = re.search(r"number of transactions actually processed: (\d+)", out)
        if not tps or not done:
            raise SystemExit(f"pgbench printed no tps: {out[-2000:]}")
        lags = markers.lags_ms()
        values = [lag for _t, lag in lags]
        return {"tps": float(tps.group(1)), "transactions": int(done.group(1)),
                "markers": len(values), "drained_s": round(max(0.0, drained), 3),
                "lag_ms": {"p50": percentile(values, 50), "p95": percentile(values, 95),
                           "p99": percentile(values, 99), "max": max(values)},
                "samples": lags, **cpu}

    def backlog_transactions(self) -> tuple[int, int]:
        """(transactions per client, row changes per transaction) for --backlog rows."""
        a = self.args
        per_txn = 1 + (a.lines or 5) + a.updates + 1  # entry, lines, updated lines, partner
        return max(1, math.ceil(a.backlog / per_txn / a.clients)), per_txn

    def write_backlog(self) -> dict[str, Any]:
        """pgbench writes the backlog (no consumer connected), then one marker."""
        a = self.args
        per_client, per_txn = self.backlog_transactions()
        cmd = self.pgbench_cmd("-t", str(per_client))
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
        if proc.returncode != 0:
            raise SystemExit(f"pgbench failed ({proc.returncode}): {proc.stderr[-2000:]}")
        written_s = time.monotonic() - t0
        self.insert_marker(1)
        with self.src.connect(SRC_DB) as conn:
            conn.execute("checkpoint")
        txns = per_client * a.clients
        return {"transactions": txns, "rows": txns * per_txn, "written_s": round(written_s, 2)}

    def wait_slot_active(self, slot: str, check=None) -> float:
        """When the way's slot on the source became active (its consumer connected): the
        apply is timed from there, so that the native launcher's wait for a worker (up to
        wal_retrieve_retry_interval) and the replicator's start count apart."""
        deadline = time.monotonic() + self.timeout
        with self.src.connect(SRC_DB) as conn:
            while not conn.execute("select coalesce(bool_or(active), false) from "
                                   "pg_replication_slots where slot_name = %s",
                                   [slot]).fetchone()[0]:
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise SystemExit(f"slot {slot} not active after {self.timeout:g} s")
                time.sleep(0.01)
        return time.monotonic()

    def run_backlog_native(self) -> dict[str, Any]:
        self.fresh(native=True)
        sub = self.subscribe_native(self.native_streaming)
        self.wait_streaming("public")
        with self.dst.connect(DST_DB) as conn:
            conn.execute(sql.SQL("alter subscription {} disable").format(
                sql.Identifier(SUBSCRIPTION)))
            deadline = time.monotonic() + self.timeout
            while conn.execute("select count(*) from pg_stat_subscription where pid is not null"
                               ).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise SystemExit("the native apply worker did not stop")
                time.sleep(0.05)
        backlog = self.write_backlog()
        snap = self.meter.snapshot()
        with self.dst.connect(DST_DB) as conn:
            conn.execute(sql.SQL("alter subscription {} enable").format(
                sql.Identifier(SUBSCRIPTION)))
        started = time.monotonic()
        active = self.wait_slot_active(SUBSCRIPTION)
        seen = self.wait_marker("public", 1, 0.01)
        res = {**backlog, **sub, "seconds": round(seen - active, 3),
               "start_s": round(active - started, 3),
               **self.meter.since(snap, settle=False)}
        self.drop_subscription()
        self.check_mirror("public", WAY_NATIVE)
        return {**res, "mirror_equal": True}

    def run_backlog_ours(self) -> dict[str, Any]:
        self.fresh(native=False)
        child = self.child()
        child.start()
        try:
            self.ready(child)
        finally:
            self.stop_child(child, WAY_OURS)
        backlog = self.write_backlog()
        snap = self.meter.snapshot()
        child.start()
        try:
            self.meter.watch("replicator", child.pid)
            active = self.wait_slot_active(SLOT, child.check_alive)
            seen = self.wait_marker(MIRROR, 1, 0.01, child.check_alive)
            res = {**backlog, "seconds": round(seen - active, 3),
                   "start_s": round(active - child.started, 3),
                   **self.meter.since(snap, settle=False),
                   "peak_rss_mib": round(child.peak_rss_mib(), 1)}
        finally:
            self.meter.unwatch("replicator")
            self.stop_child(child, WAY_OURS)
        self.check_mirror(MIRROR, WAY_OURS)
        return {**res, "mirror_equal": True}

    def run_native(self) -> dict[str, Any]:
        self.fresh(native=True)
        sub = self.subscribe_native(self.native_streaming)
        self.wait_streaming("public")
        res = self.load("public")
        self.drop_subscription()
        self.check_mirror("public", WAY_NATIVE)
        return {**res, **sub, "mirror_equal": True,
                "destination_indexes": self.destination_indexes("public")}

    def run_ours(self) -> dict[str, Any]:
        self.fresh(native=False)
        child = self.child()
        child.start()
        try:
            self.ready(child)
            self.meter.watch("replicator", child.pid)
            res = self.load(MIRROR, child.check_alive)
            res["peak_rss_mib"] = round(child.peak_rss_mib(), 1)
        finally:
            self.meter.unwatch("replicator")
            self.stop_child(child, WAY_OURS)
        self.check_mirror(MIRROR, WAY_OURS)
        return {**res, "mirror_equal": True,
                "destination_indexes": self.destination_indexes(MIRROR)}


def print_table(report: dict[str, Any], out=sys.stderr) -> None:
    p = print
    print_header(report, out)
    lo = report["load"]
    shape = (f"{lo['lines']} lines and {lo['updates']} updated lines per invoice"
             if lo.get("lines") else "the template entry's lines per invoice")
    p(f"load: pgbench, {lo['clients']} clients, {lo['seconds']} s, no rate limit, Odoo "
      f"invoice script ({shape}); a marker every {MARKER_EVERY_S * 1000:.0f} ms, destination polled "
      f"every {lo['poll_ms']:g} ms (lag resolution)", file=out)
    ways = report["ways"]
    if WAY_NATIVE in ways:
        n = ways[WAY_NATIVE]
        p(f"native subscription: streaming = {n['streaming']} (pinned), binary = "
          f"{'on' if n['binary'] else 'off'}", file=out)
    p("", file=out)
    p(f"{'way':20} {'lag p50':>8} {'p95':>7} {'p99':>7} {'max':>8} {'markers':>8} "
      f"{'source tps':>11} {'vs native':>9} {'drained':>8} {'peak RSS':>9}   CPU s: "
      "source/destination/replicator/bench", file=out)
    for way in (WAY_NATIVE, WAY_OURS):
        if way not in ways:
            continue
        e = ways[way]
        lag, cpu = e["lag_ms"], e["cpu_s"]
        vs = f"{e['tps_vs_native']:.2f}x" if "tps_vs_native" in e else ""
        rss = f"{e['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in e else ""
        p(f"{way:20} {lag['p50']:8.1f} {lag['p95']:7.1f} {lag['p99']:7.1f} {lag['max']:8.1f} "
          f"{e['markers']:8} {e['tps']:11.0f} {vs:>9} {e['drained_s']:7.2f}s {rss:>9}   "
          f"{cpu.get('source', 0):.1f} / {cpu.get('destination', 0):.1f} / "
          f"{cpu.get('replicator', 0):.1f} / {cpu.get('bench', 0):.1f}", file=out)
    p("(lag in ms: marker commit -> visible at the destination; drained: load end -> its "
      "last marker visible)", file=out)
    if report["targets"]:
        p("", file=out)
        for line in report["targets"]:
            p(line, file=out)


def print_backlog(report: dict[str, Any], out=sys.stderr) -> None:
    print_header(report, out)
    lo = report["load"]
    print(f"backlog: {lo['backlog_rows']:,} row changes requested, written by pgbench with "
          f"{lo['clients']} clients while no consumer ran, {lo['lines']} lines inserted and "
          f"{lo['updates']} updated per invoice; then the way starts and is timed until the "
          "marker after the backlog is visible", file=out)
    print("", file=out)
    print(f"{'way':20} {'transactions':>12} {'rows':>10} {'start':>6} {'seconds':>8} "
          f"{'rows/s':>9} {'vs native':>9} {'peak RSS':>9}   CPU s: "
          "source/destination/replicator/bench", file=out)
    for way in (WAY_NATIVE, WAY_OURS):
        e = report["ways"].get(way)
        if e is None:
            continue
        cpu = e["cpu_s"]
        vs = f"{e['vs_native']:.2f}x" if "vs_native" in e else ""
        rss = f"{e['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in e else ""
        print(f"{way:20} {e['transactions']:12,} {e['rows']:10,} {e['start_s']:5.2f}s "
              f"{e['seconds']:8.2f} "
              f"{e['rows_per_s']:9,.0f} {vs:>9} {rss:>9}   {cpu.get('source', 0):.1f} / "
              f"{cpu.get('destination', 0):.1f} / {cpu.get('replicator', 0):.1f} / "
              f"{cpu.get('bench', 0):.1f}", file=out)
    print("(start: ENABLE or `replicator run` -> the slot active; seconds, and rows/s: the "
          "slot active -> the marker after the backlog visible)", file=out)


def targets(ways: dict[str, Any], firehose: bool = False) -> list[str]:
    """Issue 26's targets: OLTP, p99 lag no worse than native's and p50 within 1.5x of it;
    the firehose, drained no later than native and within 1 s, at 0.95x native's tps."""
    out = []
    native, ours = ways.get(WAY_NATIVE), ways.get(WAY_OURS)

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"
    if native and ours and firehose:
        drained, theirs = ours["drained_s"], native["drained_s"]
        out.append(f"target drained <= native's and <= 1 s: "
                   f"{verdict(drained <= max(theirs, 0.0) + 0.05 and drained <= 1.0)} "
                   f"({drained:.2f} s against {theirs:.2f} s)")
        tps = ours["tps"] / max(1e-9, native["tps"])
        out.append(f"target source tps >= 0.95x native's:  {verdict(tps >= 0.95)} ({tps:.2f}x)")
    elif native and ours:
        p99 = ours["lag_ms"]["p99"] / max(1e-9, native["lag_ms"]["p99"])
        p50 = ours["lag_ms"]["p50"] / max(1e-9, native["lag_ms"]["p50"])
        out.append(f"target p99 lag <= native's:       {verdict(p99 <= 1)} ({p99:.2f}x)")
        out.append(f"target p50 lag <= 1.5x native's:  {verdict(p50 <= 1.5)} ({p50:.2f}x)")
    if ours and "peak_rss_mib" in ours:
        peak = ours["peak_rss_mib"]
        out.append(f"target peak RSS < 200 MB:      {'MET' if peak * 1.048576 < 200 else 'NOT MET'}"
                   f" ({peak:.0f} MiB)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=None,
                    help="how long pgbench runs per way (default 60, firehose 30)")
    ap.add_argument("--clients", type=int, default=None,
                    help="pgbench clients (default 4, firehose 8)")
    ap.add_argument("--lines", type=int, default=None,
                    help="journal items inserted per invoice (default: the template's, about "
                         "five; firehose 40)")
    ap.add_argument("--updates", type=int, default=None,
                    help="existing journal items updated per transaction (default 0, firehose 10)")
    ap.add_argument("--firehose", action="store_true",
                    help="the firehose: 8 clients, 40 lines inserted and 10 updated per "
                         "transaction, 30 s (each still overridable)")
    ap.add_argument("--backlog", type=int, default=0, metavar="ROWS",
                    help="measure the apply ceiling instead: about ROWS row changes in small "
                         "transactions written while each way is stopped, then applied cold "
                         "(firehose shape unless --lines/--updates/--clients say otherwise)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="seed scale of the source (1: about 1,000 entries, 5,000 lines)")
    ap.add_argument("--ways", default="native,ours", help="comma-separated subset of native,ours")
    ap.add_argument("--poll-ms", type=float, default=10.0,
                    help="how often the destination is polled for markers")
    ap.add_argument("--csv", type=Path, default=None,
                    help="write every marker as t,lag_ms,way (t: seconds since the load began)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds to wait for a way to start streaming or to catch up")
    add_cdc_options(ap, NATIVE_STREAMING)
    add_run_options(ap, "print the report as JSON on stdout (the table is always on stderr)")
    args = ap.parse_args(argv)
    profile = ({"seconds": 30, "clients": 8, "lines": 40, "updates": 10}
               if args.firehose or args.backlog
               else {"seconds": 60, "clients": 4, "lines": 0, "updates": 0})
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    wanted = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not wanted or any(w not in ("native", "ours") for w in wanted):
        ap.error("--ways: choose from native,ours")
    if args.seconds < 1 or args.clients < 1:
        ap.error("--seconds and --clients must be >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    machine = machine_info()
    bench = Bench(args)
    bench.native_streaming = args.native_streaming
    bench.copy_indexes = not args.no_indexes
    bench.replicator_settings = parse_settings(args.set)
    try:
        bench.start()
        versions = bench.versions()
        bench.seed(args.scale)
        ways: dict[str, Any] = {}
        if args.backlog:
            return backlog_main(bench, args, wanted, machine, versions)
        # Native first, then ours (the brief's order), each on fresh databases.
        for key in ("native", "ours"):
            if key not in wanted:
                continue
            way = WAY_NATIVE if key == "native" else WAY_OURS
            say(f"{way}: {args.seconds} s of pgbench with markers")
            ways[way] = bench.run_native() if key == "native" else bench.run_ours()
            e = ways[way]
            say(f"  lag p50 {e['lag_ms']['p50']:.1f} ms, p99 {e['lag_ms']['p99']:.1f} ms, "
                f"{e['tps']:.0f} tps (other processes used {e['foreign_cpu']:.0%} of the CPUs)")
        if WAY_NATIVE in ways and WAY_OURS in ways:
            ways[WAY_OURS]["tps_vs_native"] = ways[WAY_OURS]["tps"] / ways[WAY_NATIVE]["tps"]
        if args.csv:
            with args.csv.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["t", "lag_ms", "way"])
                for way, e in ways.items():
                    w.writerows((t, lag, way) for t, lag in e["samples"])
            say(f"wrote {args.csv}")
        report = {
            **report_base(bench, machine, versions, ways),
            "load": {"clients": args.clients, "seconds": args.seconds, "poll_ms": args.poll_ms,
                     "lines": args.lines, "updates": args.updates,
                     "marker_every_ms": MARKER_EVERY_S * 1000, "script": pgbench_script()},
            "ways": {w: {k: v for k, v in e.items() if k != "samples"} for w, e in ways.items()},
            "targets": targets(ways, args.firehose),
        }
        emit(report, args.json, print_table)
    finally:
        bench.close()
    return 0


def backlog_main(bench: Bench, args: argparse.Namespace, wanted: list[str],
                 machine: dict[str, Any], versions: dict[str, str]) -> int:
    ways: dict[str, Any] = {}
    for key in ("native", "ours"):
        if key not in wanted:
            continue
        way = WAY_NATIVE if key == "native" else WAY_OURS
        say(f"{way}: a backlog of about {args.backlog:,} row changes, applied cold")
        e = ways[way] = bench.run_backlog_native() if key == "native" \
            else bench.run_backlog_ours()
        e["rows_per_s"] = e["rows"] / max(1e-9, e["seconds"])
        say(f"  {e['rows']:,} rows in {e['transactions']:,} transactions (written in "
            f"{e['written_s']:.1f} s), applied in {e['seconds']:.2f} s: "
            f"{e['rows_per_s']:,.0f} rows/s")
    if WAY_NATIVE in ways and WAY_OURS in ways:
        ways[WAY_OURS]["vs_native"] = (ways[WAY_OURS]["rows_per_s"]
                                       / ways[WAY_NATIVE]["rows_per_s"])
    report = {
        **report_base(bench, machine, versions, ways),
        "load": {"backlog_rows": args.backlog, "clients": args.clients, "lines": args.lines,
                 "updates": args.updates, "script": pgbench_script(args.lines, args.updates)},
        "ways": ways,
        "targets": [],
    }
    emit(report, args.json, print_backlog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
