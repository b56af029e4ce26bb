"""The lean HTTP/1.1 server for the hot endpoints: an asyncio protocol parsed by httptools.

Measured (design brief, bench/): aiohttp's server costs ~50 µs of CPU per request more than a
protocol-level server. So each accepted connection starts here. Requests to the hot endpoints
(inference, chat completions, models, health) are parsed, answered and kept alive by this
module; the first request to any other path hands the whole connection to aiohttp (its
protocol takes over the transport and is replayed the bytes received so far), which then
serves it for the rest of its life.

HTTP/1.1 handled here: keep-alive and ``Connection: close``, HTTP/1.0, pipelining (answered in
order, at most MAX_PIPELINE queued before reading pauses), chunked request bodies,
``Expect: 100-continue`` (sent only once the responses before it are out), header size and
count limits, body size limits, idle and slow-request timeouts, write back-pressure, and a
graceful shutdown that lets in-flight requests finish. ``Upgrade`` is ignored (RFC 9110 7.8:
the router speaks HTTP/1.1 only), so such a request is answered once, like any other. A client's
EOF cancels the request being answered (it hung up), or with ``client_eof_policy: answer``
(it half-closed) what it sent completely is answered, then the connection closes (here and
on handed-off connections). A client that leaves its socket full (reads nothing) for the
client timeout is disconnected, its request cancelled and accounted as a client disconnect.

One response per request, even when answering fails (our bug: the catalog's 500, or a close
if the head was already out), and nothing kept after it: a request refused before its body or
headers have all arrived is answered, then the connection is half-closed and what the client
still sends is read and discarded (up to LINGER_BYTES or LINGER_S), so the answer is not lost
to a reset. A closed connection drops its buffers and parser at once (the parser and the
protocol refer to each other; left to the cycle collector, each refused 1 MB header stayed
in the worker for thousands of requests).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from hmac import compare_digest
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from gunicorn_h1c import parse_request_fast as parse_whole

from apirouter._httpcore import response_head, take_request
from apirouter.errors import RouterError
from apirouter.keys import credential, hash_key
from workers.context import Reply, RequestContext, Signed
from workers.endpoints import Endpoint
from workers.pipeline import InFlight, Pipeline
from workers.table_view import TableView
from workers.turn_writes import turn_writes

log = logging.getLogger("apirouter.worker")

MAX_HEADER_BYTES = 32 * 1024  # request line, and all header names and values together
MAX_HEADERS = 100
MAX_PIPELINE = 16
LINGER_BYTES = 16 << 20  # after a refusal: discard at most this much of what the client sends
LINGER_S = 10.0  # ... for at most this long
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = "Connection: close\r\n"
_CRLF = "\r\n"
_FIELD = ": ".join  # (name, value) -> "name: value"


# response_head's framing: Content-Length (the body's), chunked, or none (the close ends it)
_LENGTH, _CHUNKED, _UNFRAMED = 0, 1, 2


def _head_py(status: int, date: bytes, content_type: str, framing: int,
             headers: list[tuple[str, str]], keep_alive: bool, body: bytes = b"") -> bytes:
    """A response head (and ``body`` after it, joined in the same copy): the reference of
    ``response_head`` (apirouter/_httpcore.c), which the server calls, ``_STATUS`` first. Its
    variable part built as one str and encoded once (an encode per header name and value cost
    ~1 µs a response); the header lines joined in C (map of ": ".join)."""
    fields = "\r\n".join(map(_FIELD, headers))
    framing_line = f"Content-Length: {len(body)}\r\n" if framing == _LENGTH else \
        "Transfer-Encoding: chunked\r\n" if framing == _CHUNKED else ""
    return b"".join((_STATUS.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
                     b"Server: apirouter\r\nDate: ", date,
                     f"\r\nContent-Type: {content_type}\r\n{framing_line}{fields}"
                     f"{_CRLF if fields else ''}{'' if keep_alive else _CLOSE}\r\n"
                     .encode("latin-1"), body))


class _Handoff(Exception):
    """Raised inside the parser: this request is not ours, give the connection to aiohttp."""


class _Reject(Exception):
    """Raised inside the parser: answer with this error and close the connection."""

    def __init__(self, error: RouterError) -> None:
        self.error = error


_Request = tuple[Endpoint, TableView, bytes | None, bytes, bool, bool, str | None,
                 Signed | None, bytes | None]
_Item = _Request | Reply
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
        # Every write to a client goes out at the end of the loop turn (workers.turn_writes)
        self.writes = turn_writes(self.loop)
        self.closing = False
        self.handoffs = 0
        # What a request reads of the table, taken once a generation (adopt), not per request.
        self.view: TableView | None = None
        self.max_body_bytes = 0
        self.signing = True  # some key requires signed requests: their headers are read
        # The client's trace context is read only when tracing is on (it is used for nothing
        # else): a header lookup less a request.
        self.tracing = pipeline.tracing is not None
        self._date = b""
        self._date_second = 0
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def adopt(self, view: TableView) -> None:
        """A new table generation: what the parsers read of it per request. A request's
        signature headers are read only while some key requires them (Pipeline.authenticate
        reads them for such a key only): three header lookups less a request otherwise."""
        self.view = view
        table = view.table
        self.max_body_bytes = table.limits.max_body_bytes
        self.signing = table.auth_required and any(
            k.hmac_required for k in table.keys.values())

    def protocol(self) -> FastProtocol:
        return FastProtocol(self)

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self._date

    def _sweep(self) -> None:
        """Once a second: close idle keep-alive connections and requests that dawdle, and
        collect the young generations. The worker raises the collector's threshold for the hot
        path (workers.app), and aiohttp's connections are reference cycles: without this, a
        burst of handed-off connections stays allocated until 50,000 other objects come along
        (1,000 refused 1 MB admin bodies kept ~11 MiB). A young collection costs under a
        millisecond (0.8 ms with 45,000 young objects): most of the heap is frozen."""
        now = self.loop.time()
        client_timeout = self.pipeline.tables.current().table.limits.client_timeout_s
        for conn in list(self.connections):
            conn.check_timeouts(now, client_timeout)
        gc.collect(1)
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
    # Requests that arrive whole in the common form skip httptools (_take_whole); the
    # differential test turns this off to compare the two parsers on the same bytes.
    whole_requests = True

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.writes = server.writes
        self.parser = httptools.HttpRequestParser(self)
        self.lingering = 0.0  # when the refusal went out; then reads are discarded
        self.discarded = 0
        self.transport: asyncio.Transport | None = None
        self.queue: deque[_Item] = deque()
        self.busy = False
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.paused_at = 0.0  # when writing last paused (the client stopped reading)
        self.pending_handoff = False
        self.failed = False
        self.ended = False  # a request that closes the connection was read: nothing may follow
        self.half_closed = False  # the client sent its EOF: answer what it sent, then close
        # The request being answered (one at a time, in order), its sink, and the pipeline's
        # handle on it while it waits for its backend (cancelled when the client hangs up).
        self.current: _Request | None = None
        self.sink: _Stream | None = None
        # The sink of each request in turn (None once released: it refers back to us).
        self.stream: _Stream | None = _Stream(self, True, True)
        self.inflight: InFlight | asyncio.Task[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.last_active = server.loop.time()
        # Raw bytes since the start of the message being parsed, for a hand-off replay.
        self.chunks: list[bytes] = []
        self.completed_in_feed = False
        # The last Authorization header and its key's hash (_key_sha256).
        self.auth_seen = b""
        self.auth_sha256: str | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        self.in_message = False
        self.clean_start = True
        self.message_started = 0.0
        self.url = b""
        self.header_bytes = 0
        self.header_count = 0
        self.head_done = False
        self.head_bytes = 0  # raw bytes of a head still incomplete after whole reads
        self.upgrade = False
        self.chunked = False
        self.request_id: bytes | None = None
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.signature: list[bytes | None] = [None, None, None]  # timestamp, nonce, signature
        self.traceparent: bytes | None = None
        self.content_length = -1
        self.expect_continue = False
        self.continue_pending = False
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
        # The client is gone: cancel the request it was waiting for (_release). The pipeline
        # accounts for it, and the upstream client closes that backend connection rather than
        # pooling it.
        self._release()

    def _release(self) -> None:
        """Cancel the request being answered, and drop the buffers and the parser (it refers
        back to this protocol) now rather than whenever the cycle collector runs."""
        inflight = self.inflight
        if inflight is not None:
            self.inflight = None
            inflight.cancel()
        if self.current is not None:  # (it will not be answered)
            self.current = self.sink = None
            self.writes.serving -= 1
        self.chunks = []
        self.body = []
        self.queue.clear()
        self.parser = _SPENT
        self.stream = None
        self.auth_seen, self.auth_sha256 = b"", None

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests (and a stream
        # being relayed waits in drain()). If it reads nothing more for client_timeout_s,
        # check_timeouts disconnects it.
        self.writing_paused = True
        self.paused_at = self.server.loop.time()
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if len(self.queue) < MAX_PIPELINE:
            self._resume_reading()

    def eof_received(self) -> bool:
        """The client's EOF (FIN). It hung up, or it only half-closed (``shutdown(SHUT_WR)``,
        as ``printf ... | nc -q`` does) and still reads: a FIN cannot tell which, so
        ``client_eof_policy`` decides. cancel: the transport closes, which cancels the request
        being answered (499), as nginx does. answer: the requests it sent completely are
        answered, then the connection closes (``closing``: the last answer says so); a client
        that really closed is noticed when its answer is written. False closes the transport;
        so with nothing to answer, or an EOF inside a request (head or body cut short)."""
        if self.in_message or self.lingering or not (self.busy or self.queue) or \
                self.server.pipeline.tables.current().table.limits.client_eof_policy != "answer":
            return False
        self.half_closed = True
        self.closing = True
        return True

    def data_received(self, data: bytes) -> None:
        if self.failed:  # the connection is ending: discard what the client still sends
            self.discarded += len(data)
            if self.discarded > LINGER_BYTES:
                self._close()
            return
        self.completed_in_feed = False
        if self.ended:  # data after a request that closes: refused, as httptools does
            if data.strip(b"\r\n"):  # (which skips bare line ends there)
                self._fail(_data_after_close())
            return
        if not self.in_message and self.whole_requests and not self.closing:
            taken = self._take_whole(data)
            if taken:
                if taken == len(data):
                    return
                data = data[taken:]  # the rest is httptools': a request begins there
                self.completed_in_feed = True
        # A head still incomplete after a whole earlier read: all of this read belongs to it.
        head_pending = self.in_message and not self.head_done
        if self.in_message:
            self.chunks.append(data)
        else:
            self.chunks = [data]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            # Not bound to a local: the callback's traceback refers back to this frame, and
            # that cycle would keep ``data`` (up to 256 KB a read) until the collector runs.
            self._callback_failed(e.__context__)
            return
        except httptools.HttpParserUpgrade as e:
            self._upgrade_ignored(data[e.args[0]:])
            return
        except httptools.HttpParserError as e:
            self._fail(RouterError("INVALID_REQUEST", "malformed HTTP request",
                                   details=str(e)[:200]))
            return
        if self.in_message and not self.head_done:
            # The parser keeps a header value until it is complete: bound it here, by the
            # bytes read, not only when it ends (a 1 MB header is refused at ~32 KB read).
            self.head_bytes += len(data) if head_pending else 0
            if self.head_bytes > MAX_HEADER_BYTES:
                self._fail(_headers_too_large())

    def _take_whole(self, data: bytes) -> int:
        """The fast path: the requests at the start of ``data`` that arrived whole and in the
        common form, each parsed in one call (``take_request``, apirouter/_httpcore.c, or for a
        form it leaves to its reference, ``_take_request``: gunicorn_h1c's picohttpparser).
        Returns the bytes taken. Anything else is left to httptools, which handles every case
        and refuses what must be refused (see ``_take_request``). So this path never refuses
        anything; it only answers sooner what httptools would take the same way (a
        differential test feeds both the same bytes).
        Measured from read to queued: ~2.8 µs against ~4.6 µs through httptools' per-header
        callbacks for wrk's 4 headers, ~3.9 against ~8.4 µs for an SDK client's 15
        (bench/test_micro.py::test_lean_server_request_parse), through picohttpparser."""
        server = self.server
        routes = server.routes
        taken = 0
        end = len(data)
        while taken < end and not self.closing:
            view = server.pipeline.tables.current()
            if view is not server.view:
                server.adopt(view)
            req = take_request(data, taken, view, routes, server.max_body_bytes,
                               server.signing, server.tracing)
            if req is None:  # not the strict form the C reads: its reference decides
                req = _take_request(data, taken, view, routes, server.max_body_bytes,
                                    server.signing, server.tracing)
            if not req:
                return taken
            taken = req[0]
            self._enqueue(*req)  # (passed whole: ~20 bytecodes less than unpacked)
            if not req[5]:  # not kept alive: nothing may follow it (httptools refuses
                self.ended = True  # what does, but skips bare line ends)
                if taken < end and data[taken:].strip(b"\r\n"):
                    self._fail(_data_after_close())
                return end
        return taken

    def _callback_failed(self, cause: BaseException | None) -> None:
        if isinstance(cause, _Handoff):
            self._request_handoff()
        elif isinstance(cause, _Reject):
            self._fail(cause.error)
        else:
            log.error("error while parsing a request: %r", cause)
            self._fail(RouterError("INTERNAL_ERROR"))

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # The message state is clean here: every way a message ends resets it (complete,
        # refused, or parsed again without its upgrade), so it is not reset twice a request.
        self.in_message = True
        # A request that began right after another one in the same read shares its bytes
        # with it: those cannot be replayed to aiohttp on their own.
        self.clean_start = not self.completed_in_feed
        self.message_started = self.server.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEADER_BYTES:
            raise _Reject(RouterError("INVALID_REQUEST", "the request line is too long",
                                      details=f"the limit is {MAX_HEADER_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        self.header_count += 1
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Reject(_headers_too_large())
        if self.header_count > MAX_HEADERS:
            raise _Reject(RouterError("INVALID_REQUEST", "the request has too many headers",
                                      details=f"the limit is {MAX_HEADERS}"))
        n = name.lower()
        value = value.rstrip(b" \t")  # trailing whitespace is not part of a value (RFC 9110 5.5)
        # A repeated header: its first value counts (as in Go's Header.Get and nginx's
        # $http_ variables; the fast path's lookup agrees).
        if n == b"content-length":
            self.content_length = int(value) if value.isdigit() else -1
        elif n == b"x-request-id":
            if self.request_id is None:
                self.request_id = value
        elif n == b"authorization":
            if self.authorization is None:
                self.authorization = value
        elif n == b"x-api-key":
            if self.api_key is None:
                self.api_key = value
        elif n.startswith(b"x-signature"):
            slot = _SIGNATURE_HEADERS.get(n)
            if slot is not None and self.signature[slot] is None:
                self.signature[slot] = value
        elif n == b"expect":
            self.expect_continue = value.lower() == b"100-continue"
        elif n == b"transfer-encoding":
            self.chunked = True
        elif n == b"traceparent":
            if self.traceparent is None:
                self.traceparent = value

    def on_headers_complete(self) -> None:
        self.head_done = True
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        endpoint = self.server.routes.get((method, path))
        # Upgrade requested: ignored. aiohttp gets the request without it (_handoff); ours is
        # parsed again without it once the parser stops after this head (_upgrade_ignored).
        self.upgrade = self.parser.should_upgrade()
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
        if self.expect_continue and not self.upgrade:
            self.expect_continue = False
            if not self.busy and not self.queue:
                self._write_continue()
            else:  # the responses before it go first; _next sends it when they are out
                self.continue_pending = True

    def _write_continue(self) -> None:
        self.continue_pending = False
        if self.transport is not None and not self.transport.is_closing():
            self.server.writes.write(self.transport, _CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.limit:
            raise _Reject(RouterError("PAYLOAD_TOO_LARGE",
                                      details=f"the limit is {self.limit} bytes"))
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.endpoint is not None and self.view is not None
        if self.upgrade:  # answered once parsed again without the upgrade
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        ts, nonce, sig = self.signature
        server = self.server
        if self.view is not server.view:
            server.adopt(self.view)
        # As _take_whole: the signature and the trace context only when they are read.
        signed = _signed(self.endpoint, self.url, ts, nonce, sig) if server.signing and (
            ts is not None or nonce is not None or sig is not None) else None
        keep_alive = self.parser.should_keep_alive()
        request = (0, self.endpoint, self.view, self.request_id, body, keep_alive,
                   self.parser.get_http_version() != "1.0", self.authorization, self.api_key,
                   signed, self.traceparent if server.tracing else None)
        self.ended = not keep_alive  # what follows is refused (the fast path must not take it)
        self._reset_message()
        # The raw bytes are kept for a hand-off replay of the message being parsed; this one
        # is complete (and one beginning later in this read cannot be handed off).
        self.chunks = []
        self.completed_in_feed = True
        self._enqueue(*request)

    def _enqueue(self, stop: int, endpoint: Endpoint, view: TableView,
                 request_id: bytes | None, body: bytes, keep_alive: bool, http11: bool,
                 auth: bytes | None, api_key: bytes | None, signed: Signed | None,
                 traceparent: bytes | None) -> None:
        """A request parsed whole (by either parser): answered now on an idle connection, else
        queued to be answered in turn. ``stop`` (where it ended in its read: the first item of
        take_request's tuple, which the fast path passes as it is) is not used here."""
        if api_key is None and auth is not None and compare_digest(auth, self.auth_seen):
            digest = self.auth_sha256  # the key of the connection's previous request
        else:
            digest = self._key_sha256(auth, api_key)
        item = (endpoint, view, request_id, body, keep_alive, http11, digest, signed,
                traceparent)
        self.last_active = self.server.loop.time()
        if self.busy:  # answered in turn, once the ones before it are
            queue = self.queue
            queue.append(item)
            if len(queue) >= MAX_PIPELINE:
                self._pause_reading()
            return
        # Idle, so nothing is queued (_take leaves the connection idle only when the queue is
        # empty): answered now, not through the queue (_next and _take, two calls less).
        self.busy = True
        if self._serve(item):
            self._next()

    def _key_sha256(self, auth: bytes | None, api_key: bytes | None) -> str | None:
        """The SHA-256 of the API key a request carries (None: it carries none). A client sends
        the same ``Authorization`` header on every request of a connection: its key's hash is
        kept for the next one, which then costs a constant-time comparison of the header
        instead of a decode and a hash (~0.45 µs a request)."""
        cred = credential(auth.decode("latin-1") if auth else None,
                          api_key.decode("latin-1") if api_key else None)
        digest = None if cred is None else hash_key(cred)
        if api_key is None and auth is not None:
            self.auth_seen, self.auth_sha256 = auth, digest
        return digest

    # -- answering ------------------------------------------------------------------------------

    def _next(self) -> None:
        """Answer the queued requests in order (called when not busy): those the pipeline
        answers at once (refusals) here, one after the other; the first that waits for its
        backend goes on in the pipeline's callbacks, whose answer (_answered) continues.
        No task or future per connection or request: the connection's task, woken for each
        request and again for its backend's answer, cost ~4 µs of the router's CPU a request
        at c=32 (58.0 → 53.9 µs, bench.overhead, medians of 4 alternating runs)."""
        while True:
            item = self._take()
            if item is None:
                return
            if not self._serve(item):
                return

    def _serve(self, item: _Request) -> bool:
        """Start answering ``item``; True if it was answered at once."""
        endpoint, view, request_id, body, keep_alive, chunked, key_sha256, signed, traceparent = \
            item
        server = self.server
        pipeline = server.pipeline
        # The connection's one sink, set for this request (requests are answered one at a
        # time, and a request's writes end with its answer): no object a request.
        sink = self.stream
        assert sink is not None  # (a released connection has nothing queued to serve)
        self.current, self.sink = item, sink  # (after the check: _release undoes both)
        sink.keep_alive = keep_alive and chunked  # HTTP/1.0: the end of the body is the close
        sink.chunked = chunked
        sink.started = False
        self.writes.serving += 1  # how many requests could share a turn's writes
        try:
            ids = pipeline.ids
            rid = ids.accept(request_id.decode("latin-1")) if request_id else ids.new()
            # The context made here, not through Pipeline.context: a call less a request.
            ctx = RequestContext(rid, endpoint, view, body, key_sha256, signed, time.time(),
                                 time.perf_counter(), None, sink=sink, traceparent=traceparent
                                 .decode("latin-1") if traceparent else None)
            got = pipeline.serve(ctx, self._answered)
        except Exception as e:  # (the request's context could not be made): bounded
            self._answer(None, e)
            return True
        if type(got) is Reply:
            self._answer(got, None)
            return True
        self.inflight = got  # type: ignore[assignment]
        return False

    def _answered(self, reply: Reply | None, failed: BaseException | None) -> None:
        """The pipeline's answer to the request in flight; then the next one. With nothing
        queued and nothing waiting for the connection to go idle, it is idle now: what _next
        (through _take) would find, without its two calls (at c=1 this runs before the
        client's next request is read)."""
        self.inflight = None
        self._answer(reply, failed)
        if self.queue or self.continue_pending or self.pending_handoff or self.closing:
            self._next()
        else:
            self.busy = False

    def _answer(self, reply: Reply | None, failed: BaseException | None) -> None:
        item, sink = self.current, self.sink
        if item is None or sink is None:  # the connection was released meanwhile
            return
        self.current = self.sink = None
        keep_alive = item[4]
        try:
            if failed is not None:
                raise failed
            if reply is None:
                if not sink.keep_alive:
                    self._close()
            elif not sink.started:
                # When closing, the connection ends with the last queued answer, not this.
                self._write(reply, keep_alive and (not self.closing or bool(self.queue)))
            else:  # the pipeline's own error, after the stream's head went out
                self._unanswerable(None, item[0])
        except Exception as e:  # answering failed (the head did not encode, ...): bounded
            self._unanswered(e, sink, item[0], item[2], keep_alive)
        finally:
            self.writes.serving -= 1

    def _take(self) -> _Request | None:
        """The next request to answer (the refusals queued before it are written first); None
        when there is none: the connection is idle, and what waited for that goes ahead."""
        while self.queue:
            item = self.queue.popleft()
            if isinstance(item, Reply):  # a rejection: the connection ends with it
                self._write(item, keep_alive=False)
                continue
            self.busy = True
            if self.reading_paused and not self.writing_paused and len(self.queue) < MAX_PIPELINE:
                self._resume_reading()
            return item
        self.busy = False
        if self.continue_pending and self.in_message:
            self._write_continue()
        if self.pending_handoff:
            self._handoff()
        elif self.closing and not self.in_message and not self.lingering:
            self._close()
        return None

    def _unanswered(self, e: Exception, sink: _Stream, endpoint: Endpoint,
                    request_id: bytes | None, keep_alive: bool) -> None:
        """Building or writing a request's answer raised. Nothing of it written yet: the client
        gets the catalog's 500 instead (the connection goes on); else the connection closes,
        as the client cannot tell a cut answer from a whole one otherwise."""
        if sink.started:
            self._unanswerable(e, endpoint)
            return
        _log_failure("could not answer a request", e, endpoint)
        try:
            rid = self.server.pipeline.ids.accept(
                request_id.decode("latin-1") if request_id else None)
            self._write(self.server.pipeline.error_reply(
                RouterError("INTERNAL_ERROR"), rid, endpoint.openai),
                keep_alive and (not self.closing or bool(self.queue)))
        except Exception as again:
            _log_failure("could not answer a request with its error either", again, endpoint)
            self.abort()

    def _unanswerable(self, e: Exception | None, endpoint: Endpoint) -> None:
        """A streamed answer failed after its head went out: the client cannot be told in
        band; closing (after what was queued) ends the cut chunked body for it."""
        _log_failure("a streamed answer failed after its head; closing the connection", e,
                     endpoint)
        self._close()

    async def drain(self) -> None:
        """Wait until the client's socket takes writes again (write back-pressure)."""
        if self.writing_paused and self.transport is not None:
            if self.drained is None or self.drained.done():
                self.drained = self.server.loop.create_future()
            await self.drained

    def _write(self, reply: Reply, keep_alive: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self.writes.write(t, response_head(
            _STATUS, reply.status, self.server.date(), reply.content_type, _LENGTH,
            reply.headers, keep_alive, reply.body))
        self.last_active = self.server.loop.time()
        if not keep_alive:
            if self.failed and not self.half_closed:  # a half-closed client sends no more
                self._linger(t)
            else:
                self._close()

    def _linger(self, t: asyncio.Transport) -> None:
        """After a refusal: the answer is out; say we are done sending (FIN), and discard what
        the client still sends until it closes too, or LINGER_BYTES / LINGER_S run out. A plain
        close would make the kernel answer that data with a reset, which can destroy the
        answer before the client has read it."""
        self.lingering = self.server.loop.time()
        self._release()
        if t.can_write_eof():
            self.server.writes.flush()
            t.write_eof()
            if self.reading_paused:
                self.reading_paused = False
                t.resume_reading()
        else:
            self._close()

    def write_head(self, status: int, headers: list[tuple[str, str]], content_type: str,
                   keep_alive: bool, chunked: bool) -> None:
        """The head of a streamed response (chunked, or delimited by closing for HTTP/1.0)."""
        t = self.transport
        if t is None or t.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.server.writes.write(t, response_head(
            _STATUS, status, self.server.date(), content_type,
            _CHUNKED if chunked else _UNFRAMED, headers, keep_alive, b""))

    def _fail(self, err: RouterError) -> None:
        """Answer a request we cannot parse or accept, after any earlier ones, then close."""
        if self.failed:
            return
        self.failed = True
        self.closing = True
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
        self.server.writes.flush()  # the answers before this request go first
        replay = b"".join(self.chunks)
        if self.upgrade:
            replay = _without_upgrade(replay)
        self._release()
        proto = self.server.handoff()
        if type(proto) is RequestHandler and \
                self.server.pipeline.tables.current().table.limits.client_eof_policy == "answer":
            proto.__class__ = _HandedOff  # a half-closed client is answered there too
        t.set_protocol(proto)
        proto.connection_made(t)
        proto.data_received(replay)
        t.resume_reading()

    # -- Upgrade, ignored -------------------------------------------------------------------

    def _upgrade_ignored(self, rest: bytes) -> None:
        """The parser stopped after the head of a request asking to switch protocols (its body,
        if any, and any later requests are in ``rest``). We do not switch: parse the request
        again from a head without the upgrade, in a fresh parser, followed by ``rest``."""
        if not self.upgrade:  # not a hot endpoint's request (it was handed off) - cannot be
            self._fail(RouterError("INVALID_REQUEST", "unexpected protocol upgrade"))
            return
        head = [b"%s %s HTTP/%s" % (self.parser.get_method(), self.url,
                                     self.parser.get_http_version().encode())]
        if not self.parser.should_keep_alive():
            head.append(b"Connection: close")
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked")
        elif self.content_length >= 0:
            head.append(b"Content-Length: %d" % self.content_length)
        for name, value in ((b"X-Request-ID", self.request_id),
                            (b"Authorization", self.authorization), (b"X-API-Key", self.api_key),
                            *zip(_SIGNATURE_HEADERS, self.signature, strict=True)):
            if value is not None:
                head.append(name + b": " + value)
        if self.expect_continue:
            head.append(b"Expect: 100-continue")
        self.parser = httptools.HttpRequestParser(self)
        self._reset_message()
        self.data_received(b"\r\n".join(head) + b"\r\n\r\n" + rest)

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
        if self.writing_paused and now - self.paused_at > client_timeout:
            # The client has read nothing for that long with its socket full (a stream it
            # never reads, a response it leaves there): disconnect it. Its request, if still
            # being answered, is cancelled and accounted as a client disconnect, and the
            # backend connection is closed, not pooled (connection_lost). abort(): a close
            # would wait for the unread bytes to drain, which they never do.
            log.info("a client read nothing for %g s: disconnecting it", client_timeout)
            self.abort()
        elif self.lingering:
            if now - self.lingering > LINGER_S:
                self._close()
        elif self.in_message:
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
            self.server.writes.flush()  # what is queued for it goes first
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _ClientErrorsQuiet(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log for handed-off connections: a malformed request is the client's
    fault and gets one debug line, not a traceback at error level (26 lines an unauthenticated
    client could repeat at will); anything else is logged as aiohttp logs it."""

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and 400 <= exc_info.code < 500:
            self.logger.debug("%s: %s %s", str(msg) % args if args else msg, exc_info.code,
                              exc_info.message[:200])
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


class _HandedOff(RequestHandler):
    """aiohttp's protocol on a connection handed to it with ``client_eof_policy: answer``,
    answering a client that half-closes as the lean server does (FastProtocol.eof_received):
    aiohttp ignores the EOF, so the transport closes under the request in progress and its
    handler is cancelled (the cancel policy, and aiohttp's own behaviour). With a
    request received (queued, or taken and being answered: its task is then not waiting for
    the next one), the connection now closes after that answer (aiohttp's ``close``: requests
    pipelined behind it are not answered); else at once."""

    __slots__ = ()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's: bool | None
        if not self._messages and self._waiter is not None:  # waiting for a next request
            return False
        self.close()
        return True


def handoff_server_args() -> dict[str, Any]:
    """aiohttp's request-handler settings for the connections handed to it: limits no tighter
    than ours (a request we accepted is never refused by aiohttp on replay) and the quiet log."""
    return {"max_line_size": MAX_HEADER_BYTES + 1024, "max_field_size": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
            "logger": _ClientErrorsQuiet(logging.getLogger("aiohttp.server"), {})}


def _without_upgrade(request: bytes) -> bytes:
    """The request (it starts at ``request[0]``) without its Upgrade header, so aiohttp serves
    it as HTTP/1.1 and goes on parsing what follows it (it drops the rest of a read after an
    upgrade it does not support, and would then never answer a request pipelined behind)."""
    end = request.find(b"\r\n\r\n")
    if end < 0:
        return request
    lines = request[:end].split(b"\r\n")
    kept = [lines[0], *(ln for ln in lines[1:] if not ln[:8].lower() == b"upgrade:")]
    return b"\r\n".join(kept) + request[end:]


def _log_failure(what: str, e: BaseException | None, endpoint: Endpoint) -> None:
    """Our failure, logged with its type and where it happened: never its message, which
    may quote what it failed on (a header value, a body)."""
    if e is None:
        log.error("%s (%s %s)", what, endpoint.method, endpoint.path)
        return
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    log.error("%s (%s %s): %s at %s", what, endpoint.method, endpoint.path, type(e).__name__,
              ", ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in where) or "?")


def _signed(endpoint: Endpoint, url: bytes, ts: bytes | None, nonce: bytes | None,
            sig: bytes | None) -> Signed:
    """What signing needs of a request that carries a signature header (most carry none)."""
    return Signed(endpoint.method, url.decode("latin-1"),
                  None if ts is None else ts.decode("latin-1"),
                  None if nonce is None else nonce.decode("latin-1"),
                  None if sig is None else sig.decode("latin-1"))


_Taken = tuple[int, Endpoint, TableView, bytes | None, bytes, bool, bool, bytes | None,
               bytes | None, Signed | None, bytes | None]


def _take_request(data: bytes, start: int, view: TableView,
                  routes: dict[tuple[bytes, bytes], Endpoint], max_body: int, signing: bool,
                  tracing: bool) -> _Taken | None:
    """The request at ``data[start]`` if it is whole and in the common form: (where it ends,
    and ``FastProtocol._enqueue``'s arguments); else None. The reference of ``take_request``
    (apirouter/_httpcore.c), which answers the same or leaves it to this.
    Parsed in one call by gunicorn_h1c's picohttpparser (its validation of the request line,
    header names and values, and of the framing headers - repeated Content-Length,
    Transfer-Encoding - and a header lookup in C). None (httptools' to take or refuse) for an
    incomplete head or body, anything the parser rejects, a non-ASCII target,
    Transfer-Encoding, Expect, Upgrade, Proxy-Connection, a Connection header other than one
    close or keep-alive, a path that is not a hot endpoint's, a body over the limit (or a
    body on another method than POST), the header limits."""
    try:
        req = parse_whole(data if not start else memoryview(data)[start:])
    except Exception:  # incomplete, or malformed: httptools' to take or refuse
        return None
    head = req.consumed
    if head > MAX_HEADER_BYTES or req.header_count > MAX_HEADERS:
        return None
    url = req.path
    if not url.isascii():  # picohttpparser takes obs-text in the target; llhttp not
        return None
    q = url.find(b"?")
    method = req.method
    endpoint = routes.get((method, url if q < 0 else url[:q]))
    if endpoint is None:
        return None
    get = req.get_header
    if get("transfer-encoding") is not None or get("expect") is not None or \
            get("upgrade") is not None or get("proxy-connection") is not None:
        return None  # (llhttp reads Proxy-Connection as Connection)
    http11 = req.minor_version == 1
    connection = get("connection")
    if connection is None:
        keep_alive = http11
    else:
        connection = connection.lower()
        if connection == b"close":
            keep_alive = False
        elif connection == b"keep-alive":
            keep_alive = True
        else:
            return None
        # More than one (httptools weighs them all; the lookup sees the first).
        if data[start:start + head].lower().count(b"\nconnection:") != 1:
            return None
    length = req.content_length  # -1: none (a request without one has no body)
    if length > 0:
        if method != b"POST" or length > max_body:
            return None
        stop = start + head + length
        if stop > len(data):  # the body is still coming: httptools collects it
            return None
        body = data[start + head:stop]
    else:
        stop = start + head
        body = b""
    signed = None
    if signing:
        ts, nonce, sig = (get("x-signature-timestamp"), get("x-signature-nonce"),
                          get("x-signature"))
        if ts is not None or nonce is not None or sig is not None:
            signed = _signed(endpoint, url, ts, nonce, sig)
    return (stop, endpoint, view, get("x-request-id"), body, keep_alive, http11,
            get("authorization"), get("x-api-key"), signed,
            get("traceparent") if tracing else None)


def _data_after_close() -> RouterError:
    return RouterError("INVALID_REQUEST", "malformed HTTP request",
                       details="Data after `Connection: close`")  # httptools' words


def _headers_too_large() -> RouterError:
    return RouterError("INVALID_REQUEST", "the request headers are too large",
                       details=f"the limit is {MAX_HEADER_BYTES} bytes")


class _Spent:
    """The parser of a closed connection: nothing more is parsed."""

    def feed_data(self, data: bytes) -> None:
        raise httptools.HttpParserError("the connection is closed")


_SPENT: httptools.HttpRequestParser = _Spent()  # type: ignore[assignment]


class _Stream:
    """The lean server's Sink for a streamed response (workers.context.Sink)."""

    __slots__ = ("proto", "keep_alive", "chunked", "started")

    def __init__(self, proto: FastProtocol, keep_alive: bool, chunked: bool) -> None:
        self.proto = proto
        self.keep_alive = keep_alive and chunked  # HTTP/1.0: the end of the body is the close
        self.chunked = chunked
        self.started = False  # the head is out: the request can no longer get another answer

    async def start(self, status: int, headers: list[tuple[str, str]],
                    content_type: str) -> None:
        p = self.proto
        self.keep_alive = self.keep_alive and not (p.closing and not p.queue)
        p.write_head(status, headers, content_type, self.keep_alive, self.chunked)
        self.started = True

    async def write(self, data: bytes) -> None:
        self._put(data)
        if self.proto.writing_paused:
            await self.proto.drain()

    def write_now(self, data: bytes) -> bool:
        if self.proto.writing_paused:
            return False
        self._put(data)
        return True

    def client(self) -> tuple[FastProtocol, bool]:
        """The client's protocol, and whether the body goes to it chunked: for
        workers.streaming's _Lane, which queues a relayed read's bytes, framed by
        PlainChunks.relay, as ``write_now`` would have (its checks first, then ``_put``'s)."""
        return self.proto, self.chunked

    def _put(self, data: bytes) -> None:
        p = self.proto
        t = p.transport
        if t is None:
            raise ConnectionResetError("the client closed the connection")
        p.server.writes.write(t, b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        p.last_active = p.server.loop.time()

    async def end(self) -> None:
        t = self.proto.transport
        if t is not None and self.chunked:
            self.proto.server.writes.write(t, b"0\r\n\r\n")
