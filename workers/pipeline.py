"""The one request pipeline both servers run: authenticate → parse → admit → route and forward →
shape the response → account.

A server adapter (workers.fast_server, or aiohttp in workers.app) takes the table view once,
reads the body under that view's limit, builds a RequestContext (``context``) and awaits
``run``. What differs between endpoints comes from their declaration (workers.endpoints); what
a backend's answer means comes from the one outcome classifier (apirouter.outcomes). Every
error is rendered here, through the catalog, in the endpoint's family.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from enum import Enum
from hmac import compare_digest
from typing import Any

import orjson

from apirouter.budgets import applicable, reservation
from apirouter.errors import CATALOG, RouterError, native_body, openai_body
from apirouter.keys import authenticate_hashed
from apirouter.limits import estimate_tokens, rate_limit_headers
from apirouter.outcomes import CLIENT_GONE, classify_failure
from apirouter.request_ids import RequestIds
from apirouter.signing import verify
from apirouter.stats import WorkerStats
from apirouter.validation import ProxyRequest
from workers.accounting import Accounting
from workers.admission import Admission, PendingAdmission, Ticket
from workers.context import JSON, Caller, Reply, RequestContext, Signed
from workers.endpoints import ENDPOINTS, Endpoint, ms
from workers.forwarding import Forwarded, Forwarding, forward, resolve_route
from workers.metrics import RequestMetrics
from workers.streaming import hold, relay
from workers.table_view import TableCache, TableView
from workers.tracing import Tracing
from workers.tracing import from_env as tracing_from_env
from workers.usage_out import UsageOut

log = logging.getLogger("apirouter.worker")
audit = logging.getLogger("apirouter.audit")

SIGNATURE_WINDOW_S = 300.0  # signed requests: allowed clock difference, either way
_OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/models")
_UNSIGNED = Signed("", "", None, None, None)


class _Decision(Enum):
    LATER = 0  # admit_now: the decision needs admit (a coroutine)


_LATER = _Decision.LATER
# How a server takes a request's answer: (reply, None) — None for a streamed one — or, when
# even the failure reply could not be made, (None, the error).
Answer = Callable[["Reply | None", "BaseException | None"], None]


class InFlight:
    """A request being forwarded on callbacks (Pipeline.serve), its admission perhaps awaited
    first in a task: its server's handle."""

    __slots__ = ("pipeline", "ctx", "answer", "forwarding", "task", "admitting")

    def __init__(self, pipeline: Pipeline, ctx: RequestContext, answer: Answer) -> None:
        self.pipeline = pipeline
        self.ctx = ctx
        self.answer = answer
        self.forwarding: Forwarding | None = None
        self.task: asyncio.Task[None] | None = None  # while its admission is awaited
        self.admitting: PendingAdmission | None = None  # while Redis decides, on callbacks

    def admitted(self, ticket: Ticket | None, exc: BaseException | None) -> None:
        """Redis's decision, on callbacks (Admission.admit_soon): forward, or answer the
        refusal."""
        p, ctx = self.pipeline, self.ctx
        self.admitting = None  # (done with: it need not live as long as the request)
        try:
            if exc is not None:
                raise exc
            assert ticket is not None
            if not ticket.verdict.allowed:  # (_admitted's check, without its call)
                p._admitted(ctx, ticket)  # (raises the refusal)
            ctx.ticket = ticket
            p._forward(self)
        except Exception as e:
            p.answer_failure(ctx, e, self.answer)

    def forwarded(self, fwd: Forwarded | None, exc: BaseException | None) -> None:
        p, ctx = self.pipeline, self.ctx
        self.forwarding = None  # (a reference cycle otherwise: its ``then`` is bound to us)
        try:
            if exc is not None:
                if isinstance(exc, RouterError):  # a failover that could not be sent
                    exc = p._unforwarded(ctx, exc)  # accounted, as forward()'s caller does
                raise exc
            assert fwd is not None
            reply = p.finish(ctx, fwd)
        except Exception as e:
            p.answer_failure(ctx, e, self.answer)
            return
        self.answer(reply, None)

    def cancel(self) -> None:
        """The client hung up: the admission awaited or the attempt in flight ends (the latter
        accounted as gone), and nothing is answered."""
        task, self.task = self.task, None
        if task is not None:  # its admission releases what it may have reserved
            task.cancel()
            self.pipeline.client_gone(self.ctx)
            return
        pending, self.admitting = self.admitting, None
        if pending is not None:  # as the task's
            pending.cancel()
            self.pipeline.client_gone(self.ctx)
            return
        f, self.forwarding = self.forwarding, None
        if f is not None and f.cancel():
            self.pipeline.client_gone(self.ctx)


class Pipeline:
    """The worker's shared services and the chain of steps every request runs through."""

    def __init__(self, tables: TableCache, stats: WorkerStats | None = None,
                 usage: UsageOut | None = None) -> None:
        self.tables = tables
        self.stats = stats
        self.usage = usage
        self.loop = asyncio.get_running_loop()
        self.admission = Admission(self.loop)
        self.ids = RequestIds()
        self.metrics = RequestMetrics()
        self.pid = os.getpid()
        self.accounts = Accounting(self.admission, self.metrics, usage, self.pid, self.loop)
        self.all = ENDPOINTS
        self.by_path = {e.path: e for e in self.all}
        self.tracing = tracing_from_env()  # None unless OTEL_* asks (after the fork: per worker)

    def max_body_bytes(self) -> int:
        """The body limit of the live table (for endpoints outside the pipeline: admin)."""
        return self.tables.current().table.limits.max_body_bytes

    def context(self, endpoint: Endpoint, view: TableView, request_id: str, body: bytes,
                key_sha256: str | None, signed: Signed | None,
                path_params: dict[str, str] | None = None,
                traceparent: str | None = None) -> RequestContext:
        return RequestContext(request_id, endpoint, view, body, key_sha256, signed, time.time(),
                              time.perf_counter(), path_params, traceparent=traceparent)

    async def run(self, ctx: RequestContext) -> Reply | None:
        """The reply to send, or None when the response was streamed through ``ctx.sink``."""
        ep = ctx.endpoint
        if self.tracing is not None and ep.local is None and ctx.span is None:
            return await self._traced(self.tracing, ctx)
        try:
            if ep.scope is not None:
                ctx.caller = self.authenticate(ctx, ep.scope)
            if ep.local is not None:
                reply = await ep.local(self, ctx)
                reply.headers.insert(0, ("X-Request-ID", ctx.request_id))
                return reply
            return await self.proxy(ctx)
        except Exception as e:
            return self.failure(ctx, e)

    def serve(self, ctx: RequestContext, answer: Answer) -> Reply | InFlight | asyncio.Task[None]:
        """``run`` for a server that takes its answer in a callback (workers.fast_server): the
        reply at once when the request ended without waiting (a refusal), else a handle whose
        ``cancel()`` says the client hung up, and ``answer(reply, None)`` once it is ready
        (None: it was streamed through ``ctx.sink``), unless cancelled first;
        ``answer(None, error)`` if even the failure reply could not be made (a bug of ours).

        A buffered request is forwarded on callbacks to its end (workers.forwarding.
        Forwarding): no task, no future; a Redis admission of buckets alone is sent at once
        and its reply taken on callbacks too (Admission.admit_soon, InFlight.admitted); any
        other that must wait (a budget, a nonce, Redis not connected yet) is awaited, in a
        task, first. A stream goes on in a task from its admission;
        traced requests and local endpoints run ``run`` in one from the start."""
        ep = ctx.endpoint
        if ep.local is not None or self.tracing is not None:
            return self._in_task(self.run, ctx, answer)
        try:
            if ep.scope is not None:
                ctx.caller = self.authenticate(ctx, ep.scope)
            # parse_route, inline (a call less a request): no span to tell, as tracing runs
            # every request through ``run``.
            assert ep.parse is not None
            req = ctx.request = ep.parse(ctx.body)
            route = ctx.view.table.routes.get(req.model)
            route = ctx.route = route if route is not None else resolve_route(ctx.view,
                                                                               req.model)
            if req.stream:  # (admitted in its task: a task cancelled unstarted holds nothing)
                return self._in_task(self.admit_and_forward, ctx, answer)
            inflight = InFlight(self, ctx, answer)
            ticket = self.admit_now(ctx, inflight)
            if ticket is _LATER:
                inflight.task = self.loop.create_task(self._admit_then_forward(inflight))
            elif isinstance(ticket, PendingAdmission):  # InFlight.admitted continues
                inflight.admitting = ticket
            else:
                ctx.ticket = ticket
                self._forward(inflight)
            return inflight
        except Exception as e:
            return self.failure(ctx, e)

    def _forward(self, inflight: InFlight) -> None:
        """Forward an admitted buffered request on callbacks: InFlight.forwarded continues."""
        ctx = inflight.ctx
        req, route, ticket = ctx.request, ctx.route, ctx.ticket
        assert req is not None and route is not None
        forwarding = inflight.forwarding = Forwarding(
            ctx.view, route, ctx.endpoint.upstream,
            req.upstream_body if req.upstream_body is not None else ctx.body,
            ctx.request_id, self.loop, self.stats, inflight.forwarded, None, None,
            None if ticket is None else ticket.rate_limit_headers)
        try:
            forwarding.start()
        except Exception as e:
            inflight.forwarding = None  # (a reference cycle otherwise)
            if isinstance(e, RouterError):  # nothing could be tried (no backend)
                raise self._unforwarded(ctx, e) from None
            raise

    async def _admit_then_forward(self, inflight: InFlight) -> None:
        """The admission ``admit_now`` could not take, awaited; then on callbacks."""
        ctx = inflight.ctx
        try:
            ctx.ticket = await self.admit(ctx)
            inflight.task = None
            self._forward(inflight)
        except Exception as e:
            inflight.task = None
            self.answer_failure(ctx, e, inflight.answer)

    def _in_task(self, step: Callable[[RequestContext], Coroutine[Any, Any, Reply | None]],
                 ctx: RequestContext, answer: Answer) -> asyncio.Task[None]:
        return self.loop.create_task(self._answering(step, ctx, answer))

    async def _answering(self, step: Callable[[RequestContext], Coroutine[Any, Any, Reply | None]],
                         ctx: RequestContext, answer: Answer) -> None:
        """``step(ctx)``'s reply to ``answer`` (from the task itself: a done callback would be
        one more handle on the loop); cancelled (the client hung up), nothing is answered."""
        try:
            reply = await step(ctx)
        except Exception as e:
            self.answer_failure(ctx, e, answer)
            return
        answer(reply, None)

    def answer_failure(self, ctx: RequestContext, e: Exception, answer: Answer) -> None:
        """Answer a request that raised ``e`` (on callbacks or in a task) with its failure
        reply; if even that raises (a bug of ours), hand the server the error, so the request
        still gets its one answer. The traceback goes once the reply is made: it refers to
        the frames of the callbacks that ran the request, which would otherwise stay alive in
        a cycle (exception, traceback, frame) until a collection."""
        try:
            reply = self.failure(ctx, e)
        except Exception as again:
            answer(None, again)
            return
        finally:
            e.__traceback__ = None
        answer(reply, None)

    def failure(self, ctx: RequestContext, e: BaseException) -> Reply:
        """The reply to a request that raised ``e``: its catalog error, or INTERNAL_ERROR for
        a failure of ours (logged, and accounted if the request was admitted)."""
        ep = ctx.endpoint
        if isinstance(e, RouterError):
            return self.error_reply(e, ctx.request_id, ep.openai)
        # The traceback names our code only; request bodies never reach the log.
        log.error("unhandled error serving %s %s (request %s)", ep.method, ep.path,
                  ctx.request_id, exc_info=e)
        err = RouterError("INTERNAL_ERROR")
        if ctx.ticket is not None and not ctx.accounted:
            # Admitted, then our own failure: record it and release the reservation, as for
            # any failed request (the client is not charged for our bug).
            ctx.outcome = classify_failure(err.code)
            ctx.total_s = time.perf_counter() - ctx.started
            err = self.accounts.failed(ctx, err)
        return self.error_reply(err, ctx.request_id, ep.openai)

    async def _traced(self, t: Tracing, ctx: RequestContext) -> Reply | None:
        """``run`` inside the request's span (tracing on, proxied endpoints); a stream's span
        ends with the stream."""
        span = ctx.span = t.start(ctx.endpoint.path, ctx.traceparent, ctx.request_id)
        status = 500
        try:
            reply = await self.run(ctx)
            status = reply.status if reply is not None else (
                499 if ctx.interruption == "client_disconnected" else 200)
            return reply
        finally:
            fwd, outcome = ctx.fwd, ctx.outcome
            t.finish(span, status, fwd.backend_id if fwd else None,
                     fwd.decision_type if fwd else None, fwd.attempts if fwd else 0,
                     ctx.route.model if ctx.route else None, ctx.used,
                     outcome.error_code if outcome is not None and not outcome.success
                     else None, ctx.ttft_s)

    # -- steps -----------------------------------------------------------------------------------

    def authenticate(self, ctx: RequestContext, scope: str) -> Caller | None:
        """The caller, or None when the table does not require auth."""
        table = ctx.view.table
        if not table.auth_required:
            return None
        try:
            # authenticate_hashed's success, inline (a call less a request): the key found by
            # its hash, compared in constant time, holding the scope; else it raises the error.
            digest = ctx.key_sha256
            if digest is None or (key := table.keys.get(digest)) is None or \
                    not compare_digest(key.sha256, digest) or scope not in key.scopes:
                key = authenticate_hashed(table.keys, digest, scope)
            if not key.hmac_required:
                return Caller(key)
            # None: the request carries no signature header (verify says which to send).
            signed = ctx.signed or _UNSIGNED
            return Caller(key, verify(key, signed.method, signed.path, ctx.body,
                                      signed.timestamp, signed.nonce, signed.signature,
                                      time.time(), SIGNATURE_WINDOW_S))
        except RouterError as e:
            self.metrics.denied(e.code)
            # The audit trail of a refusal: never the key itself, nor anything derived from it.
            audit.info("%s", orjson.dumps({"event": "auth.denied", "reason": e.code,
                                           "scope": scope}).decode())
            raise

    async def proxy(self, ctx: RequestContext) -> Reply | None:
        self.parse_route(ctx)
        return await self.admit_and_forward(ctx)

    async def admit_and_forward(self, ctx: RequestContext) -> Reply | None:
        """``proxy`` after ``parse_route``: admit, forward, reply (streams are relayed)."""
        ticket = self.admit_now(ctx)
        assert not isinstance(ticket, PendingAdmission)  # (only given an InFlight)
        return await self.proxy_admitted(ctx, ticket)

    def parse_route(self, ctx: RequestContext) -> ProxyRequest:
        ep = ctx.endpoint
        assert ep.parse is not None
        req = ctx.request = ep.parse(ctx.body)
        if ctx.span is not None:
            assert self.tracing is not None
            self.tracing.parsed(ctx.span, ep.path, req.model, req.max_tokens,
                                bool(getattr(req, "stream", False)))
        route = ctx.view.table.routes.get(req.model)
        ctx.route = route if route is not None else resolve_route(ctx.view, req.model)  # raises
        return req

    async def proxy_admitted(self, ctx: RequestContext, ticket: Ticket | None | _Decision
                             ) -> Reply | None:
        """The rest of ``proxy`` once ``admit_now`` has decided or left it to ``admit``."""
        ep, req, route = ctx.endpoint, ctx.request, ctx.route
        assert req is not None and route is not None
        if ticket is _LATER:
            try:
                ticket = await self.admit(ctx)
            except asyncio.CancelledError:  # the client hung up while Redis decided
                self.client_gone(ctx)
                raise
        ctx.ticket = ticket
        try:
            fwd = ctx.fwd = await forward(
                ctx.view, route, ep.upstream,
                req.upstream_body if req.upstream_body is not None else ctx.body,
                ctx.request_id, self.loop, self.stats, hold if req.stream else None,
                trace=(self.tracing, ctx.span) if ctx.span is not None else None,
                meanwhile=None if ctx.ticket is None else ctx.ticket.rate_limit_headers)
        except RouterError as e:  # nothing could be tried (no backend)
            raise self._unforwarded(ctx, e) from None
        except asyncio.CancelledError:
            self.client_gone(ctx)
            raise
        if fwd.exchange is not None:  # a held stream: commit it to the client
            ctx.outcome = fwd.outcome
            ctx.total_s = time.perf_counter() - ctx.started
            await relay(self, ctx, fwd.exchange)
            return None
        return self.finish(ctx, fwd)

    def _unforwarded(self, ctx: RequestContext, e: RouterError) -> RouterError:
        """Account a request that no backend could be tried for (or whose failover could not
        be sent: with_model); return its error."""
        ctx.outcome = classify_failure(e.code)
        ctx.total_s = time.perf_counter() - ctx.started
        return self.accounts.failed(ctx, e)

    def client_gone(self, ctx: RequestContext) -> None:
        """The client hung up while its admission was decided or the backend worked (its server
        cancelled the request): the backend connection is closed, a reservation released;
        nothing reached the client, so nothing is billed."""
        ctx.outcome = CLIENT_GONE
        ctx.used = (0, 0)
        ctx.total_s = time.perf_counter() - ctx.started
        self.accounts.account(ctx, CATALOG["CLIENT_DISCONNECTED"].status)

    def finish(self, ctx: RequestContext, fwd: Forwarded) -> Reply:
        """The reply to a buffered request from its last attempt; accounted. A failure raises
        its catalog error (accounted too)."""
        ep, route = ctx.endpoint, ctx.route
        assert route is not None
        ctx.fwd = fwd
        outcome = ctx.outcome = fwd.outcome
        resp = fwd.response
        total = ctx.total_s = time.perf_counter() - ctx.started
        if outcome.success:
            assert resp is not None
            ctx.used = used = ep.usage(resp.body)
            price = route.price
            if price is not None and used is not None:
                ctx.cost_micro = price.cost_micro(*used)
            if ep.shape is not None:
                try:
                    reply = ep.shape(ctx, resp)
                except RouterError as e:  # a malformed backend response
                    ctx.outcome = classify_failure(e.code)
                    raise self.accounts.failed(ctx, e) from None
                reply.headers = [("X-Request-ID", ctx.request_id),
                                 ("X-Router-Backend", fwd.backend_id),
                                 ("X-Router-Decision", fwd.decision_type),
                                 ("X-Router-Latency-Ms", ms(total)),
                                 *self.accounts.account(ctx, reply.status)]
                return reply
        elif outcome.passthrough and ep.openai and resp is not None:
            # The backend's own explanation of the client's mistake, unchanged.
            self.metrics.error(outcome.error_code or "INVALID_REQUEST")
        else:
            err = fwd.error
            if err is None:
                assert resp is not None and outcome.error_code is not None
                err = RouterError(outcome.error_code,
                                  "the backend rejected the request" if outcome.passthrough
                                  else None,
                                  details=f"backend {fwd.backend_id} answered {resp.status}")
            raise self.accounts.failed(ctx, err)
        # The backend's response as it is: the Reply made once, with its headers (ms(), inline).
        ctype = resp.header(b"content-type")
        return Reply(resp.status, resp.body,
                     [("X-Request-ID", ctx.request_id), ("X-Router-Backend", fwd.backend_id),
                      ("X-Router-Decision", fwd.decision_type),
                      ("X-Router-Latency-Ms", f"{total * 1000:.3f}"),
                      *self.accounts.account(ctx, resp.status)],
                     ctype.decode("latin-1") if ctype else JSON)

    def admit_now(self, ctx: RequestContext, inflight: InFlight | None = None
                  ) -> Ticket | None | _Decision | PendingAdmission:
        """The admission decision when it can be taken at once (no caller to admit, or the
        in-process buckets alone decide: no Redis, budget, nonce or trace span), else _LATER:
        ``admit`` takes it. Given ``inflight``, a decision only Redis's buckets make is sent
        at once, and ``inflight.admitted`` gets it on callbacks (Admission.admit_soon): the
        pending admission is returned."""
        caller, route, req = ctx.caller, ctx.route, ctx.request
        if caller is None:
            return None
        assert route is not None and req is not None
        key = caller.key
        table = ctx.view.table
        if caller.nonce is not None or ctx.span is not None or (
                table.budgets and applicable(table.budgets, key.org, key.key_id)):
            return _LATER
        limits = table.limits
        # estimate_tokens, inline (a call less a request; n // 4 or 1 is its max(1, n // 4))
        completion = req.max_tokens
        tokens = (len(ctx.body) // 4 or 1) + (
            completion if completion else limits.default_completion_tokens)
        org = table.orgs.get(key.org)
        # (with a Redis URL, Admission.admit_now leaves it to Redis: not asked, a call less)
        ticket = None if limits.redis_url else self.admission.admit_now(
            limits, key, route.model, tokens, org, route.limits)
        if ticket is not None:
            return ticket if ticket.verdict.allowed else self._admitted(ctx, ticket)
        if inflight is not None:
            pending = self.admission.admit_soon(limits, key, route.model, tokens, org,
                                                route.limits, inflight.admitted)
            if pending is not None:
                return pending
        return _LATER

    async def admit(self, ctx: RequestContext) -> Ticket:
        """The decision admit_now leaves: through Redis, with budgets or a nonce, or traced."""
        caller, route, req, table = ctx.caller, ctx.route, ctx.request, ctx.view.table
        assert caller is not None and route is not None and req is not None
        key, default_completion = caller.key, table.limits.default_completion_tokens
        completion = req.max_tokens or default_completion
        tokens = estimate_tokens(len(ctx.body), req.max_tokens, default_completion)
        budgets = applicable(table.budgets, key.org, key.key_id)
        span = (self.tracing.child(ctx.span, "admission")
                if self.tracing is not None and ctx.span is not None else None)
        try:
            ticket = await self.admission.admit(
                table.limits, key, route.model, tokens, table.orgs.get(key.org), route.limits,
                caller.nonce, int(SIGNATURE_WINDOW_S * 2000), budgets,
                reservation(route.price, tokens - completion, completion) if budgets else None)
        finally:
            if span is not None:
                span.end()
        return self._admitted(ctx, ticket)

    def _admitted(self, ctx: RequestContext, ticket: Ticket) -> Ticket:
        """The ticket of an admitted request; a refusal raises its catalog error."""
        v = ticket.verdict
        if v.allowed:
            return ticket
        caller, route = ctx.caller, ctx.route
        assert caller is not None and route is not None
        key = caller.key
        if ticket.refused_budget is not None:
            budget, dimension = ticket.refused_budget
            code = "BUDGET_EXCEEDED" if dimension == "spend" else "QUOTA_EXCEEDED"
            self.metrics.denied(f"{code.lower()}_{dimension}")
            audit.info("%s", orjson.dumps({
                "event": "admission.denied", "reason": code, "limit": budget.scope,
                "dimension": dimension, "period": budget.period, "key_id": key.key_id,
                "org": key.org, "model": route.model}).decode())
            raise self.accounts.denied(ctx, RouterError(
                code, f"the {budget.period}ly {dimension} "
                      f"{'budget' if dimension == 'spend' else 'quota'} of "
                      f"{budget.scope} is exhausted"), budget.scope, None)
        assert v.failed is not None
        bucket = v.failed.name.split(":", 1)[0] + "_" + v.failed.name.rsplit(":", 1)[1]
        retry_s = max(1, -(-v.retry_after_ms // 1000))
        self.metrics.denied(f"rate_limit_{bucket}")
        audit.info("%s", orjson.dumps({
            "event": "admission.denied", "reason": "RATE_LIMIT_EXCEEDED", "limit": bucket,
            "key_id": key.key_id, "org": key.org, "model": route.model,
            "remaining": v.remaining, "retry_after_s": retry_s}).decode())
        raise self.accounts.denied(ctx, RouterError(
            "RATE_LIMIT_EXCEEDED", f"rate limit exceeded ({bucket.replace('_', ' ')})",
            headers={**dict(rate_limit_headers(v.failed, v, time.time())),
                     "Retry-After": str(retry_s)}),
            bucket, retry_s)

    # -- errors --------------------------------------------------------------------------------

    def error_reply(self, err: RouterError, request_id: str, openai: bool) -> Reply:
        self.metrics.error(err.code)
        headers = [("X-Request-ID", request_id)]
        if err.headers:
            headers.extend(err.headers.items())
        render = openai_body if openai else native_body
        return Reply(err.status, render(err, request_id), headers)

    def unrouted(self, method: str, path: str, request_id: str) -> Reply:
        """404 for unknown paths, 405 with Allow for known paths and a wrong method."""
        openai = path.startswith(_OPENAI_PREFIXES)
        known = self.by_path.get(path)
        if known is not None:
            err = RouterError("METHOD_NOT_ALLOWED",
                              f"{method} is not allowed on {path}; use {known.method}",
                              headers={"Allow": known.method})
            return self.error_reply(err, request_id, known.openai)
        return self.error_reply(RouterError("NOT_FOUND", f"no endpoint at {path}"), request_id,
                                openai)
