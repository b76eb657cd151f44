"""The deployment files read on their own: the PromQL reader the monitoring tests use, the
Grafana dashboard's model, docker-compose.yml and the Dockerfile against each other.

What a real Prometheus and a real replicator make of them is in
tests/integration/test_monitoring.py; the wheel the Dockerfile installs, in test_package.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import promql
import pytest

from replicator.telemetry import metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# The metric names replicator/telemetry/metrics.py declares, with the series names prometheus_client
# derives from them (histogram and counter suffixes).
DECLARED = {value for name, value in vars(metrics).items()
            if name.isupper() and isinstance(value, str) and value.startswith("etl_")}


def declared_series() -> set[str]:
    series = set(DECLARED)
    for name in (metrics.BATCH_DURATION, metrics.BATCH_ROWS):
        series |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
    series |= {n.removesuffix("_total") + "_created" for n in DECLARED if n.endswith("_total")}
    return series


# -- the PromQL reader ---------------------------------------------------------------------


def test_reader_finds_metric_and_label_names_and_nothing_else():
    q = promql.read(
        'histogram_quantile(0.95, sum by (le, table) (rate(etl_batch_duration_seconds_bucket'
        '{instance=~"$instance", job!="x"}[$__rate_interval] offset 5m)))'
        ' / on (instance) group_left (env) max without (state) (etl_table_sync_state == bool 1)'
        ' and max_over_time((etl_lag_seconds > 60)[1h:1m]) or vector(0) unless {__name__="up"}'
        ' > 1e3 * 10737418240 + 0x1f - label_replace(etl_up, "a", "$1", "b", "(.*)")')
    assert q.metrics == {"etl_batch_duration_seconds_bucket", "etl_table_sync_state",
                         "etl_lag_seconds", "etl_up"}
    assert ("etl_batch_duration_seconds_bucket", {"instance", "job"}) in q.selectors
    assert ("etl_lag_seconds", set()) in q.selectors
    assert ("", {"__name__"}) in q.selectors
    assert q.grouping == {"le", "table", "instance", "env", "state"}


def test_reader_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="no PromQL function"):
        promql.read("rates(etl_records_processed_total[5m])")
    with pytest.raises(ValueError, match="cannot read"):
        promql.read("etl_up ? 1")


def test_exported_names_come_from_type_lines_and_series():
    page = "\n".join([
        "# HELP etl_records_failed_total Row changes that could not be applied",
        "# TYPE etl_records_failed_total counter",
        'etl_records_failed_total{table="odoo_mirror.t"} 0.0',
        "# TYPE etl_batch_rows histogram",
        'etl_batch_rows_bucket{le="+Inf"} 0.0',
        "# TYPE etl_slot_wal_status gauge",   # no series yet: its name still counts
        "",
    ])
    names = promql.exported(page)
    assert names["etl_records_failed_total"] == {"table"}
    assert names["etl_batch_rows_bucket"] == {"le"}
    assert {"etl_records_failed_created", "etl_batch_rows_sum", "etl_batch_rows_count",
            "etl_slot_wal_status"} <= set(names)
    assert "etl_records_failed" not in names and "etl_lag_seconds" not in names


# -- the Grafana dashboard -----------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(model: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the template variables'
    label_values(SELECTOR, label) queries (their selector)."""
    exprs = [t["expr"] for p in model["panels"] for t in p["targets"]]
    for var in model["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert m, var
            exprs.append(m.group(1))
    return exprs


def test_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable():
    model = dashboard()
    assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
    assert model["title"] and model["uid"]
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]


def test_dashboard_shows_lag_throughput_wal_states_batches_dead_letters_and_up():
    used = set().union(*(promql.read(e).metrics for e in dashboard_queries(dashboard())))
    assert {metrics.LAG_SECONDS, metrics.LAG_BYTES, metrics.RECORDS_PROCESSED,
            metrics.SLOT_RETAINED_WAL, metrics.TABLE_STATE, metrics.BATCH_DURATION + "_bucket",
            metrics.DEAD_LETTERS, metrics.UP, "up"} <= used


def test_dashboard_queries_use_only_names_metrics_py_declares():
    # The live check (against a real scrape) is in tests/integration/test_monitoring.py.
    allowed = declared_series() | promql.SCRAPE_SERIES
    for expr in dashboard_queries(dashboard()):
        assert promql.read(expr).metrics <= allowed, expr


# -- docker-compose.yml and the Dockerfile -------------------------------------------------


def compose() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def metrics_port() -> int:
    return tomllib.loads((ROOT / "etl-config.toml").read_text())["metrics"]["port"]


def test_compose_builds_this_repository_and_mounts_files_that_exist():
    text = compose()
    assert re.search(r"^  etl:\n    build:\n      context: \.\n      dockerfile: Dockerfile$",
                     text, re.M)
    assert "      - ./etl-config.toml:/app/config.toml:ro" in text
    assert re.search(r"env_file:\n\s+- \.env\n", text)
    mounts = re.findall(r"^\s+- \./(\S+?):(/\S+?)(?::ro)?$", text, re.M)
    assert ("monitoring/prometheus.yml", "/etc/prometheus/prometheus.yml") in mounts
    assert ("monitoring/prometheus-alerts.yml", "/etc/prometheus/prometheus-alerts.yml") in mounts
    for source, _ in mounts:
        assert (ROOT / source).is_file(), source
    # Prometheus resolves rule_files beside its config: the alerts must be mounted there.
    assert "  - prometheus-alerts.yml" in (MONITORING / "prometheus.yml").read_text()


def test_compose_ports_health_check_and_scrape_target_agree_with_the_image():
    port = metrics_port()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {port}\n" in dockerfile
    # Published on the host's loopback only: the endpoints have no authentication.
    assert f'      - "127.0.0.1:{port}:{port}"' in compose()
    published = re.findall(r'^\s+- "([^"]+)"', compose(), re.M)
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    assert f'test: ["CMD", "curl", "-f", "http://localhost:{port}/health"]' in compose()
    assert f"http://localhost:{port}/health" in dockerfile
    assert f"- targets: ['etl:{port}']" in (MONITORING / "prometheus.yml").read_text()
    assert re.search(r"^  etl:$", compose(), re.M)   # the target's host name is the service


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def test_dockerfile_builds_the_wheel_then_runs_it_slim_and_unprivileged():
    build, runtime = stages()
    assert re.fullmatch(r"FROM \S+ AS build", build[0])
    assert any(re.match(r"RUN pip wheel .* \. && cp constraints\.txt /wheels/$", i)
               for i in build)
    # Pinned versions (constraints.txt), for the build's isolated environment too.
    assert "ENV PIP_CONSTRAINT=/src/constraints.txt" in build
    assert runtime[0].startswith("FROM ") and "slim" in runtime[0]
    copies = [i for i in runtime if i.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /wheels /wheels"]       # no source in the runtime
    installs = [i for i in runtime if "pip install" in i]
    assert len(installs) == 1 and re.search(
        r"pip install --no-cache-dir --no-index -c /wheels/constraints\.txt /wheels/\*\.whl",
        installs[0])
    users = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    user = users[-1]
    assert f"useradd --system --home /app --shell /usr/sbin/nologin {user}" in " ".join(runtime)
    assert f"EXPOSE {metrics_port()}" in runtime
    [health] = [i for i in runtime if i.startswith("HEALTHCHECK ")]
    assert "/health" in health
    # The metrics server listens on 127.0.0.1 unless told: the container tells it to listen
    # on its interfaces, for Prometheus on the compose network.
    assert runtime[-2:] == ['ENTRYPOINT ["replicator"]',
                            'CMD ["run", "--config", "/app/config.toml", '
                            '"--metrics-host", "0.0.0.0"]']
    # The spill directory: the compose volume's mount point, writable by the runtime user.
    assert f"chown {user}: /app/data" in " ".join(runtime)
    assert "ENV TMPDIR=/app/data" in runtime
    assert "      - etl-data:/app/data" in compose()


def test_constraints_pin_every_runtime_dependency_exactly():
    """The image installs pinned versions only: each dependency of pyproject.toml (and the
    build's) has one `name==version` line in constraints.txt."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]
              for d in project["project"]["dependencies"] + project["build-system"]["requires"]]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$",
                           (ROOT / "constraints.txt").read_text(), re.M))
    norm = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    missing = [d for d in wanted if re.sub(r"[-_.]+", "-", d).lower() not in norm]
    assert not missing, f"not pinned in constraints.txt: {missing}"


def test_compose_pins_every_image_and_runs_the_whole_stack():
    text = compose()
    images = re.findall(r"^\s+image: (\S+)$", text, re.M)
    assert images and all(":" in i and not i.endswith(":latest") for i in images
                          if not i.startswith("odoo-replicator")), images
    services = re.findall(r"^  ([a-z]+):$", text.split("\nvolumes:")[0], re.M)
    assert services == ["etl", "prometheus", "alertmanager", "grafana"], services
    # Hosts from .env: 127.0.0.1 inside a container is the container.
    assert "ODOO_DB_HOST: ${ODOO_DB_HOST:?" in text and "SUPABASE_DB_HOST: ${SUPABASE_DB_HOST:?" \
        in text
    config = (ROOT / "etl-config.toml").read_text()
    assert 'host = "${ODOO_DB_HOST:-127.0.0.1}"' in config
    assert 'host = "${SUPABASE_DB_HOST:-127.0.0.1}"' in config
    assert "- targets: ['alertmanager:9093']" in (MONITORING / "prometheus.yml").read_text()


def test_the_dashboard_shows_index_builds_and_streamed_transactions():
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
                     for t in p.get("targets", []))
    for name in (metrics.INDEX_BUILDS, metrics.STREAMED):
        assert name in exprs, name
