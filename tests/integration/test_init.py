"""`replicator init` through pgbouncer in transaction mode (the Supabase pooler), as a
non-superuser role owning the mirror and state schemas: schemas, mirror tables before the
first copy, row-level security and the "Analytics access only" policy, the views and
get_pending_expenses() on seeded Odoo data, the freshness view, the memory trigger.

The replicator runs as a process (`python -m replicator init|run --config PATH`), its
destination the pgbouncer port; the source is reached directly, as in production.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from plugins.pgbouncer import OUTSIDER, OWNER, ROLE_PASSWORD, STRANGER
from plugins.replicator import (
    PASSWORD_VAR,
    PUBLICATION,
    ReplicatorProcess,
    catch_up,
    json_logging,
    make_config,
    replicator_env,
    table_columns,
    wait_for,
    write_config,
)
from plugins.servers import ONE_VERSION

from replicator import failpoints
from replicator.commands.init import init
from replicator.devtools.odoo import TABLE_NAMES, TABLES, create_table_statement
from replicator.devtools.seed import seed

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
# Every test here goes through pgbouncer; a neighbour shares the pool (pool_neighbour).
pytestmark = [ONE_VERSION, pytest.mark.usefixtures("pool_neighbour")]


MIRROR = "odoo_mirror"
# What init sets up is the destination's, and so is the memory trigger: one source version is
# enough for them; the views over copied and streamed data run on both.
DEST_ONLY = pytest.mark.parametrize(
    "source_cluster", [pytest.param(15, id="pg15", marks=pytest.mark.pg15)], indirect=True)
SIX = ("account_move", "account_move_line", "hr_expense", "hr_expense_sheet", "project_task",
       "res_partner")


def _config(tmp_path: Path, source_db: Any, dest_db: Any, pgbouncer: Any,
            name: str = "etl-config.toml", **destination: Any) -> Path:
    path = write_config(
        tmp_path, source_db, dest_db, password=f"${PASSWORD_VAR}", flush_interval=0.2,
        logging=json_logging(), name=name,
        destination={"host": pgbouncer.host, "port": pgbouncer.port, "user": OWNER,
                     **destination})
    return path


def _init(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "replicator", "init", "--config", str(config)],
        env=replicator_env(**{PASSWORD_VAR: ROLE_PASSWORD}), capture_output=True, text=True,
        timeout=120, cwd=config.parent)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _process(config: Path) -> ReplicatorProcess:
    proc = ReplicatorProcess(config, config.parent, env={PASSWORD_VAR: ROLE_PASSWORD})
    return proc


def _catch_up(rep: ReplicatorProcess) -> None:
    code = rep.run_until_caught_up(timeout=120)
    assert code == 0, rep.logs()


def _seeded(source_db: Any) -> dict[str, int]:
    return seed(source_db.dsn, scale=0.3, seed=7, publication=PUBLICATION)


def _catalog(dest_db: Any) -> dict[str, list]:
    """What init sets up, with each catalog row's xmin: a row rewritten counts as a change."""
    q = {
        "relations": "select c.xmin::text, n.nspname, c.relname, c.relkind, c.relacl::text, "
                     "c.relrowsecurity from pg_class c join pg_namespace n "
                     "on n.oid = c.relnamespace where n.nspname in "
                     "('odoo_mirror', 'replicator', 'ipai_memory') order by 2, 3",
        "policies": "select p.xmin::text, p.polrelid::regclass::text, p.polname, "
                    "p.polroles::regrole[]::text, pg_get_expr(p.polqual, p.polrelid) "
                    "from pg_policy p order by 2, 3",
        "views": "select schemaname, viewname, definition from pg_views "
                 "where schemaname in ('odoo_mirror', 'replicator') order by 1, 2",
        "functions": "select p.xmin::text, p.proname, p.prosrc, p.proacl::text from pg_proc p "
                     "where p.pronamespace = 'odoo_mirror'::regnamespace order by 2",
        "triggers": "select t.xmin::text, t.tgrelid::regclass::text, t.tgname from pg_trigger t "
                    "where not t.tgisinternal order by 2, 3",
        "schemas": "select xmin::text, nspname, nspacl::text from pg_namespace order by 2",
        "migrations": "select * from replicator.component_migrations order by 1, 2",
        "state": "select source_table, state, updated_at from replicator.tables order by 1",
        "roles": "select rolname from pg_roles order by 1",
    }
    return {k: dest_db.fetchall(v) for k, v in q.items()}


def _as(pgbouncer: Any, dest_db: Any, role: str) -> psycopg.Connection:
    return pgbouncer.connect(dest_db.name, user=role)


# -- init ------------------------------------------------------------------------------------


@DEST_ONLY
def test_init_twice_through_pgbouncer_changes_nothing_the_second_time(
        tmp_path, source_db, owned_dest, pgbouncer):
    _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer)
    out = _ok(_init(config))
    assert "change(s)" in out
    for table in SIX:
        assert f"mirror table {MIRROR}.{table} created" in out
    before = _catalog(owned_dest)

    again = _ok(_init(config))
    assert "up to date, nothing changed" in again, again
    assert _catalog(owned_dest) == before

    # Everything belongs to the non-superuser, nothing needed a superuser.
    owners = owned_dest.fetchall(
        "select distinct pg_get_userbyid(c.relowner) from pg_class c "
        "where c.relnamespace in ('odoo_mirror'::regnamespace, 'replicator'::regnamespace)")
    assert owners == [(OWNER,)]
    # The views exist before the first copy, empty; the tables wait for `run` to copy them.
    with _as(pgbouncer, owned_dest, "superset_readonly") as conn:
        for view in ("v_invoice_summary", "v_receivables_aging", "v_open_tasks",
                     "v_pending_expenses"):
            assert conn.execute(f"select count(*) from {MIRROR}.{view}").fetchone() == (0,)
    assert owned_dest.fetchall("select distinct state from replicator.tables") == [("pending",)]

    # A change of analytics_roles moves every table's policy to the new list.
    fewer = _config(tmp_path, source_db, owned_dest, pgbouncer, name="fewer.toml",
                    analytics_roles=["superset_readonly"])
    out = _ok(_init(fewer))
    assert out.count("row-level security, policy") == len(SIX), out
    assert owned_dest.fetchall(
        "select distinct polroles::regrole[]::text from pg_policy where polrelid in "
        "(select oid from pg_class where relnamespace = 'odoo_mirror'::regnamespace)") == [
        ("{superset_readonly}",)]


@DEST_ONLY
def test_missing_analytics_role_is_one_line_and_a_role_creator_makes_it(
        tmp_path, source_db, owned_dest, pgbouncer, dest_db):
    _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer,
                     analytics_roles=["superset_readonly", "reader_missing_x1"])
    proc = _init(config)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "reader_missing_x1" in lines[0] and "CREATE ROLE" in lines[0]
    assert owned_dest.scalar("select to_regclass('odoo_mirror.account_move')") is None

    # As a role that may create roles (the destination's superuser here), init creates it
    # NOLOGIN and says what the operator still has to do.
    direct = write_config(tmp_path, source_db, dest_db, name="direct.toml",
                          password=f"${PASSWORD_VAR}",
                          destination={"analytics_roles": ["superset_readonly",
                                                           "reader_missing_x1"]})
    try:
        out = _ok(_init(direct))
        assert "role reader_missing_x1 created NOLOGIN" in out
        assert dest_db.fetchone("select rolcanlogin from pg_roles "
                                "where rolname = 'reader_missing_x1'") == (False,)
    finally:
        with dest_db.connect() as conn:
            conn.execute("drop owned by reader_missing_x1")
            conn.execute("drop role if exists reader_missing_x1")


# -- access and views on seeded data ---------------------------------------------------------


def _aging_expected(source_db: Any) -> dict[Any, tuple]:
    # The server's date, not this machine's: they differ around midnight in another zone.
    today = source_db.scalar("select current_date")
    out: dict[Any, list] = defaultdict(lambda: [0, Decimal(0), Decimal(0), Decimal(0),
                                                Decimal(0), Decimal(0), Decimal(0)])
    rows = source_db.fetchall(
        "select partner_id, invoice_date_due, amount_residual_signed from account_move "
        "where move_type in ('out_invoice', 'out_refund') and state = 'posted'")
    for partner, due, residual in rows:
        if not residual:
            continue
        acc = out[partner]
        acc[0] += 1
        days = (today - due).days if due is not None else 0
        bucket = 1 if days <= 0 else 2 if days <= 30 else 3 if days <= 60 else \
            4 if days <= 90 else 5
        acc[bucket] += residual
        acc[6] += residual
    return {k: tuple(v) for k, v in out.items()}


def test_rls_policy_views_and_freshness_on_seeded_data(tmp_path, source_db, owned_dest,
                                                        pgbouncer):
    counts = _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer)
    _ok(_init(config))
    rep = _process(config)
    _catch_up(rep)

    # Row-level security: no grant, no rows; a grant without the policy, no rows either;
    # the analytics roles see everything and write nothing.
    with _as(pgbouncer, owned_dest, STRANGER) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select count(*) from {MIRROR}.account_move")
    with _as(pgbouncer, owned_dest, OWNER) as conn:
        conn.execute(f"grant usage on schema {MIRROR} to {OUTSIDER}")
        conn.execute(f"grant select on {MIRROR}.account_move to {OUTSIDER}")
    with _as(pgbouncer, owned_dest, OUTSIDER) as conn:
        assert conn.execute(f"select count(*) from {MIRROR}.account_move").fetchone() == (0,)
    for role in ("superset_readonly", "service_role"):
        with _as(pgbouncer, owned_dest, role) as conn:
            for table in SIX:
                n = conn.execute(f"select count(*) from {MIRROR}.{table}").fetchone()[0]
                assert n == counts[table] > 0, (role, table)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"delete from {MIRROR}.res_partner")

    with _as(pgbouncer, owned_dest, "superset_readonly") as conn:
        # v_invoice_summary, as the deployment doc defines it.
        expected = source_db.fetchall(
            "select m.id, m.name, m.invoice_date, m.amount_total, p.name from account_move m "
            "join res_partner p on p.id = m.partner_id "
            "where m.move_type in ('out_invoice', 'out_refund') order by 1")
        got = conn.execute(f"select id, invoice_number, invoice_date, amount_total, "
                           f"partner_name from {MIRROR}.v_invoice_summary order by 1").fetchall()
        assert got == expected and len(got) > 10

        aging = {r[0]: tuple(r[1:]) for r in conn.execute(
            f"select partner_id, open_moves, not_due, days_1_30, days_31_60, days_61_90, "
            f"days_over_90, total_due from {MIRROR}.v_receivables_aging").fetchall()}
        assert aging == _aging_expected(source_db) and aging

        open_tasks = [r[0] for r in conn.execute(
            f"select id from {MIRROR}.v_open_tasks order by id").fetchall()]
        assert open_tasks == [r[0] for r in source_db.fetchall(
            "select id from project_task where active and state not in ('1_done', '1_canceled') "
            "order by id")] and open_tasks

        pending = conn.execute(
            f"select id, state, total_amount, expense_count from {MIRROR}.v_pending_expenses "
            f"order by id").fetchall()
        assert pending == source_db.fetchall(
            "select s.id, s.state, s.total_amount, (select count(*) from hr_expense e "
            "where e.sheet_id = s.id) from hr_expense_sheet s "
            "where s.state in ('submit', 'approve') order by s.id") and pending
    # n8n's call, as service_role (PostgREST's role for the service key).
    with _as(pgbouncer, owned_dest, "service_role") as conn:
        rows = conn.execute(f"select id from {MIRROR}.get_pending_expenses()").fetchall()
        assert sorted(r[0] for r in rows) == [r[0] for r in pending]
    with _as(pgbouncer, owned_dest, STRANGER) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select * from {MIRROR}.get_pending_expenses()")

    # Freshness: a streamed change to res_partner gives it a commit time and a lag.
    source_db.execute("update res_partner set name = name || ' (moved)' where id = 1")
    _catch_up(rep)
    with _as(pgbouncer, owned_dest, "superset_readonly") as conn:
        fresh = {r[0]: r[1:] for r in conn.execute(
            "select mirror_table, state, last_commit_at, data_as_of, lag_seconds, "
            "applied_at from replicator.freshness").fetchall()}
    assert set(fresh) == {f"{MIRROR}.{t}" for t in SIX}
    state, last, as_of, lag, applied = fresh[f"{MIRROR}.res_partner"]
    committed = source_db.scalar("select now()")
    assert state == "streaming" and last is not None and as_of == last
    assert abs((committed - last).total_seconds()) < 30 and 0 <= lag < 60
    assert applied >= last
    # Not changed since the copy: no commit time of its own, but as current as the mirror.
    _s, last_move, as_of_move, _lag, _a = fresh[f"{MIRROR}.account_move"]
    assert last_move is None and as_of_move == last


@DEST_ONLY
def test_table_added_to_the_publication_later_gets_the_policy(tmp_path, source_db,
                                                              owned_dest, pgbouncer):
    _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer)
    _ok(_init(config))
    rep = _process(config)
    _catch_up(rep)
    source_db.execute("create table late_table (id int primary key, note text)")
    source_db.execute("insert into late_table values (1, 'a'), (2, 'b')")
    source_db.execute(f"alter publication {PUBLICATION} add table late_table")
    _catch_up(rep)

    row = owned_dest.fetchone(
        "select c.relrowsecurity, p.polroles::regrole[]::text, pg_get_expr(p.polqual, p.polrelid)"
        " from pg_class c join pg_policy p on p.polrelid = c.oid "
        "where c.oid = 'odoo_mirror.late_table'::regclass and p.polname = 'Analytics access only'")
    assert row == (True, "{superset_readonly,service_role}", "true")
    with _as(pgbouncer, owned_dest, "superset_readonly") as conn:
        assert conn.execute(f"select count(*) from {MIRROR}.late_table").fetchone() == (2,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"insert into {MIRROR}.late_table values (3, 'c')")
    with _as(pgbouncer, owned_dest, OWNER) as conn:
        conn.execute(f"grant usage on schema {MIRROR} to {OUTSIDER}")
        conn.execute(f"grant select on {MIRROR}.late_table to {OUTSIDER}")
    with _as(pgbouncer, owned_dest, OUTSIDER) as conn:
        assert conn.execute(f"select count(*) from {MIRROR}.late_table").fetchone() == (0,)
    # run secured it as init would have: init finds nothing to do.
    with _as(pgbouncer, owned_dest, OWNER) as conn:
        conn.execute(f"revoke select on {MIRROR}.late_table from {OUTSIDER}")
        conn.execute(f"revoke usage on schema {MIRROR} from {OUTSIDER}")
    assert "up to date, nothing changed" in _ok(_init(config))


# -- the memory trigger ----------------------------------------------------------------------


def _chunks(dest_db: Any) -> list[tuple]:
    return dest_db.fetchall("select content from ipai_memory.chunks order by id")


class _Invoices(threading.Thread):
    """Inserts invoices MEM/nnnnn one transaction each, and updates older ones, until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop_event = threading.Event()
        self.names: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    name = f"MEM/{len(self.names):05d}"
                    with conn.transaction():
                        conn.execute(
                            "insert into account_move (name, move_type, state, auto_post, "
                            "partner_id, amount_total, date, journal_id, currency_id, company_id)"
                            " values (%s, 'out_invoice', 'draft', 'no', 1, 100, current_date, "
                            "1, 1, 1)", [name])
                    self.names.append(name)
                    # Updates of an invoice (the stream's MERGE updates it) make no memory.
                    conn.execute("update account_move set amount_total = amount_total + 1 "
                                 "where name = %s or id = 1", [name])
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert self.error is None, self.error


@DEST_ONLY
def test_memory_trigger_fires_once_per_streamed_insert_across_kills(tmp_path, source_db,
                                                                    owned_dest, pgbouncer):
    counts = _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer, memory_triggers=True)
    out = _ok(_init(config))
    assert "memory: migration 001" in out
    rep = _process(config)
    _catch_up(rep)
    # Ten years of invoices are not news: the initial copy makes no memory.
    assert owned_dest.scalar("select count(*) from odoo_mirror.account_move") == \
        counts["account_move"]
    assert _chunks(owned_dest) == []

    invoices = _Invoices(source_db.dsn)
    invoices.start()
    try:
        # Killed with a batch of new invoices applied but not committed, then committed
        # but not confirmed to the source: replayed once, skipped once.
        for point in (failpoints.BATCH_BEFORE_COMMIT, failpoints.BATCH_COMMITTED):
            rep.start(env={failpoints.ENV: f"{point}=kill"})
            assert rep.wait_exit(60) == -9, rep.logs()
            assert '"failpoint":"' + point in rep.current(), rep.logs()
        for _kill in range(2):
            rep.start()
            wait_for(rep.streaming, 60, "streaming")
            have = len(invoices.names)
            wait_for(lambda have=have: len(invoices.names) > have + 15, 30, "invoices inserted")
            assert rep.kill(), rep.logs()
    finally:
        invoices.stop()
    _catch_up(rep)
    chunks = [c[0] for c in _chunks(owned_dest)]
    assert sorted(c.split(" ")[2] for c in chunks) == invoices.names, (
        f"{len(chunks)} memories for {len(invoices.names)} streamed invoices\n{rep.logs()}")
    # The row as it reached the mirror: inserted, or inserted and updated in one batch.
    assert all(re.fullmatch(r"New invoice MEM/\d{5} for 1: 10[01]", c) for c in chunks), chunks
    assert owned_dest.scalar("select count(distinct session_id) from ipai_memory.chunks "
                             "where session_id is not null") == 1

    # A resync while streaming is a copy too: account_move again, and no memory from it.
    rep.start()
    wait_for(rep.streaming, 60, "streaming")
    subprocess.run([sys.executable, "-m", "replicator", "resync", "--config", str(config),
                    "--table", "account_move"], check=True, capture_output=True,
                   env=replicator_env(**{PASSWORD_VAR: ROLE_PASSWORD}))

    def account_move_state() -> str:
        return owned_dest.scalar("select state from replicator.tables "
                                 "where source_table = 'public.account_move'")
    wait_for(lambda: account_move_state() != "streaming", 30, "the resync to start")
    wait_for(lambda: account_move_state() == "streaming", 60, "the resync to end")
    assert len(_chunks(owned_dest)) == len(chunks)
    source_db.execute("insert into account_move (name, move_type, state, auto_post, "
                      "partner_id, amount_total, date, journal_id, currency_id, company_id) "
                      "values ('MEM/after', 'out_invoice', 'draft', 'no', 1, 7, current_date, "
                      "1, 1, 1)")
    wait_for(lambda: len(_chunks(owned_dest)) == len(chunks) + 1, 30, "the next memory")
    assert _chunks(owned_dest)[-1][0].startswith("New invoice MEM/after ")
    assert rep.terminate(30) == 0, rep.logs()


@DEST_ONLY
def test_trigger_created_while_the_initial_copy_runs_skips_copied_rows(
        tmp_path, source_db, owned_dest, pgbouncer):
    counts = _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer, memory_triggers=True)
    rep = _process(config)
    # `run` alone creates the mirror tables (no trigger yet) and stops before the rows go
    # in; init then adds the trigger, and the copy's rows must still make no memory.
    rep.start("--until-caught-up",
              env={failpoints.ENV: f"{failpoints.COPY_PLANNED}=sleep:4"})
    wait_for(lambda: '"failpoint"' in rep.current(), 60, "the copy to be planned")
    out = _ok(_init(config))
    assert "memory: migration 001" in out
    assert rep.wait_exit(120) == 0, rep.logs()
    assert owned_dest.scalar("select count(*) from odoo_mirror.account_move") == \
        counts["account_move"]
    assert _chunks(owned_dest) == []


@DEST_ONLY
def test_an_existing_ipai_memory_without_the_trigger_columns_is_refused(
        tmp_path, source_db, owned_dest, pgbouncer):
    with source_db.connect() as conn:
        for table in TABLES:
            conn.execute(create_table_statement(table))
        conn.execute(f"create publication {PUBLICATION} for table {', '.join(TABLE_NAMES)}")
    with owned_dest.connect() as conn:
        conn.execute(f"create schema ipai_memory authorization {OWNER}")
        conn.execute("create table ipai_memory.chunks (id int, body text)")
        conn.execute(f"alter table ipai_memory.chunks owner to {OWNER}")
    config = _config(tmp_path, source_db, owned_dest, pgbouncer, memory_triggers=True)
    proc = _init(config)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "ipai_memory lacks the column(s)" in line and "chunks.session_id" in line
    assert "memory_triggers = false" in line
    assert owned_dest.scalar("select count(*) from pg_trigger where tgname = "
                             "'invoice_to_memory'") == 0


@DEST_ONLY
def test_init_while_run_streams(tmp_path, source_db, owned_dest, pgbouncer):
    _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer, memory_triggers=True)
    rep = _process(config)
    rep.start()
    invoices = _Invoices(source_db.dsn)
    invoices.start()
    try:
        wait_for(rep.streaming, 60, "streaming")
        out = _ok(_init(config))
        assert "mirror: migration 001" in out and "memory: migration 001" in out
        # The tables `run` created were secured as it created them: init had none to do
        # (only ipai_memory's, which init's migration has just created).
        assert not [line for line in out.splitlines()
                    if "row-level security" in line and "ipai_memory." not in line], out
        have = len(invoices.names)
        wait_for(lambda: len(invoices.names) > have + 10, 30, "invoices inserted")
    finally:
        invoices.stop()
    assert rep.alive, rep.logs()
    assert rep.terminate(30) == 0, rep.logs()
    _catch_up(rep)
    src = source_db.fetchall("select id, name, amount_total from account_move order by id")
    dst = owned_dest.fetchall(f"select id, name, amount_total from {MIRROR}.account_move "
                              "order by id")
    assert src == dst
    assert len(_chunks(owned_dest)) > 0


@DEST_ONLY
def test_init_creates_the_mirror_as_its_mappings_say(source_db, dest_db):
    """No column that [mappings] excludes (the first copy would drop it again), and the
    _deleted_at of a soft-deleted table: the mirror table the first copy would create."""
    counts = _seeded(source_db)
    mappings: dict[str, Any] = {name: name for name in SIX}   # the views need all six
    mappings["res_partner"] = {"exclude": ["email", "phone"], "soft_delete": True}
    config = make_config(source_db, dest_db, mappings=mappings)
    init(config, say=lambda _line: None)
    with dest_db.connect() as conn:
        columns = table_columns(conn, MIRROR, "res_partner")
        with source_db.connect() as src:
            source = table_columns(src, "public", "res_partner")
    assert "email" in source and "phone" in source
    assert columns == [c for c in source if c not in ("email", "phone")] + ["_deleted_at"]
    catch_up(source_db, dest_db, mappings=mappings)
    with dest_db.connect() as conn:
        assert table_columns(conn, MIRROR, "res_partner") == columns
    assert dest_db.scalar(f"select count(*) from {MIRROR}.res_partner") \
        == counts["res_partner"]


# -- default privileges: nobody but the replicator writes, nobody's trigger runs -----------


def _default_privileges(dest_db: Any) -> None:
    """What Supabase's guide for exposing a custom schema sets up: usage, and every privilege
    on every table the owner creates there, for anon (STRANGER here) and service_role."""
    with dest_db.connect() as conn:
        conn.execute(f"grant usage on schema {MIRROR} to {STRANGER}, service_role")
        conn.execute(f"alter default privileges for role {OWNER} in schema {MIRROR} "
                     f"grant all on tables to {STRANGER}, service_role")
        # A trigger function anyone may execute: what a role with TRIGGER would attach.
        conn.execute("create function public.spy() returns trigger language plpgsql "
                     "as $$ begin return new; end $$")


def _others(dest_db: Any, table: str, schema: str = MIRROR) -> list[tuple]:
    """Every privilege on a mirror table, its columns included, of anyone but its owner."""
    return dest_db.fetchall(
        "select coalesce(g.rolname, 'public'), a.privilege_type, a.is_grantable from pg_class c "
        "cross join lateral aclexplode(c.relacl) a left join pg_roles g on g.oid = a.grantee "
        "where c.oid = %(t)s::regclass and a.grantee <> c.relowner "
        "union all select coalesce(g.rolname, 'public'), a.privilege_type || ' (column)', "
        "a.is_grantable from pg_attribute t join pg_class c on c.oid = t.attrelid "
        "cross join lateral aclexplode(t.attacl) a left join pg_roles g on g.oid = a.grantee "
        "where c.oid = %(t)s::regclass and a.grantee <> c.relowner order by 1, 2",
        {"t": f"{schema}.{table}"})


READERS_SELECT = [("service_role", "SELECT", False), ("superset_readonly", "SELECT", False)]


def _cannot_trigger(pgbouncer: Any, dest_db: Any, role: str, table: str) -> None:
    with _as(pgbouncer, dest_db, role) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"create trigger spy before insert on {MIRROR}.{table} "
                         "for each row execute function public.spy()")


@DEST_ONLY
def test_history_table_run_creates_is_secured_like_the_mirror_table(
        tmp_path, source_db, owned_dest, pgbouncer):
    source_db.execute("create table t (id int primary key, name text)")
    source_db.execute("insert into t select i, 'n' || i from generate_series(1, 5) i")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    _default_privileges(owned_dest)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer)
    with config.open("a") as f:
        f.write("\n[mappings.t]\nhistory = true\n")
    rep = _process(config)
    _catch_up(rep)   # `run` alone, no init: it creates t and t_history
    source_db.execute("update t set name = 'changed' where id <= 2")
    _catch_up(rep)

    for table in ("t", "t_history"):
        row = owned_dest.fetchone(
            "select c.relrowsecurity, p.polroles::regrole[]::text from pg_class c "
            "left join pg_policy p on p.polrelid = c.oid and p.polname = 'Analytics access only' "
            "where c.oid = %s::regclass", [f"{MIRROR}.{table}"])
        assert row == (True, "{superset_readonly,service_role}"), table
        assert _others(owned_dest, table) == READERS_SELECT, table
        _cannot_trigger(pgbouncer, owned_dest, STRANGER, table)
        _cannot_trigger(pgbouncer, owned_dest, "service_role", table)
    with _as(pgbouncer, owned_dest, STRANGER) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select count(*) from {MIRROR}.t_history")
    with _as(pgbouncer, owned_dest, STRANGER) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"insert into {MIRROR}.t_history (_op, _lsn, _seq, id, name) "
                         "values ('I', '0/1', 1, 99, 'forged')")
    with _as(pgbouncer, owned_dest, "service_role") as conn:
        assert conn.execute(f"select count(*) from {MIRROR}.t_history").fetchone() == (2,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"delete from {MIRROR}.t_history")


def _check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "replicator", "check", "--config", str(config)],
        env=replicator_env(**{PASSWORD_VAR: ROLE_PASSWORD}), capture_output=True, text=True,
        timeout=120, cwd=config.parent)


@DEST_ONLY
def test_init_revokes_every_other_privilege_and_check_reports_a_user_trigger(
        tmp_path, source_db, owned_dest, pgbouncer, dest_db):
    _seeded(source_db)
    _default_privileges(owned_dest)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer, memory_triggers=True)
    out = _ok(_init(config))
    assert "warning" not in out, out
    relations = [r[0] for r in owned_dest.fetchall(
        "select relname from pg_class where relnamespace = %s::regnamespace "
        "and relkind in ('r', 'v') order by 1", [MIRROR])]
    assert set(SIX) < set(relations) and "v_open_tasks" in relations
    for relation in relations:
        assert _others(owned_dest, relation) == READERS_SELECT, relation
    _cannot_trigger(pgbouncer, owned_dest, STRANGER, "res_partner")

    # Tables secured by an earlier version, or granted to by hand: a second init takes
    # back everything but the readers' SELECT.
    with _as(pgbouncer, owned_dest, OWNER) as conn:
        conn.execute(f"grant all on {MIRROR}.res_partner to {STRANGER}")
        conn.execute(f"grant insert, trigger, references on {MIRROR}.account_move "
                     "to service_role")
        conn.execute(f"grant select on {MIRROR}.hr_expense to {OUTSIDER} with grant option")
        conn.execute(f"grant update (name) on {MIRROR}.project_task to {OUTSIDER}")
        conn.execute(f"grant usage on schema {MIRROR} to {OUTSIDER}")
    with _as(pgbouncer, owned_dest, OUTSIDER) as conn:
        conn.execute(f"grant select on {MIRROR}.hr_expense to {STRANGER}")
    out = _ok(_init(config))
    revoked = [line for line in out.splitlines() if "revoked" in line]
    # One line a grantee: STRANGER's SELECT on hr_expense came from OUTSIDER's grant option.
    assert len(revoked) == 5, out
    assert any(f"{MIRROR}.res_partner" in line and STRANGER in line and "TRIGGER" in line
               for line in revoked), out
    assert any(f"{MIRROR}.project_task" in line and "UPDATE on a column" in line
               for line in revoked), out
    for relation in relations:
        assert _others(owned_dest, relation) == READERS_SELECT, relation
    _cannot_trigger(pgbouncer, owned_dest, STRANGER, "res_partner")
    _cannot_trigger(pgbouncer, owned_dest, "service_role", "account_move")
    assert "up to date, nothing changed" in _ok(_init(config))

    # A trigger only a superuser could put there now: check and init say so, one line,
    # and say nothing of the memory trigger init made.
    dest_db.execute(f"create trigger spy after insert on {MIRROR}.res_partner "
                    "for each row execute function public.spy()")
    proc = _check(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, proc.stdout
    assert f"{MIRROR}.res_partner" in warnings[0] and "trigger spy" in warnings[0]
    assert "public.spy()" in warnings[0] and "drop trigger" in warnings[0]
    out = _ok(_init(config))
    assert [line for line in out.splitlines() if "warning" in line] == [
        "  warning: " + warnings[0].split("WARNING: ", 1)[1]]


@DEST_ONLY
def test_ipai_memory_is_secured_like_the_mirror_and_functions_have_a_fixed_search_path(
        tmp_path, source_db, owned_dest, pgbouncer):
    _seeded(source_db)
    config = _config(tmp_path, source_db, owned_dest, pgbouncer, memory_triggers=True)
    _ok(_init(config))
    with _as(pgbouncer, owned_dest, OWNER) as conn:
        conn.execute(f"grant all on ipai_memory.chunks to {STRANGER}")
        conn.execute("grant all on ipai_memory.sessions to public")
    out = _ok(_init(config))
    assert "ipai_memory.chunks: revoked" in out and "ipai_memory.sessions: revoked" in out, out
    for table in ("sessions", "chunks"):
        assert owned_dest.scalar("select relrowsecurity from pg_class where oid = "
                                 "%s::regclass", [f"ipai_memory.{table}"]), table
        assert owned_dest.scalar("select count(*) from pg_policy where polrelid = "
                                 "%s::regclass", [f"ipai_memory.{table}"]) == 1, table
        assert _others(owned_dest, table, "ipai_memory") == READERS_SELECT, table
    for function in ("on_invoice_insert", "get_pending_expenses"):
        assert owned_dest.scalar(
            "select proconfig from pg_proc where proname = %s and pronamespace = "
            "%s::regnamespace", [function, MIRROR]) == ['search_path=""'], function
    assert "up to date, nothing changed" in _ok(_init(config))
