"""`replicator status`: text and JSON, while `run` runs and while it does not; its exit codes."""

from __future__ import annotations

import json
import threading
import time

from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    STATE_SCHEMA,
    catch_up,
    running,
    wait_for,
    write_config,
)
from plugins.servers import ONE_VERSION
from psycopg import sql

from replicator.commands.cli import main

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


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


def forty_rows(source_db, dest_db, tmp_path):
    """Table t with 40 rows, published; the config of a pipeline never run."""
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t select g, 'x' from generate_series(1, 40) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    return write_config(tmp_path, source_db, dest_db)


def test_status_text_json_running_stopped_and_dropped_slot(source_db, dest_db, tmp_path, capsys):
    config = forty_rows(source_db, dest_db, tmp_path)

    # Never run: nothing synced, nothing lost, and nothing runs it.
    code, out, _ = status(capsys, config, "--json")
    st = json.loads(out)
    assert code == 1 and st["synced"] is False and st["slot_exists"] is False
    assert st["running"] == "not running" and st["problems"] == [
        "no replicator runs this pipeline: none has run yet (`replicator run`)"]

    catch_up(source_db, dest_db)
    wait_slot_released(source_db)
    code, out, _ = status(capsys, config)
    # A one-shot run that caught up and exited: all is well but for that.
    assert code == 1, out
    assert "replicator           not running since" in out, out
    assert out.count("PROBLEM") == 1 and \
        ": caught up (run --until-caught-up) and exited" in out, out
    assert "dead letters" in out and "public.t" in out and "odoo_mirror.t" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("public.t"))
    assert line.split()[2] == "streaming" and line.split()[-1] == "40", line
    code, out, _ = status(capsys, config, "--json")
    st = json.loads(out)
    assert code == 1 and st["slot_exists"] and not st["slot_active"]
    assert st["exit_reason"] == "caught up (run --until-caught-up) and exited"
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
        assert st["running"] == "running" and st["problems"] == [], st

    # Far behind by the rule: lag bytes > 0 and the last write older than the bound.
    source_db.execute("insert into t values (42, 'z')")
    # Well past the bound: 1.2 s against 1 s was a coin toss on a loaded machine.
    time.sleep(2.5)
    code, out, _ = status(capsys, config, "--max-lag-seconds", "1")
    assert code == 1 and "not keeping up" in out
    assert ": stopped on request" in out, out

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


def _status_in_thread(config, *extra: str, timeout: float = 30) -> tuple[int, str]:
    """`status` in a thread, so that one which waited for a lock fails the test instead of
    hanging it; (exit code, stdout and stderr)."""
    import contextlib
    import io

    result: list[tuple[int, str]] = []

    def target() -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["status", "--config", str(config), *extra])
        result.append((code, out.getvalue()))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"status still waiting after {timeout} s: it waited for a lock"
    return result[0]


def test_status_waits_for_no_lock_and_writes_nothing(source_db, dest_db, tmp_path, capsys):
    config = forty_rows(source_db, dest_db, tmp_path)
    # Never run: status creates nothing (no state schema, no table).
    code, _out, _ = status(capsys, config, "--json")
    assert code == 1     # nothing runs it
    assert dest_db.scalar("select count(*) from pg_namespace where nspname = %s",
                          [STATE_SCHEMA]) == 0
    catch_up(source_db, dest_db)
    wait_slot_released(source_db)
    tables = [sql.Identifier(s, n) for s, n in dest_db.fetchall(
        "select schemaname, tablename from pg_tables where schemaname in (%s, %s)",
        [STATE_SCHEMA, MIRROR_SCHEMA])]
    assert len(tables) > 3, tables
    with dest_db.connect(autocommit=False) as holder:
        # SHARE on every state and mirror table: any write status made would wait for it
        # (and, with its lock_timeout, fail); reads go on.
        for table in tables:
            holder.execute(sql.SQL("lock table {} in share mode").format(table))
        code, out = _status_in_thread(config, "--json")
        st = json.loads(out)
        assert code == 1 and st["running"] == "not running", out
        assert st["tables"][0]["mirror_rows"] == 40
        assert st["tables"][0]["mirror_rows_method"] == "count"
        holder.rollback()
        # ACCESS EXCLUSIVE on the mirror table, as the replicator's TRUNCATE or ALTER TABLE
        # holds it: status does not queue behind it (nor in front of it), it estimates.
        holder.execute(sql.SQL("lock table {} in access exclusive mode").format(
            sql.Identifier(MIRROR_SCHEMA, "t")))
        code, out = _status_in_thread(config, "--json")
        st = json.loads(out)
        assert code == 1 and st["running"] == "not running", out
        assert st["tables"][0]["mirror_rows_method"] in ("estimate", "unknown"), st
        holder.rollback()
        # ACCESS EXCLUSIVE on the state itself (a newer replicator's migration): status
        # cannot read it, and says so in one line instead of waiting.
        holder.execute(sql.SQL("lock table {} in access exclusive mode").format(
            sql.Identifier(STATE_SCHEMA, "pipelines")))
        code, out = _status_in_thread(config)
        assert code == 3 and out.startswith("error: ") and out.count("\n") == 1, out
        assert "is locked, and status does not wait for a lock" in out, out
        holder.rollback()


def test_status_default_max_lag_is_300_seconds(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    catch_up(source_db, dest_db)
    wait_slot_released(source_db)
    source_db.execute("insert into t values (1, 'behind')")   # lag in bytes: not applied
    # As if a writer ran it (it holds the lease): only the lag is in question here.
    dest_db.execute(f"update {STATE_SCHEMA}.leases set released_at = null, "
                    "expires_at = now() + interval '1 hour'")
    for seconds, expected in ((200, 0), (310, 1)):
        # The last batch as if it were that long ago.
        dest_db.execute(f"update {STATE_SCHEMA}.pipelines set updated_at = now() - "
                        "%s * interval '1 second'", [seconds])
        code, out, _ = status(capsys, config)
        assert code == expected, f"{seconds} s behind: exit {code}\n{out}"
        assert ("not keeping up" in out) == bool(expected), out
    assert "--max-lag-seconds 300)" in out


# -- whether a replicator runs it ----------------------------------------------------------


def test_status_says_why_the_replicator_stopped(source_db, dest_db, replicator, capsys):
    """`run` exited with an error: status names it, with when, and exits 1 (it answered 0
    with no problem before, for a replicator that had died)."""
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    # A password in the file (the servers trust any): status runs in this process.
    proc = replicator(batch_size=50, flush_interval=0.05, password="unused")
    assert proc.run_until_caught_up(60) == 0, proc.logs()
    dest_db.execute(f"alter table {MIRROR_SCHEMA}.t add constraint no_boom check (v <> 'boom')")
    source_db.execute("insert into t values (1, 'boom')")
    assert proc.run_until_caught_up(60) == 4, proc.logs()
    code, out, _ = status(capsys, proc.config, "--json")
    st = json.loads(out)
    assert code == 1 and st["running"] == "not running" and st["stopped_at"], st
    assert st["exit_reason"].startswith(
        f"the destination rejected a change of {MIRROR_SCHEMA}.t key"), st
    assert st["problems"] == [f"no replicator runs this pipeline: not running since "
                              f"{st['stopped_at']}: {st['exit_reason']}"], st


def test_status_sees_a_killed_replicator_at_once(source_db, dest_db, replicator, capsys):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    # A password in the file (the servers trust any): status runs in this process.
    proc = replicator(batch_size=50, flush_interval=0.05, password="unused")
    proc.start()
    wait_for(lambda: dest_db.scalar(f"select count(*) from {STATE_SCHEMA}.tables "
                                    "where state = 'streaming'") == 1, what="streaming")
    code, out, _ = status(capsys, proc.config, "--json")
    assert json.loads(out)["running"] == "running", out
    assert proc.kill()
    # Its lease (lease_timeout 30 s) has long to run, but once it missed a renewal (every
    # 10 s) and its pid on this host is gone, status says so.
    def stopped() -> bool:
        return status(capsys, proc.config)[0] == 1
    wait_for(stopped, 20, what="status to see the killed replicator")
    code, out, _ = status(capsys, proc.config)
    assert code == 1, out
    assert "no exit recorded: killed, or cut off from the destination" in out, out
    left = dest_db.scalar(f"select extract(epoch from expires_at - now()) from "
                          f"{STATE_SCHEMA}.leases")
    assert left > 0, "seen before the lease ran out"
