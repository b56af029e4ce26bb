"""The worker's aiohttp application: every endpoint, for connections the lean server hands off.

gunicorn's worker (workers.gunicorn_worker) calls ``make_app``: it attaches to the routing-table
segment named by APIROUTER_TABLE_SHM, builds the shared Pipeline, and adapts each endpoint into
an aiohttp handler that builds the request context and runs the pipeline. The hot endpoints are
normally answered by workers.fast_server before aiohttp sees the connection; aiohttp serves the
rest (and the hot ones too, on connections handed to it).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from apirouter.audit import AUDIT_STORE_ENV, AUDIT_TTL_ENV
from apirouter.errors import RouterError
from apirouter.keys import credential, hash_key
from apirouter.shm import TABLE_SEGMENT_ENV, TableReader
from apirouter.signing import NONCE, SIGNATURE, TIMESTAMP
from apirouter.stats import RUN_DIR_ENV, STATS_SEGMENT_ENV, WorkerStats
from apirouter.usage_ring import USAGE_SEGMENT_ENV
from workers.admin import Admin
from workers.audit_api import PATH as AUDIT_PATH
from workers.audit_api import AuditApi
from workers.audit_reader import AuditReader
from workers.bodies import body_refused, continue_expected, read_body
from workers.context import Reply, Signed
from workers.endpoints import Endpoint
from workers.fast_server import handoff_server_args
from workers.pipeline import Pipeline
from workers.table_view import TableCache
from workers.usage_out import UsageOut

PIPELINE_KEY = web.AppKey("pipeline", Pipeline)
AioHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AdminHandler = Callable[[web.Request, str], Awaitable[Reply]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

log = logging.getLogger("apirouter.worker")


def to_response(reply: Reply) -> web.Response:
    headers = {"Content-Type": reply.content_type}
    headers.update(reply.headers)
    return web.Response(body=reply.body, status=reply.status, headers=headers)


def _adapt(pipeline: Pipeline, ep: Endpoint) -> AioHandler:
    async def handler(request: web.Request) -> web.StreamResponse:
        request_id = pipeline.ids.accept(request.headers.get("X-Request-ID"))
        view = pipeline.tables.current()  # the request's one look at the table
        try:
            body = await read_body(request, view.table.limits.max_body_bytes)
        except RouterError as e:
            return to_response(pipeline.error_reply(e, request_id, ep.openai))
        h = request.headers
        cred = credential(h.get("Authorization"), h.get("X-API-Key"))
        digest = None if cred is None else hash_key(cred)
        signed = Signed(request.method, request.path_qs, h.get(TIMESTAMP), h.get(NONCE),
                        h.get(SIGNATURE))
        ctx = pipeline.context(ep, view, request_id, body, digest, signed,
                               dict(request.match_info) or None, h.get("traceparent"))
        ctx.sink = sink = _Stream(request)
        reply = await pipeline.run(ctx)
        if reply is None:
            assert sink.response is not None
            return sink.response
        return to_response(reply)
    return handler


class _Stream:
    """aiohttp's Sink for a streamed response (workers.context.Sink): StreamResponse writes
    wait for the transport to drain; a client that hangs up cancels the handler (the runner is
    built with handler_cancellation)."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start(self, status: int, headers: list[tuple[str, str]],
                    content_type: str) -> None:
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type,
                                                          **dict(headers)})
        await resp.prepare(self.request)
        self.response = resp

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    def write_now(self, data: bytes) -> bool:
        return False  # aiohttp's writer is a coroutine: every chunk goes through ``write``

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()


def _adapt_native(endpoints: Pipeline, inner: AdminHandler, admin: Admin | None = None
                  ) -> AioHandler:
    """A native-envelope endpoint that authorizes itself (or, with ``admin``, needs admin)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        request_id = endpoints.ids.accept(request.headers.get("X-Request-ID"))
        try:
            if admin is not None:
                request["admin_actor"] = admin.authorize(request)
            reply = await inner(request, request_id)
        except RouterError as e:
            reply = endpoints.error_reply(e, request_id, openai=False)
        except Exception:
            log.exception("admin request %s failed", request_id)
            reply = endpoints.error_reply(RouterError("INTERNAL_ERROR"), request_id, False)
        return to_response(reply)
    return handler


def _expect(endpoints: Pipeline, openai: bool) -> ExpectHandler:
    """``Expect: 100-continue``: a body declared over the limit is refused at once, without the
    100 Continue that would invite the client to send it."""
    async def expect(request: web.Request) -> web.StreamResponse | None:
        refused = body_refused(request, endpoints.max_body_bytes())
        if refused is not None:
            rid = endpoints.ids.accept(request.headers.get("X-Request-ID"))
            response = to_response(endpoints.error_reply(refused, rid, openai))
            response.force_close()
            return response
        await continue_expected(request)
        return None
    return expect


def build_app(endpoints: Pipeline) -> web.Application:
    # read_body enforces the live table's limit, so aiohttp's own is lifted.
    app = web.Application(client_max_size=2**62, handler_args=handoff_server_args())
    app[PIPELINE_KEY] = endpoints
    for ep in endpoints.all:
        app.router.add_route(ep.method, ep.path, _adapt(endpoints, ep),
                             expect_handler=_expect(endpoints, ep.openai))
    admin = Admin(endpoints)
    for method, path, handler in admin.routes():
        app.router.add_route(method, path, _adapt_native(endpoints, handler, admin),
                             expect_handler=_expect(endpoints, False))
    spec = os.environ.get(AUDIT_STORE_ENV)
    ttl = os.environ.get(AUDIT_TTL_ENV)
    audit = AuditApi(endpoints, AuditReader(spec, float(ttl) if ttl else None) if spec else None)
    app.router.add_route("GET", AUDIT_PATH, _adapt_native(endpoints, audit.lookup))

    async def unrouted(request: web.Request) -> web.StreamResponse:
        request_id = endpoints.ids.accept(request.headers.get("X-Request-ID"))
        return to_response(endpoints.unrouted(request.method, request.path, request_id))

    app.router.add_route("*", "/{tail:.*}", unrouted)

    async def close_tables(app: web.Application) -> AsyncIterator[None]:
        yield
        endpoints.accounts.flush()  # the last requests' metrics and settlements
        endpoints.tables.close()
        if audit.reader is not None:
            audit.reader.close()
        if endpoints.usage is not None:
            endpoints.usage.close()
        if endpoints.stats is not None:
            endpoints.stats.close()

    app.cleanup_ctx.append(close_tables)
    return app


async def make_app() -> web.Application:
    """gunicorn entry point: attach to the supervisor's segment and build the app."""
    name = os.environ.get(TABLE_SEGMENT_ENV)
    if not name:
        raise RuntimeError(
            f"{TABLE_SEGMENT_ENV} is not set: workers are started by `apirouter serve`")
    tables = TableCache(TableReader(name))
    tables.current()  # fail the boot now, not on the first request, if the table is unreadable
    run_dir = os.environ[RUN_DIR_ENV]
    stats = WorkerStats(os.environ[STATS_SEGMENT_ENV], run_dir)
    # One slot claim serves both segments: the ring of slot i is fed by whoever holds slot i.
    usage = UsageOut(os.environ[USAGE_SEGMENT_ENV], stats.slot, run_dir)
    app = build_app(Pipeline(tables, stats, usage))
    # Everything allocated so far lives as long as the worker: keep the collector off it,
    # and let young garbage accumulate longer before a collection pauses a request.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("worker %d serving table generation %d", os.getpid(), tables.current().generation)
    return app
