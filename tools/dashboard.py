"""Builds the Grafana dashboard (deploy/helm/apirouter/files/dashboard.json) from one list of
panels, so the JSON stays reviewable here and every query is in one place for the drift test.

    python -m tools.dashboard            # rewrite the JSON
    python -m tools.dashboard --check    # exit 1 if the JSON is not what this builds

The JSON imports as is (Dashboards -> Import): it asks for a Prometheus data source
(``__inputs``) and offers a ``job`` variable (the chart's ServiceMonitor sets job="apirouter").
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "apirouter" / "files" / \
    "dashboard.json"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
J = 'job=~"$job"'
RI = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def q(quantile: float, metric: str, by: str = "") -> str:
    group = f"{by}, le" if by else "le"
    return (f"histogram_quantile({quantile}, sum by ({group}) "
            f"(rate({metric}_bucket{{{J}}}[{RI}])))")


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Traffic", (
        Panel("Request rate", (
            (f"sum(rate(router_requests_total{{{J}}}[{RI}]))", "routed"),
            (f"sum(rate(router_errors_total{{{J}}}[{RI}]))", "error responses"),
        ), "reqps", description="Requests routed to a backend, and error responses of any kind"),
        Panel("Latency p50 / p95 / p99", (
            (q(0.5, "router_backend_latency_seconds"), "p50"),
            (q(0.95, "router_backend_latency_seconds"), "p95"),
            (q(0.99, "router_backend_latency_seconds"), "p99"),
        ), "s", description="Backend latency (the alert fires at p95 > 3 s for 10 min)"),
        Panel("Time to first token p50 / p95", (
            (q(0.5, "router_time_to_first_token_seconds"), "p50"),
            (q(0.95, "router_time_to_first_token_seconds"), "p95"),
            (q(0.95, "router_time_to_first_token_seconds", "backend_id"), "p95 {{backend_id}}"),
        ), "s", description="Streams: from the request to the first event the client got"),
        Panel("Router overhead p50 / p99", (
            (q(0.5, "router_overhead_seconds"), "p50"),
            (q(0.99, "router_overhead_seconds"), "p99"),
            (q(0.99, "router_decision_latency_seconds"), "routing decision p99"),
        ), "s", description="Time in the router itself: total minus backend"),
    )),
    ("Errors", (
        Panel("Responses by backend status", (
            (f"sum by (status_code) (rate(router_requests_by_backend_total{{{J}}}[{RI}]))",
             "{{status_code}}"),
        ), "reqps", stack=True),
        Panel("Errors by code", (
            (f"sum by (error_code) (rate(router_errors_total{{{J}}}[{RI}]))", "{{error_code}}"),
        ), "reqps", stack=True),
        Panel("Streams interrupted", (
            (f"sum by (backend_id, reason) (rate(router_streams_interrupted_total{{{J}}}[{RI}]))"
             " * 60", "{{backend_id}} {{reason}}"),
        ), description="Per minute: streams that broke off after their first byte"),
        Panel("Error ratio by backend", (
            (f'sum by (backend_id) (rate(router_requests_total{{{J},success="false"}}[{RI}])) '
             f"/ sum by (backend_id) (rate(router_requests_total{{{J}}}[{RI}]))",
             "{{backend_id}}"),
        ), "percentunit"),
    )),
    ("Backends", (
        Panel("Backend health", (
            (f"max by (backend_id) (router_backend_health_status{{{J}}})", "{{backend_id}}"),
        ), kind="stat", description="1: takes traffic first-hand; 0: unhealthy or ejected",
            extra={"mappings": [{"type": "value", "options": {
                "0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}]}),
        Panel("Backend latency p95", (
            (q(0.95, "router_backend_latency_seconds", "backend_id"), "{{backend_id}}"),
        ), "s"),
        Panel("Ejections", (
            (f"sum by (backend_id) (increase(router_backend_ejections_total{{{J}}}[1h]))",
             "{{backend_id}}"),
        ), description="Outlier ejections in the last hour"),
    )),
    ("Routing", (
        Panel("Routing decisions", (
            (f"sum by (decision_type) (rate(router_requests_total{{{J}}}[{RI}]))",
             "{{decision_type}}"),
        ), "reqps", stack=True, description="PRIMARY, WEIGHTED, FAILOVER, OVERRIDE (pinned)"),
        Panel("Failovers by reason", (
            (f"sum by (from_backend, reason) (rate(router_failover_total{{{J}}}[{RI}])) * 60",
             "{{from_backend}} {{reason}}"),
        ), "short", description="Per minute (the alert fires above 10/min for 5 min)"),
        Panel("Table generation", (
            (f"max(router_table_published_generation{{{J}}})", "published"),
            (f"min(router_table_generation{{{J}}})", "oldest in a worker"),
            (f"sum(increase(router_config_rejections_total{{{J}}}[1h]))", "rejected (1h)"),
        ), kind="stat"),
    )),
    ("Usage accounting", (
        Panel("Usage records", (
            (f"sum(rate(router_usage_records_published_total{{{J}}}[{RI}]))", "published"),
            (f"sum(rate(router_usage_records_spooled_total{{{J}}}[{RI}]))", "spooled"),
            (f"sum(rate(router_usage_records_replayed_total{{{J}}}[{RI}]))", "replayed"),
            (f"sum(increase(router_usage_records_lost_total{{{J}}}[{RI}]))", "lost"),
        ), "short"),
        Panel("Spool size", (
            (f"max(router_usage_spool_records{{{J}}})", "records"),
        ), description="Records waiting for Kafka (the alert fires above 1000)"),
        Panel("Spool age", (
            (f"max(router_usage_spool_oldest_age_seconds{{{J}}})", "oldest record"),
        ), "s", description="Age of the oldest spooled record (the alert fires above 24 h)"),
        Panel("Sink and ring", (
            (f"min(router_usage_sink_up{{{J}}})", "sink up"),
            (f"max(router_usage_ring_fill_ratio{{{J}}})", "fullest ring"),
        ), "percentunit"),
    )),
    ("Rate limits and budgets", (
        Panel("Rate-limit denials", (
            (f'sum by (reason) (rate(router_denials_total{{{J},reason=~"rate_limit_.*"}}[{RI}]))'
             " * 60", "{{reason}}"),
        ), description="Per minute (the alert fires above 100/min for 5 min)"),
        Panel("Rate-limit remaining", (
            (f"min by (org, limit) (router_ratelimit_remaining_ratio{{{J}}})",
             "{{org}} {{limit}}"),
        ), "percentunit", description="Share of each org's burst available now (read at "
                                      "scrape time; 0: the org is being refused)"),
        Panel("Budget and quota denials", (
            (f"sum by (reason) (rate(router_denials_total{{{J},"
             f'reason=~"budget_exceeded_.*|quota_exceeded_.*"}}[{RI}])) * 60', "{{reason}}"),
        ), description="Per minute"),
        Panel("Budget remaining", (
            (f"min by (scope, dimension) (router_budget_remaining_ratio{{{J}}})",
             "{{scope}} {{dimension}}"),
        ), "percentunit", description="Share of each budget left this period (read from "
                                      "Redis at scrape time; GET /v1/admin/budgets has amounts)"),
        Panel("Admission", (
            (q(0.99, "router_admission_latency_seconds"), "decision p99"),
            (f"sum by (policy) (rate(router_admission_degraded_total{{{J}}}[{RI}]))",
             "decided by failure policy ({{policy}})"),
        ), "s"),
    )),
)


def _panel(p: Panel, pid: int, x: int, y: int, w: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.extra.get("mappings"):
        defaults["mappings"] = p.extra["mappings"]
    if p.kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if p.stack else "none"},
                              "fillOpacity": 20 if p.stack else 0}
    return {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description,
        "datasource": DS, "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if
        p.kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                     "legendFormat": legend} for i, (expr, legend) in enumerate(p.targets)],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        w = 24 // len(row)
        for i, p in enumerate(row):
            panels.append(_panel(p, pid, i * w, y, w))
            pid += 1
        y += 8
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus",
                        "version": "1.0.0"}],
        "uid": "apirouter-ops", "title": "apirouter", "tags": ["apirouter"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "utc",
        "templating": {"list": [{
            "name": "job", "label": "job", "type": "query", "datasource": DS,
            "query": {"query": "label_values(router_build_info, job)", "refId": "job"},
            "definition": "label_values(router_build_info, job)", "refresh": 2,
            "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"},
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in a dashboard, variables left in."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        if not OUT.exists() or OUT.read_text() != render():
            print(f"{OUT} is stale: run python -m tools.dashboard", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
