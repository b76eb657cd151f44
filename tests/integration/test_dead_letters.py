"""Changes the mirror rejects: [destination] on_error, the dead letter table, and
`replicator dead-letters [--retry]`.

The first tests feed hand-written pgoutput to an Applier on a real destination (fast, every
case exact); the last ones run `replicator run` as a process against a real source.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request

import psycopg
import pytest
from pgwire import UNCHANGED as U
from pgwire import begin, commit, insert, int4, update
from plugins.replicator import (
    PASSWORD_VAR,
    PUBLICATION,
    assert_same,
    catch_up,
    make_config,
    running,
    wait_for,
    write_config,
)
from plugins.servers import ONE_VERSION

from replicator._decode import Decoder
from replicator.batch import Batch
from replicator.commands.cli import main
from replicator.config.settings import MetricsSettings
from replicator.destination import dead_letters, state
from replicator.destination.applier import Applier
from replicator.devtools.localpg import free_port
from replicator.errors import ErrorKind, ReplicatorError
from replicator.schema import Column, MirrorTable, SourceTable

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


RELID = 16500
COLS = (Column("id", "integer", 23, 4), Column("name", "text", 25, -1),
        Column("big", "text", 25, -1))
CHECK = "alter table odoo_mirror.t add constraint no_bad check (name is distinct from 'bad')"
SLOT = "test_slot"


def B(s: str) -> bytes:
    return s.encode()


def row(i, name, big):
    return [int4(i), None if name is None else B(name), None if big is None else B(big)]


def key(i):
    return [int4(i), None, None]


def applier_for(dest_db, on_error):
    table = MirrorTable(SourceTable(RELID, "public", "t", COLS, ("id",), "d"),
                        "odoo_mirror", "t", "replicator", binary=True)
    applier = Applier(dest_db.dsn, "replicator", SLOT, on_error)
    applier.connect()
    state.setup(applier.conn, "replicator")
    applier.prepare_tables([table])
    lsn = [100]

    def apply(*transactions):
        """Apply one batch; each argument is one source transaction (a list of messages)."""
        dec = Decoder()
        dec.define(RELID, 3, [0], True)
        batch = Batch()
        for messages in transactions:
            dec.feed(begin(lsn[0]))
            for m in messages:
                dec.feed(m)
            dec.feed(commit(lsn[0], lsn[0] + 10))
            batch.add_rows(dec.take(), {RELID: table})
            batch.commit(lsn[0] + 10, 0)
            lsn[0] += 100
        return applier.apply(batch)

    return applier, apply


@pytest.fixture
def lettering(dest_db):
    applier, apply = applier_for(dest_db, "dead_letter")
    yield apply
    applier.close()


def rows(dest_db):
    return dest_db.fetchall("select id, name, big from odoo_mirror.t order by id")


def letters(dest_db):
    return dest_db.fetchall(
        "select key_data, op, row_data, sqlstate, reason, lsn::text from replicator.dead_letters "
        "order by id")


def retry(dest_db):
    with psycopg.connect(dest_db.dsn, autocommit=True) as conn:
        return dead_letters.retry(conn, "replicator", SLOT)


def test_rejected_row_is_set_aside_and_the_rest_applied(lettering, dest_db):
    lettering([insert(RELID, row(1, "a", "A"))])
    dest_db.execute(CHECK)
    res = lettering([insert(RELID, row(i, "bad" if i == 3 else f"n{i}", "X")) for i in (2, 3, 4)],
                    [insert(RELID, row(5, "n5", "X")), insert(RELID, row(6, "bad", "X"))],
                    [update(RELID, row(1, "b", "B"))])
    assert rows(dest_db) == [(1, "b", "B"), (2, "n2", "X"), (4, "n4", "X"), (5, "n5", "X")]
    got = letters(dest_db)
    assert [(k, op, r, code) for k, op, r, code, _reason, _lsn in got] == [
        ({"id": 3}, "I", {"id": 3, "name": "bad", "big": "X"}, "23514"),
        ({"id": 6}, "I", {"id": 6, "name": "bad", "big": "X"}, "23514")]
    assert all('check constraint "no_bad"' in reason for *_r, reason, _lsn in got)
    # Each letter has its own transaction's commit LSN (the batch's second and third).
    assert [lsn for *_r, lsn in got] == ["0/C8", "0/12C"]
    assert res.dead_per_table == {"odoo_mirror.t": 2}
    assert res.per_op["odoo_mirror.t"] == {"insert": 3, "update": 1, "delete": 0}
    assert dest_db.scalar("select applied_lsn::text from replicator.pipelines") == "0/19A"


def test_later_changes_of_the_key_queue_behind_and_retry_replays_them(lettering, dest_db):
    lettering([insert(RELID, row(1, "a", "A")), insert(RELID, row(2, "b", "B"))])
    dest_db.execute(CHECK)
    lettering([update(RELID, row(1, "bad", "A1"))])
    # The mirror accepts this one, but applying it would put 1 past its failed change.
    res = lettering([update(RELID, [int4(1), B("fixed"), U]), update(RELID, row(2, "b2", "B"))])
    assert res.dead_per_table == {"odoo_mirror.t": 1}
    assert rows(dest_db) == [(1, "a", "A"), (2, "b2", "B")]
    got = letters(dest_db)
    assert [(k, op, r) for k, op, r, *_ in got] == [
        ({"id": 1}, "U", {"id": 1, "name": "bad", "big": "A1"}),
        ({"id": 1}, "U", {"id": 1, "name": "fixed"})]   # big was unchanged TOAST
    assert got[1][4] == "queued behind an earlier dead letter of the same key"

    # Still rejected: the failing letter gets its error again, nothing is applied.
    out = retry(dest_db)
    assert (out.applied, len(out.failed)) == (0, 1)
    assert dest_db.scalar("select retries from replicator.dead_letters order by id limit 1") == 1
    assert rows(dest_db)[0] == (1, "a", "A")

    dest_db.execute("alter table odoo_mirror.t drop constraint no_bad")
    out = retry(dest_db)
    assert (out.applied, out.failed) == (2, [])
    # In order: the unchanged big keeps the value of the first letter.
    assert rows(dest_db) == [(1, "fixed", "A1"), (2, "b2", "B")]
    assert letters(dest_db) == []
    # No longer queued: the next change of 1 is applied directly.
    lettering([update(RELID, row(1, "later", "L"))])
    assert rows(dest_db)[0] == (1, "later", "L") and letters(dest_db) == []


def test_a_key_change_keeps_both_keys_together(lettering, dest_db):
    lettering([insert(RELID, row(1, "a", "A"))])
    dest_db.execute(CHECK)
    lettering([update(RELID, [int4(11), B("bad"), U], old=key(1)),
               insert(RELID, row(2, "ok", "B"))])
    # The old key's delete is not applied without the new key's row.
    assert rows(dest_db) == [(1, "a", "A"), (2, "ok", "B")]
    assert [(k, op) for k, op, *_ in letters(dest_db)] == [({"id": 1}, "D"), ({"id": 11}, "U")]
    dest_db.execute("alter table odoo_mirror.t drop constraint no_bad")
    assert retry(dest_db).applied == 2
    # The moved row takes its unchanged TOAST value from the row its old key had.
    assert rows(dest_db) == [(2, "ok", "B"), (11, "bad", "A")]


def test_many_rows_one_bad(lettering, dest_db):
    dest_db.execute(CHECK)
    res = lettering([insert(RELID, row(i, "bad" if i == 77 else "x", None)) for i in range(200)])
    assert dest_db.scalar("select count(*) from odoo_mirror.t") == 199
    assert [k for k, *_ in letters(dest_db)] == [{"id": 77}]
    assert res.rows == 199


def test_stop_names_table_key_and_reason_and_applies_nothing(dest_db):
    applier, apply = applier_for(dest_db, "stop")
    try:
        apply([insert(RELID, row(1, "a", "A"))])
        dest_db.execute(CHECK)
        with pytest.raises(ReplicatorError) as info:
            apply([insert(RELID, row(2, "good", "B"))], [insert(RELID, row(3, "bad", "C"))])
    finally:
        applier.close()
    err = info.value
    assert err.kind is ErrorKind.DESTINATION_REJECTED and not err.retryable
    line = err.one_line()
    assert 'odoo_mirror.t key {"id": 3}' in line and 'check constraint "no_bad"' in line
    assert "23514" in line and "bad" not in line.replace('"no_bad"', "")
    assert rows(dest_db) == [(1, "a", "A")]
    assert letters(dest_db) == []
    assert dest_db.scalar("select applied_lsn::text from replicator.pipelines") == "0/6E"


def test_toast_dead_letters_are_listed_not_retried(lettering, dest_db):
    lettering([update(RELID, [int4(9), B("z"), U])])
    with psycopg.connect(dest_db.dsn, autocommit=True) as conn:
        found = dead_letters.waiting(conn, "replicator", SLOT)
    assert [(f.key, f.op) for f in found] == [('{"id": 9}', None)]
    out = retry(dest_db)
    assert (out.applied, out.not_retryable) == (0, 1)
    # Not a queue: the next change of 9 is applied (and this one has no TOAST gap).
    lettering([update(RELID, row(9, "full", "F"))])
    assert rows(dest_db) == [(9, "full", "F")]



def test_a_batch_waits_for_a_retry_before_touching_the_mirror(lettering, dest_db):
    """The retry's lock on the pipeline's row keeps batches out, and a waiting batch holds no
    mirror row: the retry can still write them (no deadlock)."""
    lettering([insert(RELID, row(1, "a", "A"))])
    with dest_db.connect() as conn, conn.transaction():
        assert state.lock_pipeline(conn, "replicator", SLOT) is not None
        done = threading.Event()
        worker = threading.Thread(target=lambda: (lettering([update(RELID, row(1, "b", "B"))]),
                                                  done.set()), daemon=True)
        worker.start()
        # Seen waiting for the lock, not merely slow to start.
        wait_for(lambda: dest_db.scalar(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and wait_event_type = 'Lock' and pid <> pg_backend_pid()") == 1, 20,
            "the batch waiting for the retry's lock")
        assert not done.is_set()
        conn.execute("set local lock_timeout = '2s'")
        conn.execute("update odoo_mirror.t set name = 'retried' where id = 1")
    worker.join(30)
    assert done.is_set() and rows(dest_db) == [(1, "b", "B")]


# -- a real sync ---------------------------------------------------------------------------


def get_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def scraped(port: int, what) -> bool:
    try:
        return bool(what(get_metrics(port)))
    except OSError:
        return False


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_poison_rows_during_a_real_sync(source_db, dest_db, tmp_path, capsys):
    source_db.execute("create table t (id int primary key, v text, n int)")
    source_db.execute("insert into t select g, 'x', g from generate_series(1, 10) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    config = write_config(tmp_path, source_db, dest_db, destination={"on_error": "dead_letter"})
    port = free_port()
    settings = MetricsSettings(enabled=True, port=port, path="/metrics", slot_poll_interval=0.2)
    failed = {"table": "odoo_mirror.t"}

    def mirror_has(sql_text: str, expected) -> bool:
        return dest_db.scalar(sql_text) == expected

    with running(source_db, dest_db, metrics=settings, on_error="dead_letter"):
        wait_for(lambda: dest_db.scalar("select count(*) from odoo_mirror.t") == 10, 60, "copy")
        wait_for(lambda: scraped(port, lambda t: metric(t, "etl_up") == 1), 30, "streaming")
        dest_db.execute("alter table odoo_mirror.t add constraint no_bad check (v <> 'bad')")
        with source_db.connect() as conn, conn.transaction():   # one source transaction
            conn.execute("insert into t values (11, 'good', 11), (12, 'bad', 12), (13, 'y', 13)")
            conn.execute("update t set v = 'z' where id = 1")
        source_db.execute("insert into t values (14, 'w', 14)")
        wait_for(lambda: mirror_has("select count(*) from odoo_mirror.t", 13), 30, "good rows")
        got = dest_db.fetchall("select mirror_table, key_data, op, row_data, sqlstate, lsn::text "
                               "from replicator.dead_letters")
        assert got == [("odoo_mirror.t", {"id": 12}, "I", {"id": 12, "v": "bad", "n": 12},
                        "23514", got[0][5])]
        assert dest_db.scalar("select v from odoo_mirror.t where id = 1") == "z"
        wait_for(lambda: scraped(port, lambda t: metric(t, "etl_records_failed_total", **failed)
                                 == 1 and metric(t, "etl_dead_letters") == 1), 30, "metrics")

        # A later change of the rejected key queues behind it; others stream on.
        source_db.execute("update t set v = 'bad2', n = 120 where id = 12")
        source_db.execute("update t set v = 'later' where id = 2")
        wait_for(lambda: mirror_has("select v from odoo_mirror.t where id = 2", "later"), 30,
                 "streaming goes on")
        assert dest_db.scalar("select count(*) from replicator.dead_letters") == 2
        assert dest_db.scalar("select count(*) from odoo_mirror.t where id = 12") == 0
        wait_for(lambda: scraped(port, lambda t: metric(t, "etl_records_failed_total", **failed)
                                 == 2 and metric(t, "etl_dead_letters") == 2), 30, "queued")

        # A value out of range for a column narrowed by hand in the mirror.
        dest_db.execute("alter table odoo_mirror.t alter column n type smallint")
        source_db.execute("insert into t values (15, 'big', 70000), (16, 'small', 16)")
        wait_for(lambda: mirror_has("select count(*) from odoo_mirror.t where id = 16", 1), 30,
                 "the small value")
        assert dest_db.scalar("select sqlstate from replicator.dead_letters "
                              "where key_data = '{\"id\": 15}'") == "22003"

        code, out, _ = cli(capsys, "dead-letters", "--config", str(config), "--json")
        listed = json.loads(out)["dead_letters"]
        assert code == 0 and [(d["key"], d["op"], d["retryable"]) for d in listed] == [
            ({"id": 12}, "I", True), ({"id": 12}, "U", True), ({"id": 15}, "I", True)]

        code, out, _ = cli(capsys, "dead-letters", "--config", str(config), "--table", "t")
        assert code == 0 and out.startswith("3 dead letters:") and "#" in out, out
        # A table the pipeline does not mirror: said, not "0 dead letters".
        code, out, err = cli(capsys, "dead-letters", "--config", str(config), "--table", "other")
        assert code == 2 and out == "", out
        assert err.startswith("error: --table: odoo_mirror.other is not a mirror table of "
                              "pipeline"), err

        # Retried while run runs: the mirror still rejects them all; each key's failing
        # letter gets the error again, exit 1.
        code, out, _ = cli(capsys, "dead-letters", "--config", str(config), "--retry")
        assert code == 1 and "0 applied, 2 still failing" in out, out

        dest_db.execute("alter table odoo_mirror.t drop constraint no_bad")
        dest_db.execute("alter table odoo_mirror.t alter column n type int")
        code, out, _ = cli(capsys, "dead-letters", "--config", str(config), "--retry")
        assert code == 0 and "3 applied, 0 still failing" in out and "0 dead letters" in out
        assert dest_db.scalar("select v from odoo_mirror.t where id = 12") == "bad2"
        source_db.execute("update t set v = 'after' where id = 12")
        wait_for(lambda: mirror_has("select v from odoo_mirror.t where id = 12", "after"), 30,
                 "key 12 streams again")
        assert_same(source_db, dest_db, "t")
        wait_for(lambda: scraped(port, lambda t: metric(t, "etl_dead_letters") == 0), 30,
                 "etl_dead_letters back to 0")
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 0


def test_stop_is_one_line_and_a_restart_after_the_fix_loses_nothing(source_db, dest_db,
                                                                    replicator):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t values (1, 'a')")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    proc = replicator()
    proc.start()
    wait_for(proc.streaming, 60, "streaming")
    dest_db.execute("alter table odoo_mirror.t add constraint no_bad check (v <> 'bad')")
    source_db.execute("insert into t values (2, 'good'), (3, 'bad'), (4, 'good')")
    source_db.execute("update t set v = 'b' where id = 1")
    code = proc.wait_exit(60)
    out, err = proc.output()
    assert code == 4, proc.logs()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, proc.logs()
    assert lines[0].startswith("error: the destination rejected a change of odoo_mirror.t "
                               'key {"id": 3}'), lines
    assert 'check constraint "no_bad"' in lines[0] and "23514" in lines[0]
    assert "on_error" in lines[0]
    # Nothing of the batch: the good rows wait in the slot with the bad one.
    assert dest_db.fetchall("select id, v from odoo_mirror.t order by id") == [(1, "a")]

    dest_db.execute("alter table odoo_mirror.t drop constraint no_bad")
    assert proc.run_until_caught_up() == 0, proc.logs()
    assert_same(source_db, dest_db, "t")
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 0


def test_logs_to_a_file_carry_events_and_no_secret_or_row_value(source_db, dest_db, replicator,
                                                               tmp_path):
    """[logging] output = a file: JSON lines with level and event; batch lines name tables, LSN
    and counts; no line holds the password (special characters), a DSN, or a row's value."""
    password = "p@ss w:rd/?#&='\"\\%{}-Logs-7c3e"
    marker = "ROWMARK-9d2f41"
    logfile = tmp_path / "logs" / "replicator.log"
    logfile.parent.mkdir()
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t select g, %s || g from generate_series(1, 20) g", [marker])
    source_db.execute(f"create publication {PUBLICATION} for table t")
    proc = replicator(logging={"level": "debug", "format": "json", "output": str(logfile)},
                      destination={"on_error": "dead_letter"})
    proc.env[PASSWORD_VAR] = password
    assert proc.run_until_caught_up() == 0, proc.logs()
    dest_db.execute("alter table odoo_mirror.t add constraint no_bad check (v not like '%bad%')")
    source_db.execute("insert into t select g, %s || g from generate_series(21, 30) g", [marker])
    source_db.execute("update t set v = %s || 'bad' where id = 3", [marker])
    source_db.execute("delete from t where id = 4")
    assert proc.run_until_caught_up() == 0, proc.logs()
    assert proc.output(1) == ("", "") and proc.output(2) == ("", "")

    lines = logfile.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(e["level"] in ("debug", "info", "warning", "error") and e["event"]
               for e in entries)
    batches = [e for e in entries if e["event"] == "batch applied"]
    assert batches and all(e["lsn"] and "odoo_mirror.t" in e["tables"] for e in batches)
    assert sum(e["inserts"] for e in batches) == 10 and sum(e["deletes"] for e in batches) == 1
    assert sum(e["dead_letters"] for e in batches) == 1
    (lettered,) = [e for e in entries if e["event"].startswith("changes the destination rejected")]
    assert (lettered["table"], lettered["rows"], lettered["sqlstate"]) == ("odoo_mirror.t", 1,
                                                                           "23514")
    text = logfile.read_text()
    assert dest_db.scalar("select count(*) from replicator.dead_letters") == 1
    # Not the password in any form, not a DSN (even masked), not a row value.
    for secret in (password, password[:12], urllib.parse.quote(password), "dbname=",
                   "password=", marker):
        assert secret not in text, secret


def test_a_retry_writes_soft_deletes_and_history_as_the_applier_does(source_db, dest_db):
    """[mappings] soft_delete: a queued delete marks the row (it stays), a re-insert of a
    marked key clears the mark; history: every retried change reaches <table>_history, at
    its transaction's LSN."""
    source_db.execute("create table s (id integer primary key, name text)")
    source_db.execute("create table h (id integer primary key, name text)")
    source_db.execute("insert into s values (1, 'a'), (2, 'b')")
    source_db.execute("insert into h values (1, 'a')")
    source_db.execute(f"create publication {PUBLICATION} for table s, h")
    keys = {"mappings": {"s": {"soft_delete": True}, "h": {"history": True}},
            "on_error": "dead_letter"}
    config = make_config(source_db, dest_db, **keys)
    catch_up(source_db, dest_db, **keys)
    source_db.execute("delete from s where id = 2")                      # marked
    catch_up(source_db, dest_db, **keys)
    for t in ("s", "h"):
        dest_db.execute(f"alter table odoo_mirror.{t} add constraint no_bad_{t} "
                        "check (name is distinct from 'bad')")
    source_db.execute("update s set name = 'bad' where id = 1")         # lettered
    source_db.execute("insert into s values (2, 'bad')")                 # the marked key back
    source_db.execute("update h set name = 'bad' where id = 1")
    catch_up(source_db, dest_db, **keys)
    # Later batches: these queue behind the letters of their keys.
    source_db.execute("delete from s where id = 1")
    source_db.execute("update h set name = 'fine' where id = 1")
    catch_up(source_db, dest_db, **keys)
    waiting = dest_db.fetchall("select mirror_table, op, key_data->>'id', lsn "
                               "from replicator.dead_letters order by mirror_table, id")
    assert [w[:3] for w in waiting] == [
        ("odoo_mirror.h", "U", "1"), ("odoo_mirror.h", "U", "1"),
        ("odoo_mirror.s", "U", "1"), ("odoo_mirror.s", "I", "2"), ("odoo_mirror.s", "D", "1")]
    history = "select _op, id, name, _lsn from odoo_mirror.h_history order by _lsn, _seq"
    before = dest_db.fetchall(history)

    for t in ("s", "h"):
        dest_db.execute(f"alter table odoo_mirror.{t} drop constraint no_bad_{t}")
    with psycopg.connect(dest_db.dsn, autocommit=True) as conn:
        out = dead_letters.retry(conn, "replicator", config.source.slot,
                                 options=dead_letters.mirror_options(config))
    assert (out.applied, out.failed) == (5, [])
    assert dest_db.fetchall("select id, name, _deleted_at is not null from odoo_mirror.s "
                            "order by id") == [(1, "bad", True), (2, "bad", False)]
    assert dest_db.fetchall(history) == before + [
        ("U", 1, "bad", waiting[0][3]), ("U", 1, "fine", waiting[1][3])]
    assert_same(source_db, dest_db, "h")
