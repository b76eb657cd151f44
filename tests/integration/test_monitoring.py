"""monitoring/ for real: promtool checks and unit-tests the alerts, and a real Prometheus scrapes a
running replicator with them loaded.

- promtool: `check config`, `check rules`, `test rules` pass, and copies of the rules with one
  alert broken (never true, latched on, or without its `for:`) make `test rules` fail on that
  alert: every alert's case in prometheus-alerts.test.yml proves it fires, waits and resolves.
- Prometheus (Debian's package; .ci/run installs it) scrapes a replicator with the shipped
  prometheus.yml (target and intervals changed for the test): the target is up, every rule
  loads and evaluates with health ok, every rule expression and dashboard query runs, uses only
  metric and label names the replicator's own /metrics page has, and returns data; a dead letter
  and then the stopped replicator put ETLDeadLetters and ETLTargetDown in the pending state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import promql
import pytest
from plugins.faults import scrape
from plugins.replicator import PUBLICATION, STATE_SCHEMA, running, wait_for

from replicator.config.settings import MetricsSettings
from replicator.devtools.localpg import free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "prometheus-alerts.yml"
ALERT_TESTS = MONITORING / "prometheus-alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
JOB = "odoo-supabase-etl"
EXPECTED_ALERTS = {"ETLHighLag", "ETLFailedRecords", "ETLSlotRetainedWALHigh",
                   "ETLSlotWALUnreserved", "ETLSlotLost", "ETLDown", "ETLTargetDown",
                   "ETLDeadLetters"}
# Labels Prometheus adds to every series of the target (prometheus.yml's static labels).
TARGET_LABELS = {"job", "instance", "service", "env"}


def tool(name: str, package: str = "prometheus") -> str:
    """The path of a Prometheus (or Alertmanager) binary; off CI a machine without it skips,
    as for PostgreSQL; under CI it fails (.ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs it: see .ci/run)")
        pytest.skip(message)
    return path


# -- promtool --------------------------------------------------------------------------------

_RULE = re.compile(r"^      - alert: (\w+)\n        expr: (.+)\n        for: (\w+)\n", re.M)


def rules_text() -> str:
    return ALERTS.read_text()


def alert_rules(text: str) -> dict[str, tuple[str, str]]:
    """alert name -> (expr, for) as written in prometheus-alerts.yml."""
    return {m.group(1): (m.group(2), m.group(3)) for m in _RULE.finditer(text)}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    """promtool's stdout and stderr in order, in .stdout."""
    return subprocess.run([tool("promtool"), *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)


def test_promtool_checks_the_config_and_the_rules():
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout
    assert "SUCCESS: 1 rule files found" in proc.stdout
    proc = promtool("check", "rules", ALERTS.name)
    assert proc.returncode == 0, proc.stdout
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in proc.stdout


def test_amtool_checks_the_alertmanager_config():
    """Alertmanager's own checker on the config docker-compose.yml mounts (Debian's
    prometheus-alertmanager), and Prometheus sends its alerts there."""
    path = tool("amtool", "prometheus-alertmanager")
    proc = subprocess.run([path, "check-config", "alertmanager.yml"], cwd=MONITORING,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout
    assert "- 1 receivers" in proc.stdout and "- 1 inhibit rules" in proc.stdout, proc.stdout
    broken = MONITORING / "alertmanager.yml"
    bad = broken.read_text().replace("receiver: operators\n  group_by",
                                     "receiver: nobody\n  group_by", 1)
    assert bad != broken.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "alertmanager.yml").write_text(bad)
        proc = subprocess.run([path, "check-config", "alertmanager.yml"], cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=60)
    assert proc.returncode != 0 and "nobody" in proc.stdout, proc.stdout


def test_the_compose_file_is_valid_by_the_compose_specification():
    """docker-compose.yml against the Compose Specification's JSON schema (the copy that
    check-jsonschema bundles), as `docker compose config` would read it."""
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "docker-compose.yml"
        bad.write_text((ROOT / "docker-compose.yml").read_text().replace(
            "restart: unless-stopped", "restart: [unless-stopped]", 1))
        proc = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
             "vendor.compose-spec", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, "a broken compose file passed the schema"


def test_the_doc_alerts_are_kept_and_every_alert_is_there():
    rules = alert_rules(rules_text())
    assert set(rules) == EXPECTED_ALERTS
    assert rules_text().count("- alert: ") == len(EXPECTED_ALERTS)   # none the regex missed
    assert rules["ETLHighLag"] == ("etl_lag_seconds > 60", "5m")
    assert rules["ETLFailedRecords"] == ("rate(etl_records_failed_total[5m]) > 10", "5m")
    text = rules_text()
    for name, severity in (("ETLHighLag", "warning"), ("ETLFailedRecords", "critical"),
                           ("ETLSlotLost", "critical")):
        block = text[text.index(f"- alert: {name}\n"):]
        assert re.match(rf"- alert: {name}\n(?:        .*\n)*?          severity: {severity}\n",
                        block), name
    assert "replicator resync --all" in text[text.index("- alert: ETLSlotLost"):][:1200]


def mutate(text: str, name: str, how: str) -> str:
    expr, duration = alert_rules(text)[name]
    head = f"      - alert: {name}\n        expr: {expr}\n        for: {duration}\n"
    if how == "never":
        new = f"      - alert: {name}\n        expr: vector(1) == 0\n        for: {duration}\n"
    elif how == "latched":     # stays true for an hour after the condition ends
        new = (f"      - alert: {name}\n        expr: max_over_time(({expr})[1h:30s])\n"
               f"        for: {duration}\n")
    else:                      # "hasty": no waiting
        new = f"      - alert: {name}\n        expr: {expr}\n        for: 0m\n"
    assert head in text
    return text.replace(head, new)


def test_promtool_unit_tests_pass_and_fail_when_an_alert_breaks(tmp_path):
    proc = promtool("test", "rules", ALERT_TESTS.name)
    assert proc.returncode == 0, proc.stdout
    assert "SUCCESS" in proc.stdout

    original = rules_text()
    cases = [(name, "never") for name in sorted(EXPECTED_ALERTS)]
    cases += [(name, "latched") for name in sorted(EXPECTED_ALERTS)]
    cases += [(name, "hasty") for name, (_, d) in sorted(alert_rules(original).items()) if d != "0m"]
    # One promtool run for all the broken copies, each in its own directory with the test
    # groups that check that alert (the others would pass anyway, and take time).
    header, *groups = re.split(r"^(?=  - name: )", ALERT_TESTS.read_text(), flags=re.M)
    files = []
    for name, how in cases:
        case = tmp_path / f"{name}-{how}"
        case.mkdir()
        mine = [g for g in groups if re.search(rf"alertname: {name}\b", g)]
        assert mine, f"no test of {name} in {ALERT_TESTS.name}"
        (case / ALERT_TESTS.name).write_text(header + "".join(mine))
        (case / ALERTS.name).write_text(mutate(original, name, how))
        files.append(f"{case.name}/{ALERT_TESTS.name}")
    proc = promtool("test", "rules", *files, cwd=tmp_path)
    assert proc.returncode != 0
    sections = re.split(r"^Unit Testing: +(\S+)\n", proc.stdout, flags=re.M)[1:]
    results = dict(zip(sections[::2], sections[1::2]))
    assert set(results) == set(files)
    for (name, how), file in zip(cases, files):
        out = results[file]
        assert "FAILED" in out, f"{name} {how}: promtool test rules still passes\n{out}"
        # never: a firing expectation got nothing; latched, hasty: a quiet one got an alert
        failures = re.findall(rf"alertname: {name}, time: \w+, \s*exp:\[(.*?)\],\s*got:\[(.*?)\]\n",
                              out, re.S)
        if how == "never":
            ok = any(exp.strip() and not got.strip() for exp, got in failures)
        else:
            ok = any(got.strip() and not exp.strip() for exp, got in failures)
        assert ok, f"{name} {how}: not the expected failure\n{out}"


# -- a real Prometheus -----------------------------------------------------------------------


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def prometheus_config(tmp_path: Path, target_port: int) -> Path:
    """The shipped prometheus.yml and alerts, pointed at the test's replicator, every 1 s."""
    config = (MONITORING / "prometheus.yml").read_text()
    for old, new in (("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                     ("- targets: ['etl:9090']", f"- targets: ['127.0.0.1:{target_port}']")):
        assert config.count(old) == 1, old
        config = config.replace(old, new)
    alerts = rules_text()
    assert alerts.count("    interval: 30s\n") == 1
    (tmp_path / ALERTS.name).write_text(alerts.replace("    interval: 30s\n", "    interval: 1s\n"))
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    return path


class Prometheus:
    def __init__(self, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> dict:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        body = http_json(f"{self.url}/api/v1/{path}{query}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def wait(self, predicate, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except OSError:     # not listening yet
                pass
            time.sleep(0.2)
        pytest.fail(f"Prometheus: timed out waiting for {what}\n{self.log.read_text()[-3000:]}")

    def alert_state(self, name: str) -> set[str]:
        return {a["state"] for a in self.api("alerts")["alerts"]
                if a["labels"]["alertname"] == name}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5s").replace('"$instance"', '".*"')


def dashboard_queries() -> list[str]:
    model = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in model["panels"] for t in p["targets"]]
    exprs += [re.fullmatch(r"label_values\((.+),\s*\w+\)", v["query"]["query"]).group(1)
              for v in model["templating"]["list"] if v["type"] == "query"]
    return exprs


def assert_uses_only_exported(expr: str, exported: dict[str, set[str]]) -> None:
    q = promql.read(expr)
    unknown = q.metrics - set(exported) - promql.SCRAPE_SERIES
    assert not unknown, f"{expr}: {sorted(unknown)} not exported by the replicator"
    known_labels = set(TARGET_LABELS)
    for name, labels in q.selectors:
        have = exported.get(name, set()) | TARGET_LABELS | {"__name__"}
        assert labels <= have, f"{expr}: {name} has no label {sorted(labels - have)}"
        known_labels |= have
    assert q.grouping <= known_labels, f"{expr}: grouping by {sorted(q.grouping - known_labels)}"


@pytest.mark.parametrize("source_cluster", [pytest.param(15, marks=pytest.mark.pg15, id="pg15")],
                         indirect=True)
def test_prometheus_scrapes_a_running_replicator_with_the_alerts_loaded(source_db, dest_db,
                                                                        tmp_path):
    tool("prometheus")
    source_db.execute("create table t (id int primary key, v text)")
    source_db.execute("insert into t select g, 'copied' from generate_series(1, 20) g")
    source_db.execute(f"create publication {PUBLICATION} for table t")
    port = free_port()
    settings = MetricsSettings(enabled=True, port=port, path="/metrics", slot_poll_interval=0.2)
    prometheus = None
    try:
        with running(source_db, dest_db, metrics=settings):
            # Streaming, not copying: changes from now on are counted as processed.
            wait_for(lambda: 'etl_table_sync_state{state="streaming",table="odoo_mirror.t"} 1.0'
                     in scrape(port), what="table t streaming")
            source_db.execute("insert into t select g, 'streamed' from generate_series(21, 30) g")
            source_db.execute("update t set v = 'u' where id = 1")
            wait_for(lambda: 'etl_records_processed_total{op="update"' in scrape(port)
                     and 'wal_status="reserved"} 1.0' in scrape(port),
                     what="an applied update and a polled slot")
            exported = promql.exported(scrape(port))

            prometheus = Prometheus(prometheus_config(tmp_path, port), tmp_path)
            p = prometheus

            def target_up() -> bool:
                targets = p.api("targets")["activeTargets"]
                return len(targets) == 1 and targets[0]["health"] == "up"

            p.wait(target_up, "the replicator target to be up")
            [target] = p.api("targets")["activeTargets"]
            assert target["labels"] == {"job": JOB, "instance": f"127.0.0.1:{port}",
                                        "service": "odoo-etl", "env": "production"}

            def evaluated() -> bool:
                rules = [r for g in p.api("rules")["groups"] for r in g["rules"]]
                return bool(rules) and all(r["lastEvaluation"] > "2000" for r in rules)

            p.wait(evaluated, "every rule to be evaluated")
            rules = [r for g in p.api("rules")["groups"] for r in g["rules"]]
            assert {r["name"] for r in rules} == EXPECTED_ALERTS
            for rule in rules:
                assert rule["type"] == "alerting"
                assert rule["health"] == "ok" and not rule.get("lastError"), rule
                assert_uses_only_exported(rule["query"], exported)
                p.query(rule["query"])     # evaluates (the API says success)
            # Rates need two scrapes in their window.
            p.wait(lambda: p.query("count_over_time(etl_up[5s]) >= 3"), "three scrapes")
            for expr in dashboard_queries():
                assert_uses_only_exported(expr, exported)
                assert p.query(grafana_to_promql(expr)), f"dashboard query has no data: {expr}"
            assert p.query(f'etl_up{{job="{JOB}"}} == 1')
            assert p.query('etl_records_processed_total{op="insert", table="odoo_mirror.t"} == 10')
            assert not p.alert_state("ETLTargetDown") and not p.alert_state("ETLDeadLetters")

            dest_db.execute(f"insert into {STATE_SCHEMA}.dead_letters (slot, mirror_table, lsn,"
                            f" reason) values (%s, 'odoo_mirror.t', '0/1', 'test')", [PUBLICATION])
            p.wait(lambda: p.alert_state("ETLDeadLetters") == {"pending"},
                   "ETLDeadLetters pending (for: 1m)")
        # The replicator stopped: its target is down.
        p.wait(lambda: p.query(f'up{{job="{JOB}"}} == 0'), "up == 0")
        p.wait(lambda: p.alert_state("ETLTargetDown") == {"pending"},
               "ETLTargetDown pending (for: 5m)")
    finally:
        if prometheus is not None:
            prometheus.stop()
