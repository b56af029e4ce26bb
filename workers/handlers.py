"""HTTP handlers of a worker: the inference endpoints, models, status and metrics.

Each handler is wrapped by ``endpoint``, which assigns the request id and renders every error
through the catalog (native envelope or OpenAI shape); nothing else reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from apirouter import __version__
from apirouter.errors import RouterError, native_body, openai_body
from apirouter.outcomes import backend_error_code
from apirouter.request_ids import RequestIds
from apirouter.validation import parse_chat_completion, parse_chat_request, parse_inference_request
from workers.forwarding import Forwarded, forward_chat, resolve_route
from workers.metrics import CONTENT_TYPE, RequestMetrics, exposition
from workers.table_view import TableCache

log = logging.getLogger("apirouter.worker")

JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Inner = Callable[[web.Request, str], Awaitable[web.StreamResponse]]

# Paths and their methods, for telling 405 from 404 in the catch-all route.
OPENAI_PATHS = {"/v1/chat/completions": "POST", "/v1/models": "GET"}
NATIVE_PATHS = {"/v1/inference": "POST", "/v1/status/healthz": "GET",
                "/v1/status/readyz": "GET", "/metrics": "GET"}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


class Handlers:
    def __init__(self, tables: TableCache) -> None:
        self.tables = tables
        self.ids = RequestIds()
        self.metrics = RequestMetrics()
        self.pid = os.getpid()

    # -- error rendering -------------------------------------------------------------------

    def error_response(self, err: RouterError, request_id: str, openai: bool) -> web.Response:
        self.metrics.error(err.code)
        render = openai_body if openai else native_body
        headers = {"X-Request-ID": request_id}
        if err.headers:
            headers.update(err.headers)
        return web.Response(body=render(err, request_id), status=err.status,
                            content_type=JSON, headers=headers)

    def endpoint(self, inner: Inner, *, openai: bool) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            request_id = self.ids.accept(request.headers.get("X-Request-ID"))
            try:
                return await inner(request, request_id)
            except RouterError as e:
                return self.error_response(e, request_id, openai)
            except Exception:
                # The traceback names our code only; request bodies never reach the log.
                log.exception("unhandled error serving %s %s (request %s)",
                              request.method, request.path, request_id)
                return self.error_response(RouterError("INTERNAL_ERROR"), request_id, openai)
        return handler

    # -- shared steps --------------------------------------------------------------------------

    @staticmethod
    async def read_body(request: web.Request, limit: int) -> bytes:
        declared = request.content_length
        if declared is not None:
            if declared > limit:
                raise RouterError("PAYLOAD_TOO_LARGE", details=f"the limit is {limit} bytes")
            return await request.read()
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise RouterError("PAYLOAD_TOO_LARGE", details=f"the limit is {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _account(self, fwd: Forwarded, model: str, success: bool, total_s: float) -> None:
        status = fwd.response.status if fwd.response is not None else 0
        self.metrics.routed(fwd.backend_id, fwd.decision.value, success, model, status,
                            fwd.backend_s, max(0.0, total_s - fwd.backend_s))

    # -- endpoints ----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request, request_id: str) -> web.StreamResponse:
        started = time.perf_counter()
        view = self.tables.current()
        body = await self.read_body(request, view.table.limits.max_body_bytes)
        model = parse_chat_request(body)
        route = resolve_route(view, model)
        fwd = await forward_chat(view, route, body, request_id, asyncio.get_running_loop())
        resp = fwd.response
        code = fwd.error.code if fwd.error else backend_error_code(resp.status)  # type: ignore[union-attr]
        total = time.perf_counter() - started
        self._account(fwd, model, code is None, total)
        if code is not None:
            raise fwd.error or RouterError(
                code, details=f"backend {fwd.backend_id} answered {resp.status}")  # type: ignore[union-attr]
        assert resp is not None
        return web.Response(body=resp.body, status=resp.status, headers={
            "Content-Type": (resp.header(b"content-type") or b"application/json").decode("latin-1"),
            "X-Request-ID": request_id,
            "X-Router-Backend": fwd.backend_id,
            "X-Router-Decision": fwd.decision.value,
            "X-Router-Latency-Ms": _ms(total),
        })

    async def inference(self, request: web.Request, request_id: str) -> web.StreamResponse:
        started = time.perf_counter()
        view = self.tables.current()
        body = await self.read_body(request, view.table.limits.max_body_bytes)
        req = parse_inference_request(body)
        route = resolve_route(view, req.model)
        fwd = await forward_chat(view, route, req.upstream_body, request_id,
                                 asyncio.get_running_loop())
        resp = fwd.response
        if fwd.error is None and resp is not None and resp.status >= 300:
            code = backend_error_code(resp.status)
            fwd.error = RouterError(code or "INVALID_REQUEST",
                                    "the backend rejected the request" if code is None else None,
                                    details=f"backend {fwd.backend_id} answered {resp.status}")
        if fwd.error is not None:
            self._account(fwd, req.model, False, time.perf_counter() - started)
            raise fwd.error
        assert resp is not None
        try:
            completion = parse_chat_completion(resp.body)
        except RouterError:
            self._account(fwd, req.model, False, time.perf_counter() - started)
            raise
        total = time.perf_counter() - started
        self._account(fwd, req.model, True, total)
        return web.Response(body=orjson.dumps({
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
                "attempts": 1,
                "table_generation": view.generation,
                "router_overhead_ms": round((total - fwd.backend_s) * 1000, 3),
                "backend_latency_ms": round(fwd.backend_s * 1000, 3),
                "total_latency_ms": round(total * 1000, 3),
            },
        }), content_type=JSON, headers={"X-Request-ID": request_id,
                                         "X-Router-Backend": fwd.backend_id,
                                         "X-Router-Latency-Ms": _ms(total)})

    async def models(self, request: web.Request, request_id: str) -> web.StreamResponse:
        return web.Response(body=self.tables.current().models_body, content_type=JSON,
                            headers={"X-Request-ID": request_id})

    async def healthz(self, request: web.Request, request_id: str) -> web.StreamResponse:
        return web.json_response({"status": "ok", "worker_pid": self.pid},
                                 headers={"X-Request-ID": request_id})

    async def readyz(self, request: web.Request, request_id: str) -> web.StreamResponse:
        view = self.tables.current()
        table = view.table
        registry_ok = bool(table.backends) and bool(table.routes)
        body = {
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
            },
            "build": {"version": __version__, "python": platform.python_version()},
        }
        return web.Response(body=orjson.dumps(body), status=200 if registry_ok else 503,
                            content_type=JSON, headers={"X-Request-ID": request_id})

    async def metrics_endpoint(self, request: web.Request, request_id: str) -> web.StreamResponse:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def fallback(self, request: web.Request, request_id: str) -> web.StreamResponse:
        """Everything no route matched: 405 with Allow for known paths, 404 otherwise."""
        allowed = OPENAI_PATHS.get(request.path) or NATIVE_PATHS.get(request.path)
        if allowed is not None:
            raise RouterError("METHOD_NOT_ALLOWED",
                              f"{request.method} is not allowed on {request.path}; use {allowed}",
                              headers={"Allow": allowed})
        raise RouterError("NOT_FOUND", f"no endpoint at {request.path}")
