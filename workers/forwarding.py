"""Forward one request: try the chosen backend, fail over to the next candidates, map errors.

Whether an attempt failed over, counts against its backend, or ends the request is decided by
the one outcome classifier (apirouter.outcomes), for every endpoint alike. Failover happens
only while nothing has reached the client: a buffered response is complete before anything is
sent, and a stream is held (workers.streaming) until its status and first event are in.
Foreign exceptions of the upstream client become catalog errors here, at the boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from random import random
from time import perf_counter
from typing import Any

from apirouter.errors import RouterError
from apirouter.outcomes import OUTCOME_BY_STATUS, Outcome, classify_failure, classify_status
from apirouter.routing import Decision, NoBackend, choose, failover_order
from apirouter.stats import WorkerStats
from apirouter.table import Route
from apirouter.validation import with_model
from workers.metric_values import observer
from workers.metrics import DECISION_LATENCY, FAILOVERS
from workers.table_view import BackendTarget, TableView
from workers.upstream import (
    PendingExchange,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamStale,
    UpstreamTimeout,
)

log = logging.getLogger("apirouter.worker")


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
    decision_type: str = ""  # decision.value (_DECISION_TYPE: an enum's value is a property)


# One attempt: (target, request bytes, deadline) -> (response, held stream or None).
Attempt = Callable[[BackendTarget, bytes, float], Coroutine[Any, Any, tuple[UpstreamResponse, Any]]]


# decision -> decision.value: an enum's value is a property (~0.15 µs); a str-keyed lookup ~0.02.
_DECISION_TYPE = {d: d.value for d in Decision}

# DECISION_LATENCY.observe without the library's Python loop over the buckets (metric_values).
_observe_decision = observer(DECISION_LATENCY)


def resolve_route(view: TableView, model: str) -> Route:
    route = view.table.routes.get(model)
    if route is None:
        raise RouterError("MODEL_NOT_FOUND", f"model '{model}' is not routed by this router",
                          field="model")
    return route


def _attempt_error(e: UpstreamConnectError | UpstreamTimeout | UpstreamProtocolError,
                   backend_id: str) -> RouterError:
    """The catalog error of an attempt the upstream client failed."""
    code = ("BACKEND_TIMEOUT" if isinstance(e, UpstreamTimeout) else
            "BACKEND_UNAVAILABLE" if isinstance(e, UpstreamConnectError) else "BACKEND_ERROR")
    return RouterError(code, details=f"backend {backend_id}: {e}")


class Forwarding(Forwarded):
    """One request's attempts, driven by callbacks: the chosen backend, then the failover
    candidates, until an attempt ends the request; then ``then(forwarding, None)``, or
    ``then(None, error)`` for a failure of ours. ``then`` is called once, unless ``cancel``
    came first.

    A Forwarding is its own outcome: the Forwarded it hands to ``then`` is itself, its fields
    those of the last attempt (a Forwarded made at the end was one more object and a call of
    ten stores a request). ``then`` is dropped as it is called: held by the request's context
    (``ctx.fwd``), it would close a reference cycle through the request's handle. Equality,
    hashing and repr are an object's own, not a dataclass's field by field.

    A buffered attempt on an idle keep-alive connection runs on the connection's callbacks
    (BackendPool.start): no future, no task, no coroutine. Against the coroutines it
    replaced (forward -> exchange -> a future, and the lean server's connection task woken
    twice a request), ``python -m bench.overhead``, 4 alternating runs each: router CPU per
    request at c=32 58.0 → 53.9 µs, at c=1 165 → 154 µs (added p50 0.148 → 0.134 ms). Any other
    attempt — a stream (``attempt``: workers.streaming.hold), no idle connection (the pool
    waits for one or connects), a reused connection found closed (retried once on a fresh
    one) — runs as a task whose end continues the same way.
    """

    __slots__ = ("view", "route", "path", "body", "request_id", "loop", "stats", "then",
                 "attempt", "trace", "meanwhile", "deadline", "target", "data", "until",
                 "started", "span", "pending", "retried", "tried", "order")

    __eq__ = object.__eq__
    __hash__ = object.__hash__
    __repr__ = object.__repr__  # (a dataclass's would read fields not set before the end)

    # Set by the attempts (_send, _failed_over), not by __init__:
    deadline: float
    target: BackendTarget
    data: bytes
    until: float
    started: float
    span: Any
    pending: PendingExchange | asyncio.Task[tuple[UpstreamResponse, Any]] | None
    tried: list[str]
    order: list[tuple[str, str]]

    def __init__(self, view: TableView, route: Route, path: str, body: bytes, request_id: str,
                 loop: asyncio.AbstractEventLoop, stats: WorkerStats | None,
                 then: Callable[[Forwarded | None, BaseException | None], None],
                 attempt: Attempt | None = None, trace: tuple[Any, Any] | None = None,
                 meanwhile: Callable[[], object] | None = None) -> None:
        """``trace``: (workers.tracing.Tracing, the request's span) when tracing is on.
        ``meanwhile``: work for the wait on the backend, first attempt only (see
        BackendPool.exchange)."""
        # Only what the first attempt's success reads before it sets it: the failover state
        # (tried, order) is made by the first failover, the attempt's own by _send.
        self.view = view
        self.route = route
        self.path = path
        self.body = body
        self.request_id = request_id
        self.loop = loop
        self.stats = stats
        # None once called (or cancelled): the request has ended.
        self.then: Callable[[Forwarded | None, BaseException | None], None] | None = then
        self.attempt = attempt
        self.trace = trace
        self.meanwhile = meanwhile
        self.attempts = 0
        self.backend_s = 0.0
        self.retried = False  # the attempt in flight's connection was stale once already

    def start(self) -> None:
        """Choose the backend and send the first attempt. Raises NO_BACKEND_AVAILABLE when
        nothing can be tried (then is not called)."""
        table = self.view.table
        now = self.loop.time()
        self.deadline = now + table.limits.request_timeout_s
        stats = self.stats
        decided = perf_counter()
        try:
            backend_id, self.decision = choose(
                table, self.route, random(), stats.inflight if stats else None,
                stats.latency_ms if stats else None)
        except NoBackend:
            raise RouterError("NO_BACKEND_AVAILABLE",
                              f"no backend may serve model '{self.route.model}' now") from None
        if not int(decided * 1e6) & 7:  # a sampled histogram: about 1 decision in 8
            _observe_decision(perf_counter() - decided)
        self._send(now, backend_id, None, self.meanwhile)

    def cancel(self) -> bool:
        """The client hung up: end the attempt in flight (its connection closes, as its answer
        will never be read), with no verdict on the backend; ``then`` is not called. False if
        it had ended already."""
        if self.then is None:
            return False
        self.then = None
        pending, self.pending = self.pending, None
        if isinstance(pending, asyncio.Future):  # a task
            pending.cancel()
        elif pending is not None:
            self.target.pool.cancel(pending)
        if self.stats:
            self.stats.abandon(self.target.backend.index)
        if self.trace is not None:
            self.trace[0].attempt_done(self.span, None, "CLIENT_DISCONNECTED")
        return True

    # -- one attempt ---------------------------------------------------------------------------

    def _send(self, now: float, backend_id: str, model: str | None,
              meanwhile: Callable[[], object] | None) -> None:
        """Send an attempt to ``backend_id`` for ``model`` (None: the request's own, its body
        as it came), ``now`` the loop's time, taken by the caller. ``meanwhile``: the first
        attempt's (see BackendPool.exchange)."""
        self.backend_id = backend_id
        target = self.target = self.view.targets[backend_id]
        send = self.body if model is None else with_model(self.body, model)
        stats = self.stats
        if stats:
            stats.inflight[target.backend.index] += 1  # (WorkerStats.begin, inline: a call less)
        extra = b""
        if self.trace is not None:
            tracing, parent = self.trace
            b = target.backend
            self.span, extra = tracing.attempt(parent, self.path, backend_id, b.host, b.port,
                                               model or self.route.model)
        self.started = perf_counter()
        # The request: the target's rendered head for the path (its dict read here, not
        # through BackendTarget.head, once rendered), ``extra`` header lines, then the
        # request's own lines formatted as one str and encoded once (two encodes and a str()
        # before, in a function of their own: a call less).
        path = self.path
        data = self.data = b"".join((
            target.heads.get(path) or target.head(path), extra,
            f"X-Request-ID: {self.request_id}\r\nContent-Length: {len(send)}\r\n\r\n"
            .encode("latin-1"), send))
        # The attempt's own timeout within the request's deadline (min(), without its C call).
        until = now + target.timeout_s
        until = self.until = until if until < self.deadline else self.deadline
        if self.attempt is None:
            conn = self.pending = target.pool.start(data, until, self._attempted)
            if conn is not None:
                if meanwhile is not None:  # (workers.upstream.do_meanwhile, inline: a call less)
                    try:
                        meanwhile()
                    except Exception:
                        log.exception("work done while a backend answers failed")
                return
            self._run(target.pool.exchange(data, until, False, meanwhile))
        else:
            self._run(self.attempt(target, data, until))

    def _run(self, attempt: Coroutine[Any, Any, tuple[UpstreamResponse, Any]]) -> None:
        task = self.pending = self.loop.create_task(attempt)
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[tuple[UpstreamResponse, Any]]) -> None:
        if task is not self.pending:  # cancelled meanwhile (the client hung up)
            if not task.cancelled() and task.exception() is None:
                held = task.result()[1]
                if held is not None:  # a stream's head came as we were cancelled
                    held.body.close()
            return
        if task.cancelled():  # not by us: the worker is stopping
            self._end(RuntimeError("the backend attempt was cancelled"))
            return
        exc = task.exception()
        if exc is None:
            resp, held = task.result()
            self._attempted(resp, None, held)
        else:
            self._attempted(None, exc, None)

    def _attempted(self, resp: UpstreamResponse | None, exc: BaseException | None,
                   held: Any = None) -> None:
        """An attempt ended: end the request with its outcome, or try the next candidate.
        Also the callback of a buffered attempt on an idle connection (BackendPool.start):
        one call less a request than a callback of its own in front of this one.

        (``pending``, the attempt's connection or task, is not cleared here: whatever follows
        sets it again, or ends the request, after which ``cancel`` no longer reads it.)"""
        try:
            error: RouterError | None = None
            if exc is None:
                if resp is not None:
                    # (classify_status, its table read inline: a call less a request)
                    outcome = OUTCOME_BY_STATUS.get(resp.status) or classify_status(resp.status)
                else:
                    outcome = classify_failure("BACKEND_ERROR")
            elif isinstance(exc, UpstreamStale) and not self.retried:
                # The backend had closed the idle connection and never saw the request: once
                # more, on a fresh connection (the pool connects in a task). (Only
                # BackendPool.start's exchanges fail with UpstreamStale: ``exchange`` retries by
                # itself.)
                self.retried = True
                self._run(self.target.pool.exchange(self.data, self.until, False, None, False))
                return
            elif isinstance(exc, (UpstreamTimeout, UpstreamConnectError, UpstreamProtocolError)):
                error = _attempt_error(exc, self.backend_id)
                outcome = classify_failure(error.code)
            else:
                raise exc  # a failure of ours
            took = perf_counter() - self.started
            self.backend_s += took
            self.attempts += 1
            if self.trace is not None:
                self.trace[0].attempt_done(self.span, resp.status if resp is not None else None,
                                           None if outcome.success else outcome.error_code)
            stats = self.stats
            if stats and held is None:  # a held stream ends its attempt when relayed
                stats.end(self.target.backend.index, not outcome.backend_fault, took * 1000)
            if outcome.failover and self._failed_over(resp, error):
                return
            self.response = resp
            self.error = error
            self.outcome = outcome
            self.exchange = held
            self.decision_type = _DECISION_TYPE[self.decision]
        except Exception as e:
            self._end(e)
            return
        then = self.then
        if then is not None:  # (_end, inline: the common ending)
            self.then = None
            then(self, None)

    def _failed_over(self, resp: UpstreamResponse | None, error: RouterError | None) -> bool:
        """The attempt that just ended fails over: send the next candidate, if there is one
        and time and attempts are left (True), else the request ends with this attempt."""
        table = self.view.table
        now = self.loop.time()
        if self.attempts >= table.limits.max_attempts or now >= self.deadline:
            return False
        if self.attempts == 1:  # the first failover: the candidates, best first
            tried = self.tried = [self.backend_id]
            self.order = failover_order(table, self.route, tried)
        else:
            tried = self.tried
            tried.append(self.backend_id)
        nxt = next(((b, m) for b, m in self.order if b not in tried), None)
        if nxt is None:
            return False
        reason = error.code if error is not None else f"status_{resp.status if resp else 0}"
        FAILOVERS.labels(self.route.model, self.backend_id, reason).inc()
        backend_id, model = nxt
        self.decision = Decision.FAILOVER
        self.retried = False  # each attempt's connection may be stale once
        self._send(now, backend_id, None if model == self.route.model else model, None)
        return True

    def _end(self, exc: BaseException) -> None:
        """End the request with a failure of ours (once)."""
        then = self.then
        if then is None:
            return
        self.then = None
        then(None, exc)


async def forward(view: TableView, route: Route, path: str, body: bytes, request_id: str,
                  loop: asyncio.AbstractEventLoop, stats: WorkerStats | None,
                  attempt: Attempt | None = None, trace: tuple[Any, Any] | None = None,
                  meanwhile: Callable[[], object] | None = None) -> Forwarded:
    """Forwarding, awaited (the pipeline's coroutine path: Redis admission, streams, traced
    requests, the aiohttp server); cancelling the caller cancels the attempt in flight."""
    done: asyncio.Future[Forwarded] = loop.create_future()

    def then(fwd: Forwarded | None, exc: BaseException | None) -> None:
        if not done.done():
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(fwd)  # type: ignore[arg-type]

    forwarding = Forwarding(view, route, path, body, request_id, loop, stats, then, attempt,
                            trace, meanwhile)
    forwarding.start()
    try:
        return await done
    except asyncio.CancelledError:
        if not forwarding.cancel() and not done.cancelled() and done.exception() is None:
            # Cancelled after the attempts ended, before this task woke up to take the
            # result: a stream held for the client nobody will relay to now.
            held = done.result().exchange
            if held is not None:
                held.body.close()  # not complete: its connection closes
                if stats:
                    stats.abandon(held.target.backend.index)
        raise
