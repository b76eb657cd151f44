"""What every benchmark in bench/ reports the same way: the machine, the CPU each side
used (and what other processes took meanwhile), the replicator commit, progress lines.

Not a benchmark: imported by the scripts next to it (bench/ is on sys.path when one of
them runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from psycopg import sql  # noqa: E402

from replicator.devtools.localpg import DURABLE_SETTINGS, LocalCluster  # noqa: E402


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def median_cpu(runs: list[dict]) -> dict[str, float]:
    sides = runs[0].get("cpu_s", {})
    return {k: round(median([r["cpu_s"].get(k, 0.0) for r in runs]), 2) for k in sides}


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": cpu or platform.processor() or "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def replicator_commit() -> str:
    """The commit the replicator code was run from ("+dirty" if replicator/ has edits).

    Outside a git work tree (a `git archive` export), $REPLICATOR_COMMIT says it.
    """
    if not (ROOT / ".git").exists():
        return os.environ.get("REPLICATOR_COMMIT", "unknown (not a git work tree)")
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "replicator"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def clean_env() -> dict[str, str]:
    """The environment for client tools: no PG* variable may redirect them elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class CpuMeter:
    """CPU time used on the machine, split by side, and the share others took.

    `sides` names processes to watch: each counts itself (with its reaped
    children) and its live direct children, so a postmaster counts its backends
    and a replicator child process counts itself. "bench" is this process and its
    reaped children (psql, pg_recvlogical, pgbench). Everything else /proc/stat
    counts as busy is someone else's: other test suites running meanwhile show up
    there. A side can be added while measuring (`watch`): a process that did not
    exist at the first snapshot started from zero.
    """

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, sides: dict[str, int | None]) -> None:
        self.sides = {name: pid for name, pid in sides.items() if pid}

    def watch(self, name: str, pid: int) -> None:
        self.sides[name] = pid

    def unwatch(self, name: str) -> None:
        self.sides.pop(name, None)

    @staticmethod
    def _stat(pid: int | str) -> list[str] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return text[text.rindex(")") + 2:].split()

    def _ours(self) -> dict[str, float]:
        """CPU seconds so far: this process, and each side with its live children."""
        by_pid = {pid: name for name, pid in self.sides.items()}
        ticks = {"bench": 0, **{name: 0 for name in self.sides}}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            f = self._stat(entry.name)
            if f is None:
                continue
            pid, ppid = int(entry.name), int(f[1])
            if pid == os.getpid():      # utime stime cutime cstime
                ticks["bench"] += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
            elif pid in by_pid:
                ticks[by_pid[pid]] += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
            elif ppid in by_pid:
                ticks[by_pid[ppid]] += int(f[11]) + int(f[12])
        return {k: v / self.TICK for k, v in ticks.items()}

    @classmethod
    def _busy(cls) -> float:
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return 0.0
        v = [int(x) for x in f]
        # user nice system idle iowait irq softirq steal
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / cls.TICK

    # A backend that exits while /proc is scanned (after its postmaster's line was
    # read, before its own) is missed: its time is in neither. Backends exit right
    # after a timed run (psql disconnects), so wait for them to be reaped first.
    SETTLE_S = 0.3

    def snapshot(self, settle: bool = True) -> tuple[float, float, dict[str, float]]:
        if settle:
            time.sleep(self.SETTLE_S)
        return time.monotonic(), self._busy(), self._ours()

    def since(self, start: tuple[float, float, dict[str, float]],
              settle: bool = True) -> dict[str, Any]:
        """CPU seconds since `start` by side, and the share of all CPUs others used."""
        t1, busy1, ours1 = self.snapshot(settle)
        t0, busy0, ours0 = start
        out = {k: round(ours1.get(k, 0.0) - ours0.get(k, 0.0), 2) for k in ours1}
        # /proc/stat's busy time covers the settling pause too, so the wall time must.
        wall = max(1e-6, t1 - t0) * (os.cpu_count() or 1)
        foreign = max(0.0, ((busy1 - busy0) - sum(out.values())) / wall)
        return {"cpu_s": out, "foreign_cpu": foreign}


class Servers:
    """A throwaway PostgreSQL source and destination with production durability.

    Under a mode-755 directory in /tmp (as root the servers run as an unprivileged
    user who must reach it). fsync, full_page_writes and synchronous_commit are on:
    what users run, and the commit path is part of what is timed.
    """

    def __init__(self, version: int, keep: bool, base: Path | None,
                 dbnames: tuple[str, str] = ("postgres", "postgres")) -> None:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="odoo-replicator-bench-", dir="/tmp"))
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        base.chmod(0o755)
        self.version = version
        self.base = base
        self.keep = keep
        self.dbnames = dbnames          # what --keep prints the DSNs of
        self.settings = DURABLE_SETTINGS
        self.src = LocalCluster(version, base, settings=DURABLE_SETTINGS)
        self.dst = LocalCluster(version, base, settings=DURABLE_SETTINGS)
        self.meter = CpuMeter({})

    def start(self) -> None:
        say(f"starting PostgreSQL {self.version} source and destination under {self.base}")
        self.src.start()
        self.dst.start()
        self.meter = CpuMeter({"source": self.src.pid, "destination": self.dst.pid})

    def close(self) -> None:
        if self.keep:
            say(f"--keep: clusters left running under {self.base}")
            say(f"  source:      {self.src.dsn(self.dbnames[0])}")
            say(f"  destination: {self.dst.dsn(self.dbnames[1])}")
            prefix = f"runuser -u {self.src.os_user} -- " if self.src.os_user else ""
            for c in (self.src, self.dst):
                say(f"  stop: {prefix}{c.bin_dir}/pg_ctl stop -D {c.data_dir}")
            say(f"  then: rm -rf {self.base}")
            return
        self.src.remove()
        self.dst.remove()
        shutil.rmtree(self.base, ignore_errors=True)

    def versions(self) -> dict[str, str]:
        out = {}
        for name, c in (("source", self.src), ("destination", self.dst)):
            with c.connect() as conn:
                out[name] = conn.execute("show server_version").fetchone()[0]
        return out

    def durability(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


def table_digest(conn: Any, schema: str, table: str) -> tuple[int, str]:
    """(rows, md5 of every row's text in id order): equal digests, equal tables."""
    q = sql.SQL("select count(*), coalesce(md5(string_agg(t::text, '|' order by id)), '') "
                "from {} t").format(sql.Identifier(schema, table))
    return conn.execute(q).fetchone()



# -- the command line and the report's end, alike in every script --------------------------


def add_run_options(ap: argparse.ArgumentParser, json_help: str) -> None:
    """--json, --keep and --base-dir: how a run reports and where its clusters live."""
    ap.add_argument("--json", action="store_true", help=json_help)
    ap.add_argument("--keep", action="store_true", help="keep the clusters running at the end")
    ap.add_argument("--base-dir", type=Path, default=None,
                    help="mode-755 directory for the clusters")


def add_cdc_options(ap: argparse.ArgumentParser, native_streaming: tuple[str, ...]) -> None:
    """What both change-stream benchmarks set alike on the two destinations and the replicator."""
    ap.add_argument("--no-indexes", action="store_true",
                    help="primary keys only on both destinations (replicator copy_indexes = "
                         "false); by default both get the source's secondary indexes")
    ap.add_argument("--native-streaming", choices=native_streaming, default="off",
                    help="the native subscription's streaming setting (pinned, printed)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a replicator setting for every run, e.g. source.streaming=false or "
                         "destination.max_streams=0 (repeatable; printed in the report)")


def emit(report: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], None]) -> None:
    """The report as JSON on stdout (with --json), then its table."""
    if as_json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    table(report)
