"""A lean HTTP/1.1 keep-alive client for plain-http targets: asyncio.Protocol + httptools.

The generator's own CPU per request is part of what it measures on a small machine; aiohttp's
client spends several hundred microseconds a request here, this one a fraction of that. It
does only what the suite sends: one POST per connection at a time, a fixed body and headers,
responses with Content-Length or chunked bodies, SSE events timed as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

WANTED = {b"x-router-latency-ms", b"x-router-decision", b"retry-after", b"content-type"}


class Response:
    __slots__ = ("status", "headers", "body", "keep_alive")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.keep_alive = True


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.resp = Response()
        self.on_event: Callable[[bytes], None] | None = None
        self._line = bytearray()
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("connection closed"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError(f"bad response: {e}"))
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in WANTED:
            self.resp.headers[name.decode()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.resp.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.on_event is None or self.resp.status != 200:
            self.resp.body += body
            return
        # SSE: time each event as its line completes; keep the usage event's line.
        self._line += body
        while (nl := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:nl])
            del self._line[:nl + 1]
            if line.startswith(b"data:"):
                self.on_event(line)

    def on_message_complete(self) -> None:
        self.resp.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.resp)

    def request(self, data: bytes, on_event: Callable[[bytes], None] | None
                ) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.resp = Response()
        self.on_event = on_event
        self._line.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RawPool:
    """Up to ``limit`` keep-alive connections to one http:// origin."""

    def __init__(self, url: str, limit: int) -> None:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"RawPool speaks plain http only, not {url}")
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.authority = u.netloc
        self.idle: list[_Conn] = []
        self.slots = asyncio.Semaphore(limit)

    def head(self, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.authority}",
                 f"Content-Length: {len(body)}", "Connection: keep-alive",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def post(self, data: bytes, on_event: Callable[[bytes], None] | None = None
                   ) -> Response:
        async with self.slots:
            conn = None
            while self.idle:
                c = self.idle.pop()
                if not c.closed:
                    conn = c
                    break
            if conn is None:
                loop = asyncio.get_running_loop()
                _, conn = await loop.create_connection(_Conn, self.host, self.port)
            try:
                resp = await conn.request(data, on_event)
            except BaseException:
                conn.close()
                raise
            if resp.keep_alive and not conn.closed:
                self.idle.append(conn)
            else:
                conn.close()
            return resp

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()
