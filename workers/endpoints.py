"""The endpoints, as declarations: what each one parses, where it forwards, how it answers.

An endpoint is an entry here, not a copy of the request flow: the one pipeline
(workers.pipeline) runs every request — authenticate, parse, admit, route and forward, shape
the response, account — and reads from the declaration what differs between endpoints:

- ``parse``: the body validator (apirouter.validation), returning a ProxyRequest;
- ``upstream``: the backend path it forwards to;
- ``shape``: how a successful backend response becomes the client's reply (None: as is);
- ``usage``: where its token usage comes from in the backend's response;
- ``openai``: its error family (OpenAI's error shape, or the native envelope).

Endpoints the worker answers itself (catalogue, health, metrics) declare a ``local`` handler.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from apirouter.errors import RouterError
from apirouter.validation import (
    ProxyRequest,
    parse_chat,
    parse_chat_completion,
    parse_completion,
    parse_embedding,
    parse_inference,
    usage_counts,
)
from workers import readiness
from workers.context import Reply, RequestContext
from workers.metrics import CONTENT_TYPE, exposition
from workers.scrape_metrics import scrape_exposition
from workers.upstream import UpstreamResponse

if TYPE_CHECKING:
    from workers.pipeline import Pipeline

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
INFERENCE = "/v1/inference"

LocalHandler = Callable[["Pipeline", RequestContext], Awaitable[Reply]]
Shaper = Callable[[RequestContext, UpstreamResponse], Reply]
UsageSource = Callable[[bytes], "tuple[int, int] | None"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    openai: bool  # errors in OpenAI's shape (OpenAI-compatible family) or the native envelope
    hot: bool  # served by the lean protocol server rather than handed to aiohttp
    scope: str | None  # the API-key scope it needs (when the table requires auth)
    local: LocalHandler | None = None  # answered by the worker itself
    parse: Callable[[bytes], ProxyRequest] | None = None
    upstream: str = ""  # the backend path a forwarded request goes to
    shape: Shaper | None = None  # None: the backend's response goes to the client as is
    usage: UsageSource = usage_counts


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


# -- response shaping ---------------------------------------------------------------------------

def shape_inference(ctx: RequestContext, resp: UpstreamResponse) -> Reply:
    """The native envelope around a backend's chat completion (with a ``router`` block)."""
    assert ctx.fwd is not None and ctx.request is not None
    completion = parse_chat_completion(resp.body)
    fwd, total = ctx.fwd, ctx.total_s
    return Reply(200, orjson.dumps({
        "id": ctx.request_id,
        "object": "inference",
        "created": int(time.time()),
        "model": ctx.request.model,
        "output": {"role": completion.role, "content": completion.content,
                   "finish_reason": completion.finish_reason},
        "usage": {"prompt_tokens": completion.prompt_tokens,
                  "completion_tokens": completion.completion_tokens,
                  "total_tokens": completion.total_tokens},
        "router": {
            "request_id": ctx.request_id,
            "backend_id": fwd.backend_id,
            "decision_type": fwd.decision_type,
            "attempts": fwd.attempts,
            "table_generation": ctx.view.generation,
            "router_overhead_ms": round((total - fwd.backend_s) * 1000, 3),
            "backend_latency_ms": round(fwd.backend_s * 1000, 3),
            "total_latency_ms": round(total * 1000, 3),
        },
    }))


# -- answered by the worker -----------------------------------------------------------------------

async def models(p: Pipeline, ctx: RequestContext) -> Reply:
    return Reply(200, ctx.view.models_body)


async def model(p: Pipeline, ctx: RequestContext) -> Reply:
    """GET /v1/models/{model}: one entry of the catalogue, in OpenAI's shape."""
    name = (ctx.path_params or {}).get("model", "")
    if name not in ctx.view.table.routes:
        raise RouterError("MODEL_NOT_FOUND", f"model '{name}' is not routed by this router",
                          field="model")
    return Reply(200, orjson.dumps({"id": name, "object": "model",
                                    "created": int(ctx.view.table.compiled_at),
                                    "owned_by": "apirouter"}))


async def healthz(p: Pipeline, ctx: RequestContext) -> Reply:
    return Reply(200, orjson.dumps({"status": "ok", "worker_pid": p.pid}))


async def readyz(p: Pipeline, ctx: RequestContext) -> Reply:
    view = ctx.view
    status, doc = readiness.report(p.pid, view.generation, view.table, p.tables.reload_errors,
                                   p.admission.status(view.table.limits))
    return Reply(status, orjson.dumps(doc))


async def metrics_text(p: Pipeline, ctx: RequestContext) -> Reply:
    gauges = await scrape_exposition(p.admission, ctx.view.table)
    return Reply(200, exposition() + gauges, [], CONTENT_TYPE)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", CHAT, True, True, "inference", parse=parse_chat, upstream=CHAT),
    Endpoint("POST", COMPLETIONS, True, True, "inference", parse=parse_completion,
             upstream=COMPLETIONS),
    Endpoint("POST", EMBEDDINGS, True, True, "inference", parse=parse_embedding,
             upstream=EMBEDDINGS),
    Endpoint("GET", "/v1/models", True, True, "inference", local=models),
    # A model id may contain slashes ("org/name"): the rest of the path is the id.
    Endpoint("GET", "/v1/models/{model:.+}", True, False, "inference", local=model),
    Endpoint("POST", INFERENCE, False, True, "inference", parse=parse_inference, upstream=CHAT,
             shape=shape_inference),
    Endpoint("GET", "/v1/status/healthz", False, True, None, local=healthz),
    Endpoint("GET", "/v1/status/readyz", False, True, None, local=readyz),
    Endpoint("GET", "/metrics", False, False, None, local=metrics_text),
)
