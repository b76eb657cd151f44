"""pytest plugin: pgbouncer in transaction mode in front of the destination cluster, as the
Supabase pooler (Supavisor, port 6543) is, and the roles a Supabase mirror is used by.

- `pgbouncer`: one pgbouncer per session (Debian's /usr/sbin/pgbouncer), pool_mode
  transaction, on a free port, every database of the destination cluster behind it (`*`),
  md5 auth from a userlist. As root it runs as the unprivileged OS user the clusters use.
- `supabase_roles`: cluster-wide roles: OWNER (the replicator's, LOGIN, no superuser, no
  CREATEROLE), the analytics roles superset_readonly and service_role, STRANGER (a login
  with no grant at all) and OUTSIDER (granted SELECT by a test but not in the policy).
- `owned_dest`: the test's destination database with its mirror and state schemas owned by
  OWNER, who may also create schemas there (ipai_memory).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
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


class PgBouncer:
    def __init__(self, port: int, dest: LocalCluster) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.dest = dest

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
default_pool_size = 40
ignore_startup_parameters = extra_float_digits
server_reset_query =
logfile = {workdir}/pgbouncer.log
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
        yield PgBouncer(port, dest_cluster)
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
