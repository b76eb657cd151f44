"""pytest plugin: local PostgreSQL clusters (one per version per session) and
a fresh database per test.

Clusters start lazily (a unit-test-only run starts none) and each takes about a
second. Sources are PostgreSQL 15 and 18 with wal_level=logical; the destination
is a separate PostgreSQL 15 cluster, so that source and destination never share
a server by accident.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from replicator.devtools.localpg import LocalCluster, LocalClusterError, available_versions

SOURCE_VERSIONS = (15, 18)
DEST_VERSION = 15
# A test (or a module: pytestmark) of what the source's version changes nothing in: the
# replicator's own crash windows, signals and lease, its CLI and config errors, the
# destination's side (grants, mappings, dead letters, status). It runs against ONE_SOURCE
# only, not every version: the decoder, the stream, slots, catalogs and the copy are where
# versions differ, and those tests run on each.
ONE_VERSION = pytest.mark.one_source_version
ONE_SOURCE = 15


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        version = callspec.params.get("source_cluster") if callspec is not None else None
        if version is not None and version != ONE_SOURCE \
                and item.get_closest_marker("one_source_version") is not None:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
# The replicator's source role in the tests, as the README's "Source role: least privilege"
# makes it: LOGIN REPLICATION, and SELECT on the tables, nothing else.
SOURCE_ROLE = "replicator_src"


class TestDatabase:
    """A database created for one test; dropped (with its slots) afterwards."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.dsn = cluster.dsn(name)

    def __repr__(self) -> str:
        return f"<TestDatabase {self.name} on {self.cluster!r}>"

    def connect(self, **kw: Any) -> psycopg.Connection:
        """An autocommit connection to this database; the caller closes it."""
        kw.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kw)

    def execute(self, query: Any, params: Any = None) -> int:
        """Run one statement on a short-lived autocommit connection; returns rowcount."""
        with self.connect() as conn:
            return conn.execute(query, params).rowcount

    def fetchall(self, query: Any, params: Any = None) -> list[tuple]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()

    def fetchone(self, query: Any, params: Any = None) -> tuple | None:
        with self.connect() as conn:
            return conn.execute(query, params).fetchone()

    def scalar(self, query: Any, params: Any = None) -> Any:
        """First column of the first row (None when there is no row)."""
        row = self.fetchone(query, params)
        return None if row is None else row[0]


def _database_name(prefix: str, node_name: str) -> str:
    # Readable in pg_stat_activity and the server log, unique across reruns,
    # within the 63-byte identifier limit.
    stem = re.sub(r"[^a-z0-9]+", "_", node_name.lower()).strip("_")[:40]
    return f"{prefix}_{stem}_{uuid.uuid4().hex[:8]}"


# Where the clusters' files go: memory when the machine has room there. Each test creates
# two databases and tables by the dozen, and on this project's VMs every file created on disk
# costs the kernel close to a millisecond: a CREATE DATABASE takes 0.25 s on /tmp, 0.025 s on
# tmpfs, and the suite spends minutes on that alone. The servers run without fsync either way.
SHM = Path("/dev/shm")
SHM_ROOM = 8 << 30     # the suite's clusters peak at a few GiB (WAL kept for slots included)


def _cluster_root() -> Path:
    try:
        st = os.statvfs(SHM)
    except OSError:
        return Path("/tmp")
    return SHM if os.access(SHM, os.W_OK) and st.f_bavail * st.f_frsize >= SHM_ROOM else Path("/tmp")


def scratch(name: str) -> Path:
    """A path for a test's own servers (a bench smoke, the demo) where the suite's clusters
    go: memory when there is room. Not pytest's tmp_path: as root the servers run as a user
    who cannot enter it. The caller creates and removes it."""
    return _cluster_root() / f"odoo-replicator-{name}-{os.getpid()}"


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """A mode-755 directory under /dev/shm (or /tmp) holding this session's clusters.

    Not pytest's tmp_path: as root the servers run as an unprivileged user that
    cannot traverse pytest's mode-700 temporary directories.
    """
    base = _cluster_root() / f"odoo-replicator-tests-{os.getpid()}"
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def start_cluster(version: int, base_dir: Path,
                  settings: dict[str, Any] | None = None) -> Iterator[LocalCluster]:
    """A running cluster of that version, removed after; a version this machine lacks skips
    the test, or fails it on CI (which installs every one)."""
    if version not in available_versions():
        message = f"PostgreSQL {version} is not available on this machine"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs it: see .ci/run)")
        pytest.skip(message)
    cluster = LocalCluster(version, base_dir, settings=settings)
    try:
        cluster.start()
    except LocalClusterError as exc:
        cluster.remove()
        pytest.fail(f"cannot start PostgreSQL {version}: {exc}")
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def pg15(pg_base_dir: Path) -> Iterator[LocalCluster]:
    """A PostgreSQL 15 source cluster (wal_level=logical)."""
    yield from start_cluster(15, pg_base_dir)


@pytest.fixture(scope="session")
def pg18(pg_base_dir: Path) -> Iterator[LocalCluster]:
    """A PostgreSQL 18 source cluster (wal_level=logical)."""
    yield from start_cluster(18, pg_base_dir)


@pytest.fixture(
    scope="session",
    params=[pytest.param(v, id=f"pg{v}", marks=getattr(pytest.mark, f"pg{v}")) for v in SOURCE_VERSIONS],
)
def source_cluster(request: pytest.FixtureRequest) -> LocalCluster:
    """Each source version in turn: tests using it run once per version."""
    return request.getfixturevalue(f"pg{request.param}")


@pytest.fixture(scope="session")
def dest_cluster(pg_base_dir: Path) -> Iterator[LocalCluster]:
    """The destination cluster (PostgreSQL 15), separate from every source cluster."""
    yield from start_cluster(DEST_VERSION, pg_base_dir)


def _fresh_database(cluster: LocalCluster, prefix: str, node_name: str) -> Iterator[TestDatabase]:
    db = TestDatabase(cluster, _database_name(prefix, node_name))
    cluster.create_database(db.name)
    try:
        yield db
    finally:
        # A test that stopped the server, or left a slot or a subscription behind,
        # must not break the next one: restart it, drop those, then drop WITH (FORCE).
        if not cluster.is_running:
            cluster.start()
        cluster.drop_database(db.name)


def grant_source_role(db: TestDatabase, role: str = SOURCE_ROLE) -> None:
    """Make `role` (LOGIN REPLICATION, cluster-wide) able to read every table `postgres`
    creates in `db` from now on, and nothing more."""
    ident = sql.Identifier(role)
    with db.cluster.connect() as conn:
        if conn.execute("select 1 from pg_roles where rolname = %s", [role]).fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                conn.execute(sql.SQL("create role {} login replication").format(ident))
    with db.connect() as conn:
        conn.execute(sql.SQL("grant select on all tables in schema public to {}").format(ident))
        conn.execute(sql.SQL("alter default privileges grant select on tables to {}").format(ident))
        conn.execute(sql.SQL("alter default privileges grant usage on schemas to {}").format(ident))


@pytest.fixture
def source_db(source_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[TestDatabase]:
    """A fresh database on the source cluster (parametrized over pg15/pg18), readable by
    SOURCE_ROLE, which the configs of tests/plugins/replicator.py connect as."""
    for db in _fresh_database(source_cluster, "src", request.node.name):
        grant_source_role(db)
        yield db


@pytest.fixture
def dest_db(dest_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[TestDatabase]:
    """A fresh database on the destination cluster."""
    yield from _fresh_database(dest_cluster, "dst", request.node.name)
