"""TLS on both sides, against a CA made here with the openssl CLI.

One PostgreSQL 15 cluster serves both sides over TLS only (pg_hba.conf has `hostssl` lines and
nothing else), with a server certificate for DNS:localhost signed by the test CA, and
certificate authentication (`cert`) for the destination's role. `verify-full` with the right
CA and host name replicates; the wrong CA, the wrong host name, a missing or unprotected key,
or no client certificate each give one line on stderr that names the side and the key to fix,
exit 2 at once (no retrying), no traceback and no password.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from plugins.faults import scrape
from plugins.replicator import (
    PASSWORD,
    PASSWORD_VAR,
    ReplicatorProcess,
    assert_same,
    json_logging,
    replicator_env,
    wait_for,
    write_config,
)
from plugins.servers import TestDatabase, grant_source_role
from psycopg import sql

from replicator.devtools.localpg import LocalCluster, ensure_os_user, free_port

DEST_ROLE = "mirror_writer"  # authenticated by its client certificate (CN = the role)
PUBLICATION = "odoo_pub"

HBA = f"""\
local all all trust
hostssl all {DEST_ROLE} 127.0.0.1/32 cert
hostssl all all 127.0.0.1/32 trust
hostssl replication all 127.0.0.1/32 trust
"""


def _openssl(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


def _new_key_args(name: str) -> list[str]:
    # EC keys: generated in milliseconds, where RSA takes a noticeable part of a second.
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key"]


def _make_ca(cwd: Path, name: str) -> None:
    _openssl(cwd, "req", "-x509", *_new_key_args(name), "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}")


def _make_cert(cwd: Path, ca: str, name: str, cn: str, extensions: str = "") -> None:
    _openssl(cwd, "req", "-new", *_new_key_args(name), "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    ext: list[str] = []
    if extensions:
        (cwd / f"{name}.ext").write_text(extensions)
        ext = ["-extfile", f"{name}.ext"]
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext)


class TlsServer:
    """The cluster and the files a client needs: `ca`, `other_ca`, `client_crt`, `client_key`."""

    def __init__(self, cluster: LocalCluster, certs: Path) -> None:
        self.cluster = cluster
        self.certs = certs
        self.ca = certs / "ca.crt"
        self.other_ca = certs / "other_ca.crt"
        self.client_crt = certs / "client.crt"
        self.client_key = certs / "client.key"


@pytest.fixture(scope="module")
def tls_server(pg_base_dir: Path) -> Iterator[TlsServer]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing: apt-get install openssl (.ci/run does)")
    certs = pg_base_dir / f"tls-{uuid.uuid4().hex[:8]}"
    certs.mkdir(mode=0o755)
    _make_ca(certs, "ca")
    _make_ca(certs, "other_ca")  # a CA that signed nothing the server presents
    _make_cert(certs, "ca", "server", "localhost", "subjectAltName = DNS:localhost\n")
    _make_cert(certs, "ca", "client", DEST_ROLE)
    for path in certs.iterdir():
        path.chmod(0o600 if path.suffix == ".key" else 0o644)
    if os.geteuid() == 0:
        # The server runs as an unprivileged user, which must own its key (mode 0600).
        user = ensure_os_user()
        os.chown(certs / "server.key", user.pw_uid, user.pw_gid)
    cluster = LocalCluster(15, pg_base_dir, settings={
        "ssl": True,
        "ssl_cert_file": str(certs / "server.crt"),
        "ssl_key_file": str(certs / "server.key"),
        "ssl_ca_file": str(certs / "ca.crt"),  # verifies the client certificates
    })
    try:
        cluster.start()
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text(HBA)  # keeps the file's owner: the server's user
        with cluster.connect() as conn:
            conn.execute(sql.SQL("create role {} login").format(sql.Identifier(DEST_ROLE)))
            conn.execute("select pg_reload_conf()")
        # In force once a connection without TLS is refused.
        wait_for(lambda: _refused_without_tls(cluster), 10, "pg_hba.conf to reload")
        yield TlsServer(cluster, certs)
    finally:
        cluster.remove()
        shutil.rmtree(certs, ignore_errors=True)


def _refused_without_tls(cluster: LocalCluster) -> bool:
    try:
        psycopg.connect(cluster.dsn(sslmode="disable"), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        return "no encryption" in str(exc)
    return False


@pytest.fixture
def tls_dbs(tls_server: TlsServer, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """A source database with a published table and an empty destination database owned by
    DEST_ROLE, both on the TLS cluster."""
    cluster = tls_server.cluster
    stem = uuid.uuid4().hex[:8]
    src, dst = TestDatabase(cluster, f"tls_src_{stem}"), TestDatabase(cluster, f"tls_dst_{stem}")
    cluster.create_database(src.name)
    cluster.create_database(dst.name)
    try:
        dst.execute(sql.SQL("alter database {} owner to {}").format(
            sql.Identifier(dst.name), sql.Identifier(DEST_ROLE)))
        grant_source_role(src)
        src.execute("create table t (id int primary key, v text)")
        src.execute("insert into t select g, 'row ' || g from generate_series(1, 50) g")
        src.execute(f"create publication {PUBLICATION} for table t")
        yield src, dst
    finally:
        cluster.drop_database(src.name)
        cluster.drop_database(dst.name)


def tls_config(workdir: Path, server: TlsServer, src: Any, dst: Any, *,
               source: dict[str, Any] | None = None,
               destination: dict[str, Any] | None = None,
               metrics: dict[str, Any] | None = None) -> Path:
    """verify-full on both sides with paths relative to the config file (certs/ beside it),
    the destination logging in with its client certificate; `source`/`destination` override."""
    local = workdir / "certs"
    local.mkdir()
    for path in (server.ca, server.other_ca, server.client_crt, server.client_key):
        shutil.copy2(path, local / path.name)  # copy2 keeps the key's mode 0600
    tls = {"host": "localhost", "sslmode": "verify-full", "sslrootcert": "certs/ca.crt"}
    return write_config(
        workdir, src, dst, password=f"${PASSWORD_VAR}", flush_interval=0.2,
        logging=json_logging(), metrics=metrics,
        source={**tls, **(source or {})},
        destination={**tls, "user": DEST_ROLE, "sslcert": "certs/client.crt",
                     "sslkey": "certs/client.key", **(destination or {})},
    )


def _command(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replicator", *args, "--config", str(config)],
                          cwd=config.parent, env=replicator_env(), capture_output=True,
                          text=True, timeout=60)


def test_verify_full_replicates_over_tls_with_a_client_certificate(tls_server, tls_dbs, tmp_path):
    src, dst = tls_dbs
    port = free_port()
    config = tls_config(tmp_path, tls_server, src, dst,
                        metrics={"enabled": True, "port": port, "slot_poll_interval": 0.5})
    process = ReplicatorProcess(config, tmp_path)
    try:
        process.start()
        wait_for(lambda: process.streaming() or not process.alive, 60, "streaming")
        assert process.alive, process.logs()
        src.execute("insert into t values (51, 'streamed')")
        wait_for(lambda: dst.scalar("select count(*) from odoo_mirror.t") == 51, 30,
                 "the streamed row")
        assert_same(src, dst, "t")
        # The metrics' own connections (the slot monitor, on both sides) go through TLS
        # too: the server refuses any other (hostssl only).
        wait_for(lambda: 'etl_slot_wal_status{wal_status="reserved"} 1.0' in scrape(port), 30,
                 "the slot monitor to read the source's slot")
        time.sleep(1.5)     # three polls of the destination's dead letters
        assert "metrics monitor: query failed" not in process.current(), process.logs()
        # `status` and `check` beside it, with the same settings: each connects to both sides.
        st = _command(config, "status", "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        assert json.loads(st.stdout)["slot_active"] is True, st.stdout
        ck = _command(config, "check")
        assert ck.returncode == 0, ck.stdout + ck.stderr
        for out in (st.stdout + st.stderr, ck.stdout + ck.stderr):
            assert PASSWORD not in out and "Traceback" not in out, out
        backends = src.fetchall(
            "select a.datname, a.usename, a.backend_type, s.ssl, s.client_dn "
            "from pg_stat_activity a join pg_stat_ssl s using (pid) "
            "where a.application_name = 'odoo-replicator' and a.datname in (%s, %s)",
            [src.name, dst.name])
        on_source = [b for b in backends if b[0] == src.name]
        on_dest = [b for b in backends if b[0] == dst.name]
        assert {b[2] for b in on_source} >= {"walsender", "client backend"}, backends
        assert all(b[1] == "replicator_src" and b[3] for b in on_source), backends
        assert on_dest and all(b[1] == DEST_ROLE and b[3] and b[4] == f"/CN={DEST_ROLE}"
                               for b in on_dest), backends
        assert process.terminate(30) == 0, process.logs()
    finally:
        process.stop()
    out, err = process.output()
    assert PASSWORD not in out + err


def _certs(workdir: Path) -> Path:
    return workdir / "certs"


def _world_readable_key(workdir: Path) -> None:
    (_certs(workdir) / "client.key").chmod(0o644)


# (id, [source] overrides, [destination] overrides, a change to the files, expected parts of
# the one stderr line)
ERRORS = [
    ("source-wrong-ca", {"sslrootcert": "certs/other_ca.crt"}, {}, None,
     ["error: [source] ", "certificate verify failed",
      "could not be verified against [source] sslrootcert (", "other_ca.crt)",
      "point [source] sslrootcert at the CA certificate"]),
    ("destination-wrong-ca", {}, {"sslrootcert": "certs/other_ca.crt"}, None,
     ["error: [destination] ", "certificate verify failed",
      "point [destination] sslrootcert at the CA certificate"]),
    ("source-host-mismatch", {"host": "127.0.0.1"}, {}, None,
     ["error: [source] ", 'server certificate for "localhost"',
      'does not match host name "127.0.0.1"', "not issued for [source] host",
      'set [source] host to a name it is for ("localhost")']),
    ("destination-missing-key", {}, {"sslkey": "certs/missing.key"}, None,
     ["error: [destination] sslkey: ", "/certs/missing.key does not exist",
      "fix sslkey in [destination]"]),
    ("destination-world-readable-key", {}, {}, _world_readable_key,
     ["error: [destination] ", "has group or world access",
      "check [destination] sslcert and sslkey", "0600"]),
    ("destination-no-client-certificate", {}, {"sslcert": None, "sslkey": None}, None,
     ["error: [destination] ", f"authenticates {DEST_ROLE} by client certificate",
      "set [destination] sslcert and sslkey"]),
]


@pytest.mark.parametrize(("source", "destination", "change", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in ERRORS])
def test_a_tls_mistake_is_one_line_and_exit_2(tls_server, tls_dbs, tmp_path, source,
                                              destination, change, expected):
    src, dst = tls_dbs
    config = tls_config(tmp_path, tls_server, src, dst, source=source, destination=destination)
    if change is not None:
        change(tmp_path)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "replicator", "run", "--until-caught-up", "--config", str(config)],
        cwd=tmp_path, env=replicator_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60)
    # At once: a setup error is not retried (a connection error would be, for retry_timeout).
    assert time.monotonic() - started < 20
    assert proc.returncode == 2, f"{proc.stderr}\n{proc.stdout[-3000:]}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
