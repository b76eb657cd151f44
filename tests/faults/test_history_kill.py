"""[mappings] history and soft_delete: every change exactly once, the replicator killed between.

A writer keeps changing the source table (inserts, updates that leave a large value
unchanged, deletes) while the replicator process is SIGKILLed: by a failpoint right before a
batch commits, right after it commits (before the source hears of it: the batch is sent
again and must be skipped), and at random moments. A trigger on the source logs every change
into an audit table that is not published; at the end the mirror's history must be that log,
change for change, and the mirror must hold the source's rows plus the deleted ones, marked.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import psycopg
import pytest
from plugins.pgbouncer import OWNER, ROLE_PASSWORD
from plugins.replicator import PASSWORD_VAR, PUBLICATION, ReplicatorProcess
from plugins.servers import ONE_VERSION

from replicator import failpoints

# The kill windows are the replicator's own (tests/plugins/servers.py).
pytestmark = ONE_VERSION

BIG = "(select string_agg(md5(random()::text), '') from generate_series(1, 100))"
AUDIT = """
create table audit (n bigserial primary key, op "char", id integer, name text, body text);
create function log_change() returns trigger language plpgsql as $$
begin
  if tg_op = 'DELETE' then
    insert into audit (op, id) values ('D', old.id);
  else
    insert into audit (op, id, name, body) values (left(tg_op, 1), new.id, new.name, new.body);
  end if;
  return null;
end $$;
create trigger log_change after insert or update or delete on t
  for each row execute function log_change();
"""


class Writer(threading.Thread):
    """One change transaction after another (one writer: the audit's order is commit order)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="writer", daemon=True)
        self.dsn = dsn
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.txns = 0

    def run(self) -> None:
        rnd = random.Random(15)
        next_id = 1
        try:
            with psycopg.connect(self.dsn, autocommit=False) as conn:
                while not self.stop_event.is_set():
                    for _ in range(rnd.randint(1, 3)):
                        ids = [r[0] for r in conn.execute("select id from t").fetchall()]
                        kind = rnd.random()
                        if kind < 0.4 or len(ids) < 3:
                            conn.execute(f"insert into t values (%s, 'new', {BIG})", [next_id])
                            next_id += 1
                        elif kind < 0.85:   # the large body is left unchanged: 'u'
                            conn.execute("update t set name = md5(random()::text) where id = %s",
                                         [rnd.choice(ids)])
                        else:
                            conn.execute("delete from t where id = %s", [rnd.choice(ids)])
                    conn.commit()
                    self.txns += 1
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert self.error is None, f"the writer failed: {self.error!r}"


@pytest.fixture(params=["direct", "pgbouncer"])
def proc(request, replicator, source_db) -> ReplicatorProcess:
    """The replicator, writing straight to the destination or, as on Supabase, through
    pgbouncer in transaction mode as a non-superuser that owns the mirror schemas."""
    source_db.execute("create table t (id integer primary key, name text, body text)")
    source_db.execute("alter table t alter column body set storage external")
    source_db.execute(AUDIT)
    source_db.execute(f"create publication {PUBLICATION} for table t")
    if request.param == "pgbouncer":
        request.getfixturevalue("owned_dest")
        request.getfixturevalue("pool_neighbour")
        bouncer = request.getfixturevalue("pgbouncer")
        process = replicator(batch_size=200, flush_interval=0.1, destination={
            "host": bouncer.host, "port": bouncer.port, "user": OWNER})
        process.env[PASSWORD_VAR] = ROLE_PASSWORD  # the source trusts any password
    else:
        process = replicator(batch_size=200, flush_interval=0.1)
    with process.config.open("a") as f:
        f.write("\n[mappings.t]\nhistory = true\nsoft_delete = true\n")
    return process


def test_history_exactly_once_across_kills(proc, source_db, dest_db):
    # The history starts with the stream: the initial copy's rows are not changes.
    assert proc.run_until_caught_up(60) == 0, proc.logs()
    writer = Writer(source_db.dsn)
    writer.start()
    try:
        for point in (failpoints.BATCH_COMMITTED, failpoints.BATCH_BEFORE_COMMIT,
                      failpoints.BATCH_COMMITTED):
            proc.start(env={failpoints.ENV: f"{point}=kill"})
            assert proc.wait_exit(60) == -signal.SIGKILL, proc.logs()
        for pause in (0.8, 1.5, 1.1):
            proc.start()
            time.sleep(pause)
            assert proc.kill(), proc.logs()  # it was running, not exited by itself
    finally:
        writer.stop()
    assert proc.run_until_caught_up(120) == 0, proc.logs()
    assert writer.txns > 20
    changes = source_db.fetchall("select op, id, name, body from audit order by n")
    history = dest_db.fetchall("select _op, id, name, body from odoo_mirror.t_history "
                               "order by _lsn, _seq")
    assert len(history) == len(changes)
    assert history == changes
    assert any(op == "U" for op, *_ in history) and any(op == "D" for op, *_ in history)
    # soft_delete: the live rows are the source's, the deleted ones are kept and marked.
    assert dest_db.fetchall("select id, name, body from odoo_mirror.t "
                            "where _deleted_at is null order by id") == source_db.fetchall(
                                "select id, name, body from t order by id")
    last = {}
    for op, i, *_ in changes:
        last[i] = op
    deleted = sorted(i for i, op in last.items() if op == "D")
    assert [r[0] for r in dest_db.fetchall(
        "select id from odoo_mirror.t where _deleted_at is not null order by id")] == deleted
