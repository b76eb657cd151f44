"""The package as the Dockerfile ships it: `pip wheel` builds it (Cython extensions compiled),
and the wheel installed into a fresh venv, outside the source tree, runs on its own.

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


@pytest.mark.parametrize("source_cluster", [pytest.param(15, marks=pytest.mark.pg15, id="pg15")],
                         indirect=True)
def test_wheel_in_a_fresh_venv_runs_a_real_sync(source_db, dest_db, tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT,
        cwd=tmp_path, timeout=300)
    [wheel] = wheels.glob("odoo_replicator-*.whl")
    venv = tmp_path / "venv"
    # Without a pip of its own (seconds saved): this pip installs into it, with the wheel's
    # dependencies, as `pip install /wheels/*.whl` does in the image.
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, timeout=120)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", wheel,
        cwd=tmp_path, timeout=300)

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
