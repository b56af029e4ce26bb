"""Prometheus metrics of the data plane (multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set).

The supervisor gives every worker pool a fresh multiprocess directory; gunicorn's child_exit
hook marks dead workers. Label children are cached so the hot path does one dict lookup and
one mmap write per metric.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

REQUESTS = Counter("router_requests_total", "Requests routed, by outcome",
                   ["backend_id", "decision_type", "success"])
REQUESTS_BY_BACKEND = Counter("router_requests_by_backend_total",
                              "Backend responses by backend, model and HTTP status",
                              ["backend_id", "model", "status_code"])
BACKEND_LATENCY = Histogram(
    "router_backend_latency_seconds", "Time from sending to a backend to its complete response",
    ["backend_id"],
    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
OVERHEAD = Histogram(
    "router_overhead_seconds", "Time spent in the router itself (total minus backend)",
    buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1))
ERRORS = Counter("router_errors_total", "Error responses by catalog code", ["error_code"])
DENIALS = Counter("router_denials_total",
                  "Requests refused by authentication or admission, by reason", ["reason"])
FAILOVERS = Counter("router_failover_total", "Attempts that failed over to another backend",
                    ["model", "from_backend", "reason"])
DECISION_LATENCY = Histogram(
    "router_decision_latency_seconds", "Time to choose the first backend of a request",
    buckets=(.000005, .00001, .000025, .00005, .0001, .00025, .0005, .001, .005))
ADMISSION_LATENCY = Histogram(
    "router_admission_latency_seconds", "Time to decide admission (Redis round trip included)",
    buckets=(.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025))
ADMISSION_DEGRADED = Counter("router_admission_degraded_total",
                             "Decisions made by the failure policy because Redis did not answer",
                             ["policy"])
USAGE_OVERFLOW = Counter("router_usage_ring_overflow_total",
                         "Usage records written to an overflow file because the ring was full")
USAGE_LOST = Counter("router_usage_records_lost_total",
                     "Usage records lost: ring full and the overflow file not writable")
AUDIT_LOOKUPS = Counter("router_audit_lookups_total", "Audit lookups by outcome", ["outcome"])
TABLE_GENERATION = Gauge("router_table_generation", "Routing-table generation in use",
                         multiprocess_mode="livemax")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RequestMetrics:
    """Cached label children: `labels()` costs microseconds, a dict hit costs nanoseconds."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str], Counter] = {}
        self._by_backend: dict[tuple[str, str, int], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self._errors: dict[str, Counter] = {}

    def routed(self, backend_id: str, decision: str, success: bool, model: str, status: int,
               backend_s: float, overhead_s: float) -> None:
        key = (backend_id, decision, "true" if success else "false")
        c = self._requests.get(key)
        if c is None:
            c = self._requests[key] = REQUESTS.labels(*key)
        c.inc()
        bkey = (backend_id, model, status)
        b = self._by_backend.get(bkey)
        if b is None:
            b = self._by_backend[bkey] = REQUESTS_BY_BACKEND.labels(backend_id, model, str(status))
        b.inc()
        h = self._latency.get(backend_id)
        if h is None:
            h = self._latency[backend_id] = BACKEND_LATENCY.labels(backend_id)
        h.observe(backend_s)
        OVERHEAD.observe(overhead_s)

    def denied(self, reason: str) -> None:
        DENIALS.labels(reason).inc()

    def error(self, code: str) -> None:
        c = self._errors.get(code)
        if c is None:
            c = self._errors[code] = ERRORS.labels(code)
        c.inc()


def exposition() -> bytes:
    """All workers' metrics, aggregated, in the text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
