"""The backfill benchmark runs end to end on a small table (no timing assertion)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from plugins.servers import scratch

from replicator.devtools.localpg import available_versions

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "backfill.py"

WAYS = ("replicator (copy_indexes=false)", "replicator (copy_indexes=true)",
        "raw pipe", "native subscription")


@pytest.mark.pg15
def test_backfill_bench_smoke(tmp_path):
    if 15 not in available_versions():
        # Only off CI (where .ci/run installs it): the same rule as the cluster fixtures.
        message = "PostgreSQL 15 is not available on this machine"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs it: see .ci/run)")
        pytest.skip(message)
    if shutil.which("pgcopydb") is None and os.environ.get("CI"):
        pytest.fail("pgcopydb is not installed (CI installs it: see .ci/run)")
    # A mode-755 base directory: as root the servers run as an unprivileged user.
    base = scratch("bench-smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--rows", "5000", "--repeat", "1", "--json",
         "--tune", "--tune-workers", "2", "--tune-pages", "64,0", "--tune-repeat", "1",
         "--base-dir", str(base)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not base.exists(), "the benchmark left its clusters behind"
    report = json.loads(proc.stdout)

    assert report["table"]["rows"] > 4000
    assert report["machine"]["nproc"] >= 1
    assert report["postgres"]["source"].startswith("15")
    ways = report["ways"]
    for way in WAYS:
        assert ways[way]["rows_per_s"] > 0, way
        assert ways[way]["seconds"] > 0, way
    assert ways["  its copy phase only"]["rows_per_s"] > 0
    assert ways["raw pipe"]["vs_raw_pipe"] == pytest.approx(1.0)
    assert ways["native subscription"]["streaming"] == "off"
    assert ways["replicator (copy_indexes=false)"]["workers"] >= 1
    assert ways["replicator (copy_indexes=false)"]["mirror_indexes"] == 1      # the key only
    # the key before streaming; the secondary indexes built while streaming, or owed to
    # the next run if it ended first
    with_indexes = ways["replicator (copy_indexes=true)"]
    assert with_indexes["mirror_indexes"] + with_indexes["indexes_owed"] > 1
    assert ways["replicator (copy_indexes=false)"]["indexes_owed"] == 0
    if shutil.which("pgcopydb"):     # in the default ways when installed
        clone = ways["pgcopydb clone"]
        assert clone["seconds"] > 0 and clone["indexes"] > 1   # the key and the source's others
        assert clone["vs_pgcopydb"] == pytest.approx(1.0)
        assert ways["raw pipe"]["vs_pgcopydb"] > 0
    assert len(report["tuning"]) == 2
    assert all(r["rows_per_s"] > 0 for r in report["tuning"])
    ranges = {r["ranges"] for r in report["tuning"]}
    assert min(ranges) == 1 and max(ranges) > 1      # "no split" and 64-page ranges

    # and the human-readable table (on stderr with --json) names every way
    table = proc.stderr[proc.stderr.index("machine:"):]
    for way in WAYS:
        assert way in table
    assert "rows/s" in table and "streaming = off" in table and "tuning:" in table


@pytest.mark.pg15
def test_soak_bench_smoke():
    """bench/soak.py end to end for a few seconds: kills on both sides, samples, a mirror
    equal to the source, and a report whose verdict fields are filled (no timing asserted)."""
    base = scratch("soak-smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.25",
             "--kill-every", "4", "--sample-every", "1", "--json", "--workdir", str(base)],
            capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mirror_equal"] is True and report["exit_code"] == 0, proc.stderr[-3000:]
    assert report["kills"]["source"] >= 1 and report["kills"]["destination"] >= 1
    assert report["source_transactions"] > 0
    assert len(report["samples"]) >= 10
    assert all(s["rss_kib"] > 0 and s["threads"] >= 1 and s["fds"] > 0 for s in report["samples"])


def _bench(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _bench_report(script: str, name: str, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """A CDC benchmark run with --json under a scratch base directory (removed after): its
    report, and the process (for the table on stderr)."""
    base = scratch(name)
    try:
        proc = _bench(script, *args, "--json", "--base-dir", str(base))
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc


@pytest.mark.pg15
def test_cdc_bulk_bench_smoke():
    """bench/cdc_bulk.py on a 2,000-row close: every way reports, the mirrors are equal to
    the source, the native subscription's streaming setting is the pinned one."""
    report, proc = _bench_report("cdc_bulk.py", "bulk-smoke", "--rows", "2000",
                                 "--base-scale", "0.1")
    ways = report["ways"]
    assert set(ways) == {"native subscription, live", "replicator, live", "replicator, cold",
                         "pg_recvlogical (floor for cold)", "  the floor, streaming as we ask"}
    for way, e in ways.items():
        assert e["seconds"] > 0, way
        assert set(e["cpu_s"]) >= {"bench", "source", "destination"}, way
    for way in ("native subscription, live", "replicator, live", "replicator, cold"):
        assert ways[way]["mirror_equal"] is True, way
    # the same indexes to maintain on every destination: the source's, not just the keys
    indexes = {ways[w]["destination_indexes"] for w in
               ("native subscription, live", "replicator, live", "replicator, cold")}
    assert len(indexes) == 1 and indexes.pop() > 2
    assert ways["native subscription, live"]["streaming"] == "off"
    assert ways["replicator, live"]["speedup_vs_native"] > 0
    assert ways["replicator, cold"]["vs_floor"] > 0
    assert ways["replicator, cold"]["vs_floor_streaming"] > 0
    assert 10 < ways["replicator, live"]["peak_rss_mib"] < 4096
    assert 10 < ways["replicator, cold"]["peak_rss_mib"] < 4096
    assert ways["replicator, cold"]["cpu_s"]["replicator"] > 0
    assert ways["pg_recvlogical (floor for cold)"]["options"]["binary"] == "true"
    assert "streaming" not in ways["pg_recvlogical (floor for cold)"]["options"]
    strict = ways["  the floor, streaming as we ask"]["options"]
    assert strict["streaming"] == "on" and strict["logical_decoding_work_mem (PGOPTIONS)"]
    assert report["close"]["rows"] == 2000 and report["postgres"]["source"].startswith("15")
    assert len(report["targets"]) == 4
    table = proc.stderr[proc.stderr.index("machine:"):]
    assert "streaming = off (pinned)" in table and "x the floor" in table
    assert "faster than native" in table and "MiB" in table


@pytest.mark.pg15
def test_cdc_oltp_bench_smoke(tmp_path):
    """bench/cdc_oltp.py for 2 s a way: lag percentiles, tps, the CSV of every marker, and
    mirrors equal to the source after pgbench's Odoo invoices; the native subscription with
    the other streaming value and primary keys only on both sides, as the report shows."""
    lag_csv = tmp_path / "lag.csv"
    report, proc = _bench_report("cdc_oltp.py", "oltp-smoke", "--seconds", "2", "--scale", "0.1",
                                 "--csv", str(lag_csv), "--native-streaming", "on",
                                 "--no-indexes")
    ways = report["ways"]
    assert list(ways) == ["native subscription", "replicator"]
    for way, e in ways.items():
        lag = e["lag_ms"]
        assert 0 <= lag["p50"] <= lag["p95"] <= lag["p99"] <= lag["max"], way
        assert e["markers"] >= 10 and e["tps"] > 0 and e["transactions"] > 0, way
        assert e["mirror_equal"] is True, way
    assert ways["native subscription"]["streaming"] == "on"
    # --no-indexes: the seven primary keys, on both destinations
    assert [e["destination_indexes"] for e in ways.values()] == [7, 7]
    assert report["destination_indexes"] == "primary keys only"
    assert ways["replicator"]["tps_vs_native"] > 0
    assert 10 < ways["replicator"]["peak_rss_mib"] < 4096
    assert report["load"]["clients"] == 4
    rows = lag_csv.read_text().splitlines()
    assert rows[0] == "t,lag_ms,way"
    per_way = {w: sum(1 for r in rows[1:] if r.endswith("," + w)) for w in ways}
    assert per_way == {w: e["markers"] for w, e in ways.items()}
    assert "lag p50" in proc.stderr and "source tps" in proc.stderr
    # Issue 26's two OLTP targets, and the memory bound.
    assert [t.split(":")[0].strip() for t in report["targets"]] == [
        "target p99 lag <= native's", "target p50 lag <= 1.5x native's",
        "target peak RSS < 200 MB"]


def test_decoder_bench_smoke():
    """bench/test_decoder_bench.py runs each decoder once on the Odoo capture (no timing)
    and both give the same staging output."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_decoder_bench.py", "--benchmark-disable",
         "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
    assert "same staging output on the capture: True" in proc.stdout


@pytest.mark.pg15
def test_cdc_backlog_bench_smoke():
    """bench/cdc_oltp.py --backlog: a few thousand row changes written while each way is
    stopped, applied cold, timed from the slot going active; mirrors equal afterwards."""
    report, proc = _bench_report("cdc_oltp.py", "backlog-smoke", "--backlog", "3000",
                                 "--clients", "2", "--scale", "0.1", "--no-indexes")
    ways = report["ways"]
    assert list(ways) == ["native subscription", "replicator"]
    for way, e in ways.items():
        # 2 clients, 52 row changes per invoice: 29 invoices each
        assert e["transactions"] == 58 and e["rows"] == 58 * 52, way
        assert e["seconds"] > 0 and e["start_s"] >= 0 and e["rows_per_s"] > 0, way
        assert e["mirror_equal"] is True, way
    assert ways["replicator"]["vs_native"] > 0 and 10 < ways["replicator"]["peak_rss_mib"] < 4096
    assert "rows/s" in proc.stderr and "slot active" in proc.stderr
