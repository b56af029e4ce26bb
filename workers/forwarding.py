"""Forward one request: try the chosen backend, fail over to the next candidates, map errors.

Whether an attempt failed over, counts against its backend, or ends the request is decided by
the one outcome classifier (apirouter.outcomes), for every endpoint alike. Failover happens
only while nothing has reached the client: a buffered response is complete before anything is
sent, and a stream is held (workers.streaming) until its status and first event are in.
Foreign exceptions of the upstream client become catalog errors here, at the boundary.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from apirouter.errors import RouterError
from apirouter.outcomes import Outcome, classify_failure, classify_status
from apirouter.routing import Decision, NoBackend, choose, failover_order
from apirouter.stats import WorkerStats
from apirouter.table import Route
from apirouter.validation import with_model
from workers.metrics import DECISION_LATENCY, FAILOVERS
from workers.table_view import BackendTarget, TableView
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
    outcome: Outcome
    exchange: Any = None  # a held stream (workers.streaming), when the attempt streams
    decision_type: str = ""  # decision.value, read once (an enum's value is a property)


# One attempt: (target, request bytes, deadline) -> (response, held stream or None).
Attempt = Callable[[BackendTarget, bytes, float], Awaitable[tuple[UpstreamResponse, Any]]]


def resolve_route(view: TableView, model: str) -> Route:
    route = view.table.routes.get(model)
    if route is None:
        raise RouterError("MODEL_NOT_FOUND", f"model '{model}' is not routed by this router",
                          field="model")
    return route


def request_bytes(target: BackendTarget, path: str, body: bytes, request_id: str,
                  extra: bytes = b"") -> bytes:
    return b"".join((target.head(path), extra, b"X-Request-ID: ", request_id.encode("latin-1"),
                     b"\r\nContent-Length: ", str(len(body)).encode("latin-1"), b"\r\n\r\n",
                     body))


def _attempt_error(e: UpstreamConnectError | UpstreamTimeout | UpstreamProtocolError,
                   backend_id: str) -> RouterError:
    """The catalog error of an attempt the upstream client failed."""
    code = ("BACKEND_TIMEOUT" if isinstance(e, UpstreamTimeout) else
            "BACKEND_UNAVAILABLE" if isinstance(e, UpstreamConnectError) else "BACKEND_ERROR")
    return RouterError(code, details=f"backend {backend_id}: {e}")


async def forward(view: TableView, route: Route, path: str, body: bytes, request_id: str,
                  loop: asyncio.AbstractEventLoop, stats: WorkerStats | None,
                  attempt: Attempt | None = None, trace: tuple[Any, Any] | None = None,
                  meanwhile: Callable[[], object] | None = None) -> Forwarded:
    """``trace``: (workers.tracing.Tracing, the request's span) when tracing is on.
    ``meanwhile``: work for the wait on the backend (BackendPool.exchange), first attempt
    only."""
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
        target = view.targets[backend_id]
        index = target.backend.index
        send = body if model == route.model else with_model(body, model)
        if stats:
            stats.begin(index)
        extra, span, tracing = b"", None, None
        if trace is not None:
            tracing, parent = trace
            b = target.backend
            span, extra = tracing.attempt(parent, path, backend_id, b.host, b.port, model)
        started = time.perf_counter()
        data = request_bytes(target, path, send, request_id, extra)
        until = min(deadline, loop.time() + target.timeout_s)
        resp: UpstreamResponse | None = None
        held: Any = None
        error: RouterError | None = None
        try:  # awaited here, not through a coroutine of its own: ~0.5 µs a request
            if attempt is None:  # buffered: the complete response
                work, meanwhile = meanwhile, None
                resp = (await target.pool.exchange(data, until, False, work))[0]
            else:
                resp, held = await attempt(target, data, until)
        except (UpstreamTimeout, UpstreamConnectError, UpstreamProtocolError) as e:
            error = _attempt_error(e, backend_id)
        except asyncio.CancelledError:  # the client hung up: no verdict on the backend
            if stats:
                stats.abandon(index)
            if tracing is not None:
                tracing.attempt_done(span, None, "CLIENT_DISCONNECTED")
            raise
        took = time.perf_counter() - started
        total_s += took
        outcome = classify_failure(error.code) if error is not None else (
            classify_status(resp.status) if resp is not None else classify_failure("BACKEND_ERROR"))
        if tracing is not None:
            tracing.attempt_done(span, resp.status if resp is not None else None,
                                 None if outcome.success else outcome.error_code)
        if stats and held is None:  # a held stream ends its attempt when it is relayed
            stats.end(index, not outcome.backend_fault, took * 1000)
        tried.append(backend_id)
        if (not outcome.failover or len(tried) >= table.limits.max_attempts
                or loop.time() >= deadline):
            return Forwarded(backend_id, decision, resp, error, total_s, len(tried), outcome,
                             held, decision.value)
        if order is None:
            order = failover_order(table, route, tried)
        nxt = next(((b, m) for b, m in order if b not in tried), None)
        if nxt is None:
            return Forwarded(backend_id, decision, resp, error, total_s, len(tried), outcome,
                             held, decision.value)
        reason = error.code if error is not None else f"status_{resp.status if resp else 0}"
        FAILOVERS.labels(route.model, backend_id, reason).inc()
        backend_id, model = nxt
        decision = Decision.FAILOVER
