"""The upstream client: per-backend keep-alive pools of raw asyncio protocols parsed by httptools.

Measured (design brief): aiohttp's ClientSession costs ~100 µs more per request than this, so
the hot path uses a small HTTP/1.1 client of its own. It does one thing: send a complete
request on an idle keep-alive connection and collect the complete response, under a deadline.

Errors are grouped by kind for the caller to map onto the catalog: UpstreamConnectError
(nothing was sent), UpstreamTimeout, UpstreamProtocolError (the backend broke HTTP or hung up).
A request that fails on a *reused* connection before any response byte arrived is retried once
on a fresh one: the backend had closed the idle connection, and never saw the request.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from dataclasses import dataclass

import httptools

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


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


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
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
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._got_data = False
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_data = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"invalid HTTP from backend: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        self._fail(_Dropped(self._got_data))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail(UpstreamProtocolError("backend response exceeds the size limit"))
            self.abort()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        resp = UpstreamResponse(self._parser.get_status_code(), self._headers,
                                b"".join(self._body))
        self._headers = []
        self._body = []
        self._size = 0
        w = self._waiter
        self._waiter = None
        if w is not None and not w.done():
            w.set_result(resp)

    # used by the pool
    def _fail(self, exc: Exception) -> None:
        w = self._waiter
        self._waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, data: bytes, deadline: float,
                       loop: asyncio.AbstractEventLoop) -> UpstreamResponse:
        fut: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._waiter = fut
        self._got_data = False
        self.used = True
        timer = loop.call_at(deadline, self._on_deadline, fut)
        assert self.transport is not None
        self.transport.write(data)
        try:
            return await fut
        finally:
            timer.cancel()
            if not fut.done():  # cancelled by our caller: the response will never be read
                self.abort()

    def _on_deadline(self, fut: asyncio.Future[UpstreamResponse]) -> None:
        if not fut.done():
            fut.set_exception(UpstreamTimeout("the backend did not answer before the deadline"))
            self.abort()


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
        self.closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def request(self, data: bytes, deadline: float) -> UpstreamResponse:
        """Send one complete HTTP/1.1 request and return the complete response."""
        for attempt in (0, 1):
            conn = await self._acquire(deadline)
            reused = conn.used
            try:
                resp = await conn.exchange(data, deadline, self._loop)
            except _Dropped as e:
                self._release(conn)
                if reused and not e.got_data and attempt == 0:
                    continue
                raise
            except BaseException:
                self._release(conn)
                raise
            self._release(conn)
            return resp
        raise AssertionError("unreachable")

    async def _acquire(self, deadline: float) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
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


def _expire(fut: asyncio.Future[_Connection | None]) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout("no backend connection became free before the deadline"))
