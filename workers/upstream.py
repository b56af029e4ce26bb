"""The upstream client: per-backend keep-alive pools of raw asyncio protocols parsed by httptools.

Measured (design brief): aiohttp's ClientSession costs ~100 µs more per request than this, so
the hot path uses a small HTTP/1.1 client of its own. It does one thing: send a complete
request on an idle keep-alive connection and collect the complete response, under a deadline.

Streams (``BackendPool.open_stream``): the head is awaited like a buffered response; a 2xx
``text/event-stream`` body is then handed out as it arrives through a BodyStream, which pauses
reading from the backend while more than STREAM_HIGH_WATER bytes wait for the reader (so a slow
client pauses the backend, and memory stays flat) and whose one timer enforces a deadline or an
idle timeout. Any other answer to a stream request is collected whole, as usual. A stream read
to its end returns its connection to the pool; one abandoned early closes it.

Errors are grouped by kind for the caller to map onto the catalog: UpstreamConnectError
(nothing was sent), UpstreamTimeout, UpstreamProtocolError (the backend broke HTTP or hung up).
A request that fails on a *reused* connection before any response byte arrived is retried once
on a fresh one: the backend had closed the idle connection, and never saw the request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl as ssl_module
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from apirouter._ssecore import PlainChunks
from apirouter._wholecore import whole_response
from apirouter.sse import StreamUsage, _plain_events_py
from workers.turn_writes import turn_writes

log = logging.getLogger("apirouter.worker")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
STREAM_HIGH_WATER = 256 * 1024  # stream bytes waiting for the reader before reading pauses


class UpstreamError(Exception):
    retriable = True


class UpstreamConnectError(UpstreamError):
    """The connection could not be opened: the backend never saw the request."""


class UpstreamTimeout(UpstreamError):
    """The deadline passed before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The backend closed the connection mid-exchange or sent something that is not HTTP."""


class _Dropped(UpstreamProtocolError):
    def __init__(self, got_data: bool) -> None:
        super().__init__("the backend closed the connection before answering")
        self.got_data = got_data


class UpstreamStale(UpstreamProtocolError):
    """A reused keep-alive connection turned out closed before any answer: the backend had
    closed it while idle and never saw the request, which may go again on a fresh connection
    (``exchange`` does that itself; a ``start`` caller is told with this)."""


# The callback of an exchange started by BackendPool.start: (response, None) or (None, error).
Answered = Callable[["UpstreamResponse | None", "UpstreamError | None"], None]


# UpstreamResponse.content_type when it was not taken with the headers (header() looks).
_UNSEEN = b"\x00unseen"


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # The first Content-Type header's value (None: none) when whole_response took the headers
    # (a loop over them a reply less, ~0.5 µs); _UNSEEN when the parser did (header() looks).
    content_type: bytes | None = _UNSEEN

    def header(self, name: bytes) -> bytes | None:
        ct = self.content_type
        if ct is not _UNSEEN and name == b"content-type":
            return ct
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class _Connection(asyncio.Protocol):
    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False
        self.reused = False  # the exchange in flight is not the connection's first
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._then: Answered | None = None  # instead of _waiter: an exchange of ``start``
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._got_data = False
        self.keep_alive = True
        self._want_stream = False
        self._head_only = False  # the parser is fed a stream's head alone (data_received)
        # A stream's body in plain chunked framing, taken off in C instead of by the parser
        # (see data_received); None: the parser takes every byte.
        self._plain: PlainChunks | None = None
        self.stream: BodyStream | None = None
        self.deadline = 0.0  # of the exchange in flight (the pool's deadline watch reads it)
        # The parser is between messages (on_message_begin/_complete): a read may begin one.
        self._at_rest = True
        # The next read begins a buffered exchange's answer, the parser at rest: it may be
        # taken whole (whole_response) without the parser (see data_received).
        self._whole = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._whole:
            # The first read of a buffered exchange's answer: when it is exactly one plain
            # Content-Length response (see apirouter/_wholecore.c), taken in one C call and
            # answered as on_message_complete does, without the parser's five callbacks into
            # Python (the connection stays alive: whole_response takes only such).
            self._whole = False
            # At rest now, not only when the exchange began: one started inside the parser's
            # on_message_complete (a pipelined client's next request) began before the parser
            # took the rest of that read, which may have begun another message.
            resp = whole_response(data, MAX_RESPONSE_BYTES, UpstreamResponse) \
                if self._at_rest else None
            if resp is not None:
                self._got_data = True
                self._deliver(resp)
                return
        plain = self._plain
        if plain is not None:  # a stream's body, plain chunked: one C call takes the framing
            stream = self.stream
            if stream is not None:
                lane = stream.lane  # see BodyStream.read
                if lane is not None and lane(data):
                    return
            body = plain.feed(data)
            if body is None:
                self._plain_stopped(plain, data)
            elif body and stream is not None:
                stream.take(body, len(data))
            return
        if self._want_stream and not self._got_data:
            self._got_data = True
            self._stream_began(data)
            return
        self._got_data = True
        self._parse(data)
        stream = self.stream
        if stream is not None and stream._chunks:
            stream.fed(len(data))  # once per read, not per chunk of the chunked encoding

    def _parse(self, data: bytes) -> bool:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"invalid HTTP from backend: {e}"))
            self.abort()
            return False
        except httptools.HttpParserUpgrade:
            # A 101 with Upgrade (not an HttpParserError): no request of ours asks to switch
            # protocols, so it is a broken answer, not a data_received that raises.
            self._fail(UpstreamProtocolError("invalid HTTP from backend: it switched protocols"))
            self.abort()
            return False
        return True

    def _stream_began(self, data: bytes) -> None:
        """The first read of the answer to a stream request. When it holds the whole head
        (every line ending in CRLF, so that the first blank line is where the parser's head
        ends too), the parser is fed the head alone: if it is a stream's, in plain chunked
        framing, the body from here on is taken by PlainChunks (``_plain``), with no parser
        call per chunk; the parser sees the body only from where PlainChunks stops (the last
        chunk, or framing it does not take), which is what it would have seen after the
        chunks before. Anything else goes on to the parser, as it would have in one piece.
        Measured: see PlainChunks in apirouter/_ssecore.c."""
        end = data.find(b"\r\n\r\n") + 4
        if end >= 4 and data.count(b"\n", 0, end) == data.count(b"\r\n", 0, end):
            self._head_only = True
            try:
                if not self._parse(data[:end]):
                    return
            finally:
                self._head_only = False
            plain = self._plain
            if plain is not None:
                body = plain.feed(data[end:])
                if body is None:
                    self._plain_stopped(plain, data)
                elif body and self.stream is not None:
                    self.stream.take(body, len(data))
                return
            self._parse(data[end:])
        else:
            self._parse(data)
        stream = self.stream
        if stream is not None and stream._chunks:
            stream.fed(len(data))

    def _plain_stopped(self, plain: PlainChunks, data: bytes) -> None:
        """PlainChunks stopped in ``data``: what it took before goes to the stream, the rest
        to the parser, as if the parser had taken the whole read (framing that PlainChunks
        finds broken is broken for the parser too)."""
        self._plain = None
        stream = self.stream
        if stream is not None and plain.head:
            stream._chunks.append(plain.head)
        if plain.rest is None:
            self._fail(UpstreamProtocolError(
                "invalid HTTP from backend: a chunk's data is not followed by CRLF"))
            self.abort()
        elif plain.rest:
            self._parse(plain.rest)
        stream = self.stream
        if stream is not None and stream._chunks:
            stream.fed(len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        self._fail(_Dropped(self._got_data))
        if self.stream is not None:
            self.stream.fail(UpstreamProtocolError("the backend closed the connection mid-stream"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._at_rest = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self._want_stream:
            return
        status = self._parser.get_status_code()
        if 200 <= status < 300 and any(
                k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                for k, v in self._headers):
            self.stream = BodyStream(self)
            # (A 204 has no body whatever its framing says: httptools ends the message at the
            # head, so what follows is not this stream's.)
            if self._head_only and status != 204 and _plain_chunked(self._parser, self._headers):
                self._plain = PlainChunks()
            w = self._waiter
            self._waiter = None
            if w is not None and not w.done():
                w.set_result(UpstreamResponse(status, self._headers, b""))
            self._headers = []

    def on_body(self, body: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream._chunks.append(body)  # data_received then calls stream.fed()
            return
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail(UpstreamProtocolError("backend response exceeds the size limit"))
            self.abort()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._at_rest = True
        self.keep_alive = self._parser.should_keep_alive()
        if self.stream is not None:
            self.stream.finish()
            return
        resp = UpstreamResponse(self._parser.get_status_code(), self._headers,
                                b"".join(self._body))
        self._headers = []
        self._body = []
        self._size = 0
        self._deliver(resp)

    def _deliver(self, resp: UpstreamResponse) -> None:
        """The exchange's answer, whole (by the parser, or by whole_response)."""
        then = self._then
        if then is not None:  # BackendPool._answered's success path, inline (a call less)
            self._then = None
            pool = self._pool
            pool._inflight.discard(self)
            pool._release(self)
            try:
                then(resp, None)
            except Exception:
                log.exception("the end of a backend exchange was not handled")
            return
        w = self._waiter
        self._waiter = None
        if w is not None and not w.done():
            w.set_result(resp)

    # used by the pool
    def _fail(self, exc: UpstreamError) -> None:
        then = self._then
        if then is not None:
            self._then = None
            self._pool._answered(self, then, None, exc)
            return
        w = self._waiter
        self._waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes, deadline: float, stream: bool
             ) -> asyncio.Future[UpstreamResponse]:
        """Start an exchange: the request goes out at the end of the turn; the future gets the
        response (the head, for a stream). The pool awaits it, then calls ``finished``."""
        fut: asyncio.Future[UpstreamResponse] = self._pool._loop.create_future()
        self._waiter = fut
        self._send(data, deadline, stream)
        return fut

    def _send(self, data: bytes, deadline: float, stream: bool) -> None:
        pool = self._pool
        self._got_data = False
        self._want_stream = stream
        self._whole = self._at_rest and not stream
        self._plain = None
        self.stream = None
        self.reused = self.used
        self.used = True
        self.deadline = deadline
        # Watched by the pool: failed if still in flight at ``deadline`` (loop time).
        pool._inflight.add(self)
        if pool._watch_timer is None or deadline < pool._watch_at:
            pool._arm_watch(deadline)
        assert self.transport is not None
        pool.writes.write(self.transport, data)  # at the end of the turn

    def finished(self, fut: asyncio.Future[UpstreamResponse]) -> None:
        """The exchange started by ``send`` is over, however it ended."""
        self._pool._inflight.discard(self)
        # Cancelled by our caller (the client hung up): the task cancelled ``fut`` too, so it
        # is done - but cancelled. The response will never be read: close the connection.
        if not fut.done() or fut.cancelled():
            self.abort()

    def _expire(self) -> None:
        """The deadline of the exchange in flight passed (the pool's deadline watch)."""
        then = self._then
        if then is not None:
            self._then = None
            self.abort()
            self._pool._answered(self, then, None, UpstreamTimeout(
                "the backend did not answer before the deadline"))
            return
        fut = self._waiter
        if fut is not None and not fut.done():
            self._waiter = None
            fut.set_exception(UpstreamTimeout("the backend did not answer before the deadline"))
            self.abort()


# What whole_response (apirouter/_wholecore.c) takes, in Python: its reference (the property
# test holds the two equal). A status line of HTTP/1.1, no 1xx, 204 or 304; header lines of a
# token, a colon, spaces and a value of visible bytes and inner spaces; the blank line.
_WHOLE_STATUS = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) [\x20-\x7e]*\r\n")
_WHOLE_HEADER = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): *((?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?)\r\n")
_WHOLE_LENGTH = re.compile(rb"0|[1-9][0-9]{0,14}")
# Headers that decide framing or keep-alive: a response with one is left to httptools.
_WHOLE_REFUSED = {b"transfer-encoding", b"connection", b"proxy-connection", b"upgrade"}


def _whole_response_py(read: bytes, max_body: int, cls: type[UpstreamResponse] = UpstreamResponse
                       ) -> UpstreamResponse | None:
    """What whole_response does (see apirouter/_wholecore.c): ``read`` as cls(status,
    headers, body, content type) when it is exactly one plain Content-Length response of
    HTTP/1.1 kept alive, its body at most ``max_body`` bytes; else None."""
    m = _WHOLE_STATUS.match(read)
    if m is None:
        return None
    status = int(m[1])
    if status in (204, 304):
        return None
    p = m.end()
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    ctype: bytes | None = None
    while not read.startswith(b"\r\n", p):
        h = _WHOLE_HEADER.match(read, p)
        if h is None:
            return None
        p = h.end()
        name, value = h[1], h[2]
        headers.append((name, value))
        lower = name.lower()
        if lower in _WHOLE_REFUSED:
            return None
        if lower == b"content-type" and ctype is None:
            ctype = value
        elif lower == b"content-length":
            if length >= 0 or _WHOLE_LENGTH.fullmatch(value) is None:
                return None
            length = int(value)
    p += 2
    if length < 0 or length > max_body or len(read) - p != length:
        return None
    return cls(status, headers, read[p:], ctype)


def _plain_chunked(parser: httptools.HttpResponseParser,
                   headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a body comes in chunked framing and nothing else can frame it: HTTP/1.1, one
    Transfer-Encoding, ``chunked``, and no Content-Length (the parser's own rules decide
    anything less plain)."""
    if parser.get_http_version() != "1.1":
        return False
    chunked = 0
    for k, v in headers:
        name = k.lower()
        if name == b"transfer-encoding":
            if v.lower() != b"chunked":
                return False
            chunked += 1
        elif name == b"content-length":
            return False
    return chunked == 1


# A size line PlainChunks takes: hex without leading zeros (at most 15 digits), CRLF; and one
# a read may end inside of before it is whole.
_SIZE_LINE = re.compile(rb"([1-9a-fA-F][0-9a-fA-F]{0,14})\r\n")
_SIZE_LINE_BEGUN = re.compile(rb"[1-9a-fA-F][0-9a-fA-F]{0,14}\r?")


class _PlainChunksPy:
    """What PlainChunks (apirouter/_ssecore.c) does, in Python: the reference its property test
    (tests/workers/test_dechunk.py) holds it to.

    ``feed(read)`` returns the data of the chunks in ``read`` (of a body fed from its start,
    read by read; a chunk may span reads, so may its size line), as long as every size line is
    plain: hex without leading zeros, at most 15 digits, CRLF. At the first that is not (the
    last chunk's "0", an extension, whitespace, anything else) it stops: it returns None, and
    ``head`` is the data before that line, ``rest`` the bytes from its start on (a size line
    begun in an earlier read included). A chunk's data not followed by CRLF stops it too, with
    ``rest`` None: the framing is broken. After a stop, ``feed`` must not be called again."""

    def __init__(self) -> None:
        self.remaining = 0  # data bytes of the current chunk still to come
        self.crlf = 0  # bytes of the CRLF after the chunk's data still to come
        self.carried = b""  # a size line begun at the end of the last read
        self.head: bytes | None = None
        self.rest: bytes | None = None
        self.usage = StreamUsage()
        self.max_event_bytes = 0
        self.frame = False

    def feed(self, read: bytes) -> bytes | None:
        if self.head is not None:
            raise RuntimeError("feed() after the chunks stopped")
        data = self.carried + read
        self.carried = b""
        out: list[bytes] = []
        p, end = 0, len(data)
        while True:
            if self.remaining:
                take = min(self.remaining, end - p)
                out.append(data[p:p + take])
                p += take
                self.remaining -= take
                if self.remaining:
                    break
                self.crlf = 2
            if self.crlf == 2:
                if p == end:
                    break
                if data[p] != 0x0D:
                    self._stop(out, None)
                    return None
                p += 1
                self.crlf = 1
            if self.crlf == 1:
                if p == end:
                    break
                if data[p] != 0x0A:
                    self._stop(out, None)
                    return None
                p += 1
                self.crlf = 0
            if p == end:
                break
            m = _SIZE_LINE.match(data, p)
            if m is not None:
                self.remaining = int(m[1], 16)
                p = m.end()
                continue
            if _SIZE_LINE_BEGUN.fullmatch(data, p) is not None:
                self.carried = data[p:]
                break
            self._stop(out, data[p:])
            return None
        return b"".join(out)

    def _stop(self, out: list[bytes], rest: bytes | None) -> None:
        self.head = b"".join(out)
        self.rest = rest
        return None

    def open_relay(self, usage: StreamUsage, max_event_bytes: int, frame: bool) -> None:
        self.usage = usage
        self.max_event_bytes = max_event_bytes
        self.frame = frame

    def relay(self, read: bytes) -> bytes | None:
        """``feed``, then what SSERelay.feed (with nothing buffered before) and the client's
        chunked framing make of it, when that is the read as it came: when the read's data is
        whole plain events (``plain_events``), at most ``max_event_bytes``, the events framed
        as one chunk (when ``frame``) and counted into ``usage``. Else None, with nothing
        changed: a read with a size line begun before it, or one that stops the chunks, or any
        other data."""
        if self.head is not None:
            raise RuntimeError("relay() after the chunks stopped")
        if self.carried:
            return None
        state = self.remaining, self.crlf
        body = self.feed(read)
        whole = None if body is None else _plain_events_py(body, self.max_event_bytes)
        if body is None or whole is None:
            self.remaining, self.crlf = state
            self.carried = b""
            self.head = self.rest = None
            return None
        self.usage.events += whole[0]
        self.usage.content_bytes += whole[1]
        return b"%x\r\n%b\r\n" % (len(body), body) if self.frame else body


def _stale(conn: _Connection, exc: BaseException) -> bool:
    """Whether ``exc`` ended ``conn``'s exchange before the backend saw the request: a reused
    keep-alive connection it had closed while idle, dropped before any answer."""
    return isinstance(exc, _Dropped) and conn.reused and not exc.got_data


def do_meanwhile(work: Callable[[], object]) -> None:
    """Run work done while a backend answers (``meanwhile``): a failure is logged, not raised,
    since it is only work ahead (the caller does it again when it needs its result)."""
    try:
        work()
    except Exception:
        log.exception("work done while a backend answers failed")


# What BackendPool.start returns: the exchange's connection, a handle for BackendPool.cancel.
PendingExchange = _Connection


class BackendPool:
    """Keep-alive connections to one backend address, at most ``max_connections`` open."""

    def __init__(self, scheme: str, host: str, port: int, max_connections: int,
                 connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._ssl = ssl_module.create_default_context() if scheme == "https" else None
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._loop = asyncio.get_running_loop()
        self.writes = turn_writes(self._loop)
        self.closed = False
        # Exchanges in flight, and one timer for the soonest deadline among them: a timer per
        # exchange (call_at + cancel) cost ~2 µs a request; this is a set add and discard.
        self._inflight: set[_Connection] = set()
        self._watch_timer: asyncio.TimerHandle | None = None
        self._watch_at = 0.0

    @property
    def open_connections(self) -> int:
        return self._open

    async def request(self, data: bytes, deadline: float) -> UpstreamResponse:
        """Send one complete HTTP/1.1 request and return the complete response."""
        return (await self.exchange(data, deadline))[0]

    async def open_stream(self, data: bytes, deadline: float
                          ) -> tuple[UpstreamResponse, BodyStream | None]:
        """Send a streaming request; return the head and the body as a BodyStream when the
        backend streams (2xx event-stream), else the complete response and None. The caller
        must close() the BodyStream."""
        return await self.exchange(data, deadline, True)

    def start(self, data: bytes, deadline: float, then: Answered) -> PendingExchange | None:
        """A buffered exchange on an idle keep-alive connection, driven by the connection's
        callbacks: ``then(response, None)`` or ``then(None, error)`` once, the connection back
        in the pool (or closed) by then; no future and no task woken by it (see
        workers.forwarding). None when no connection is idle: the caller awaits ``exchange``,
        which waits for one or opens one. A reused connection found closed before any answer
        fails with UpstreamStale (``exchange`` retries that itself). ``cancel`` ends it early.
        """
        idle = self._idle
        while idle:  # (_take_idle, inline: a call less a request)
            conn = idle.pop()
            if not conn.closed:
                conn._then = then
                conn._send(data, deadline, False)
                return conn
        return None

    def cancel(self, conn: PendingExchange) -> None:
        """End an exchange of ``start`` before its answer (the client hung up): the answer
        would never be read, so the connection closes; ``then`` is not called."""
        if conn._then is not None:
            conn._then = None
            self._inflight.discard(conn)
            conn.abort()

    def _answered(self, conn: _Connection, then: Answered, resp: UpstreamResponse | None,
                  exc: UpstreamError | None) -> None:
        """An exchange of ``start`` ended: the connection to the pool (or closed), then
        ``then``, which must not raise: it runs inside the connection's parser callbacks, and
        the connection may already serve another exchange."""
        self._inflight.discard(conn)
        if exc is None:
            self._release(conn)
        else:
            if not conn.closed:
                conn.abort()
            if _stale(conn, exc):
                exc = UpstreamStale(str(exc))
        try:
            then(resp, exc)
        except Exception:
            log.exception("the end of a backend exchange was not handled")

    async def exchange(self, data: bytes, deadline: float, stream: bool = False,
                       meanwhile: Callable[[], object] | None = None, retry: bool = True
                       ) -> tuple[UpstreamResponse, BodyStream | None]:
        """One exchange on a pooled connection: the response, and the BodyStream of a streamed
        one (the connection is the stream's until it is closed; otherwise back in the pool).
        Retried once on a fresh connection when a reused one turns out closed before any
        answer. One coroutine, awaiting the response itself: each level of coroutines between
        the pipeline and the response cost ~0.3 µs a request.

        ``meanwhile`` is called once, when the request is on its way (a lone request's is
        written by then; under load it goes out with the turn's other writes), before the
        wait: work the response would otherwise wait for, done while the backend works (with
        one request at a time, the worker is idle then). It must be work the caller would do
        later anyway: a failure of it is logged, not raised. ``retry``: False when this is
        already the retry (of a ``start`` that failed with UpstreamStale)."""
        for attempt in (0, 1) if retry else (1,):
            conn = self._take_idle()  # the common case, without awaiting a coroutine
            if conn is None:
                conn = await self._acquire(deadline)
            try:
                fut = conn.send(data, deadline, stream)
                try:
                    if meanwhile is not None:
                        work, meanwhile = meanwhile, None
                        do_meanwhile(work)
                    resp = await fut
                finally:
                    conn.finished(fut)
            except _Dropped as e:
                self._release(conn)
                if attempt == 0 and _stale(conn, e):
                    continue
                raise
            except BaseException:
                if conn.stream is not None:
                    # Cancelled just as a stream's head arrived: its body is still coming on
                    # this connection, which must not go back to the pool (the next request
                    # would read the rest of this one). Closing the unread stream closes it.
                    conn.stream.close()
                else:
                    self._release(conn)
                raise
            body = conn.stream
            if body is None:
                self._release(conn)
            return resp, body
        raise AssertionError("unreachable")

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _acquire(self, deadline: float) -> _Connection:
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self._open >= self.max_connections:
            fut: asyncio.Future[_Connection | None] = self._loop.create_future()
            self._waiters.append(fut)
            timer = self._loop.call_at(deadline, _expire, fut)
            try:
                got = await fut
            except BaseException:
                # Cancelled just after a connection was handed over: give it back.
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    handed = fut.result()
                    if handed is not None:
                        self._release(handed)
                raise
            finally:
                timer.cancel()
            if got is not None:
                return got
        return await self._connect(deadline)

    async def _connect(self, deadline: float) -> _Connection:
        self._open += 1
        timeout = min(self.connect_timeout, max(0.0, deadline - self._loop.time()))
        try:
            async with asyncio.timeout(timeout):
                _, proto = await self._loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self._ssl)
        except TimeoutError:
            self._open -= 1
            self._wake_one()
            raise UpstreamConnectError(
                f"connecting to the backend timed out after {timeout:.3f}s") from None
        except OSError as e:
            self._open -= 1
            self._wake_one()
            raise UpstreamConnectError(
                f"cannot connect to the backend: {e.strerror or e}") from None
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return proto

    def _arm_watch(self, when: float) -> None:
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        self._watch_at = when
        self._watch_timer = self._loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Expire the exchanges past their deadline; wait for the soonest of the others."""
        self._watch_timer = None
        # What the timer was armed for is due even when the clock reads a little less: uvloop
        # rounds a timer to the millisecond and fires up to half of one early. Without this the
        # watch re-armed for the same deadline until the clock caught up (hundreds of runs).
        now = max(self._loop.time(), self._watch_at)
        expired = [conn for conn in self._inflight if conn.deadline <= now]
        self._inflight.difference_update(expired)
        if self._inflight:
            self._arm_watch(min(conn.deadline for conn in self._inflight))
        # Expired after the watch is re-armed: an expiry's callback may start another exchange
        # (a failover, on callbacks), whose _watch must not be undone by this re-arming.
        for conn in expired:
            conn._expire()

    def _release(self, conn: _Connection) -> None:
        if conn.closed or not conn.keep_alive or self.closed:
            if not conn.closed:
                conn.abort()  # connection_lost will account for it via _forget
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._open -= 1
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._wake_one()

    def _wake_one(self) -> None:
        # A slot freed up: let one waiter open a connection of its own.
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()


class BodyStream:
    """The body of a streamed response, handed out as it arrives.

    ``read()`` returns every byte received since the last read (b"" once the body is complete)
    or raises: UpstreamTimeout when the deadline (``arm``) or the idle timeout (``watch_idle``)
    passed first, UpstreamProtocolError when the backend hung up mid-body. One timer serves both
    deadlines: it is re-armed only when it fires, not on every chunk. The connection hands it
    each socket read's body bytes once (``take``; or, from the parser, appends each chunk and
    calls ``fed``): the idle clock, the high-water mark and the reader's wake-up are per read.

    ``read(push)`` hands each read that arrives while it waits to ``push``, inside the
    connection's callback, instead of waking the reader for it: a relay then passes a read on
    with no future and no task step (see workers.streaming). It returns once ``push`` answers
    False (it could not take more: the reader takes over), or the body ends or fails.
    ``read(push, lane)`` offers each such read of a body in plain chunked framing to ``lane``
    first, with its framing (``plain_chunks``): the connection's data_received calls it before
    anything else, and a read it answers True is done with (workers.streaming's _Lane
    relays it whole; it then keeps the body's accounting, ``_size`` and ``_last``, as ``take``
    would have); False, and the read goes on as without it.
    """

    __slots__ = ("_conn", "_loop", "_chunks", "_size", "_waiter", "_push", "_timer",
                 "_deadline", "_idle_s", "_last", "_paused", "done", "error", "closed", "lane")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._loop = conn._pool._loop
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._push: Callable[[bytes], bool] | None = None  # of a read(push) waiting
        self.lane: Callable[[bytes], bool] | None = None  # of a read(push, lane) waiting
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # what the timer is armed for (loop time)
        self._idle_s = 0.0
        self._last = self._loop.time()
        self._paused = False
        self.done = False
        self.error: Exception | None = None
        self.closed = False

    # fed by the connection: take() once per read, or (the parser's path) each chunk appended
    # to _chunks, then fed() once per read
    def take(self, data: bytes, n: int) -> None:
        """``data``, the body's bytes in a read of ``n`` bytes (chunked framing and all),
        arrived."""
        if self._idle_s:
            self._last = self._loop.time()
        self._size += n
        push = self._push
        # A read(push) waits: the read goes to push, the reader sleeps on (nothing waits in
        # _chunks then). What push passed on counts toward the high-water mark until the
        # reader runs again: a loop turn's writes may wait in TurnWrites before the client's
        # socket says it is full, and libuv reads a socket up to 32 times in one callback;
        # past the mark a read stays here, reading pauses and the reader wakes, as without
        # push.
        if push is not None and self._size <= STREAM_HIGH_WATER:
            if not push(data):
                self._wake()
            return
        self._chunks.append(data)
        if self._size > STREAM_HIGH_WATER and not self._paused:
            t = self._conn.transport
            if t is not None:
                self._paused = True
                t.pause_reading()
        self._wake()

    def fed(self, n: int) -> None:
        """``n`` bytes were read (the body's, with their chunked framing) into _chunks."""
        chunks = self._chunks
        self._chunks = []
        self.take(chunks[0] if len(chunks) == 1 else b"".join(chunks), n)

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: Exception) -> None:
        if not self.done and self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        self._push = None
        self.lane = None
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # deadlines
    def arm(self, deadline: float) -> None:
        """Fail reads once ``deadline`` (loop time) passes without the body completing."""
        self._idle_s = 0.0
        self._set_timer(deadline)

    def watch_idle(self, idle_s: float) -> None:
        """Fail reads when no byte arrived for ``idle_s`` seconds."""
        self._idle_s = idle_s
        self._last = self._loop.time()
        self._set_timer(self._last + idle_s)

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._deadline = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.done or self.error is not None or self.closed:
            return
        if self._idle_s:
            due = self._last + self._idle_s
            # What the timer was armed for is due even when the clock reads a little less
            # (uvloop fires up to half a millisecond early; re-arming for the same moment
            # would run this again every loop turn until the clock caught up).
            if max(self._loop.time(), self._deadline) < due:  # a byte came since: wait on
                self._set_timer(due)
                return
            self.fail(UpstreamTimeout(f"the backend sent nothing for {self._idle_s:g} s"))
        else:
            self.fail(UpstreamTimeout("the backend did not answer before the deadline"))

    # read by the consumer
    async def read(self, push: Callable[[bytes], bool] | None = None,
                   lane: Callable[[bytes], bool] | None = None) -> bytes:
        if not self._chunks and not self.done and self.error is None:
            w = self._loop.create_future()
            self._waiter = w
            self._push = push
            self.lane = lane if push is not None else None
            try:
                await w
            finally:
                self._push = None
                self.lane = None
        self._size = 0  # what was read so far is the reader's now, or went out through push
        if self._chunks:
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks = []
            if self._paused:
                self._paused = False
                t = self._conn.transport
                if t is not None:
                    t.resume_reading()
            return data
        if self.error is not None:
            raise self.error
        return b""

    def plain_chunks(self) -> PlainChunks | None:
        """The de-chunking of the body from here on, when it is in plain chunked framing (see
        _Connection._stream_began); None: the HTTP parser takes it."""
        return self._conn._plain

    def close(self) -> None:
        """Give the connection back: to the pool after a complete body, else closed."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self._conn
        conn.stream = None
        conn._plain = None
        if not self.done or self.error is not None:
            conn.abort()
        conn._pool._release(conn)


def _expire(fut: asyncio.Future[_Connection | None]) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout("no backend connection became free before the deadline"))
