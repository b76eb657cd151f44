"""Prometheus metrics and /health while the replicator runs."""

from __future__ import annotations

import time
import urllib.request

import orjson
from plugins.replicator import PUBLICATION, running

from replicator.devtools.localpg import free_port
from replicator.settings import MetricsSettings


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
        code, body = get(port, "/health")
        assert code == 200 and orjson.loads(body)["status"] == "streaming"
        assert get(port, "/nope")[0] == 404
