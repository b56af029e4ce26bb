"""The lean HTTP/1.1 server for the hot endpoints: an asyncio protocol parsed by httptools.

Measured (design brief, bench/): aiohttp's server costs ~50 µs of CPU per request more than a
protocol-level server. So each accepted connection starts here. Requests to the hot endpoints
(inference, chat completions, models, health) are parsed, answered and kept alive by this
module; the first request to any other path hands the whole connection to aiohttp (its
protocol takes over the transport and is replayed the bytes received so far), which then
serves it for the rest of its life.

HTTP/1.1 handled here: keep-alive and ``Connection: close``, HTTP/1.0, pipelining (answered in
order, at most MAX_PIPELINE queued before reading pauses), chunked request bodies,
``Expect: 100-continue``, header and body size limits, idle and slow-request timeouts, write
back-pressure, and a graceful shutdown that lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import httptools

from apirouter.errors import RouterError
from apirouter.keys import credential
from workers.context import Reply, Signed
from workers.endpoints import Endpoint
from workers.pipeline import Pipeline
from workers.table_view import TableView

log = logging.getLogger("apirouter.worker")

MAX_HEADER_BYTES = 32 * 1024
MAX_PIPELINE = 16
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Handoff(Exception):
    """Raised inside the parser: this request is not ours, give the connection to aiohttp."""


class _Reject(Exception):
    """Raised inside the parser: answer with this error and close the connection."""

    def __init__(self, error: RouterError) -> None:
        self.error = error


_Item = tuple[Endpoint, TableView, bytes | None, bytes, bool, str | None, Signed] | Reply
_SIGNATURE_HEADERS = {b"x-signature-timestamp": 0, b"x-signature-nonce": 1, b"x-signature": 2}


class FastServer:
    """Shared state of all fast connections of one worker."""

    def __init__(self, pipeline: Pipeline, handoff: Callable[[], asyncio.Protocol], *,
                 keepalive_s: float) -> None:
        self.pipeline = pipeline
        self.routes = {(e.method.encode(), e.path.encode()): e for e in pipeline.all if e.hot}
        self.handoff = handoff
        self.keepalive_s = keepalive_s
        self.connections: set[FastProtocol] = set()
        self.loop = asyncio.get_running_loop()
        self.closing = False
        self.handoffs = 0
        self._date = b""
        self._date_second = 0
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def protocol(self) -> FastProtocol:
        return FastProtocol(self)

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self._date

    def _sweep(self) -> None:
        """Once a second: close idle keep-alive connections and requests that dawdle."""
        now = self.loop.time()
        client_timeout = self.pipeline.tables.current().table.limits.client_timeout_s
        for conn in list(self.connections):
            conn.check_timeouts(now, client_timeout)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    async def shutdown(self, timeout: float) -> None:
        """Stop reading new requests; let in-flight ones finish; then close everything."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        self._sweeper.cancel()


class FastProtocol(asyncio.Protocol):
    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[_Item] = deque()
        self.busy = False
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.pending_handoff = False
        self.failed = False
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self.last_active = server.loop.time()
        # Raw bytes since the start of the message being parsed, for a hand-off replay.
        self.chunks: list[bytes] = []
        self.completed_in_feed = False
        self._reset_message()

    def _reset_message(self) -> None:
        self.in_message = False
        self.clean_start = True
        self.message_started = 0.0
        self.url = b""
        self.header_bytes = 0
        self.request_id: bytes | None = None
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.signature: list[bytes | None] = [None, None, None]  # timestamp, nonce, signature
        self.content_length = -1
        self.expect_continue = False
        self.endpoint: Endpoint | None = None
        self.view: TableView | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.limit = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.closing:
            self.close_when_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        # The client is gone: cancel the request it was waiting for. The pipeline accounts for
        # it, and the upstream client closes that backend connection rather than pooling it.
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests.
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if len(self.queue) < MAX_PIPELINE:
            self._resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.failed:  # the parser is in its error state; the connection is ending
            return
        if self.in_message:
            self.chunks.append(data)
        else:
            self.chunks = [data]
        self.completed_in_feed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Handoff):
                self._request_handoff()
            elif isinstance(cause, _Reject):
                self._fail(cause.error)
            else:
                log.error("error while parsing a request: %r", cause)
                self._fail(RouterError("INTERNAL_ERROR"))
        except httptools.HttpParserUpgrade:
            self._request_handoff()
        except httptools.HttpParserError as e:
            self._fail(RouterError("INVALID_REQUEST", "malformed HTTP request",
                                   details=str(e)[:200]))

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self.in_message = True
        # A request that began right after another one in the same read shares its bytes
        # with it: those cannot be replayed to aiohttp on their own.
        self.clean_start = not self.completed_in_feed
        self.message_started = self.server.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEADER_BYTES:
            raise _Reject(RouterError("INVALID_REQUEST", "the request line is too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Reject(RouterError("INVALID_REQUEST", "the request headers are too large",
                                      details=f"the limit is {MAX_HEADER_BYTES} bytes"))
        n = name.lower()
        if n == b"content-length":
            self.content_length = int(value) if value.isdigit() else -1
        elif n == b"x-request-id":
            self.request_id = value
        elif n == b"authorization":
            self.authorization = value
        elif n == b"x-api-key":
            self.api_key = value
        elif n.startswith(b"x-signature"):
            slot = _SIGNATURE_HEADERS.get(n)
            if slot is not None:
                self.signature[slot] = value
        elif n == b"expect":
            self.expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        endpoint = self.server.routes.get((method, path))
        if endpoint is None:
            raise _Handoff
        self.endpoint = endpoint
        # The request's one look at the table: its limits here, everything else in the pipeline.
        self.view = view = self.server.pipeline.tables.current()
        if method == b"POST":
            self.limit = view.table.limits.max_body_bytes
            if self.content_length > self.limit:
                raise _Reject(RouterError("PAYLOAD_TOO_LARGE",
                                          details=f"the limit is {self.limit} bytes"))
        if self.expect_continue and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.limit:
            raise _Reject(RouterError("PAYLOAD_TOO_LARGE",
                                      details=f"the limit is {self.limit} bytes"))
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.endpoint is not None and self.view is not None
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        cred = credential(self.authorization.decode("latin-1") if self.authorization else None,
                          self.api_key.decode("latin-1") if self.api_key else None)
        ts, nonce, sig = (v.decode("latin-1") if v is not None else None
                          for v in self.signature)
        signed = Signed(self.endpoint.method, self.url.decode("latin-1"), ts, nonce, sig)
        self.queue.append((self.endpoint, self.view, self.request_id, body,
                           self.parser.should_keep_alive(), cred, signed))
        self._reset_message()
        self.completed_in_feed = True
        self.last_active = self.server.loop.time()
        if len(self.queue) >= MAX_PIPELINE:
            self._pause_reading()
        if not self.busy:
            self._next()

    # -- answering ------------------------------------------------------------------------------

    def _next(self) -> None:
        while self.queue:
            item = self.queue.popleft()
            if isinstance(item, Reply):  # a rejection: the connection ends with it
                self._write(item, keep_alive=False)
                continue
            self.busy = True
            if self.reading_paused and not self.writing_paused and len(self.queue) < MAX_PIPELINE:
                self._resume_reading()
            self.task = self.server.loop.create_task(self._serve(*item))
            return
        self.busy = False
        if self.pending_handoff:
            self._handoff()
        elif self.closing and not self.in_message:
            self._close()

    async def _serve(self, endpoint: Endpoint, view: TableView, request_id: bytes | None,
                     body: bytes, keep_alive: bool, cred: str | None, signed: Signed) -> None:
        pipeline = self.server.pipeline
        rid = pipeline.ids.accept(request_id.decode("latin-1") if request_id else None)
        reply = await pipeline.run(pipeline.context(endpoint, view, rid, body, cred, signed))
        self.task = None
        # When closing, the connection ends with the last queued answer, not this one.
        self._write(reply, keep_alive and (not self.closing or bool(self.queue)))
        self._next()

    def _write(self, reply: Reply, keep_alive: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        parts = [_STATUS.get(reply.status) or f"HTTP/1.1 {reply.status} Unknown\r\n".encode(),
                 b"Server: apirouter\r\nDate: ", self.server.date(),
                 b"\r\nContent-Type: ", reply.content_type.encode("latin-1"),
                 b"\r\nContent-Length: ", str(len(reply.body)).encode(), b"\r\n"]
        for k, v in reply.headers:
            parts += (k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n")
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        parts += (b"\r\n", reply.body)
        t.write(b"".join(parts))
        self.last_active = self.server.loop.time()
        if not keep_alive:
            self._close()

    def _fail(self, err: RouterError) -> None:
        """Answer a request we cannot parse or accept, after any earlier ones, then close."""
        if self.failed:
            return
        self.failed = True
        self.closing = True
        self._pause_reading()
        endpoint = self.endpoint
        rid = self.server.pipeline.ids.accept(
            self.request_id.decode("latin-1") if self.request_id else None)
        self.queue.append(self.server.pipeline.error_reply(
            err, rid, endpoint.openai if endpoint else False))
        self._reset_message()
        if not self.busy:
            self._next()

    # -- hand-off to aiohttp -------------------------------------------------------------------

    def _request_handoff(self) -> None:
        if not self.clean_start:
            self._fail(RouterError(
                "INVALID_REQUEST", "this endpoint cannot be pipelined behind another request; "
                                   "send it on its own connection"))
            return
        self.pending_handoff = True
        self._pause_reading()
        if not self.busy:
            self._next()

    def _handoff(self) -> None:
        """Give the transport, and every byte of the current request, to aiohttp."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self.server.connections.discard(self)
        self.server.handoffs += 1
        self.transport = None
        proto = self.server.handoff()
        t.set_protocol(proto)
        proto.connection_made(t)
        proto.data_received(b"".join(self.chunks))
        self.chunks = []
        t.resume_reading()

    # -- lifecycle ----------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closing:
            self.reading_paused = False
            self.transport.resume_reading()

    def check_timeouts(self, now: float, client_timeout: float) -> None:
        if self.in_message:
            if now - self.message_started > client_timeout:
                self._fail(RouterError("REQUEST_TIMEOUT",
                                       details=f"the limit is {client_timeout:g} s"))
        elif not self.busy and not self.queue and now - self.last_active > self.server.keepalive_s:
            self._close()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy and not self.queue and not self.in_message:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
