"""workers.streaming's relay with reads pushed from the backend's callback (_Push): what a
declined push holds must reach the client even when the body fails in the same turn."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from workers import streaming
from workers.streaming import Held, relay
from workers.upstream import BackendPool

HOST = "127.0.0.1"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
E1 = b'data: {"choices":[{"delta":{"content":"one"}}]}\n\n'
E2 = b'data: {"choices":[{"delta":{"content":"two"}}]}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class FullSink:
    """A client whose socket is full whenever a pushed write is tried (write_now declines,
    as the aiohttp adapter's always does); ``write`` takes everything."""

    def __init__(self) -> None:
        self.written = bytearray()

    async def start(self, status: int, headers: Any, content_type: Any) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.written += data

    def write_now(self, data: bytes) -> bool:
        return False

    async def end(self) -> None:
        pass


async def test_a_declined_push_is_written_even_when_the_backend_breaks_in_that_read(
        monkeypatch: Any) -> None:
    go = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + chunk(E1))
        await go.wait()
        # the second event, then bad chunk framing, in one read of the router's
        writer.write(chunk(E2) + b"zz\r\n")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(backend, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    loop = asyncio.get_running_loop()
    resp, body = await pool.open_stream(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        loop.time() + 5)
    assert resp.status == 200 and body is not None
    first = await body.read()
    assert first == E1
    settled: list[Any] = []
    monkeypatch.setattr(streaming, "_settle", lambda *a: settled.append(a[-1]))
    sink = FullSink()
    ctx = SimpleNamespace(
        fwd=SimpleNamespace(backend_id="b", decision_type="direct"),
        request=SimpleNamespace(include_usage=False), sink=sink, body=b"{}", ticket=None,
        request_id="r1", started=0.0, ttft_s=None)
    target = SimpleNamespace(backend=SimpleNamespace(index=0), idle_s=5.0)
    task = asyncio.create_task(relay(None, ctx, Held(target, body, first, 0.0)))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)  # the relay waits in body.read(push)
    go.set()
    await asyncio.wait_for(task, 5)
    server.close()
    pool.close()
    out = bytes(sink.written)
    assert settled == ["cut"]
    # main: E1, E2, then the error event; the declined push's E2 must not vanish
    assert out.startswith(E1 + E2), out
