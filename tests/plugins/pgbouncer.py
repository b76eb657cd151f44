"""pytest plugin: pgbouncer in transaction mode in front of the destination cluster, as the
Supabase pooler (Supavisor, port 6543) is, and the roles a Supabase mirror is used by.

- `pgbouncer`: one pgbouncer per session (Debian's /usr/sbin/pgbouncer), pool_mode
  transaction, on a free port, every database of the destination cluster behind it (`*`),
  md5 auth from a userlist. As root it runs as the unprivileged OS user the clusters use.
- `supabase_roles`: cluster-wide roles: OWNER (the replicator's, LOGIN, no superuser, no
  CREATEROLE), the analytics roles superset_readonly and service_role, STRANGER (a login
  with no grant at all) and OUTSIDER (granted SELECT by a test but not in the policy).
- `pool_neighbour`: another client of the test database's pool (OWNER), in a loop of short
  transactions for the test's length, each checking that the server connection it got has
  nothing a transaction before left behind (a session SET, a prepared statement, an
  advisory lock, a temporary table, an open transaction); the test fails if one had.
- `roomy_pool`: the test database's pool made big enough for what the replicator holds at
  once with streamed transactions applied while they run (README: max_streams + 3).
- `owned_dest`: the test's destination database with its mirror and state schemas owned by
  OWNER, who may also create schemas there (ipai_memory).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replicator.devtools.localpg import DEFAULT_OS_USER, LocalCluster, ensure_os_user, free_port

PGBOUNCER = "/usr/sbin/pgbouncer"
OWNER = "mirror_owner"
ANALYTICS = ("superset_readonly", "service_role")
STRANGER = "no_grant_role"
OUTSIDER = "not_in_policy_role"
ROLE_PASSWORD = "Role-Pw-3c9e"  # pgbouncer checks it; the server behind trusts 127.0.0.1
POOL_SIZE = 2


class PgBouncer:
    def __init__(self, port: int, dest: LocalCluster, workdir: Path) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.dest = dest
        self.workdir = workdir

    def pool_size(self, dbname: str, size: int) -> None:
        """Give one database a pool of ``size`` server connections (a reload, at once)."""
        ini = self.workdir / "pgbouncer.ini"
        entry = f"{dbname} = host=127.0.0.1 port={self.dest.port} pool_size={size}"
        ini.write_text(ini.read_text().replace("[databases]\n", f"[databases]\n{entry}\n", 1))
        log = self.workdir / "pgbouncer.log"
        reloads = log.read_text().count("re-reading config")
        os.kill(int((self.workdir / "pgbouncer.pid").read_text()), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log.read_text().count("re-reading config") == reloads:
            assert time.monotonic() < deadline, "pgbouncer did not reload its config"
            time.sleep(0.05)

    def dsn(self, dbname: str, user: str = OWNER) -> str:
        return make_conninfo(host=self.host, port=self.port, dbname=dbname, user=user,
                             password=ROLE_PASSWORD)

    def connect(self, dbname: str, user: str = OWNER, **kw: Any) -> psycopg.Connection:
        kw.setdefault("autocommit", True)
        kw.setdefault("prepare_threshold", None)
        return psycopg.connect(self.dsn(dbname, user), **kw)


@pytest.fixture(scope="session")
def supabase_roles(dest_cluster: LocalCluster) -> tuple[str, ...]:
    with dest_cluster.connect() as conn:
        for role in (OWNER, *ANALYTICS, STRANGER, OUTSIDER):
            if not conn.execute("select 1 from pg_roles where rolname = %s", [role]).fetchone():
                conn.execute(sql.SQL("create role {} login password {}").format(
                    sql.Identifier(role), sql.Literal(ROLE_PASSWORD)))
    return ANALYTICS


@pytest.fixture(scope="session")
def pgbouncer(dest_cluster: LocalCluster, pg_base_dir: Path,
              supabase_roles: tuple[str, ...]) -> Iterator[PgBouncer]:
    if not Path(PGBOUNCER).exists():
        message = f"pgbouncer is not installed ({PGBOUNCER})"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs it: see .ci/run)")
        pytest.skip(message + ": apt-get install pgbouncer")
    workdir = pg_base_dir / "pgbouncer"
    workdir.mkdir(mode=0o755, exist_ok=True)
    users = "\n".join(f'"{r}" "{ROLE_PASSWORD}"'
                      for r in (OWNER, *ANALYTICS, STRANGER, OUTSIDER))
    (workdir / "userlist.txt").write_text(users + "\n")
    port = free_port()
    (workdir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host=127.0.0.1 port={dest_cluster.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = md5
auth_file = {workdir}/userlist.txt
pool_mode = transaction
max_client_conn = 500
; Two server connections per database and user, handed out in turn (not the last one used
; first): the replicator's consecutive transactions land on different server connections,
; shared with a neighbour (pool_neighbour), so session state leaking from one transaction
; would show in another's.
default_pool_size = {POOL_SIZE}
server_round_robin = 1
ignore_startup_parameters = extra_float_digits
server_reset_query =
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
""")
    # -q: log to the logfile only. Its stderr must not be a pipe nobody reads: pgbouncer
    # blocks once the pipe is full (64 kB of log) and every client waits for ever.
    cmd = [PGBOUNCER, "-q", str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root.
        user = ensure_os_user(DEFAULT_OS_USER)
        for f in workdir.iterdir():
            os.chown(f, user.pw_uid, user.pw_gid)
        os.chown(workdir, user.pw_uid, user.pw_gid)
        cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = workdir / "pgbouncer.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                proc.kill()
                pytest.fail(f"pgbouncer did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
    try:
        yield PgBouncer(port, dest_cluster, workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def owned_dest(dest_db: Any, supabase_roles: tuple[str, ...]) -> Any:
    """dest_db with schemas odoo_mirror and replicator owned by OWNER (who may create more)."""
    with dest_db.connect() as conn:
        conn.execute(sql.SQL("grant create on database {} to {}").format(
            sql.Identifier(dest_db.name), sql.Identifier(OWNER)))
        for schema in ("odoo_mirror", "replicator"):
            conn.execute(sql.SQL("create schema {} authorization {}").format(
                sql.Identifier(schema), sql.Identifier(OWNER)))
    return dest_db


# What a transaction-mode pooler's server connection must look like to the next client:
# what a replicator's transaction set with SET LOCAL, set_config(..., true) or
# pg_advisory_xact_lock is gone with it.
_SESSION_STATE = """
select current_setting('statement_timeout'), current_setting('lock_timeout'),
       current_setting('idle_in_transaction_session_timeout'),
       current_setting('synchronous_commit'), current_setting('default_transaction_read_only'),
       current_setting('search_path'),
       (select count(*) from pg_prepared_statements),
       (select count(*) from pg_locks where pid = pg_backend_pid() and locktype = 'advisory'),
       (select count(*) from pg_class where relpersistence = 't'
          and relnamespace = pg_my_temp_schema()),
       pg_backend_pid()
"""


class PoolNeighbour(threading.Thread):
    def __init__(self, pgbouncer: PgBouncer, dbname: str) -> None:
        super().__init__(daemon=True, name="pool-neighbour")
        self.pgbouncer, self.dbname = pgbouncer, dbname
        self.stop_event = threading.Event()
        self.baseline: tuple | None = None
        self.leaks: list[tuple] = []
        self.backends: set[int] = set()
        self.checks = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.pgbouncer.connect(self.dbname) as conn:
                while not self.stop_event.wait(0.02):
                    with conn.transaction():
                        row = conn.execute(_SESSION_STATE).fetchone()
                    assert row is not None
                    self.backends.add(row[-1])
                    self.checks += 1
                    state = tuple(row[:-1])
                    if self.baseline is None:
                        self.baseline = state
                    elif state != self.baseline and len(self.leaks) < 5:
                        with conn.transaction():
                            prepared = conn.execute(
                                "select left(statement, 200) from pg_prepared_statements"
                            ).fetchall()
                        self.leaks.append((state, prepared))
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert self.error is None, f"the pool's neighbour failed: {self.error!r}"
        assert not self.leaks, (
            "a server connection came to the pool's neighbour with session state left by "
            f"another client's transaction: {self.leaks} (clean: {self.baseline})")
        assert self.checks > 0


@pytest.fixture
def pool_neighbour(pgbouncer: PgBouncer, dest_db: Any, supabase_roles: tuple[str, ...]
                   ) -> Iterator[PoolNeighbour]:
    """Another client of the test database's pool (OWNER), for the test's length."""
    neighbour = PoolNeighbour(pgbouncer, dest_db.name)
    neighbour.start()
    yield neighbour
    neighbour.finish()


@pytest.fixture
def roomy_pool(pgbouncer: PgBouncer, dest_db: Any) -> None:
    """Before anything connects to it: the test database's pool at max_streams (2) + 3."""
    pgbouncer.pool_size(dest_db.name, 5)
