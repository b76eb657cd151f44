#!/usr/bin/env python
"""Month-end close benchmark: a bulk insert and a bulk update, then a marker, through CDC.

On one pair of throwaway PostgreSQL 15 servers with production durability (fsync,
full_page_writes, synchronous_commit on), the source has `account_move_line` (seeded
with replicator.devtools.seed, small) and `bench_marker (id, at)`, both published. The
close is three transactions on the source, one after the other:

1. insert `--rows` journal items (copies of the seeded ones, new ids),
2. update those rows (parent_state 'posted', write_date),
3. insert one marker row;

and what is timed is when the marker becomes visible in the mirror. Each way starts
from a fresh copy of the seeded source database and an empty destination, whose tables
get the source's secondary indexes on both ways (the replicator's copy_indexes = true;
`--no-indexes`: primary keys only on both):

- native subscription, live: `CREATE SUBSCRIPTION ... WITH (copy_data = true,
  streaming = off)` (or `--native-streaming on`; pinned, and the value the server
  reports is printed), synced and
  streaming before the close; timed from the marker's commit to its visibility;
- replicator, live: `python -m replicator run` (a child process), backfilled and
  streaming before the close; timed from the marker's commit to its visibility;
- replicator, cold: `replicator run --until-caught-up` first (slot and backfill), then
  the close is committed with no consumer connected, then `replicator run` starts:
  timed from its start to the marker's visibility;
- the floor for cold: `pg_recvlogical --start -f /dev/null` on a pgoutput slot created
  before the close, with the replicator's options, until it passes the marker's LSN
  (`--endpos`): decoding the close and sending it, with nothing applied. It asks for
  no streaming (as the issue defines the floor), so the source spills a big
  transaction to its disk and decodes it again at the commit; a second floor,
  "streaming as the replicator asks", adds `streaming=on` and the replicator's
  `logical_decoding_work_mem` (PGOPTIONS), the same decoding work the replicator
  makes the source do: the stricter floor.

Reported: seconds per way, native / live (how many times faster than native), cold /
floor, the replicator's peak resident memory (VmHWM of the child process), CPU seconds
per side and the share of the CPUs other processes used meanwhile.

    python bench/cdc_bulk.py [--rows 200000] [--repeat 1] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _cdc import (  # noqa: E402
    MIRROR,
    NATIVE_STREAMING,
    PUBLICATION,
    SRC_DB,
    CdcBench,
    print_header,
    report_base,
)
from _common import (  # noqa: E402
    add_cdc_options,
    add_run_options,
    clean_env,
    emit,
    machine_info,
    median,
    median_cpu,
    say,
)
from _replicator import ReplicatorChild, parse_settings  # noqa: E402
from psycopg import sql  # noqa: E402

from replicator.config.settings import SourceSettings  # noqa: E402
from replicator.devtools import odoo  # noqa: E402
from replicator.source.connection import protocol_for  # noqa: E402

TABLE = "account_move_line"
FLOOR_SLOT = "bench_floor"
FLOOR_STREAM_SLOT = "bench_floor_streaming"

WAY_NATIVE = "native subscription, live"
WAY_LIVE = "replicator, live"
WAY_COLD = "replicator, cold"
WAY_FLOOR = "pg_recvlogical (floor for cold)"
WAY_FLOOR_STREAM = "  the floor, streaming as we ask"
WAYS = {"native": WAY_NATIVE, "live": WAY_LIVE, "cold": WAY_COLD}

LINE_COLUMNS = [c for c in odoo.column_names(TABLE) if c != "id"]


class Bench(CdcBench):
    def __init__(self, rows: int, keep: bool, base: Path | None, poll_s: float,
                 timeout: float, analyze_every: float = 0.0) -> None:
        super().__init__(keep, base, timeout, (TABLE,))
        self.rows = rows
        self.poll_s = poll_s
        # ANALYZE the table this often while the close runs (0: never), as autovacuum does
        # during a big close: each makes the walsender describe the table again mid-stream.
        self.analyze_every = analyze_every
        self.recvlogical = str(self.src.bin_dir / "pg_recvlogical")

    # -- the close

    def close_month(self) -> dict[str, Any]:
        """The insert and the update transactions; their seconds on the source."""
        done = threading.Event()
        analyzer = threading.Thread(target=self._analyze_until, args=(done,), daemon=True)
        if self.analyze_every:
            analyzer.start()
        try:
            return self._close_month()
        finally:
            done.set()
            if analyzer.is_alive():
                analyzer.join()

    def _analyze_until(self, done: threading.Event) -> None:
        with self.src.connect(SRC_DB) as conn:
            conn.autocommit = True
            while not done.wait(self.analyze_every):
                conn.execute(sql.SQL("analyze {}").format(sql.Identifier("public", TABLE)))

    def _close_month(self) -> dict[str, Any]:
        cols = sql.SQL(", ").join(map(sql.Identifier, LINE_COLUMNS))
        t = sql.Identifier("public", TABLE)
        with self.src.connect(SRC_DB) as conn:
            first = conn.execute(sql.SQL("select max(id) from {}").format(t)).fetchone()[0]
            copies = -(-self.rows // max(1, self.seeded[TABLE]))
            t0 = time.monotonic()
            n = conn.execute(sql.SQL(
                "insert into {t} ({cols}) select {cols} from {t} "
                "cross join generate_series(1, %s) g order by g, id limit %s").format(
                t=t, cols=cols), [copies, self.rows]).rowcount
            t1 = time.monotonic()
            m = conn.execute(sql.SQL(
                "update {} set parent_state = 'posted', "
                "write_date = now() at time zone 'utc' where id > %s").format(t), [first]).rowcount
            t2 = time.monotonic()
        if n != self.rows or m != self.rows:
            raise RuntimeError(f"the close inserted {n} and updated {m} rows, not {self.rows}")
        return {"insert_s": round(t1 - t0, 3), "update_s": round(t2 - t1, 3)}

    # -- the ways

    def run_native(self) -> dict[str, Any]:
        self.fresh(native=True)
        sub = self.subscribe_native(self.native_streaming)
        self.insert_marker(0)
        self.wait_marker("public", 0, self.poll_s)
        res = self.timed_close("public")
        self.drop_subscription()
        self.check_mirror("public", WAY_NATIVE)
        return {**res, **sub, "mirror_equal": True,
                "destination_indexes": self.destination_indexes("public")}

    def timed_close(self, schema: str, child: ReplicatorChild | None = None) -> dict[str, Any]:
        snap = self.meter.snapshot()
        close = self.close_month()
        committed, _lsn = self.insert_marker(1)
        seen = self.wait_marker(schema, 1, self.poll_s, child.check_alive if child else None)
        cpu = self.meter.since(snap, settle=False)
        return {"seconds": seen - committed, **close, **cpu}

    def run_live(self) -> dict[str, Any]:
        self.fresh(native=False)
        child = self.child()
        child.start()
        try:
            self.ready(child)
            self.meter.watch("replicator", child.pid)
            res = self.timed_close(MIRROR, child)
            res["peak_rss_mib"] = round(child.peak_rss_mib(), 1)
            res["streamed"] = streamed(child)
        finally:
            self.meter.unwatch("replicator")
            self.stop_child(child, WAY_LIVE)
        self.check_mirror(MIRROR, WAY_LIVE)
        return {**res, "mirror_equal": True,
                "destination_indexes": self.destination_indexes(MIRROR)}

    def run_cold(self) -> dict[str, Any]:
        """The replicator from a cold start, then the floor on the same WAL."""
        self.fresh(native=False)
        child = self.child()
        child.run_until_caught_up(self.timeout)
        # run --until-caught-up leaves the secondary indexes to the next run: build them
        # now, so that the cold start below applies the month with them all in place.
        if self.indexes_owed():
            child.start()
            try:
                self.wait_indexes(child.check_alive)
            finally:
                code = child.stop()
                if code != 0:
                    raise SystemExit(f"{WAY_COLD}: the replicator failed building the "
                                     f"indexes (exit {code})")
        with self.src.connect(SRC_DB) as conn:
            for slot in (FLOOR_SLOT, FLOOR_STREAM_SLOT):
                conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')",
                             [slot])
            server_version = conn.info.server_version
        close = self.close_month()
        _committed, lsn = self.insert_marker(1)

        snap = self.meter.snapshot()
        child.start()
        self.meter.watch("replicator", child.pid)
        try:
            seen = self.wait_marker(MIRROR, 1, self.poll_s, child.check_alive)
            cpu = self.meter.since(snap, settle=False)
            peak = child.peak_rss_mib()
        finally:
            self.meter.unwatch("replicator")
            self.stop_child(child, WAY_COLD)
        self.check_mirror(MIRROR, WAY_COLD)
        cold = {"seconds": seen - child.started, **close, **cpu, "peak_rss_mib": round(peak, 1),
                "mirror_equal": True, "destination_indexes": self.destination_indexes(MIRROR)}
        # Second, so that if reading WAL the replicator just read is any cheaper, the
        # floor gets that advantage, not the replicator.
        protocol = protocol_for(server_version)
        return {"cold": cold, "floor": self.run_floor(lsn, protocol, FLOOR_SLOT, False),
                "floor_streaming": self.run_floor(lsn, protocol, FLOOR_STREAM_SLOT, True)}

    def run_floor(self, lsn: str, protocol: int, slot: str, streaming: bool) -> dict[str, Any]:
        options = {"proto_version": str(protocol), "publication_names": PUBLICATION,
                   "binary": "true", "messages": "true"}
        env = clean_env()
        if streaming:
            options["streaming"] = "on"
            work_mem = self.replicator_settings["source"].get(
                "logical_decoding_work_mem", SourceSettings.logical_decoding_work_mem)
            if work_mem:
                env["PGOPTIONS"] = f"-c logical_decoding_work_mem={work_mem}"
                options["logical_decoding_work_mem (PGOPTIONS)"] = work_mem
        cmd = [self.recvlogical, "-d", self.src.dsn(SRC_DB), "--slot", slot, "--start",
               "--no-loop", "-E", lsn, "-f", "/dev/null"]
        for k, v in options.items():
            if "(" not in k:
                cmd += ["-o", f"{k}={v}"]
        snap = self.meter.snapshot()
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=self.timeout)
        secs = time.monotonic() - t0
        cpu = self.meter.since(snap)
        if proc.returncode != 0:
            raise SystemExit(f"pg_recvlogical failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with self.src.connect(SRC_DB) as conn:
            confirmed = conn.execute(
                "select confirmed_flush_lsn >= %s::pg_lsn from pg_replication_slots "
                "where slot_name = %s", [lsn, slot]).fetchone()[0]
            conn.execute("select pg_drop_replication_slot(%s)", [slot])
        if not confirmed:
            raise SystemExit(f"pg_recvlogical stopped before {lsn}")
        return {"seconds": secs, **cpu, "options": options}


# -- reporting --------------------------------------------------------------


def streamed(child: ReplicatorChild) -> dict[str, int]:
    """How the replicator applied the streamed transactions: while they ran, or at commit."""
    return {how: int(child.metric(f'etl_streamed_transactions_total{{applied="{how}"}}') or 0)
            for how in ("while_running", "at_commit")}


def summarize(samples: dict[str, list[dict]]) -> dict[str, Any]:
    ways: dict[str, Any] = {}
    for way, runs in samples.items():
        if not runs:
            continue
        entry: dict[str, Any] = {
            "seconds": median([r["seconds"] for r in runs]),
            "samples_s": [round(r["seconds"], 3) for r in runs],
            "cpu_s": median_cpu(runs),
            "foreign_cpu_max": max(r["foreign_cpu"] for r in runs),
        }
        if "insert_s" in runs[0]:
            entry["source_insert_s"] = median([r["insert_s"] for r in runs])
            entry["source_update_s"] = median([r["update_s"] for r in runs])
        if "peak_rss_mib" in runs[0]:
            entry["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        if "streamed" in runs[0]:
            entry["streamed"] = [r["streamed"] for r in runs]
        for key in ("streaming", "binary", "options", "mirror_equal", "destination_indexes"):
            if key in runs[0]:
                entry[key] = runs[0][key]
        ways[way] = entry
    native, live = ways.get(WAY_NATIVE), ways.get(WAY_LIVE)
    if native and live:
        live["speedup_vs_native"] = native["seconds"] / live["seconds"]
    cold, floor = ways.get(WAY_COLD), ways.get(WAY_FLOOR)
    if cold and floor:
        cold["vs_floor"] = cold["seconds"] / floor["seconds"]
    strict = ways.get(WAY_FLOOR_STREAM)
    if cold and strict:
        cold["vs_floor_streaming"] = cold["seconds"] / strict["seconds"]
    return ways


def targets(ways: dict[str, Any]) -> list[str]:
    out = []
    live, cold = ways.get(WAY_LIVE, {}), ways.get(WAY_COLD, {})
    if "speedup_vs_native" in live:
        x = live["speedup_vs_native"]
        out.append(f"target live >= 3x faster than native:  {'MET' if x >= 3 else 'NOT MET'} "
                   f"({x:.2f}x)")
    if "vs_floor" in cold:
        x = cold["vs_floor"]
        out.append(f"target cold <= 1.2x the floor:          {'MET' if x <= 1.2 else 'NOT MET'} "
                   f"({x:.2f}x)")
    if "vs_floor_streaming" in cold:
        x = cold["vs_floor_streaming"]
        out.append(f"  against the streaming floor:          {'MET' if x <= 1.2 else 'NOT MET'} "
                   f"({x:.2f}x)")
    peaks = [w["peak_rss_mib"] for w in ways.values() if "peak_rss_mib" in w]
    if peaks:
        out.append(f"target peak RSS < 200 MB:               "
                   f"{'MET' if max(peaks) * 1.048576 < 200 else 'NOT MET'} "
                   f"({max(peaks):.0f} MiB)")
    return out


def print_table(report: dict[str, Any], out=sys.stderr) -> None:
    p = print
    print_header(report, out)
    c = report["close"]
    p(f"close: {c['rows']:,}-row insert txn + {c['rows']:,}-row update txn on {TABLE} "
      f"(seeded with {c['seeded_rows']:,}) + a marker row; median of {report['repeat']} run(s)"
      + (f"; ANALYZE every {c['analyze_every_s']:g} s during it" if c.get("analyze_every_s")
         else ""), file=out)
    ways = report["ways"]
    if WAY_NATIVE in ways:
        n = ways[WAY_NATIVE]
        p(f"native subscription: streaming = {n['streaming']} (pinned), binary = "
          f"{'on' if n['binary'] else 'off'}", file=out)
    for way in (WAY_FLOOR, WAY_FLOOR_STREAM):
        if way in ways:
            p(f"{way.strip()}: pg_recvlogical options " + ", ".join(
                f"{k}={v}" for k, v in ways[way]["options"].items()), file=out)
    p("", file=out)
    p(f"{'way':34} {'seconds':>8} {'ratio':>22} {'peak RSS':>9}   CPU s: "
      "source/destination/replicator/bench", file=out)
    for way in (WAY_NATIVE, WAY_LIVE, WAY_COLD, WAY_FLOOR, WAY_FLOOR_STREAM):
        if way not in ways:
            continue
        e = ways[way]
        ratio = ""
        if "speedup_vs_native" in e:
            ratio = f"{e['speedup_vs_native']:.2f}x faster than native"
        elif "vs_floor" in e:
            ratio = f"{e['vs_floor']:.2f}x the floor"
            if "vs_floor_streaming" in e:
                ratio += f", {e['vs_floor_streaming']:.2f}x"
        rss = f"{e['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in e else ""
        cpu = e["cpu_s"]
        p(f"{way:34} {e['seconds']:8.2f} {ratio:>22} {rss:>9}   "
          f"{cpu.get('source', 0):.1f} / {cpu.get('destination', 0):.1f} / "
          f"{cpu.get('replicator', 0):.1f} / {cpu.get('bench', 0):.1f}", file=out)
    live = ways.get(WAY_LIVE, {})
    if "streamed" in live:
        p("replicator, live: streamed transactions applied while running / at commit, per run: "
          + ", ".join(f"{s['while_running']}/{s['at_commit']}" for s in live["streamed"]),
          file=out)
    p("(native and live: marker commit -> visible; cold: `replicator run` start -> marker "
      "visible; floor: pg_recvlogical start -> exit at the marker's LSN)", file=out)
    if report["targets"]:
        p("", file=out)
        for line in report["targets"]:
            p(line, file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000,
                    help="rows of the insert and of the update transaction")
    ap.add_argument("--base-scale", type=float, default=1.0,
                    help="seed scale of the source before the close (1: about 5,000 lines)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per way; the median is reported")
    ap.add_argument("--ways", default="native,live,cold",
                    help="comma-separated subset of native,live,cold (cold includes the floor)")
    ap.add_argument("--poll-ms", type=float, default=5.0,
                    help="how often the destination is polled for the marker")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a way may take")
    ap.add_argument("--analyze-every", type=float, default=0.0, metavar="SECONDS",
                    help="ANALYZE the table this often during the close, as autovacuum does "
                         "(each makes the source describe it again mid-transaction); 0: never")
    add_cdc_options(ap, NATIVE_STREAMING)
    add_run_options(ap, "print the report as JSON on stdout (the table is always on stderr)")
    args = ap.parse_args(argv)
    wanted = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in WAYS]
    if unknown or not wanted:
        ap.error(f"unknown way(s) {unknown}: choose from {', '.join(WAYS)}")
    if args.rows < 1 or args.repeat < 1:
        ap.error("--rows and --repeat must be >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    machine = machine_info()
    bench = Bench(args.rows, args.keep, args.base_dir, args.poll_ms / 1000, args.timeout,
                  args.analyze_every)
    bench.native_streaming = args.native_streaming
    bench.copy_indexes = not args.no_indexes
    bench.replicator_settings = parse_settings(args.set)
    try:
        bench.start()
        versions = bench.versions()
        bench.seed(args.base_scale)
        samples: dict[str, list[dict]] = {w: [] for w in
                                          (WAY_NATIVE, WAY_LIVE, WAY_COLD, WAY_FLOOR,
                                           WAY_FLOOR_STREAM)}
        for i in range(args.repeat):
            for key in wanted:
                say(f"round {i + 1}/{args.repeat}: {WAYS[key]}")
                if key == "cold":
                    both = bench.run_cold()
                    samples[WAY_FLOOR].append(both["floor"])
                    samples[WAY_FLOOR_STREAM].append(both["floor_streaming"])
                    say(f"  floor {both['floor']['seconds']:.2f} s, streaming "
                        f"{both['floor_streaming']['seconds']:.2f} s")
                    res = both["cold"]
                else:
                    res = bench.run_native() if key == "native" else bench.run_live()
                samples[WAYS[key]].append(res)
                say(f"  {res['seconds']:.2f} s (other processes used "
                    f"{res['foreign_cpu']:.0%} of the CPUs)")
        ways = summarize(samples)
        report = {
            **report_base(bench, machine, versions, ways),
            "repeat": args.repeat,
            "close": {"table": f"public.{TABLE}", "rows": args.rows,
                      "seeded_rows": bench.seeded[TABLE], "analyze_every_s": args.analyze_every},
            "ways": ways,
            "targets": targets(ways),
        }
        emit(report, args.json, print_table)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
