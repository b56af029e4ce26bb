"""The operator's package against a real router: the smoke test passes (and fails loudly),
and nothing an alert, a dashboard panel or a runbook reads has drifted from what /metrics
exports; every PromQL expression passes promtool."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from apirouter.keys import hash_key
from tests.e2e.conftest import post_json, request
from tests.harness import ROOT, MockBackend, RedisServer, Router, free_port, http_get, started
from tools import dashboard

CHART = ROOT / "deploy" / "helm" / "apirouter"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ADMIN_TOKEN = "smoke-admin-token"
# Labels Prometheus adds to every scraped series, and series it makes up itself.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
SYNTHETIC = {"up"}
PROMQL_WORDS = {"sum", "max", "min", "avg", "rate", "increase", "by", "without", "and", "or",
                "unless", "on", "ignoring", "histogram_quantile", "time", "count", "abs",
                "label_values", "le", "bool", "offset", "group_left", "group_right", "topk",
                "irate", "delta", "absent"}

def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (tools/setup.sh test installs Debian prometheus)"
    return path


@pytest.fixture(scope="module")
def deployed() -> Iterator[Router]:
    with ExitStack() as stack:
        a = started(stack, MockBackend("a"))
        broken = started(stack, MockBackend("broken", "--error-rate", "1", "--error-status", "503"))
        cfg: dict[str, Any] = {
            "server": {"admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
            "backends": {"a": {"url": a.url}, "broken": {"url": broken.url}},
            "models": {"m": {"backends": ["a"]},
                       "canary": {"backends": ["broken"], "fallbacks": ["m"]}},
            "keys": {
                "user": {"sha256": hash_key("ar-user"), "org": "acme", "tier": "admin",
                         "scopes": ["inference", "audit"]},
                "tight": {"sha256": hash_key("ar-tight"), "org": "acme", "tier": "developer",
                          "rpm": 2, "rpm_burst": 2},
                "poor": {"sha256": hash_key("ar-poor"), "org": "poor", "tier": "developer"},
            },
            "budgets": {"org:poor": {"period": "day", "requests": 2}},
            "orgs": {"acme": {"rpm": 50000, "rpm_burst": 60000}},
        }
        yield started(stack, Router(cfg, workers=2))


def smoke(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "smoke", url, *extra],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))


FULL = ("--key", "ar-user", "--admin-token", ADMIN_TOKEN, "--limited-key", "ar-tight",
        "--budget-key", "ar-poor", "--failover-model", "canary")


def test_smoke_passes_against_a_real_router(deployed: Router) -> None:
    done = smoke(deployed.url, *FULL)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for check in ("health", "readiness", "metrics", "inference", "admin routing",
                  "audit lookup", "rate limit", "failover", "budget", "usage records"):
        assert any(line.startswith(f"ok   {check}:") for line in lines), (check, lines)
    assert "429 RATE_LIMIT_EXCEEDED" in done.stdout and "402 QUOTA_EXCEEDED" in done.stdout
    assert not any(line.startswith("skip") for line in lines)


def test_smoke_takes_its_credentials_from_the_environment(deployed: Router) -> None:
    done = subprocess.run([sys.executable, "-m", "tools.cli", "smoke", deployed.url],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                          env={**os.environ, "APIROUTER_SMOKE_KEY": "ar-user",
                               "APIROUTER_SMOKE_ADMIN_TOKEN": ADMIN_TOKEN})
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("ok   admin routing:") for line in done.stdout.splitlines())
    assert "ar-user" not in done.stdout and ADMIN_TOKEN not in done.stdout


def test_smoke_stops_at_the_first_failure_with_a_clear_line(deployed: Router) -> None:
    wrong = smoke(deployed.url, "--key", "ar-user", "--admin-token", "not-the-token")
    assert wrong.returncode == 1
    last = wrong.stdout.splitlines()[-1]
    assert last.startswith("FAIL admin /v1/admin/routing/table: expected HTTP 200, got 401")
    assert "ok   inference" in wrong.stdout and "audit lookup" not in wrong.stdout
    dead = smoke(f"http://127.0.0.1:{free_port()}", "--key", "k", "--admin-token", "t")
    assert dead.returncode == 1 and dead.stdout.startswith("FAIL GET /v1/status/healthz: no "
                                                           "answer")


# -- no drift ------------------------------------------------------------------------------------


def alert_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(title, expr.replace("$__rate_interval", "5m").replace('=~"$job"', '="apirouter"'))
            for title, expr in dashboard.expressions(json.loads(DASHBOARD.read_text()))]


def runbook_exprs() -> list[tuple[str, str]]:
    blocks = re.findall(r"```promql\n(.*?)```", RUNBOOKS.read_text(), re.S)
    return [(f"runbook block {i}", b.strip()) for i, b in enumerate(blocks)]


def used(expr: str) -> dict[str, set[str]]:
    """Metric names an expression reads, each with the label names it filters or groups on."""
    grouped = {lbl.strip() for g in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)",
                                               expr) for lbl in g.split(",") if lbl.strip()}
    out: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        if name in PROMQL_WORDS or not (name.startswith("router_") or name in SYNTHETIC):
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        out.setdefault(name, set()).update(labels | grouped)
    return out


def exported(url: str) -> dict[str, set[str]]:
    status, body = http_get(f"{url}/metrics")
    assert status == 200
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def every_expression() -> list[tuple[str, str]]:
    return alert_exprs() + dashboard_exprs() + runbook_exprs()


def test_every_metric_and_label_an_alert_panel_or_runbook_reads_is_exported(
        deployed: Router) -> None:
    # A little traffic down the paths the smoke test does not take.
    for body in ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, {"x": 1}):
        post_json(f"{deployed.url}/v1/chat/completions", body,
                  {"Authorization": "Bearer ar-user"})
    request(f"{deployed.url}/v1/audit/requests/unknown-id",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    have = exported(deployed.url)
    exprs = every_expression()
    assert len(exprs) > 50
    problems = []
    for where, expr in exprs:
        for name, labels in used(expr).items():
            if name in SYNTHETIC:
                continue
            if name not in have:
                problems.append(f"{where}: {name} is not exported")
                continue
            allowed = have[name] | TARGET_LABELS
            if missing := labels - allowed:
                problems.append(f"{where}: {name} has no label {sorted(missing)}")
    assert problems == []


def gauge(url: str, name: str) -> dict[tuple[str, ...], float]:
    status, body = http_get(f"{url}/metrics")
    assert status == 200
    return {tuple(s.labels.values()): s.value
            for f in text_string_to_metric_families(body.decode()) if f.name == name
            for s in f.samples}


def test_budget_and_rate_limit_remaining_are_read_at_scrape_time(deployed: Router) -> None:
    budgets = gauge(deployed.url, "router_budget_remaining_ratio")
    assert set(budgets) == {("org:poor", "requests")}
    assert 0 <= budgets["org:poor", "requests"] <= 1
    limits = gauge(deployed.url, "router_ratelimit_remaining_ratio")
    assert set(limits) == {("acme", "rpm")}
    assert 0 <= limits["acme", "rpm"] <= 1


def test_remaining_gauges_read_redis_for_every_router(redis_server: RedisServer) -> None:
    stack = ExitStack()
    mock = started(stack, MockBackend("a"))
    cfg = {"server": {"redis_url": redis_server.url, "redis_timeout_ms": 250},
           "backends": {"a": {"url": mock.url}}, "models": {"m": {"backends": ["a"]}},
           "keys": {"k": {"sha256": hash_key("ar-gauge"), "org": "gauge", "tier": "admin"}},
           "orgs": {"gauge": {"rpm": 60, "rpm_burst": 100}},
           "budgets": {"org:gauge": {"period": "day", "requests": 40}}}
    with stack:
        router = started(stack, Router(cfg, workers=2))
        for _ in range(10):
            status, _, _ = post_json(f"{router.url}/v1/chat/completions",
                                     {"model": "m", "messages": [{"role": "user",
                                                                  "content": "x"}]},
                                     {"Authorization": "Bearer ar-gauge"})
            assert status == 200
        # 10 of the 40 requests of the budget are used, whichever worker answers the scrape.
        assert gauge(router.url, "router_budget_remaining_ratio") == {
            ("org:gauge", "requests"): 0.75}
        # 10 of a burst of 100 taken; it refills at 1 a second.
        (level,) = gauge(router.url, "router_ratelimit_remaining_ratio").values()
        assert 0.9 <= level < 1


def test_the_drift_check_catches_a_renamed_metric_or_label() -> None:
    have = {"router_requests_total": {"backend_id", "success"}}
    seen = used('sum by (backend_id) (rate(router_requests_total{succes="false"}[5m])) '
                "/ sum(rate(router_request_total[5m]))")
    assert seen == {"router_requests_total": {"backend_id", "succes"},
                    "router_request_total": {"backend_id"}}
    assert "router_request_total" not in have
    assert seen["router_requests_total"] - have["router_requests_total"] == {"succes"}


def test_every_promql_expression_passes_promtool(tmp_path: Path) -> None:
    rules = [{"record": f"apirouter:check:{i}", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_exprs() + runbook_exprs())]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    done = subprocess.run([promtool(), "check", "rules", str(path), str(ALERTS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = path.with_name("bad.yaml")
    bad.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [
        {"record": "x:y", "expr": "sum by (le (rate(router_requests_total[5m]))"}]}]}))
    assert subprocess.run([promtool(), "check", "rules", str(bad)], capture_output=True,
                          timeout=60).returncode != 0


def test_alert_unit_tests_fire_and_stay_quiet() -> None:
    done = subprocess.run([promtool(), "test", "rules", "alerts_test.yaml"],
                          cwd=ROOT / "deploy" / "prometheus", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "deploy" / "prometheus" /
                                                  "alerts_test.yaml").read_text()))
    assert tested == {name for name, _ in alert_exprs()}


def test_every_alert_links_to_a_runbook_section() -> None:
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)}
    doc = yaml.safe_load(ALERTS.read_text())
    for rule in (r for g in doc["groups"] for r in g["rules"]):
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/runbooks.md#"), url
        assert url.split("#", 1)[1] in headings, (rule["alert"], url)
        assert rule["labels"]["severity"] in ("warning", "critical")
    for topic in ("startup-and-shutdown", "reading-healthz-and-readyz", "backend-degradation",
                  "routing-policy-updates", "failover-recovery", "spool-recovery",
                  "kafka-connectivity", "config-store-etcd-connectivity",
                  "rate-limit-troubleshooting", "budget-troubleshooting"):
        assert topic in headings, topic


def test_dashboard_json_is_what_the_generator_builds_and_has_the_panels() -> None:
    assert dashboard.main(["--check"]) == 0
    doc = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in doc["panels"]}
    for t in ("Request rate", "Latency p50 / p95 / p99", "Responses by backend status",
              "Error ratio by backend", "Backend health", "Backend latency p95",
              "Routing decisions", "Usage records", "Spool size", "Spool age",
              "Rate-limit denials", "Rate-limit remaining", "Budget and quota denials",
              "Budget remaining",
              "Router overhead p50 / p99", "Time to first token p50 / p95",
              "Streams interrupted"):
        assert t in titles, t
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert doc["__inputs"][0]["pluginId"] == "prometheus"
    for p in doc["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
