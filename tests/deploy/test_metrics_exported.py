"""Every metric the router declares is on /metrics from start-up, at zero until used: an alert
or a panel reading a series that only appears with its first event sees nothing, not zero."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from prometheus_client import Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import supervisor.metrics as supervisor_metrics
import workers.metrics as worker_metrics
from tests.harness import ROOT, MockBackend, Router, http_get, router_config, started


def declared() -> dict[str, MetricWrapperBase]:
    out = {}
    for module in (worker_metrics, supervisor_metrics):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                out[value._name] = value
    return out


def scrape(url: str) -> dict[str, Metric]:
    status, body = http_get(f"{url}/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


@pytest.fixture(scope="module")
def idle_router() -> Iterator[Router]:
    with ExitStack() as stack:
        mock = started(stack, MockBackend("a"))
        yield started(stack, Router(router_config(
            {"a": mock.url, "b": mock.url}, {"m1": {"a": 1}, "m2": {"a": 1, "b": 1}}),
            workers=2))


def test_every_declared_metric_is_exported_before_any_request(idle_router: Router) -> None:
    families = scrape(idle_router.url)
    names = declared()
    assert len(names) > 30
    missing = sorted(n for n in names if n not in families or not families[n].samples)
    assert missing == [], f"not exported at start-up: {missing}"


def test_the_pre_registered_interruptions_are_those_the_streaming_code_counts() -> None:
    source = (ROOT / "workers" / "streaming.py").read_text()
    counted = set(re.findall(r'interruption = "(\w+)"', source)) - {"client_disconnected"}
    assert counted and counted == set(worker_metrics.STREAM_INTERRUPTIONS)


def test_per_backend_and_per_model_series_exist_at_zero(idle_router: Router) -> None:
    families = scrape(idle_router.url)
    failover = {(s.labels["model"], s.labels["from_backend"]) for s in
                families["router_failover"].samples if s.name == "router_failover_total"}
    assert failover == {("m1", "a"), ("m2", "a"), ("m2", "b")}
    assert all(s.value == 0 for s in families["router_failover"].samples
               if s.name == "router_failover_total")
    decisions = {s.labels["decision_type"] for s in families["router_requests"].samples}
    assert decisions == {"PRIMARY", "WEIGHTED", "FAILOVER", "OVERRIDE"}
    assert {s.labels["backend_id"] for s in families["router_backend_ejections"].samples} == {
        "a", "b"}
    streams = {(s.labels["backend_id"], s.labels["reason"])
               for s in families["router_streams_interrupted"].samples}
    assert streams == {(b, r) for b in ("a", "b") for r in worker_metrics.STREAM_INTERRUPTIONS}
    build = families["router_build_info"].samples[0].labels
    assert build["version"] and build["git_commit"] and build["build_time"]
