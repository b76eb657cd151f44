"""`replicator status`: text and JSON, while `run` runs and while it does not; its exit codes."""

from __future__ import annotations

import json
import time

from plugins.replicator import PUBLICATION, catch_up, running, wait_for, write_config

from replicator.cli import main


def status(capsys, config, *extra: str) -> tuple[int, str, str]:
    code = main(["status", "--config", str(config), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def wait_slot_released(source_db) -> None:
    # The replicator has closed its replication connection, but the server's
    # walsender marks the slot inactive only once it has noticed and exited.
    wait_for(lambda: not source_db.fetchall(
        "select 1 from pg_replication_slots where slot_name = %s and active", [PUBLICATION]),
        timeout=30, what="the slot to be released")


def test_status_text_json_running_stopped_and_dropped_slot(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t select g, 'x' from generate_series(1, 40) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)

    # Never run: nothing synced, so nothing is wrong yet.
    code, out, _ = status(capsys, config, "--json")
    st = json.loads(out)
    assert code == 0 and st["synced"] is False and st["slot_exists"] is False

    catch_up(source_db, dest_db)
    wait_slot_released(source_db)
    code, out, _ = status(capsys, config)
    assert code == 0, out
    assert "dead letters" in out and "public.t" in out and "odoo_mirror.t" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("public.t"))
    assert line.split()[2] == "streaming" and line.split()[-1] == "40", line
    code, out, _ = status(capsys, config, "--json")
    st = json.loads(out)
    assert code == 0 and st["slot_exists"] and not st["slot_active"]
    assert st["wal_status"] == "reserved" and st["retained_wal_bytes"] > 0
    assert st["tables"] == [{"source_table": "public.t", "mirror_table": "odoo_mirror.t",
                             "state": "streaming", "source_rows_estimate": st["tables"][0][
                                 "source_rows_estimate"], "mirror_rows": 40,
                             "mirror_rows_method": "count"}]
    assert st["dead_letters"] == 0 and st["applied_lsn"] and st["last_batch_at"]

    with running(source_db, dest_db):
        source_db.execute("insert into t values (41, 'y')")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, out, _ = status(capsys, config, "--json")
            st = json.loads(out)
            if st["slot_active"] and st["tables"][0]["mirror_rows"] == 41:
                break
            time.sleep(0.2)
        assert st["slot_active"] and st["tables"][0]["mirror_rows"] == 41, st
        assert code == 0 and st["lag_seconds"] is not None

    # Far behind by the rule: lag bytes > 0 and the last write older than the bound.
    source_db.execute("insert into t values (42, 'z')")
    # Well past the bound: 1.2 s against 1 s was a coin toss on a loaded machine.
    time.sleep(2.5)
    code, out, _ = status(capsys, config, "--max-lag-seconds", "1")
    assert code == 1 and "not keeping up" in out

    wait_slot_released(source_db)
    source_db.execute("select pg_drop_replication_slot(%s)", [PUBLICATION])
    code, out, _ = status(capsys, config, "--json")
    st = json.loads(out)
    assert code == 1 and st["slot_exists"] is False
    assert any("missing" in p for p in st["problems"])


def test_status_setup_error_is_one_line_exit_2(tmp_path, capsys):
    code, out, err = status(capsys, tmp_path / "nope.toml")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


def test_status_help(capsys):
    assert main(["status", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-lag-seconds" in out and "--json" in out and "read-only" in out.lower()
