"""`replicator demo`, README's first command, end to end: its own servers, init, the copy,
status, streaming under the workload, verify, the comparison; with --keep, servers left up
and the printed commands that use and stop them working as printed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import psycopg
import pytest
from plugins.replicator import REPO
from plugins.servers import scratch

from replicator.devtools.localpg import available_versions, free_port


@pytest.mark.pg15
def test_demo_keep_runs_everything_and_prints_commands_that_work():
    if 15 not in available_versions() and os.environ.get("CI"):
        pytest.fail("PostgreSQL 15 is not available (CI installs it: see .ci/run)")
    base = scratch("demo-test")
    # No activated venv and no passwords in the environment: what a new user has.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")
           and k not in ("VIRTUAL_ENV", "ODOO_DB_PASSWORD", "SUPABASE_DB_PASSWORD")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    port = free_port()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "replicator", "demo", "--keep", "--seconds", "2",
             "--workdir", str(base), "--port", str(port)],
            capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
        out = proc.stdout
        assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
        for step in ("== replicator init", "change(s) in", "== replicator status",
                     "streaming", "== replicator verify", "no drift",
                     "== the mirror equals the source", "/metrics"):
            assert step in out, f"{step!r} missing from the demo's output:\n{out[-4000:]}"
        assert "Traceback" not in out + proc.stderr
        assert f"http://127.0.0.1:{port}/metrics" in out
        # Nothing masked: the demo's passwords are in no path ("demo-test" is).
        assert "***" not in out and str(base) in out
        # The printed commands work as printed, with no venv activated.
        for line in re.findall(r"^   (\S+ (?:status|verify) --config \S+)", out, re.M):
            done = subprocess.run(line, shell=True, timeout=60, capture_output=True, text=True,
                                  env=env, cwd="/")
            assert done.returncode in (0, 1), f"{line}: {done.stdout}{done.stderr}"
            assert "error" not in done.stderr, f"{line}: {done.stderr}"

        dsns = re.findall(r"^   psql ('[^']*'|\S+)", out, re.M)
        assert len(dsns) == 2, out[-2000:]
        source_dsn, mirror_dsn = (shlex.split(d)[0] for d in dsns)
        # The servers are still up, and the mirror answers the queries the demo prints.
        with psycopg.connect(mirror_dsn) as conn:
            for query in re.findall(r"^     (select .*;)$", out, re.M):
                conn.execute(query).fetchall()
            assert conn.execute("select count(*) from odoo_mirror.account_move").fetchone()[0] > 0
        with psycopg.connect(source_dsn) as conn:
            assert conn.execute("select count(*) from account_move").fetchone()[0] > 0

        stops = out.split("To stop them and remove their files:", 1)[1].strip().splitlines()
        for line in stops:
            subprocess.run(line.strip(), shell=True, check=True, timeout=60,
                           capture_output=True)
        for dsn in (source_dsn, mirror_dsn):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn, connect_timeout=3).close()
        assert not base.exists()
    finally:
        subprocess.run(["pkill", "-f", "--", f"-D {base}"], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.pg15
def test_demo_leaves_nothing_behind_without_keep(monkeypatch):
    """Without --keep the servers go, and so do the config and .env it wrote (and the
    workdir it made)."""
    from replicator.devtools import demo

    if 15 not in available_versions() and os.environ.get("CI"):
        pytest.fail("PostgreSQL 15 is not available (CI installs it: see .ci/run)")
    seen = {}

    def short_run(base, source, dest, scale, seconds, metrics_port):
        (base / demo.CONFIG_NAME).write_text("# written\n")
        (base / ".env").write_text("X=1\n")
        seen["base"] = base
        return True

    monkeypatch.setattr(demo, "_run", short_run)
    root = scratch("demo-cleanup")
    try:
        workdir = root / "fresh"
        assert demo.main(workdir, keep=False) == 0
        assert seen["base"] == workdir and not workdir.exists()
        # A directory with a config or .env of the user's: refused, untouched.
        mine = root / "deployment"
        mine.mkdir(parents=True)
        (mine / ".env").write_text("ODOO_DB_PASSWORD=the real one\n")
        assert demo.main(mine, keep=False) == 2
        assert (mine / ".env").read_text() == "ODOO_DB_PASSWORD=the real one\n"
        given = root / "given"
        given.mkdir(parents=True)
        assert demo.main(given, keep=False) == 0
        assert given.exists() and not (given / demo.CONFIG_NAME).exists() \
            and not (given / ".env").exists()
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
