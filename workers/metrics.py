"""Prometheus metrics of the data plane (multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set).

The supervisor gives every worker pool a fresh multiprocess directory; gunicorn's child_exit
hook marks dead workers. Label children are cached so the hot path does one dict lookup and
one mmap write per metric.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

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

from apirouter.errors import CATALOG
from apirouter.routing import Decision
from apirouter.table import RoutingTable
from workers import metric_values

metric_values.install()  # before the first metric below is created

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
WORKER_EXITS = Counter("router_worker_exits_total",
                       "Worker processes that exited (crashes, kills, scale-down); gunicorn "
                       "starts a replacement unless the pool shrank")
TIME_TO_FIRST_TOKEN = Histogram(
    "router_time_to_first_token_seconds",
    "Streams: time from the request to the first event the client got, by backend",
    ["backend_id"],
    buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
STREAMS_INTERRUPTED = Counter(
    "router_streams_interrupted_total",
    "Streams that broke off after their first byte (cut, idle timeout, no [DONE]), by backend",
    ["backend_id", "reason"])
TABLE_GENERATION = Gauge("router_table_generation", "Routing-table generation in use",
                         multiprocess_mode="livemax")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Label values known before any traffic, so every series an alert or a dashboard reads exists
# from start-up at zero (a counter that appears with its first event makes rate() miss it and
# "absent" look like "fine"). Kept beside the code that produces them.
FAILOVER_REASONS = ("BACKEND_UNAVAILABLE", "BACKEND_TIMEOUT", "BACKEND_ERROR", "status_429",
                    "status_500", "status_502", "status_503", "status_504")
DENIAL_REASONS = ("UNAUTHORIZED", "INVALID_API_KEY", "FORBIDDEN", "rate_limit_key_rpm",
                  "rate_limit_key_tpm", "rate_limit_org_rpm", "rate_limit_org_tpm",
                  "budget_exceeded_spend", "quota_exceeded_tokens", "quota_exceeded_requests")
# Why a started stream ended early (workers.streaming); client_disconnected is not counted
# against a backend and not here.
INTERRUPTIONS = ("cut", "idle_timeout", "no_done", "event_too_large")
AUDIT_OUTCOMES = ("found", "not_found", "not_modified")
STREAM_INTERRUPTIONS = ("no_done", "idle_timeout", "cut", "event_too_large")  # workers.streaming
FAILURE_POLICIES = ("open", "closed")


def preregister(table: RoutingTable) -> None:
    """Create (at zero) the label children a routing table makes possible. Idempotent."""
    for code in CATALOG:
        ERRORS.labels(code)
    for reason in DENIAL_REASONS:
        DENIALS.labels(reason)
    for outcome in AUDIT_OUTCOMES:
        AUDIT_LOOKUPS.labels(outcome)
    for policy in FAILURE_POLICIES:
        ADMISSION_DEGRADED.labels(policy)
    for bid in table.backends:
        BACKEND_LATENCY.labels(bid)
        TIME_TO_FIRST_TOKEN.labels(bid)
        for interruption in STREAM_INTERRUPTIONS:
            STREAMS_INTERRUPTED.labels(bid, interruption)
        TIME_TO_FIRST_TOKEN.labels(bid)
        for reason in INTERRUPTIONS:
            STREAMS_INTERRUPTED.labels(bid, reason)
        for decision in Decision:
            for success in ("true", "false"):
                REQUESTS.labels(bid, decision.value, success)
    for route in table.routes.values():
        for bid in route.backend_ids:
            REQUESTS_BY_BACKEND.labels(bid, route.model, "200")
            for reason in FAILOVER_REASONS:
                FAILOVERS.labels(route.model, bid, reason)


_K = TypeVar("_K")

# What routed() counts of one request: backend_id, decision, success, model, backend status,
# backend_s, overhead_s.
Routed = tuple[str, str, bool, str, int, float, float]


class RequestMetrics:
    """Cached label children: `labels()` costs microseconds, a dict hit costs nanoseconds."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, bool], Callable[[float], None]] = {}
        self._by_backend: dict[tuple[str, str, int], Callable[[float], None]] = {}
        self._latency: dict[str, Callable[[float], None]] = {}
        self._latency_all: dict[str, Callable[[Sequence[float]], None]] = {}
        self._errors: dict[str, Counter] = {}
        self._overhead = metric_values.observer(OVERHEAD)
        self._overhead_all = metric_values.many_observer(OVERHEAD)

    def routed(self, backend_id: str, decision: str, success: bool, model: str, status: int,
               backend_s: float, overhead_s: float) -> None:
        key = (backend_id, decision, success)
        (self._requests.get(key) or self._requests_series(key))(1)
        bkey = (backend_id, model, status)
        (self._by_backend.get(bkey) or self._by_backend_series(bkey))(1)
        (self._latency.get(backend_id) or self._latency_series(backend_id))(backend_s)
        self._overhead(overhead_s)

    def routed_together(self, rows: list[Routed]) -> None:
        """``routed`` for the requests of one event-loop turn: each series is written once, with
        the turn's count (at c=32 a turn ends ~10 requests; the metric files' writes were most
        of routed's cost).

        The rows are taken apart into columns by C (zip), and a column that holds one value
        throughout (the common case: one backend answering 200 to all of them) is found so by
        C too (tuple.count): a label set is then counted without a loop. With many_observer's
        bisections, against a loop over the rows and the observations: 12 rows a turn, six
        metric writes, medians of 5 alternating micro-runs, 921 → 493 ns a request (the
        turn's overheads in one bucket), 1147 → 653 (spread over three)."""
        n = len(rows)
        if n <= 1:
            if rows:
                self.routed(*rows[0])
            return
        ids, decisions, successes, models, statuses, backend_s, overhead_s = zip(
            *rows, strict=True)
        one_backend = ids.count(ids[0]) == n
        if one_backend and decisions.count(decisions[0]) == n and \
                successes.count(successes[0]) == n:
            key = (ids[0], decisions[0], successes[0])
            (self._requests.get(key) or self._requests_series(key))(n)
        else:
            for key, count in _counted(zip(ids, decisions, successes, strict=True)):
                (self._requests.get(key) or self._requests_series(key))(count)
        if one_backend and models.count(models[0]) == n and statuses.count(statuses[0]) == n:
            bkey = (ids[0], models[0], statuses[0])
            (self._by_backend.get(bkey) or self._by_backend_series(bkey))(n)
        else:
            for bkey, count in _counted(zip(ids, models, statuses, strict=True)):
                (self._by_backend.get(bkey) or self._by_backend_series(bkey))(count)
        if one_backend:
            (self._latency_all.get(ids[0]) or self._latency_all_series(ids[0]))(backend_s)
        else:
            latency: dict[str, list[float]] = {}
            for backend_id, took in zip(ids, backend_s, strict=True):
                got = latency.get(backend_id)
                if got is None:
                    latency[backend_id] = [took]
                else:
                    got.append(took)
            for backend_id, tooks in latency.items():
                (self._latency_all.get(backend_id) or self._latency_all_series(backend_id))(
                    tooks)
        self._overhead_all(overhead_s)

    def _requests_series(self, key: tuple[str, str, bool]) -> Callable[[float], None]:
        backend_id, decision, success = key
        inc = self._requests[key] = metric_values.incrementer(
            REQUESTS.labels(backend_id, decision, "true" if success else "false"))
        return inc

    def _by_backend_series(self, key: tuple[str, str, int]) -> Callable[[float], None]:
        backend_id, model, status = key
        inc = self._by_backend[key] = metric_values.incrementer(
            REQUESTS_BY_BACKEND.labels(backend_id, model, str(status)))
        return inc

    def _latency_all_series(self, backend_id: str) -> Callable[[Sequence[float]], None]:
        observe_all = self._latency_all[backend_id] = metric_values.many_observer(
            BACKEND_LATENCY.labels(backend_id))
        return observe_all

    def _latency_series(self, backend_id: str) -> Callable[[float], None]:
        observe = self._latency[backend_id] = metric_values.observer(
            BACKEND_LATENCY.labels(backend_id))
        return observe

    def denied(self, reason: str) -> None:
        DENIALS.labels(reason).inc()

    def error(self, code: str) -> None:
        c = self._errors.get(code)
        if c is None:
            c = self._errors[code] = ERRORS.labels(code)
        c.inc()


def _counted(keys: Iterable[_K]) -> Iterable[tuple[_K, int]]:
    """Each distinct key with how often it came, in the order first seen."""
    counts: dict[_K, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return counts.items()


# What this process holds back before writing its metrics (workers.accounting waits up to a few
# milliseconds to count several requests at once): written first when this worker is scraped.
# Weakly: a pipeline gone (tests make many) takes its flush with it.
_BEFORE_EXPOSITION: list[weakref.WeakMethod[Callable[[], None]]] = []


def before_exposition(flush: Callable[[], None]) -> None:
    """Have ``flush`` (a bound method) called whenever this process's metrics are exposed."""
    _BEFORE_EXPOSITION.append(weakref.WeakMethod(flush))


def exposition() -> bytes:
    """All workers' metrics, aggregated, in the text format (this worker's waiting counts
    written first)."""
    for ref in list(_BEFORE_EXPOSITION):
        flush = ref()
        if flush is None:
            _BEFORE_EXPOSITION.remove(ref)
        else:
            flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
