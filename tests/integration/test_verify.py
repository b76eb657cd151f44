"""`replicator verify`: finds a changed, missing or extra mirror row, names its key, and raises
no false alarm while a real replicator process streams a live workload into the mirror."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from plugins.replicator import (
    MIRROR_SCHEMA,
    PUBLICATION,
    assert_same,
    catch_up,
    wait_for,
    write_config,
)

from replicator.commands.cli import main


def verify(capsys: Any, config: Any, *extra: str) -> tuple[int, str, str]:
    code = main(["verify", "--config", str(config), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys: Any, config: Any, *extra: str) -> tuple[int, dict]:
    code, out, err = verify(capsys, config, "--json", *extra)
    assert out, err
    return code, json.loads(out)


def table(report: dict, name: str) -> dict:
    return next(t for t in report["tables"] if t["source_table"] == name)


def mirror(dest_db: Any, statement: str, params: Any = None) -> None:
    """Tamper with the mirror behind the replicator's back (as the superuser)."""
    dest_db.execute(statement.replace("{m}", MIRROR_SCHEMA), params)


def test_clean_then_changed_missing_extra_rows_pipeline_stopped(source_db, dest_db, tmp_path,
                                                                capsys):
    source_db.execute("create table t (id int primary key, v text, n numeric(12,2), "
                      "at timestamptz, f float8, j jsonb)")
    # Composite text key: ranges must hold the same keys whatever either side's collation.
    source_db.execute("create type mood as enum ('ok', 'sad')")   # text in the mirror
    source_db.execute("create table c (a text, b int, v text, m mood, primary key (a, b))")
    source_db.execute("create table k (code varchar(20) primary key, v int)")
    source_db.execute("create table other (id int primary key)")
    source_db.execute("insert into t select g, 'v' || g, g / 7.0, now() - g * interval '1 h', "
                      "g / 3.0, jsonb_build_object('g', g) from generate_series(1, 25000) g")
    source_db.execute("insert into c select chr(65 + g % 26) || g, g, 'x', 'sad' "
                      "from generate_series(1, 300) g")
    source_db.execute("insert into k select 'K-' || g, g from generate_series(1, 12000) g")
    source_db.execute(f"create publication {PUBLICATION} for table t, c, k")
    config = write_config(tmp_path, source_db, dest_db)
    catch_up(source_db, dest_db)
    # Source WAL that is not ours: the mirror's applied position stays behind it.
    source_db.execute("insert into other values (1)")
    # Not streamed yet (no row changed since): the mirror still has v, and no column x.
    source_db.execute("alter table t rename column v to v2")
    source_db.execute("alter table t add column x int")

    code, out, err = verify(capsys, config)
    assert code == 0, out + err
    assert "no drift" in out and "public.t" in out and "odoo_mirror.c" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("public.t "))
    assert line.split()[2:5] == ["25000", "25000", "3"] and line.rstrip().endswith("ok"), line
    code, report = verify_json(capsys, config)
    assert code == 0 and report["drift"] is False
    t = table(report, "public.t")
    assert t["verdict"] == "ok" and t["source_rows"] == 25000 and t["ranges"] == 3
    assert t["compared_columns"] == ["id", "v2", "n", "at", "f", "j"] and t["keys"] == []
    assert t["not_compared"] == ["x (not in the mirror yet)"]
    assert table(report, "public.c")["compared_columns"] == ["a", "b", "v", "m"]
    assert table(report, "public.k")["ranges"] == 2   # a one-column text key, in one scan

    mirror(dest_db, "update {m}.t set v = 'tampered' where id = 12345")
    mirror(dest_db, "delete from {m}.t where id = 20001")
    mirror(dest_db, "insert into {m}.t (id, v) values (30000, 'extra')")
    mirror(dest_db, "update {m}.c set m = 'ok' where a = 'Z51' and b = 51")
    mirror(dest_db, "delete from {m}.k where code = 'K-9999'")
    code, out, err = verify(capsys, config)
    assert code == 1, out + err
    assert "key id=12345: changed" in out
    assert "key id=20001: missing in the mirror" in out
    assert "key id=30000: extra in the mirror" in out
    assert "key a=Z51, b=51: changed" in out and "drift found" in out
    assert "key code=K-9999: missing in the mirror" in out
    code, report = verify_json(capsys, config, "--table", "t")
    assert code == 1 and report["drift"] is True and len(report["tables"]) == 1
    t = table(report, "public.t")
    assert t["verdict"] == "drift" and t["keys_total"] == 3
    assert t["keys"] == [{"key": {"id": 12345}, "kind": "changed"},
                         {"key": {"id": 20001}, "kind": "missing"},
                         {"key": {"id": 30000}, "kind": "extra"}]
    assert (t["source_rows"], t["mirror_rows"]) == (25000, 25000)
    assert [(r["start"], r["end"]) for r in t["drift_ranges"]] == [
        ({"id": 10001}, {"id": 20001}), ({"id": 20001}, None)]


@pytest.mark.parametrize("source_cluster", [15], indirect=True)   # one version: time
def test_many_extra_mirror_rows_are_cut_down_and_the_key_list_capped(source_db, dest_db,
                                                                       tmp_path, capsys):
    source_db.execute("create table t (id int primary key, v int)")
    source_db.execute("insert into t select g, g from generate_series(1, 15000) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    catch_up(source_db, dest_db)
    capsys.readouterr()
    # 30000 rows in the last range, the source's 5000 among them: cut into parts to compare.
    mirror(dest_db, "insert into {m}.t select g, g from generate_series(100001, 125000) g")
    mirror(dest_db, "update {m}.t set v = 0 where id = 12000")
    code, report = verify_json(capsys, config)
    t = table(report, "public.t")
    assert code == 1 and t["narrowing_stopped"] is True, t
    assert t["keys"][0] == {"key": {"id": 12000}, "kind": "changed"}
    assert 1000 <= t["keys_total"] < 25001
    assert all(k["kind"] == "extra" and int(k["key"]["id"]) > 100000 for k in t["keys"][1:])
    assert [(r["start"], r["end"], r["source_rows"], r["mirror_rows"])
            for r in t["drift_ranges"]] == [({"id": 10001}, None, 5000, 30000)]
    code, out, _ = verify(capsys, config)
    assert code == 1 and "only the first were narrowed" in out and "more keys" in out


def test_unknown_table_skipped_table_and_help(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table t (id int primary key)")
    source_db.execute("create table u (id int primary key)")
    source_db.execute(f"create publication {PUBLICATION} for table t, u")
    config = write_config(tmp_path, source_db, dest_db)

    code, out, err = verify(capsys, config)   # never run: nothing to compare with
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1

    catch_up(source_db, dest_db)
    capsys.readouterr()   # the in-process replicator's log lines
    code, out, err = verify(capsys, config, "--table", "nope")
    assert code == 2 and out == ""
    assert err.startswith("error: --table: public.nope is not replicated") and err.count("\n") == 1
    dest_db.execute("update replicator.tables set state = 'pending' where source_table = 'public.u'")
    code, report = verify_json(capsys, config)
    assert code == 0
    assert table(report, "public.u")["verdict"] == "skipped"
    assert "sync state pending" in table(report, "public.u")["reason"]
    assert table(report, "public.t")["verdict"] == "ok"

    assert main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out and "--table" in out and "--wait" in out and "drift" in out


@pytest.mark.parametrize("source_cluster", [18], indirect=True)   # one version: time
def test_mirror_behind_with_pipeline_stopped_is_exit_2(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table t (id int primary key)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    catch_up(source_db, dest_db)
    capsys.readouterr()
    source_db.execute("insert into t values (1)")   # in the slot, not applied
    code, out, err = verify(capsys, config, "--wait", "1.5")
    assert code == 2 and out == "", out
    assert "did not catch up" in err and "not running" in err and err.count("\n") == 1
    # With the default wait (60 s): no replicator applies, so verify does not wait for one.
    started = time.monotonic()
    code, out, err = verify(capsys, config)
    assert code == 2 and out == "", out
    assert "no replicator is applying: slot" in err and "start `replicator run`" in err, err
    assert time.monotonic() - started < 30


def test_a_pipeline_never_synced_has_nothing_to_compare(source_db, dest_db, tmp_path, capsys):
    # `replicator init` made the state (and the mirror tables, empty); no `run` yet.
    from replicator.destination import state

    source_db.execute("create table t (id int primary key)")
    source_db.execute("insert into t values (1)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    with dest_db.connect() as conn:
        state.setup(conn, "replicator")
    code, out, err = verify(capsys, config)
    assert code == 2 and out == "", out
    assert "has never been synced: the mirror has nothing to compare yet" in err, err


class Writer(threading.Thread):
    """Inserts, updates and deletes on the source until stopped: ids up to `upto` and new
    ids from 1_000_000_000 on, and one hot row (id 1) updated in every transaction."""

    def __init__(self, dsn: str, upto: int, seed: int = 7) -> None:
        super().__init__(name="writer", daemon=True)
        self.dsn, self.upto, self.rng = dsn, upto, random.Random(seed)
        self.stopping = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        next_id = 1_000_000_000
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stopping.is_set():
                    with conn.transaction():
                        conn.execute("update w set v = v + 1 where id = 1")
                        for _ in range(self.rng.randint(1, 5)):
                            op, key = self.rng.random(), self.rng.randint(2, self.upto)
                            if op < 0.4:
                                conn.execute("update w set v = v + 1, s = md5(s) where id = %s",
                                             [key])
                            elif op < 0.6:
                                conn.execute("delete from w where id = %s", [key])
                            elif op < 0.8:
                                conn.execute("insert into w values (%s, 0, 'back') "
                                             "on conflict (id) do nothing", [key])
                            else:
                                next_id += 1
                                conn.execute("insert into w values (%s, 0, 'new')", [next_id])
                    self.transactions += 1
                    time.sleep(0.004)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive() and self.error is None, self.error
        assert self.transactions > 20, f"only {self.transactions} transactions"


def start_streaming(replicator: Any, dest_db: Any, timeout: float = 60) -> Any:
    # A password in the file (the servers trust any): verify runs in this process.
    process = replicator(batch_size=500, flush_interval=0.2, password="unused")
    process.start()
    wait_for(lambda: dest_db.scalar("select state from replicator.tables "
                                    "where source_table = 'public.w'") == "streaming",
             timeout, "the initial copy")
    return process


@pytest.mark.parametrize("source_cluster", [18], indirect=True)   # one version: time
def test_no_false_alarm_under_live_load_then_exactly_the_tampered_keys(
        source_db, dest_db, replicator, capsys):
    source_db.execute("create table w (id int primary key, v int, s text)")
    source_db.execute("insert into w select g, 0, md5(g::text) from generate_series(1, 30000) g")
    source_db.execute(f"create publication {PUBLICATION} for table w")
    process = start_streaming(replicator, dest_db)
    writer = Writer(source_db.dsn, upto=12000)
    writer.start()
    try:
        time.sleep(0.5)
        for _ in range(2):
            code, report = verify_json(capsys, process.config)
            w = table(report, "public.w")
            assert code == 0 and w["verdict"] == "ok" and w["keys"] == [], w
            assert w["rounds"] >= 1 and w["source_rows"] > 25000
        # The writer never touches ids above 12000.
        mirror(dest_db, "update {m}.w set v = -1 where id = 20000")
        mirror(dest_db, "delete from {m}.w where id = 25000")
        code, report = verify_json(capsys, process.config)
        w = table(report, "public.w")
        assert code == 1 and w["verdict"] == "drift", w
        assert w["keys"] == [{"key": {"id": 20000}, "kind": "changed"},
                             {"key": {"id": 25000}, "kind": "missing"}], w
        assert process.alive, process.logs()
    finally:
        writer.stop()


@pytest.mark.parametrize("source_cluster", [15], indirect=True)   # one source version: 1M rows
def test_one_changed_row_among_a_million_under_live_load(source_db, dest_db, replicator,
                                                         capsys):
    source_db.execute("create table w (id int primary key, v int, s text)")
    source_db.execute("insert into w select g, g, null from generate_series(1, 1000000) g")
    source_db.execute("analyze w")
    source_db.execute(f"create publication {PUBLICATION} for table w")
    started = time.monotonic()
    process = start_streaming(replicator, dest_db, timeout=120)
    copied = time.monotonic() - started
    writer = Writer(source_db.dsn, upto=100_000)
    writer.start()
    try:
        mirror(dest_db, "update {m}.w set s = 'y' where id = 777777")
        started = time.monotonic()
        code, report = verify_json(capsys, process.config)
        took = time.monotonic() - started
        w = table(report, "public.w")
        assert code == 1 and w["keys"] == [{"key": {"id": 777777}, "kind": "changed"}], w
        assert w["ranges"] in (100, 101) and w["source_rows"] > 990_000   # + the new rows
        # Boundaries every 10000 rows: the writer's deletes below 100000 shift them a little.
        (r,) = w["drift_ranges"]
        assert int(r["start"]["id"]) <= 777777 < int(r["end"]["id"]), r
        assert 9900 < r["source_rows"] <= 10000 and r["source_rows"] == r["mirror_rows"], r
    finally:
        writer.stop()
    print(f"initial copy {copied:.1f} s, verify {took:.1f} s")


@pytest.mark.parametrize("source_cluster", [18], indirect=True)   # one version: time
def test_repair_under_live_load_recopies_only_the_drifted_keys(source_db, dest_db, replicator,
                                                               capsys):
    source_db.execute("create table w (id int primary key, v int, s text)")
    source_db.execute("insert into w select g, 0, md5(g::text) from generate_series(1, 30000) g")
    source_db.execute(f"create publication {PUBLICATION} for table w")
    process = start_streaming(replicator, dest_db)
    writer = Writer(source_db.dsn, upto=12000)
    writer.start()
    try:
        # Outside the writer's keys: drift that stays until repaired.
        mirror(dest_db, "update {m}.w set v = -1, s = null where id = 20000")
        mirror(dest_db, "delete from {m}.w where id = 25000")
        mirror(dest_db, "insert into {m}.w values (40000, 1, 'extra')")
        # Inside them: the writer's changes race the repair; whichever wins, the row must
        # end as the source has it (never an older value over a newer one).
        for key in (100, 200, 300):
            mirror(dest_db, "update {m}.w set v = -1 where id = %s", [key])
        code, out, err = verify(capsys, process.config, "--repair")
        assert code == 0, out + err
        assert "after repairing" in out and "no drift" in out
        code, report = verify_json(capsys, process.config)
        assert code == 0 and table(report, "public.w")["keys"] == [], report
        assert process.alive, process.logs()
    finally:
        writer.stop()
    lsn = source_db.scalar("select pg_current_wal_insert_lsn()::text")
    source_db.execute("select pg_logical_emit_message(false, 'test', '')")   # WAL past lsn
    wait_for(lambda: dest_db.scalar("select applied_lsn >= %s::pg_lsn from replicator.pipelines",
                                    [lsn]), 30, "the mirror to catch up")
    assert_same(source_db, dest_db, "w")
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 0


@pytest.mark.parametrize("source_cluster", [15], indirect=True)   # one version: time
def test_running_pipeline_idle_source_mirror_passes_a_position_past_the_wal_end(
        source_db, dest_db, replicator):
    """A snapshot's position can lie just past the last record (at a page boundary, after the
    page header): with the source idle, verify writes the WAL record that carries the
    applied position past it instead of waiting for the source's next write."""
    from replicator.commands.verify import Verifier
    from replicator.config.load import load_config
    from replicator.lsn import parse_lsn

    source_db.execute("create table w (id int primary key, v int, s text)")
    source_db.execute(f"create publication {PUBLICATION} for table w")
    process = start_streaming(replicator, dest_db)
    wait_for(lambda: source_db.scalar("select active from pg_replication_slots"), 30, "the slot")
    verifier = Verifier(load_config(process.config), wait=8)
    try:
        time.sleep(1.0)   # idle
        past = parse_lsn(source_db.scalar("select pg_current_wal_insert_lsn()::text")) + 1
        started = time.monotonic()
        verifier.wait_for_mirror(past)
        assert time.monotonic() - started < 5
    finally:
        verifier.close()


@pytest.mark.parametrize("source_cluster", [15], indirect=True)   # one version: time
def test_a_locked_mirror_table_is_skipped_as_busy_not_waited_for(source_db, dest_db, tmp_path,
                                                                 capsys):
    source_db.execute("create table t (id int primary key)")
    source_db.execute("create table u (id int primary key)")
    source_db.execute("insert into t values (1), (2)")
    source_db.execute(f"create publication {PUBLICATION} for table t, u")
    config = write_config(tmp_path, source_db, dest_db)
    catch_up(source_db, dest_db)
    capsys.readouterr()
    with dest_db.connect() as holder:   # as the replicator's own ALTER TABLE would
        holder.execute("begin")
        holder.execute(f"lock table {MIRROR_SCHEMA}.t in access exclusive mode")
        started = time.monotonic()
        code, report = verify_json(capsys, config)
        took = time.monotonic() - started
        holder.execute("rollback")
    assert code == 0 and took < 15, (took, report)
    t = table(report, "public.t")
    assert t["verdict"] == "skipped" and t["reason"].startswith("busy after 3 attempts"), t
    assert table(report, "public.u")["verdict"] == "ok"


@pytest.mark.parametrize("source_cluster", [15], indirect=True)   # one version: time
def test_repair_leaves_a_key_alone_that_changed_since_it_was_verified(source_db, dest_db,
                                                                      tmp_path, capsys):
    from replicator.commands.verify import Verifier
    from replicator.config.load import load_config

    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t select g, 'v' from generate_series(1, 100) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db)
    catch_up(source_db, dest_db)
    mirror(dest_db, "update {m}.t set v = 'tampered' where id in (7, 8)")
    verifier = Verifier(load_config(config), wait=5)
    try:
        result = verifier.verify_table("public.t", "streaming", f"{MIRROR_SCHEMA}.t")
        # Numbers, as in `dead-letters --json`.
        assert [k["key"] for k in result.keys] == [{"id": 7}, {"id": 8}]
        # A newer source version of 8, not in the mirror yet (run is stopped).
        source_db.execute("update t set v = 'newer' where id = 8")
        assert verifier.repair("public.t") == (1, 1)
    finally:
        verifier.close()
    assert dest_db.fetchall(f"select id, v from {MIRROR_SCHEMA}.t where id in (7, 8) "
                            "order by id") == [(7, "v"), (8, "tampered")]
    catch_up(source_db, dest_db)   # the stream brings 8's newer version
    assert_same(source_db, dest_db, "t")
    capsys.readouterr()
    code, out, err = verify(capsys, config, "--repair")
    assert code == 0 and "no drift" in out, out + err
