"""Forward one request: try the chosen backend, fail over to the next candidates, map errors.

Failover happens on a connect error, a timeout, a broken response or a retryable status, while
the request's deadline allows and ``max_attempts`` is not spent. (Responses are complete before
anything reaches the client, so nothing has been sent yet.) Foreign exceptions of the upstream
client become catalog errors here, at the boundary.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from apirouter.errors import RouterError
from apirouter.outcomes import should_failover
from apirouter.routing import Decision, NoBackend, choose, failover_order
from apirouter.stats import WorkerStats
from apirouter.table import Route
from apirouter.validation import with_model
from workers.metrics import DECISION_LATENCY, FAILOVERS
from workers.table_view import TableView
from workers.upstream import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)


@dataclass(slots=True)
class Forwarded:
    """The outcome of the last attempt: a response, or the catalog error it failed with."""

    backend_id: str
    decision: Decision
    response: UpstreamResponse | None
    error: RouterError | None
    backend_s: float
    attempts: int


def resolve_route(view: TableView, model: str) -> Route:
    route = view.table.routes.get(model)
    if route is None:
        raise RouterError("MODEL_NOT_FOUND", f"model '{model}' is not routed by this router",
                          field="model")
    return route


async def _attempt(view: TableView, backend_id: str, body: bytes, request_id: str,
                   deadline: float, loop: asyncio.AbstractEventLoop
                   ) -> tuple[UpstreamResponse | None, RouterError | None, float]:
    target = view.targets[backend_id]
    data = b"".join((target.chat_head, b"X-Request-ID: ", request_id.encode("latin-1"),
                     b"\r\nContent-Length: ", str(len(body)).encode("latin-1"), b"\r\n\r\n", body))
    started = time.perf_counter()
    try:
        resp = await target.pool.request(data, min(deadline, loop.time() + target.timeout_s))
        return resp, None, time.perf_counter() - started
    except UpstreamTimeout as e:
        error = RouterError("BACKEND_TIMEOUT", details=f"backend {backend_id}: {e}")
    except UpstreamConnectError as e:
        error = RouterError("BACKEND_UNAVAILABLE", details=f"backend {backend_id}: {e}")
    except UpstreamProtocolError as e:
        error = RouterError("BACKEND_ERROR", details=f"backend {backend_id}: {e}")
    return None, error, time.perf_counter() - started


async def forward_chat(view: TableView, route: Route, body: bytes, request_id: str,
                       loop: asyncio.AbstractEventLoop, stats: WorkerStats | None) -> Forwarded:
    table = view.table
    deadline = loop.time() + table.limits.request_timeout_s
    decided = time.perf_counter()
    try:
        backend_id, decision = choose(table, route, random.random(),
                                      stats.inflight if stats else None,
                                      stats.latency_ms if stats else None)
    except NoBackend:
        raise RouterError("NO_BACKEND_AVAILABLE",
                          f"no backend may serve model '{route.model}' now") from None
    if not int(decided * 1e6) & 7:  # a sampled histogram: about 1 decision in 8
        DECISION_LATENCY.observe(time.perf_counter() - decided)
    model = route.model
    tried: list[str] = []
    order: list[tuple[str, str]] | None = None
    total_s = 0.0
    while True:
        index = table.backends[backend_id].index
        send = body if model == route.model else with_model(body, model)
        if stats:
            stats.begin(index)
        resp, error, took = await _attempt(view, backend_id, send, request_id, deadline, loop)
        total_s += took
        failed = error is not None or (resp is not None and resp.status >= 500)
        if stats:
            stats.end(index, not failed, took * 1000)
        tried.append(backend_id)
        reason = error.code if error else (
            f"status_{resp.status}" if resp is not None and should_failover(resp.status)
            else None)
        if (reason is None or len(tried) >= table.limits.max_attempts
                or loop.time() >= deadline):
            return Forwarded(backend_id, decision, resp, error, total_s, len(tried))
        if order is None:
            order = failover_order(table, route, tried)
        nxt = next(((b, m) for b, m in order if b not in tried), None)
        if nxt is None:
            return Forwarded(backend_id, decision, resp, error, total_s, len(tried))
        FAILOVERS.labels(route.model, backend_id, reason).inc()
        backend_id, model = nxt
        decision = Decision.FAILOVER
