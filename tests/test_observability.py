"""The monitoring stack (docker/prometheus, docker/grafana) checked by the real tools, and run end to end.

- promtool checks the rules, runs their unit tests (docker/prometheus/rules_test.yml) and checks
  the Prometheus configuration.
- End to end: a real `fraud run` process reads two Redis shards and serves /metrics
  (FRAUD_METRICS_PORT); Debian's /usr/bin/prometheus scrapes it every second with the repository's
  prometheus.yml and rules.yml. A paced replay of a small generated world feeds the flow, then a
  burst of records that are not JSON. Every panel query of the Grafana dashboard must return data,
  every rule must evaluate without error and its `signal` annotation (the rule's raw query, its
  expression without the final comparison) must return data, and the dead-letter rule must fire.

What the test changes in the production files, in a copy under tmp_path:
- prometheus.yml: the global scrape and evaluation intervals (15s -> 1s), so the run is short;
  its targets/ files are the test's own (the flow's port, and no Alertmanager).
- rules.yml: every `for:` becomes 1s, so an alert fires within the test's seconds rather than
  after minutes. Expressions, windows and thresholds are the production ones.
- dashboard queries: Grafana's `$__rate_interval` becomes 1m (Grafana derives it from the scrape
  interval; any other `$` variable fails the test).

Prometheus and promtool are Debian's `prometheus` package (`make test` installs it); a machine
without them fails here with that instruction rather than skipping.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flows.redis_source import ENTRY_KIND, ENTRY_PAYLOAD, shard_stream
from fraud.datagen import GeneratorConfig, write_files
from service.redis_client import connect
from testkit import drill
from testkit.system import free_port

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "fraud.json"
DATASOURCE = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
RUNBOOK = ROOT / "docs" / "observability.md"
TAG = "obs"
SHARDS = 2
BAD_RECORDS = 300  # not JSON: dead-lettered as bad_json, about a tenth of the records read
RULE_SET = "big_amount: amount > 200 -> review\nlarge_amount: amount > 400 -> alert dry-run\n"
FLOW = {
    "FRAUD_SOURCE_IDLE_EXIT_S": "120",  # stays up while Prometheus scrapes; killed at the end
    "FRAUD_SOURCE_BATCH_SIZE": "100",
    "FRAUD_SNAPSHOT_INTERVAL_S": "1",
    "FRAUD_ONLINE_WARMUP_LABELS": "50",
    # small drift windows, so this small replay sets the PSI and model-quality gauges
    "FRAUD_DRIFT_WINDOW_HOURS": "2",
    "FRAUD_DRIFT_MIN_ROWS": "20",
    "FRAUD_DRIFT_LABEL_WINDOW": "100",
}
DEADLINE_S = 30.0  # longest wait for any one condition of the run


def tool(name: str) -> str:
    path = Path("/usr/bin") / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: `apt-get install prometheus` installs it (`make test` does)")
    return str(path)


def run_tool(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_promtool_checks_the_rules() -> None:
    out = run_tool(tool("promtool"), "check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    out = run_tool(tool("promtool"), "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in out


def test_promtool_checks_the_configuration() -> None:
    out = run_tool(tool("promtool"), "check", "config", str(CONFIG))
    assert "SUCCESS" in out and "1 rule files found" in out


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_every_alert_has_unit_tests_and_a_runbook_section() -> None:
    names = alert_names()
    assert len(names) == len(set(names)) >= 10
    tests = RULES_TEST.read_text()
    untested = [n for n in names if not re.search(rf"alertname: {n}$", tests, re.MULTILINE)]
    assert untested == [], f"rules without a promtool test in {RULES_TEST.name}: {untested}"
    headings = {
        re.sub(r"[^a-z0-9_ -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.MULTILINE)
    }
    runbooks = re.findall(r'runbook: "docs/observability\.md#([\w-]+)"', RULES.read_text())
    assert len(runbooks) == len(names)
    assert sorted(runbooks) == sorted(n.lower() for n in names)  # each points to its own section
    missing = [r for r in runbooks if r not in headings]
    assert missing == [], f"runbook anchors without a heading in docs/observability.md: {missing}"


def datasource_uid() -> str:
    found = re.findall(r"^\s+uid: (\S+)$", DATASOURCE.read_text(), re.MULTILINE)
    assert len(found) == 1
    return found[0]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's `$__rate_interval` filled in."""
    out = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            assert "$" not in expr, f"{panel['title']}: a dashboard variable the test cannot fill: {expr}"
            out.append((panel["title"], expr))
    return out


def test_the_dashboard_is_well_formed() -> None:
    uid = datasource_uid()
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel.get("title"), panel
        assert "gridPos" in panel, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("description"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), (panel["title"], target)
            assert target["datasource"]["uid"] == uid, panel["title"]
    # Every metric of service/telemetry.py the issue asks for has a panel.
    exprs = " ".join(expr for _, expr in panel_queries())
    for metric in (
        "fraud_transactions_total",
        "fraud_alerts_total",
        "fraud_dead_letters_total",
        "fraud_end_to_end_latency_seconds_bucket",
        "fraud_scoring_batch_size_bucket",
        "fraud_source_lag_seconds",
        "fraud_epoch_pause_seconds_bucket",
        "fraud_order_held_events",
        "fraud_redis_errors_total",
        "fraud_score_bucket",
        "fraud_model_quality",
        "fraud_model_info",
        "fraud_feature_psi",
        "fraud_drift_events_total",
        "fraud_rule_hits_total",
    ):
        assert metric in exprs, f"no panel shows {metric}"


# --- end to end ------------------------------------------------------------------------------


@dataclass
class Stack:
    """A flow process and the Prometheus scraping it."""

    prometheus: str  # base URL
    flow_log: Path
    prometheus_log: Path

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the error in its body
            body = json.load(exc)
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def logs(self) -> str:
        tail = {p.name: p.read_text(errors="replace")[-2500:] for p in (self.flow_log, self.prometheus_log)}
        return "\n".join(f"--- {name}\n{text}" for name, text in tail.items())


def has_value(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (NaN aside: a quantile of no observations is NaN)."""
    return any(not math.isnan(float(r["value"][1])) for r in result)


def wait_for(what: str, ready: Callable[[], bool], stack: Stack | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\n{stack.logs()}" if stack else ""))
        time.sleep(0.25)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def prometheus_files(out: Path, metrics_port: int) -> Path:
    """prometheus.yml and rules.yml copied to `out` as the module docstring says; the config path."""
    (out / "targets").mkdir(parents=True)
    config, n = re.subn(
        r"^(  (?:scrape|evaluation)_interval:) 15s$", r"\1 1s", CONFIG.read_text(), flags=re.M
    )
    assert n == 2, "prometheus.yml's global intervals are not where the test expects them"
    (out / "prometheus.yml").write_text(config)
    rules, n = re.subn(r"^(\s+for:) \S+$", r"\1 1s", RULES.read_text(), flags=re.MULTILINE)
    assert n > 0
    (out / "rules.yml").write_text(rules)
    # file_sd target files (JSON is YAML): the flow, and no Alertmanager
    (out / "targets" / "fraud-flow.yml").write_text(json.dumps([{"targets": [f"127.0.0.1:{metrics_port}"]}]))
    (out / "targets" / "alertmanager.yml").write_text("[]\n")
    return out / "prometheus.yml"


def feed(url: str, world: Path) -> None:
    """The paced replay into the shards, then BAD_RECORDS lines that are not JSON into shard 0."""
    client = connect(url)
    try:
        files = (world / "transactions.jsonl", world / "labels.jsonl")
        drill.replay(client, files, TAG, SHARDS, rate=500)
        with client.pipeline(transaction=False) as pipe:
            for i in range(BAD_RECORDS):
                pipe.xadd(shard_stream(f"{TAG}:in", 0), {ENTRY_KIND: "txn", ENTRY_PAYLOAD: f"not json {i}"})
            pipe.execute()
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = tool("prometheus")
    run_tool(tool("promtool"), "check", "config", str(CONFIG))
    work = tmp_path_factory.mktemp("observability")
    world = work / "world"
    write_files(world, GeneratorConfig(seed=3, days=14, n_cards=150, n_merchants=50, drift_day=None))
    client = connect(redis_url)
    client.delete(*client.keys(f"{TAG}:*") or [f"{TAG}:none"])
    client.close()
    registry = work / f"{TAG}-registry"
    registry.mkdir()
    (registry / "rules.txt").write_text(RULE_SET)  # the rule set in force at start: rule hits

    metrics_port, web_port = free_port(), free_port()
    config = prometheus_files(work / "prometheus", metrics_port)
    run_tool(tool("promtool"), "check", "config", str(config))
    env = drill.flow_env(redis_url, TAG, SHARDS, work, FRAUD_METRICS_PORT=str(metrics_port), **FLOW)
    flow_log, prometheus_log = work / "flow.log", work / "prometheus.log"
    stack = Stack(f"http://127.0.0.1:{web_port}", flow_log, prometheus_log)
    procs: list[subprocess.Popen[bytes]] = []
    # Not drill.start: its output pipe is only read at the end, and the drift watch's log lines
    # would fill it and block the flow while Prometheus watches. The logs go to files instead.
    with flow_log.open("wb") as flow_out, prometheus_log.open("wb") as prometheus_out:
        try:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fraud.cli", "run"],
                    cwd=ROOT,
                    env=env,
                    stdout=flow_out,
                    stderr=subprocess.STDOUT,
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        prometheus_bin,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={work / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{web_port}",
                    ],
                    cwd=work,
                    stdout=prometheus_out,
                    stderr=subprocess.STDOUT,
                )
            )
            flow = procs[0]
            wait_for(
                "the flow's /metrics",
                lambda: flow.poll() is not None or answers(f"http://127.0.0.1:{metrics_port}/metrics"),
                stack,
            )
            assert flow.poll() is None, f"the flow exited with {flow.returncode}\n{stack.logs()}"
            wait_for("Prometheus", lambda: answers(f"{stack.prometheus}/-/ready"), stack)
            wait_for(
                "a successful scrape of the flow",
                lambda: [t["health"] for t in stack.api("targets")["activeTargets"]] == ["up"],
                stack,
            )
            feed(redis_url, world)
            wait_for(
                "the bad records to be counted",
                lambda: has_value(
                    stack.query(f'sum(fraud_dead_letters_total{{reason="bad_json"}}) >= {BAD_RECORDS}')
                ),
                stack,
            )
            yield stack
        finally:
            for proc in reversed(procs):
                stop(proc)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    empty: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    for title, expr in panel_queries():
        # A gauge appears when its step first runs, a rate after two scrapes: wait a little.
        while not has_value(result := stack.query(expr)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not has_value(result):
            empty.append(f"{title}: {expr}")
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty) + f"\n{stack.logs()}"


def rules(stack: Stack) -> list[dict[str, Any]]:
    """The rules as the running Prometheus loaded them (expression, labels, annotations, health)."""
    return [r for g in stack.api("rules")["groups"] for r in g["rules"]]


def test_every_rule_evaluates_and_its_signal_returns_data(stack: Stack) -> None:
    wait_for(
        "every rule evaluated without error", lambda: all(r["health"] == "ok" for r in rules(stack)), stack
    )
    loaded = rules(stack)
    assert sorted(r["name"] for r in loaded) == sorted(alert_names())
    for rule in loaded:
        stack.query(rule["query"])  # evaluates without error (empty unless firing)
        annotations = rule["annotations"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["name"]
        assert annotations["summary"] and annotations["description"], rule["name"]
        assert annotations["runbook"] == f"docs/observability.md#{rule['name'].lower()}"
    empty = [r["name"] for r in loaded if not has_value(stack.query(r["annotations"]["signal"]))]
    assert empty == [], f"rules whose signal has no data: {empty}\n{stack.logs()}"


def test_the_dead_letter_alert_fires(stack: Stack) -> None:
    def firing() -> list[dict[str, Any]]:
        return [
            a
            for a in stack.api("alerts")["alerts"]
            if a["labels"]["alertname"] == "FraudDeadLetterRateHigh" and a["state"] == "firing"
        ]

    wait_for("FraudDeadLetterRateHigh to fire", lambda: bool(firing()), stack)
    (alert,) = firing()  # bad_json only: the generated world itself has no bad records
    assert alert["labels"]["reason"] == "bad_json" and alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook"] == "docs/observability.md#frauddeadletterratehigh"
    assert float(alert["value"]) > 0.01
