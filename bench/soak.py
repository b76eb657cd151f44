#!/usr/bin/env python
"""Soak: a long `replicator run` under an Odoo-like OLTP load, with its connections killed
on a schedule, watched for growth in memory, file descriptors and threads.

On one pair of throwaway PostgreSQL 15 servers with production durability (fsync,
full_page_writes, synchronous_commit on), this seeds Odoo-shaped data, starts
`python -m replicator run` as a child process (what an operator runs), runs the
devtools workload against the source for `--minutes`, and every `--kill-every`
seconds terminates the replicator's backends on one side (source and destination in
turn, with pg_terminate_backend: its walsender, its catalog and copy connections, or
its applier), so the process reconnects many times. Every `--sample-every` seconds
it records the child's resident memory (VmRSS), open file descriptors and threads.

At the end the workload stops, the replicator catches up (etl_lag_bytes 0 on
/metrics), is stopped with SIGTERM, and the mirror is compared with the source
table by table. The report gives the first and last samples after a warm-up
(the first 20% of the run), the growth between the two windows and a verdict:
flat means RSS grew by less than 10% + 8 MiB and threads and descriptors by at most
two between the warm-up window and the last one, and the mirror equals the source.

    python bench/soak.py                       # 10 minutes, a kill every 30 s
    python bench/soak.py --minutes 1 --kill-every 10 --json > soak.json

Not part of the test suite (it takes minutes); `tests/integration/test_bench_smoke.py`
runs it for a few seconds so that it keeps working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replicator.config.settings import APPLICATION_NAME  # noqa: E402
from replicator.devtools.config_file import write_config  # noqa: E402
from replicator.devtools.demo import compare  # noqa: E402
from replicator.devtools.localpg import DURABLE_SETTINGS, LocalCluster, free_port  # noqa: E402
from replicator.devtools.seed import seed  # noqa: E402
from replicator.devtools.workload import workload  # noqa: E402

PUBLICATION = "odoo_pub_soak"



def _proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return {"rss_kib": fields["VmRSS"], "threads": fields["Threads"],
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def _terminate(cluster: LocalCluster, dbname: str) -> int:
    """pg_terminate_backend on every connection the replicator holds there."""
    with cluster.connect(dbname) as conn:
        return len(conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where application_name = %s and pid <> pg_backend_pid()",
            [APPLICATION_NAME]).fetchall())


def run(minutes: float, kill_every: float, sample_every: float, scale: int,
        workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    with LocalCluster(15, workdir, settings=DURABLE_SETTINGS) as source, \
            LocalCluster(15, workdir, settings=DURABLE_SETTINGS) as dest:
        source.create_database("odoo_core")
        src_dsn = source.dsn("odoo_core")
        seed(src_dsn, scale=scale, seed=42, publication=PUBLICATION)
        metrics_port = free_port()
        config = workdir / "etl-config.toml"
        log_path = workdir / "replicator.log"
        write_config(config, {
            "source": {"type": "postgres", "host": "127.0.0.1", "port": source.port,
                       "database": "odoo_core", "user": "postgres", "password": "soak",
                       "publication": PUBLICATION},
            "destination": {"type": "postgres", "host": "127.0.0.1", "port": dest.port,
                            "database": "postgres", "user": "postgres", "password": "soak",
                            "batch_size": 5000, "flush_interval": 0.5},
            "logging": {"level": "warning", "format": "json", "output": log_path},
            "metrics": {"enabled": True, "port": metrics_port},
        })
        child = subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--config", str(config)],
            cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while _up(metrics_port) != 1:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the replicator did not start streaming: "
                                     f"{child.stderr.read().decode() if child.stderr else ''}")
                time.sleep(0.5)

            stop = threading.Event()
            done: dict[str, int] = {}
            load = threading.Thread(
                target=lambda: done.update(workload(src_dsn, stop=stop, seed=7)), daemon=True)
            started = time.monotonic()
            load.start()
            samples: list[dict[str, Any]] = []
            kills = {"source": 0, "destination": 0}
            next_kill = started + kill_every
            side = "source"
            while time.monotonic() - started < minutes * 60:
                if child.poll() is not None:
                    raise SystemExit(f"the replicator exited ({child.returncode}) during the soak")
                now = time.monotonic()
                samples.append({"t": round(now - started, 1), **_proc_status(child.pid)})
                if now >= next_kill:
                    cluster, db = (source, "odoo_core") if side == "source" else (dest, "postgres")
                    if _terminate(cluster, db):
                        kills[side] += 1
                    side = "destination" if side == "source" else "source"
                    next_kill = now + kill_every
                time.sleep(sample_every)
            stop.set()
            load.join()

            deadline = time.monotonic() + 300
            while _lag(metrics_port) != 0:
                if time.monotonic() > deadline:
                    raise SystemExit("the replicator did not catch up within 5 minutes")
                time.sleep(0.5)
            child.send_signal(signal.SIGTERM)
            code = child.wait(60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the --json report
            equal = compare(src_dsn, dest.dsn("postgres"))
    return _report(samples, kills, done, equal, code, minutes, kill_every)


def _up(port: int) -> float | None:
    try:
        return _metric(port, "etl_up")
    except OSError:
        return None


def _lag(port: int) -> float | None:
    try:
        return _metric(port, "etl_lag_bytes")
    except OSError:
        return None


def _report(samples: list[dict[str, Any]], kills: dict[str, int], done: dict[str, int],
            equal: bool, code: int, minutes: float, kill_every: float) -> dict[str, Any]:
    warm = max(1, len(samples) // 5)
    first, last = samples[warm:2 * warm] or samples[:1], samples[-warm:]

    def peak(window: list[dict[str, Any]], key: str) -> int:
        return max(s[key] for s in window)

    growth = {key: peak(last, key) - peak(first, key) for key in ("rss_kib", "threads", "fds")}
    flat = (growth["rss_kib"] <= peak(first, "rss_kib") * 0.10 + 8 * 1024
            and growth["threads"] <= 2 and growth["fds"] <= 2)
    return {
        "minutes": minutes, "kill_every_s": kill_every, "kills": kills,
        "source_transactions": done.get("transactions", 0),
        "after_warmup": {k: peak(first, k) for k in ("rss_kib", "threads", "fds")},
        "last_window": {k: peak(last, k) for k in ("rss_kib", "threads", "fds")},
        "growth": growth, "flat": flat, "mirror_equal": equal, "exit_code": code,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--kill-every", type=float, default=30, help="seconds between kills")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples")
    parser.add_argument("--scale", type=int, default=1, help="seed scale")
    parser.add_argument("--json", action="store_true", help="the whole report as JSON on stdout")
    parser.add_argument("--workdir", type=Path, help="where the servers live (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="replicator-soak-"))
    report = run(args.minutes, args.kill_every, args.sample_every, args.scale, workdir)
    if args.json:
        print(json.dumps(report, indent=2))
    a, b, g = report["after_warmup"], report["last_window"], report["growth"]
    print(f"soak {report['minutes']:g} min, kills {report['kills']}, "
          f"{report['source_transactions']} source transactions", file=sys.stderr)
    print(f"{'':14}{'after warm-up':>15}{'last window':>15}{'growth':>10}", file=sys.stderr)
    print(f"{'RSS MiB':14}{a['rss_kib'] / 1024:>15.1f}{b['rss_kib'] / 1024:>15.1f}"
          f"{g['rss_kib'] / 1024:>10.1f}", file=sys.stderr)
    for key in ("threads", "fds"):
        print(f"{key:14}{a[key]:>15}{b[key]:>15}{g[key]:>10}", file=sys.stderr)
    print(f"flat: {report['flat']}; mirror equals source: {report['mirror_equal']}; "
          f"exit code {report['exit_code']}", file=sys.stderr)
    return 0 if report["flat"] and report["mirror_equal"] and report["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
