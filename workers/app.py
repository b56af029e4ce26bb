"""The worker application: what gunicorn's aiohttp worker runs (``workers.app:make_app``).

A worker attaches to the routing-table segment named by APIROUTER_TABLE_SHM, serves from it,
and freezes its start-up heap out of the garbage collector's sight.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from apirouter.shm import TABLE_SEGMENT_ENV, TableReader
from workers.handlers import Handlers
from workers.table_view import TableCache

HANDLERS_KEY = web.AppKey("handlers", Handlers)
_OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/models")

log = logging.getLogger("apirouter.worker")


def build_app(tables: TableCache) -> web.Application:
    """The application for an already-attached table; tests use this directly."""
    # Our own reader enforces the body limit from the live table, so aiohttp's is lifted.
    app = web.Application(client_max_size=2**62, handler_args={"max_field_size": 16384})
    h = Handlers(tables)
    app[HANDLERS_KEY] = h
    r = app.router
    r.add_post("/v1/chat/completions", h.endpoint(h.chat_completions, openai=True))
    r.add_get("/v1/models", h.endpoint(h.models, openai=True), allow_head=False)
    r.add_post("/v1/inference", h.endpoint(h.inference, openai=False))
    r.add_get("/v1/status/healthz", h.endpoint(h.healthz, openai=False), allow_head=False)
    r.add_get("/v1/status/readyz", h.endpoint(h.readyz, openai=False), allow_head=False)
    r.add_get("/metrics", h.endpoint(h.metrics_endpoint, openai=False), allow_head=False)
    openai_fallback = h.endpoint(h.fallback, openai=True)
    native_fallback = h.endpoint(h.fallback, openai=False)

    async def fallback(request: web.Request) -> web.StreamResponse:
        if request.path.startswith(_OPENAI_PREFIXES):
            return await openai_fallback(request)
        return await native_fallback(request)

    r.add_route("*", "/{tail:.*}", fallback)

    async def pools(app: web.Application) -> AsyncIterator[None]:
        yield
        tables.close()

    app.cleanup_ctx.append(pools)
    return app


async def make_app() -> web.Application:
    """gunicorn entry point: attach to the supervisor's segment and build the app."""
    name = os.environ.get(TABLE_SEGMENT_ENV)
    if not name:
        raise RuntimeError(
            f"{TABLE_SEGMENT_ENV} is not set: workers are started by `apirouter serve`")
    tables = TableCache(TableReader(name))
    tables.current()  # fail the boot now, not on the first request, if the table is unreadable
    app = build_app(tables)
    # Everything allocated so far lives as long as the worker: keep the collector off it,
    # and let young garbage accumulate longer before a collection pauses a request.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("worker %d serving table generation %d", os.getpid(), tables.current().generation)
    return app
