"""The floor: the least a proxy on the router's own stack costs a request.

    python -m bench.floor_proxy --port 8081 --upstream 127.0.0.1:8000

bench.overhead's ``--floor`` leg. The same libraries as a router worker and its transport
layer - uvloop, an asyncio.Protocol per client connection, picohttpparser (gunicorn_h1c) for the
request, a pool of keep-alive upstream connections whose responses httptools parses, the
socket writes of a loop turn made together at its end (workers.turn_writes) - and nothing
else: no authentication, admission, routing table, metrics, usage record, request id or
rate-limit headers, and one process (the router adds its supervisor and gunicorn's master).
What it costs a request is what any Python router built this way pays before it does anything
of its own; the router's CPU per request minus this, in the same run, is what the rest costs:
its own work in the worker, and its supervisor's (issue 14 asks where the cost is before
cutting it).

It serves what the benchmarks send (whole requests with a Content-Length, one at a time per
connection, as wrk does) and refuses the rest with a 400 and a close: it is a measuring stick,
not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from http import HTTPStatus

import httptools
import uvloop
from gunicorn_h1c import parse_request_fast
from gunicorn_h1c._parser_fast import IncompleteError  # (the package's own is _parser's)

from workers.turn_writes import TurnWrites, turn_writes

MAX_REQUEST_BYTES = 1 << 20
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the backend, carrying one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.content_type = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()

    def on_message_begin(self) -> None:
        self.content_type = b"application/json"

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        body, self.body = b"".join(self.body), []
        if self.parser.should_keep_alive():
            self.pool.idle.append(self)
        elif self.transport is not None:  # the backend closes it: not to be reused
            self.transport.close()
        if client is not None:
            client.respond(self.parser.get_status_code(), self.content_type, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        self._fail()

    def _fail(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.fail()
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Idle upstream connections, reused last-in first-out; a new one when none is idle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.writes = turn_writes(loop)  # the clients' too: one queue a loop, as in a worker
        self.idle: list[Upstream] = []
        self.connecting: set[asyncio.Task[None]] = set()
        self.head = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n".encode()

    def send(self, client: Client, request: bytes) -> None:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is None or conn.transport.is_closing():
                continue  # closed since it went idle (connection_lost comes a callback later)
            conn.client = client
            self.writes.write(conn.transport, request)
            return
        task = self.loop.create_task(self._connect(client, request))
        self.connecting.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, client: Client, request: bytes) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: Upstream(self), self.host,
                                                        self.port)
        except OSError:
            client.fail()
            return
        conn.client = client
        assert conn.transport is not None
        conn.transport.write(request)


class Client(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.writes: TurnWrites = pool.writes
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.busy = False  # a request of this connection is with the backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self.pending + data if self.pending else data
        try:
            req = parse_request_fast(data)
        except IncompleteError:
            self._wait_for_more(data)
            return
        except Exception:  # malformed
            self._refuse(_BAD_REQUEST)
            return
        end = req.consumed + max(0, req.content_length)
        if len(data) < end:
            self._wait_for_more(data)
            return
        if len(data) > end or req.has_chunked or self.busy:
            self._refuse(_BAD_REQUEST)  # pipelined or chunked: not what it measures
            return
        self.pending = b""
        self.busy = True
        self.writes.serving += 1
        body = data[req.consumed:end]
        self.pool.send(self, b"".join((req.method, b" ", req.path, b" HTTP/1.1\r\n",
                                       self.pool.head, b"Content-Length: ",
                                       str(len(body)).encode(), b"\r\n\r\n", body)))

    def _wait_for_more(self, data: bytes) -> None:
        if len(data) > MAX_REQUEST_BYTES:
            self._refuse(_BAD_REQUEST)
        else:
            self.pending = data

    def respond(self, status: int, content_type: bytes, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.writes.write(self.transport, b"".join((
                _STATUS.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
                b"Content-Type: ", content_type, b"\r\nContent-Length: ",
                str(len(body)).encode(), b"\r\n\r\n", body)))
        self._done()  # (after its write, as the router's server counts it)

    def fail(self) -> None:
        self._refuse(_BAD_GATEWAY)
        self._done()

    def _done(self) -> None:
        if self.busy:
            self.busy = False
            self.writes.serving -= 1

    def _refuse(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.writes.write(self.transport, answer)
            self.writes.flush()  # (queued writes go out before the close)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._done()


async def serve(port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    host, _, upstream_port = upstream.rpartition(":")
    pool = Pool(loop, host, int(upstream_port))
    server = await loop.create_server(lambda: Client(pool), "127.0.0.1", port, backlog=1024)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    p.add_argument("--upstream", required=True, help="the backend, HOST:PORT")
    args = p.parse_args(argv)
    uvloop.run(serve(args.port, args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
