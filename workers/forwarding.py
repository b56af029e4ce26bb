"""Forward one request to the backend the routing decision names, and map what went wrong.

Foreign exceptions (the upstream client's) are translated into the error catalog here, at the
boundary, so handlers only ever see RouterError.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from apirouter.errors import RouterError
from apirouter.routing import Decision, choose_backend
from apirouter.table import Route
from workers.table_view import TableView
from workers.upstream import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)


@dataclass(slots=True)
class Forwarded:
    """The outcome of one attempt: a response, or the catalog error it failed with."""

    backend_id: str
    decision: Decision
    response: UpstreamResponse | None
    error: RouterError | None
    backend_s: float


def resolve_route(view: TableView, model: str) -> Route:
    route = view.table.routes.get(model)
    if route is None:
        raise RouterError("MODEL_NOT_FOUND", f"model '{model}' is not routed by this router",
                          field="model")
    return route


async def forward_chat(view: TableView, route: Route, body: bytes, request_id: str,
                       loop: asyncio.AbstractEventLoop) -> Forwarded:
    backend_id, decision = choose_backend(route, random.random())
    target = view.targets[backend_id]
    data = b"".join((target.chat_head, b"X-Request-ID: ", request_id.encode("latin-1"),
                     b"\r\nContent-Length: ", str(len(body)).encode("latin-1"), b"\r\n\r\n", body))
    started = time.perf_counter()
    resp: UpstreamResponse | None = None
    error: RouterError | None = None
    try:
        resp = await target.pool.request(data, loop.time() + target.timeout_s)
    except UpstreamTimeout as e:
        error = RouterError("BACKEND_TIMEOUT", details=f"backend {backend_id}: {e}")
    except UpstreamConnectError as e:
        error = RouterError("BACKEND_UNAVAILABLE", details=f"backend {backend_id}: {e}")
    except UpstreamProtocolError as e:
        error = RouterError("BACKEND_ERROR", details=f"backend {backend_id}: {e}")
    return Forwarded(backend_id, decision, resp, error, time.perf_counter() - started)
