"""The package as the Dockerfile ships it: `pip wheel` builds it (Cython extensions compiled),
and the wheel installed into a fresh venv, outside the source tree, runs on its own; from that
venv, README's checklist "Mirror your Odoo into Supabase", step by step.

No Docker engine here: the Dockerfile's own build and runtime steps are the same pip commands
(its instructions are checked in tests/unit/test_deploy_files.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from plugins.replicator import PUBLICATION, assert_same, table_rows, write_config

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """No PYTHONPATH (it would put this checkout on the path), no venv of the caller's, no PG*
    variable (the config decides every connection setting)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PG")}


def run(*args: str | Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


PROBE = """
import importlib.resources, json, replicator, replicator._decode, replicator.pipeline._pipe
sql = importlib.resources.files("replicator") / "sql" / "state"
print(json.dumps({"package": replicator.__file__, "decode": replicator._decode.__file__,
                  "pipe": replicator.pipeline._pipe.__file__,
                  "migrations": sorted(p.name for p in sql.iterdir() if p.name.endswith(".sql"))}))
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from this checkout and installed into a fresh venv outside it (once:
    the module stays on one worker, tests/plugins/schedule.py)."""
    base = tmp_path_factory.mktemp("package")
    assert not base.resolve().is_relative_to(ROOT)
    wheels = base / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT,
        cwd=base, timeout=300)
    [wheel] = wheels.glob("odoo_replicator-*.whl")
    path = base / "venv"
    # Without a pip of its own (seconds saved): this pip installs into it, with the wheel's
    # dependencies, as `pip install /wheels/*.whl` does in the image.
    run(sys.executable, "-m", "venv", "--without-pip", path, cwd=base, timeout=120)
    run(sys.executable, "-m", "pip", "--python", path / "bin" / "python", "install", "-q", wheel,
        cwd=base, timeout=300)
    return path


@pytest.mark.parametrize("source_cluster", [pytest.param(15, marks=pytest.mark.pg15, id="pg15")],
                         indirect=True)
def test_wheel_in_a_fresh_venv_runs_a_real_sync(venv, source_db, dest_db, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = run(venv / "bin" / "replicator", "--help", cwd=work, timeout=60).stdout
    assert out.startswith("usage: replicator") and "run --until-caught-up" in out

    probe = json.loads(run(venv / "bin" / "python", "-c", PROBE, cwd=work, timeout=60).stdout)
    site = venv.resolve()
    for key in ("package", "decode", "pipe"):
        assert Path(probe[key]).resolve().is_relative_to(site), probe
    assert probe["decode"].endswith(".so") and probe["pipe"].endswith(".so"), probe  # compiled
    shipped = sorted(p.name for p in (ROOT / "replicator" / "sql" / "state").glob("*.sql"))
    assert probe["migrations"] == shipped

    # A real sync from the installed command: the initial copy (the _pipe extension), then the
    # changes made since, streamed (the _decode extension).
    source_db.execute("create table t (id int primary key, v text, n numeric, at timestamptz)")
    source_db.execute("insert into t select g, 'row ' || g, g * 1.5, now() from"
                      " generate_series(1, 500) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(work, source_db, dest_db)
    replicator = venv / "bin" / "replicator"
    run(replicator, "run", "--until-caught-up", "--config", config, cwd=work, timeout=120)
    assert_same(source_db, dest_db, "t")
    assert len(table_rows(source_db, "t")) == 500
    source_db.execute("update t set v = 'changed', n = null where id % 7 = 0")
    source_db.execute("delete from t where id > 450")
    source_db.execute("insert into t values (1000, 'new', 2.25, now())")
    run(replicator, "run", "--until-caught-up", "--config", config, cwd=work, timeout=120)
    assert_same(source_db, dest_db, "t")
    assert len(table_rows(source_db, "t")) == 451


# -- README's checklist, as a new operator follows it -----------------------------------------

SIX = ("account_move", "account_move_line", "res_partner", "project_task", "hr_expense",
       "hr_expense_sheet")


def _shipped_config(work: Path, source_db, dest_db) -> Path:
    """The shipped etl-config.toml with what differs here changed: where the two servers are
    (ports and databases: these servers are the test's), and a free metrics port."""
    from replicator.devtools.localpg import free_port

    text = (ROOT / "etl-config.toml").read_text()
    for old, new in (('port = 5432\n', f"port = {source_db.cluster.port}\n"),
                     ('database = "odoo_core"\n', f'database = "{source_db.name}"\n'),
                     ("port = 5433  #", f"port = {dest_db.cluster.port}  #"),
                     ('database = "postgres"\n', f'database = "{dest_db.name}"\n'),
                     ("port = 9090\n", f"port = {free_port()}\n")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = work / "etl-config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("source_cluster", [pytest.param(15, marks=pytest.mark.pg15, id="pg15")],
                         indirect=True)
def test_the_readme_checklist_from_a_fresh_venv(venv, source_db, dest_db, tmp_path):
    """Mirror your Odoo into Supabase, as README's checklist says, from the installed command:
    the source role and its grants, the publication, the shipped config and a .env, check,
    init, run; status while it runs; a seventh table added to the publication meanwhile is
    mirrored without a restart; verify; and status once it stopped."""
    import signal
    import time

    from replicator.devtools.seed import seed

    seed(source_db.dsn, scale=1, publication=None)             # an Odoo database
    # 2. The source role: LOGIN REPLICATION and SELECT, nothing more.
    source_db.execute("do $$ begin create role replicator login replication password 'x'; "
                      "exception when duplicate_object then null; end $$")
    source_db.execute(f"grant select on {', '.join(SIX)} to replicator")
    # 3. The publication.
    source_db.execute(f"create publication odoo_pub_scout for table {', '.join(SIX)}")
    # 4. The shipped config and the two passwords in .env beside it.
    work = tmp_path / "checklist"
    work.mkdir()
    config = _shipped_config(work, source_db, dest_db)
    (work / ".env").write_text("ODOO_DB_PASSWORD=source-pw-123\nSUPABASE_DB_PASSWORD=dest-pw-456\n")
    replicator = venv / "bin" / "replicator"
    # 5. check, 6. init.
    out = run(replicator, "check", "--config", config, cwd=work, timeout=120).stdout
    assert "every table of the publication -> odoo_mirror.<same name>" in out, out
    assert "with 6 replicated table(s)" in out, out
    run(replicator, "init", "--config", config, cwd=work, timeout=120)
    # 7. run, in the background, as a service would.
    log = (work / "run.log").open("w")
    proc = subprocess.Popen([str(replicator), "run", "--config", str(config)], cwd=work,
                            env=clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        def status() -> dict:
            done = subprocess.run([str(replicator), "status", "--json", "--config",
                                   str(config)], cwd=work, env=clean_env(),
                                  capture_output=True, text=True, timeout=60)
            return json.loads(done.stdout)

        def until(what: str, check, timeout: float = 90) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert proc.poll() is None, f"run exited {proc.returncode}"
                assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
                time.sleep(0.5)

        until("every table streaming", lambda: [t["state"] for t in status()["tables"]]
              == ["streaming"] * 6)
        # 8. status: it runs, nothing is wrong.
        st = status()
        assert st["running"] == "running" and st["problems"] == [], st
        # A seventh table, added to the publication while it runs.
        source_db.execute("create table x_fleet_vehicle (id int primary key, name text)")
        source_db.execute("insert into x_fleet_vehicle select g, 'car ' || g "
                          "from generate_series(1, 50) g")
        source_db.execute("grant select on x_fleet_vehicle to replicator")
        source_db.execute("alter publication odoo_pub_scout add table x_fleet_vehicle")
        source_db.execute("insert into x_fleet_vehicle values (51, 'added after')")
        source_db.execute("update res_partner set name = name || ' (edited)' where id <= 5")
        until("the seventh table mirrored", lambda: bool(dest_db.scalar(
            "select to_regclass('odoo_mirror.x_fleet_vehicle') is not null")) and dest_db.scalar(
            "select count(*) from odoo_mirror.x_fleet_vehicle") == 51)
        assert len(status()["tables"]) == 7
        # verify: mirror and source agree, row by row.
        out = run(replicator, "verify", "--config", config, cwd=work, timeout=180).stdout
        assert out.rstrip().endswith("no drift"), out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.close()
    assert proc.returncode == 0, (work / "run.log").read_text()[-3000:]
    st = status()
    assert st["running"] == "not running" and st["exit_reason"] == "stopped on request", st
    for table in (*SIX, "x_fleet_vehicle"):
        assert_same(source_db, dest_db, table)
