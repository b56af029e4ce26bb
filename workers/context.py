"""The per-request context: built once by the server adapter that carried the request.

Both servers (workers.fast_server for the hot endpoints, aiohttp in workers.app for the rest)
make one RequestContext per request and hand it to the pipeline (workers.pipeline). It carries
everything the steps share: the request id, the routing-table view taken ONCE (every step of a
request sees one generation), the caller, the clocks, the forwarding result and the outcome,
and a slot for a trace span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from apirouter.keys import KeyRecord
from apirouter.outcomes import Outcome

if TYPE_CHECKING:
    from apirouter.table import Route
    from apirouter.validation import ProxyRequest
    from workers.admission import Ticket
    from workers.endpoints import Endpoint
    from workers.forwarding import Forwarded
    from workers.table_view import TableView

JSON = "application/json"


@dataclass(slots=True)
class Reply:
    """A complete (buffered) response."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON


# Caller and Signed are made for every request: not frozen, as a frozen dataclass's __init__
# costs ~0.4 µs more (a object.__setattr__ call per field). Nothing assigns to them.
@dataclass(slots=True)
class Caller:
    """Who is calling: the authenticated key, and the nonce of a signed request."""

    key: KeyRecord
    nonce: str | None = None


@dataclass(slots=True)
class Signed:
    """What request signing needs from the transport (both servers fill it in)."""

    method: str
    path: str  # with the query string
    timestamp: str | None
    nonce: str | None
    signature: str | None


class Sink(Protocol):
    """A streamed response, as the server adapter writes it: head, chunks (each awaiting the
    client's socket: write back-pressure), end. A client that hangs up cancels the request's
    task (both servers do), so the pipeline never writes into a dead connection for long."""

    async def start(self, status: int, headers: list[tuple[str, str]],
                    content_type: str) -> None: ...

    async def write(self, data: bytes) -> None: ...

    def write_now(self, data: bytes) -> bool:
        """``write`` from a callback, when it need not wait: False, with nothing written,
        while the client's socket is full (or the adapter cannot tell): the caller then
        awaits ``write``. ConnectionError if the client is gone."""
        ...

    async def end(self) -> None: ...


@dataclass(slots=True)
class RequestContext:
    request_id: str
    endpoint: Endpoint
    view: TableView  # taken once, by the adapter, before the body was read
    body: bytes
    key_sha256: str | None  # of the API key sent (apirouter.keys.hash_key); never the key
    signed: Signed | None
    t0: float  # wall clock at the start (records)
    started: float  # perf_counter at the start (latencies)
    path_params: dict[str, str] | None = None
    caller: Caller | None = None
    request: ProxyRequest | None = None
    route: Route | None = None
    ticket: Ticket | None = None
    fwd: Forwarded | None = None
    outcome: Outcome | None = None
    used: tuple[int, int] | None = None  # (prompt, completion) tokens the request consumed
    cost_micro: int = 0
    total_s: float = 0.0
    sink: Sink | None = None  # where a stream is written (the server adapter's)
    # Streams: time to the first event the client got, events relayed, why it broke off.
    ttft_s: float | None = None
    events: int = 0
    interruption: str | None = None
    usage_estimated: bool = False
    accounted: bool = False  # the accounting step ran (recorded, settled): never twice
    span: Any = None  # the request's trace span, when tracing is on (OpenTelemetry)
    traceparent: str | None = None  # the client's W3C trace context header
