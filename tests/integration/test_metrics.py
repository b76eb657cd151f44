"""Prometheus metrics and /health while the replicator runs."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import orjson
from plugins.replicator import PUBLICATION, running
from plugins.servers import ONE_VERSION

from replicator.config.settings import MetricsSettings
from replicator.devtools.localpg import free_port

# What this module tests does not depend on the source's version (tests/plugins/servers.py).
pytestmark = ONE_VERSION


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_and_health(source_db, dest_db):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    port = free_port()
    settings = MetricsSettings(enabled=True, port=port, path="/metrics")
    with running(source_db, dest_db, metrics=settings):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                code, body = get(port, "/health")
                if code == 200 and orjson.loads(body)["status"] == "streaming":
                    break
            except OSError:
                pass
            time.sleep(0.2)
        source_db.execute("insert into t select g, 'x' from generate_series(1, 50) g")
        source_db.execute("update t set v = 'y' where id <= 10")
        source_db.execute("delete from t where id <= 5")
        text = ""
        while time.monotonic() < deadline:
            text = get(port, "/metrics")[1].decode()
            if metric(text, "etl_records_processed_total", op="delete", table="odoo_mirror.t") == 5:
                break
            time.sleep(0.2)
        assert metric(text, "etl_records_processed_total", op="insert", table="odoo_mirror.t") == 50
        assert metric(text, "etl_records_processed_total", op="update", table="odoo_mirror.t") == 10
        assert metric(text, "etl_records_processed_total", op="delete", table="odoo_mirror.t") == 5
        assert metric(text, "etl_batch_duration_seconds_count") >= 1
        assert metric(text, "etl_lag_seconds") is not None
        assert metric(text, "etl_applied_lsn") > 0
        assert metric(text, "etl_table_sync_state", state="streaming", table="odoo_mirror.t") == 1
        # One transaction for the copy's rows aside, three streamed: each counted once.
        assert metric(text, "etl_transactions_total") >= 3
        assert metric(text, "etl_last_apply_timestamp_seconds") > time.time() - 60
        assert metric(text, "etl_copy_rows_total", table="odoo_mirror.t") == 0  # copied empty
        # Every metric README's Monitoring section names is exported, under that name.
        exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
        assert documented_metrics() <= exported, documented_metrics() - exported
        code, body = get(port, "/health")
        assert code == 200 and orjson.loads(body)["status"] == "streaming"
        assert get(port, "/nope")[0] == 404


def documented_metrics() -> set[str]:
    """The metric names the metrics list of docs/monitoring.md ("## Metrics") gives."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "monitoring.md").read_text()
    section = page.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`(etl_[a-z_]+)", section))
    assert len(names) >= 15, names   # the section, not a stray mention
    return names


def scrape(port: int) -> str:
    return get(port, "/metrics")[1].decode()


def wait_for(port: int, what, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = scrape(port)
        except OSError:
            text = ""
        if text and what(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"metrics never got there; last scrape:\n{text}")


def started(source_db, dest_db, **overrides):
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    port = free_port()
    settings = MetricsSettings(enabled=True, port=port, path="/metrics", slot_poll_interval=0.2)
    return port, running(source_db, dest_db, metrics=settings, **overrides)


def test_lag_slot_and_up_metrics_move(source_db, dest_db):
    port, ctx = started(source_db, dest_db)
    with ctx:
        # Streaming, not only up: a row written during the initial copy would arrive by the
        # copy and never count as a streamed insert.
        wait_for(port, lambda t: metric(t, "etl_up") == 1 and get(port, "/ready")[0] == 200)
        source_db.execute("insert into t values (1, 'a')")
        text = wait_for(port, lambda t: metric(
            t, "etl_records_processed_total", op="insert", table="odoo_mirror.t") == 1
            and metric(t, "etl_lag_seconds") == 0 and metric(t, "etl_lag_bytes") == 0)
        text = wait_for(port, lambda t: (metric(t, "etl_slot_retained_wal_bytes") or 0) > 0)
        assert metric(text, "etl_slot_wal_status", wal_status="reserved") == 1
        assert metric(text, "etl_slot_wal_status", wal_status="lost") == 0
        assert metric(text, "etl_dead_letters") == 0

        # The applier is held by a lock on the mirror table: lag grows, then drains.
        with dest_db.connect(autocommit=False) as lock:
            lock.execute("lock table odoo_mirror.t in access exclusive mode")
            source_db.execute("insert into t values (2, 'b')")
            text = wait_for(port, lambda t: metric(t, "etl_lag_bytes") > 0
                            and metric(t, "etl_lag_seconds") > 0.3)
            first = metric(text, "etl_lag_seconds")
            time.sleep(1.0)
            later = metric(scrape(port), "etl_lag_seconds")
            assert later >= first + 0.8, (first, later)   # grows while stuck, never frozen
            assert metric(scrape(port), "etl_up") == 1
            lock.rollback()
        wait_for(port, lambda t: metric(t, "etl_lag_seconds") == 0
                 and metric(t, "etl_lag_bytes") == 0)

        # The destination goes away: not up, /health 503, until it is back.
        seen_down = health_down = False
        deadline = time.monotonic() + 30
        n = 10
        while time.monotonic() < deadline and not (seen_down and health_down):
            dest_db.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                            "where datname = current_database() and pid <> pg_backend_pid()")
            n += 1
            source_db.execute("insert into t values (%s, 'c')", [n])
            if metric(scrape(port), "etl_up") == 0:
                seen_down = True
                code, body = get(port, "/health")
                if code == 503:
                    health_down = True
                    # Short: no error text (server names, SQL context) on an open port.
                    assert set(orjson.loads(body)) == {"status", "seconds_since_activity"}, body
            time.sleep(0.05)
        assert seen_down and health_down
        wait_for(port, lambda t: metric(t, "etl_up") == 1)


def test_heartbeat_advances_the_slot_on_an_idle_source(source_db, dest_db):
    port, ctx = started(source_db, dest_db, source_heartbeat_interval=0.3)
    slot = PUBLICATION

    def confirmed() -> int:
        return int(source_db.scalar(
            "select confirmed_flush_lsn - '0/0' from pg_replication_slots where slot_name = %s",
            [slot]) or 0)

    with ctx:
        wait_for(port, lambda t: metric(t, "etl_up") == 1)
        start = confirmed()
        deadline = time.monotonic() + 20
        moves = 0
        last = start
        while time.monotonic() < deadline and moves < 3:
            now = confirmed()
            if now > last:
                moves, last = moves + 1, now
            time.sleep(0.2)
        # Nothing was written on the source: only the heartbeat moves the slot, again and again.
        assert moves >= 3, (start, last)
