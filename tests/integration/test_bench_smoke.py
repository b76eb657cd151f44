"""The backfill benchmark runs end to end on a small table (no timing assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # A mode-755 base directory: as root the servers run as an unprivileged user.
    base = Path(f"/tmp/odoo-replicator-bench-smoke-{os.getpid()}")
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
    assert ways["replicator (copy_indexes=true)"]["mirror_indexes"] > 1
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
    base = Path(f"/tmp/odoo-replicator-soak-smoke-{os.getpid()}")
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
