"""What each endpoint does, independent of the HTTP server that carried the request.

Two servers call this: the lean protocol server for the hot endpoints (workers.fast_server),
and aiohttp for everything handed off to it (workers.app). Both give an endpoint the method,
path, a header lookup and the complete body, and write back the Reply it returns. Every error
is rendered here, through the catalog, in the shape the endpoint's family uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from apirouter.budgets import applicable, reservation
from apirouter.buildinfo import build_info
from apirouter.errors import RouterError, native_body, openai_body
from apirouter.keys import KeyRecord, authenticate
from apirouter.limits import BucketSpec, Verdict, estimate_tokens
from apirouter.outcomes import backend_error_code
from apirouter.request_ids import RequestIds
from apirouter.signing import verify
from apirouter.stats import WorkerStats
from apirouter.table import Route
from apirouter.usage import usage_record
from apirouter.validation import (
    parse_chat_completion,
    parse_chat_request,
    parse_inference_request,
    usage_counts,
)
from workers.admission import Admission, Ticket
from workers.forwarding import Forwarded, forward_chat, resolve_route
from workers.metrics import CONTENT_TYPE, USAGE_LOST, RequestMetrics, exposition
from workers.scrape_metrics import scrape_exposition
from workers.table_view import TableCache, TableView
from workers.usage_out import UsageOut

log = logging.getLogger("apirouter.worker")
audit = logging.getLogger("apirouter.audit")

JSON = "application/json"
CHAT = "/v1/chat/completions"
INFERENCE = "/v1/inference"
SIGNATURE_WINDOW_S = 300.0  # signed requests: allowed clock difference, either way


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON


Handler = Callable[[bytes, str, "Caller | None"], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the authenticated key, and the nonce of a signed request."""

    key: KeyRecord
    nonce: str | None = None


@dataclass(frozen=True, slots=True)
class Signed:
    """What request signing needs from the transport (both servers fill it in)."""

    method: str
    path: str  # with the query string
    timestamp: str | None
    nonce: str | None
    signature: str | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    openai: bool  # errors in OpenAI's shape (OpenAI-compatible family) or the native envelope
    hot: bool  # served by the lean protocol server rather than handed to aiohttp
    scope: str | None  # the API-key scope it needs (when the table requires auth)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _rate_headers(spec: BucketSpec, v: Verdict) -> list[tuple[str, str]]:
    return [("X-RateLimit-Limit", str(spec.per_minute)),
            ("X-RateLimit-Remaining", str(v.remaining)),
            ("X-RateLimit-Reset", str(int(time.time() + v.reset_ms / 1000)))]


class Endpoints:
    def __init__(self, tables: TableCache, stats: WorkerStats | None = None,
                 usage: UsageOut | None = None) -> None:
        self.tables = tables
        self.stats = stats
        self.usage = usage
        self.admission = Admission()
        self.ids = RequestIds()
        self.metrics = RequestMetrics()
        self.pid = os.getpid()
        self.loop = asyncio.get_running_loop()
        self.all = (
            Endpoint("POST", CHAT, self.chat_completions, True, True, "inference"),
            Endpoint("GET", "/v1/models", self.models, True, True, "inference"),
            Endpoint("POST", INFERENCE, self.inference, False, True, "inference"),
            Endpoint("GET", "/v1/status/healthz", self.healthz, False, True, None),
            Endpoint("GET", "/v1/status/readyz", self.readyz, False, True, None),
            Endpoint("GET", "/metrics", self.metrics_text, False, False, None),
        )
        self.by_path = {e.path: e for e in self.all}

    def max_body_bytes(self) -> int:
        return self.tables.current().table.limits.max_body_bytes

    # -- the envelope every endpoint runs in ---------------------------------------------------

    def authenticate(self, scope: str, credential: str | None, body: bytes,
                     signed: Signed | None) -> Caller | None:
        """The caller, or None when the table does not require auth."""
        table = self.tables.current().table
        if not table.auth_required:
            return None
        try:
            key = authenticate(table.keys, credential, scope)
            if not key.hmac_required:
                return Caller(key)
            if signed is None:
                raise RouterError("UNAUTHORIZED", "this key requires signed requests")
            return Caller(key, verify(key, signed.method, signed.path, body, signed.timestamp,
                                      signed.nonce, signed.signature, time.time(),
                                      SIGNATURE_WINDOW_S))
        except RouterError as e:
            self.metrics.denied(e.code)
            # The audit trail of a refusal: never the key itself, nor anything derived from it.
            audit.info("%s", orjson.dumps({"event": "auth.denied", "reason": e.code,
                                           "scope": scope}).decode())
            raise

    async def call(self, endpoint: Endpoint, body: bytes, request_id: str,
                   credential: str | None = None, signed: Signed | None = None) -> Reply:
        try:
            caller = (self.authenticate(endpoint.scope, credential, body, signed)
                      if endpoint.scope else None)
            return await endpoint.handler(body, request_id, caller)
        except RouterError as e:
            return self.error_reply(e, request_id, endpoint.openai)
        except Exception:
            # The traceback names our code only; request bodies never reach the log.
            log.exception("unhandled error serving %s %s (request %s)", endpoint.method,
                          endpoint.path, request_id)
            return self.error_reply(RouterError("INTERNAL_ERROR"), request_id, endpoint.openai)

    def error_reply(self, err: RouterError, request_id: str, openai: bool) -> Reply:
        self.metrics.error(err.code)
        headers = [("X-Request-ID", request_id)]
        if err.headers:
            headers.extend(err.headers.items())
        render = openai_body if openai else native_body
        return Reply(err.status, render(err, request_id), headers)

    def unrouted(self, method: str, path: str, request_id: str) -> Reply:
        """404 for unknown paths, 405 with Allow for known paths and a wrong method."""
        openai = path.startswith(("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/models"))
        known = self.by_path.get(path)
        if known is not None:
            err = RouterError("METHOD_NOT_ALLOWED",
                              f"{method} is not allowed on {path}; use {known.method}",
                              headers={"Allow": known.method})
            return self.error_reply(err, request_id, known.openai)
        return self.error_reply(RouterError("NOT_FOUND", f"no endpoint at {path}"), request_id,
                                openai)

    def _account(self, fwd: Forwarded, model: str, success: bool, total_s: float) -> None:
        status = fwd.response.status if fwd.response is not None else 0
        self.metrics.routed(fwd.backend_id, fwd.decision.value, success, model, status,
                            fwd.backend_s, max(0.0, total_s - fwd.backend_s))

    def _emit(self, request_id: str, record: bytes) -> None:
        """Hand a usage record to the supervisor; accounting never fails a response."""
        if self.usage is None:
            return
        try:
            self.usage.emit(record)
        except OSError as e:  # the ring was full and the overflow file unwritable
            USAGE_LOST.inc()
            log.error("usage record of request %s lost: ring full and %s", request_id, e)

    def _record(self, endpoint: str, request_id: str, caller: Caller | None, view: TableView,
                model: str, fwd: Forwarded, t0: float, status: int, error_code: str | None,
                used: tuple[int, int] | None, cost_micro: int) -> None:
        if self.usage is None:
            return
        key = caller.key if caller is not None else None
        self._emit(request_id, usage_record(
            kind="request", request_id=request_id, ts_start=t0, ts_end=time.time(),
            endpoint=endpoint, key_id=key.key_id if key else None, org=key.org if key else None,
            model=model, backend_id=fwd.backend_id, decision_type=fwd.decision.value,
            attempts=fwd.attempts, status=status, error_code=error_code,
            prompt_tokens=used[0] if used else None, completion_tokens=used[1] if used else None,
            cost_micro=cost_micro, backend_s=fwd.backend_s, table_generation=view.generation,
            worker_pid=self.pid))

    def _failed(self, endpoint: str, request_id: str, caller: Caller | None, view: TableView,
                model: str, fwd: Forwarded, t0: float, ticket: Ticket | None,
                err: RouterError) -> RouterError:
        """A request that failed after admission: record it, release its reservation, and
        return the error carrying the rate-limit headers."""
        self._record(endpoint, request_id, caller, view, model, fwd, t0, err.status, err.code,
                     None, 0)
        err.headers = {**(err.headers or {}),
                       **dict(self._finish(view, ticket, None, failed=True))}
        return err

    def _deny(self, endpoint: str, request_id: str, key: KeyRecord, view: TableView,
              model: str, t0: float, err: RouterError, limit: str,
              retry_after_s: int | None) -> RouterError:
        """Account an admission refusal like a request (kind denial) and return the error."""
        if self.usage is not None:
            self._emit(request_id, usage_record(
                kind="denial", request_id=request_id, ts_start=t0, ts_end=time.time(),
                endpoint=endpoint, key_id=key.key_id, org=key.org, model=model, backend_id=None,
                decision_type=None, attempts=0, status=err.status, error_code=err.code,
                prompt_tokens=None, completion_tokens=None, cost_micro=0, backend_s=0.0,
                table_generation=view.generation, worker_pid=self.pid, limit=limit,
                retry_after_s=retry_after_s))
        return err

    # -- admission -----------------------------------------------------------------------------

    async def _admit(self, view: TableView, caller: Caller | None, route: Route,
                     body_len: int, max_tokens: int | None, endpoint: str, request_id: str,
                     t0: float) -> Ticket | None:
        if caller is None:
            return None
        key = caller.key
        table = view.table
        completion = max_tokens or table.limits.default_completion_tokens
        tokens = estimate_tokens(body_len, max_tokens, table.limits.default_completion_tokens)
        budgets = applicable(table.budgets, key.org, key.key_id)
        ticket = await self.admission.admit(
            table.limits, key, route.model, tokens, table.orgs.get(key.org), route.limits,
            caller.nonce, int(SIGNATURE_WINDOW_S * 2000), budgets,
            reservation(route.price, tokens - completion, completion) if budgets else None)
        v = ticket.verdict
        if v.allowed:
            return ticket
        if ticket.refused_budget is not None:
            budget, dimension = ticket.refused_budget
            code = "BUDGET_EXCEEDED" if dimension == "spend" else "QUOTA_EXCEEDED"
            self.metrics.denied(f"{code.lower()}_{dimension}")
            audit.info("%s", orjson.dumps({
                "event": "admission.denied", "reason": code, "limit": budget.scope,
                "dimension": dimension, "period": budget.period, "key_id": key.key_id,
                "org": key.org, "model": route.model}).decode())
            raise self._deny(endpoint, request_id, key, view, route.model, t0, RouterError(
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
        raise self._deny(endpoint, request_id, key, view, route.model, t0, RouterError(
            "RATE_LIMIT_EXCEEDED", f"rate limit exceeded ({bucket.replace('_', ' ')})",
            headers={**dict(_rate_headers(v.failed, v)), "Retry-After": str(retry_s)}),
            bucket, retry_s)

    def _finish(self, view: TableView, ticket: Ticket | None, usage: tuple[int, int] | None,
                cost_micro: int = 0, failed: bool = False) -> list[tuple[str, str]]:
        """Settle the reservation (release it for a failed request) off the response path;
        return the rate-limit headers to send. Without reported usage it stays as reserved."""
        if ticket is None:
            return []
        limits = view.table.limits
        if failed:
            self.admission.settle_soon(limits, ticket, 0, 0)
        elif usage is not None:
            self.admission.settle_soon(limits, ticket, usage[0] + usage[1], cost_micro)
        return _rate_headers(ticket.specs[0], ticket.verdict) if ticket.specs else []

    # -- inference -----------------------------------------------------------------------------

    async def chat_completions(self, body: bytes, request_id: str, caller: Caller | None
                               ) -> Reply:
        started = time.perf_counter()
        t0 = time.time()
        view = self.tables.current()
        model, max_tokens = parse_chat_request(body)
        route = resolve_route(view, model)
        ticket = await self._admit(view, caller, route, len(body), max_tokens, CHAT,
                                   request_id, t0)
        fwd = await forward_chat(view, route, body, request_id, self.loop, self.stats)
        resp = fwd.response
        error = fwd.error
        if error is None and resp is not None:
            code = backend_error_code(resp.status)
            if code is not None:
                error = RouterError(code,
                                    details=f"backend {fwd.backend_id} answered {resp.status}")
        total = time.perf_counter() - started
        self._account(fwd, model, error is None, total)
        if error is not None:
            raise self._failed(CHAT, request_id, caller, view, model, fwd, t0, ticket, error)
        assert resp is not None
        used = usage_counts(resp.body)
        cost = route.price.cost_micro(*used) if route.price is not None and used else 0
        self._record(CHAT, request_id, caller, view, model, fwd, t0, resp.status, None, used,
                     cost)
        ctype = resp.header(b"content-type")
        return Reply(resp.status, resp.body, [
            ("X-Request-ID", request_id),
            ("X-Router-Backend", fwd.backend_id),
            ("X-Router-Decision", fwd.decision.value),
            ("X-Router-Latency-Ms", _ms(total)),
            *self._finish(view, ticket, used, cost),
        ], ctype.decode("latin-1") if ctype else JSON)

    async def inference(self, body: bytes, request_id: str, caller: Caller | None) -> Reply:
        started = time.perf_counter()
        t0 = time.time()
        view = self.tables.current()
        req = parse_inference_request(body)
        route = resolve_route(view, req.model)
        ticket = await self._admit(view, caller, route, len(body), req.max_tokens, INFERENCE,
                                   request_id, t0)
        fwd = await forward_chat(view, route, req.upstream_body, request_id, self.loop,
                                 self.stats)
        resp = fwd.response
        if fwd.error is None and resp is not None and resp.status >= 300:
            code = backend_error_code(resp.status)
            fwd.error = RouterError(code or "INVALID_REQUEST",
                                    "the backend rejected the request" if code is None else None,
                                    details=f"backend {fwd.backend_id} answered {resp.status}")
        if fwd.error is not None:
            self._account(fwd, req.model, False, time.perf_counter() - started)
            raise self._failed(INFERENCE, request_id, caller, view, req.model, fwd, t0, ticket,
                               fwd.error)
        assert resp is not None
        try:
            completion = parse_chat_completion(resp.body)
        except RouterError as e:
            self._account(fwd, req.model, False, time.perf_counter() - started)
            self._failed(INFERENCE, request_id, caller, view, req.model, fwd, t0, ticket, e)
            raise
        total = time.perf_counter() - started
        self._account(fwd, req.model, True, total)
        used = (completion.prompt_tokens, completion.completion_tokens)
        cost = route.price.cost_micro(*used) if route.price is not None else 0
        self._record(INFERENCE, request_id, caller, view, req.model, fwd, t0, 200, None, used,
                     cost)
        return Reply(200, orjson.dumps({
            "id": request_id,
            "object": "inference",
            "created": int(time.time()),
            "model": req.model,
            "output": {"role": completion.role, "content": completion.content,
                       "finish_reason": completion.finish_reason},
            "usage": {"prompt_tokens": completion.prompt_tokens,
                      "completion_tokens": completion.completion_tokens,
                      "total_tokens": completion.total_tokens},
            "router": {
                "request_id": request_id,
                "backend_id": fwd.backend_id,
                "decision_type": fwd.decision.value,
                "attempts": fwd.attempts,
                "table_generation": view.generation,
                "router_overhead_ms": round((total - fwd.backend_s) * 1000, 3),
                "backend_latency_ms": round(fwd.backend_s * 1000, 3),
                "total_latency_ms": round(total * 1000, 3),
            },
        }), [("X-Request-ID", request_id), ("X-Router-Backend", fwd.backend_id),
             ("X-Router-Latency-Ms", _ms(total)),
             *self._finish(view, ticket, used, cost)])

    # -- catalogue and status ----------------------------------------------------------------

    async def models(self, body: bytes, request_id: str, caller: Caller | None) -> Reply:
        return Reply(200, self.tables.current().models_body, [("X-Request-ID", request_id)])

    async def healthz(self, body: bytes, request_id: str, caller: Caller | None) -> Reply:
        return Reply(200, orjson.dumps({"status": "ok", "worker_pid": self.pid}),
                     [("X-Request-ID", request_id)])

    async def readyz(self, body: bytes, request_id: str, caller: Caller | None) -> Reply:
        view = self.tables.current()
        table = view.table
        registry_ok = bool(table.backends) and bool(table.routes)
        doc = {
            "status": "ready" if registry_ok else "degraded",
            "worker_pid": self.pid,
            "checks": {
                "routing_table": {
                    "status": "ok",
                    "generation": view.generation,
                    "source": table.source,
                    "compiled_at": table.compiled_at,
                    "age_s": round(time.time() - table.compiled_at, 3),
                    "load_errors": self.tables.reload_errors,
                },
                "backend_registry": {
                    "status": "ok" if registry_ok else "empty",
                    "backends": len(table.backends),
                    "models": len(table.routes),
                },
                "admission": self.admission.status(table.limits),
                **{name: check for name, check in table.status.items()},
            },
            "build": {**build_info(), "python": platform.python_version()},
        }
        return Reply(200 if registry_ok else 503, orjson.dumps(doc),
                     [("X-Request-ID", request_id)])

    async def metrics_text(self, body: bytes, request_id: str, caller: Caller | None) -> Reply:
        gauges = await scrape_exposition(self.admission, self.tables.current().table)
        return Reply(200, exposition() + gauges, [], CONTENT_TYPE)
