"""`python -m replicator run` as a child process of a benchmark: what an operator runs,
so that its memory (VmHWM, the peak resident set) and CPU are its own.

Not a benchmark: imported by cdc_bulk.py and cdc_oltp.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import ROOT

from replicator.devtools.config_file import write_config
from replicator.devtools.localpg import LocalCluster, free_port


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--set source.streaming=false` and the like: the replicator's settings for a run."""
    out: dict[str, dict[str, Any]] = {"source": {}, "destination": {}, "logging": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        side, dot, name = key.partition(".")
        if not sep or not dot or side not in out:
            raise SystemExit(f"--set {item!r}: write source.KEY=VALUE, destination.KEY=VALUE "
                             "or logging.level=info")
        value: Any = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        out[side][name] = value
    return out


def proc_status_kib(pid: int, key: str) -> int:
    """A memory line of /proc/PID/status in KiB (VmHWM: the peak resident set so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


class ReplicatorChild:
    """One config file, any number of `replicator run` processes started from it in turn."""

    def __init__(self, workdir: Path, source: LocalCluster, src_db: str, dest: LocalCluster,
                 dst_db: str, publication: str, slot: str, copy_indexes: bool = True,
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.metrics_port = free_port()
        self.log = workdir / "replicator.log"
        self.config = workdir / "etl-config.toml"
        extra = settings or {}
        write_config(self.config, {
            "source": {"type": "postgres", "host": "127.0.0.1", "port": source.port,
                       "database": src_db, "user": "postgres", "password": "bench",
                       "publication": publication, "slot": slot, **extra.get("source", {})},
            "destination": {"type": "postgres", "host": "127.0.0.1", "port": dest.port,
                            "database": dst_db, "user": "postgres", "password": "bench",
                            "copy_indexes": copy_indexes, **extra.get("destination", {})},
            "logging": {"level": "warning", "format": "json", "output": self.log,
                        **extra.get("logging", {})},
            "metrics": {"enabled": True, "port": self.metrics_port},
        })
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self, *extra: str) -> subprocess.Popen:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--config", str(self.config), *extra],
            cwd=self.workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SystemExit(f"the replicator exited ({self.proc.returncode}): {self._tail()}")

    def _tail(self) -> str:
        err = self.proc.stderr.read().decode(errors="replace") if self.proc and self.proc.stderr \
            else ""
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        return (err + log)[-3000:]

    def run_until_caught_up(self, timeout: float = 3600) -> float:
        """`run --until-caught-up` to its end (slot, state, backfill): the seconds it took."""
        self.start("--until-caught-up")
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SystemExit("replicator run --until-caught-up did not finish") from None
        if code != 0:
            raise SystemExit(f"replicator run --until-caught-up exited {code}: {self._tail()}")
        return time.monotonic() - self.started

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=5) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
        except OSError:
            return None
        return None

    def peak_rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as an operator stops it; its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
