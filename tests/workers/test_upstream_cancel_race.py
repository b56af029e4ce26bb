"""Review (issue 14 hot path): a stream request cancelled just as its head arrives.

The client's hang-up (its connection's task cancelled) and the backend's response head can be
handled in the same event-loop turn: the head resolves the exchange's future, then the cancel
lands before the task resumes, and ``BackendPool.exchange`` sees CancelledError with a future
that is done, not cancelled. The backend is still streaming the body on that connection: it
must not go back to the pool, or the next request on it is answered with the rest of another
client's stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from tools.mock_backend import MockState, start_mock
from workers import upstream
from workers.upstream import BackendPool

HOST = "127.0.0.1"


def chat_request(port: int, body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (port, len(body), body))


@pytest.fixture
async def mock() -> AsyncIterator[tuple[int, MockState]]:
    server, state = await start_mock(HOST, 0, name="up")
    yield server.sockets[0].getsockname()[1], state
    server.close()


async def test_a_stream_cancelled_as_its_head_arrives_does_not_pool_its_connection(
        mock: tuple[int, MockState], monkeypatch: pytest.MonkeyPatch) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 1, 1.0)
    loop = asyncio.get_running_loop()
    stream = chat_request(port, orjson.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "mock": {"reply_tokens": 50, "event_interval_ms": 5}}))
    task: asyncio.Task[object] | None = None
    original = upstream._Connection.on_headers_complete

    def head_then_hang_up(self: upstream._Connection) -> None:
        original(self)  # the head resolves the exchange ...
        if task is not None:
            task.cancel()  # ... and the client's hang-up is handled in the same turn

    monkeypatch.setattr(upstream._Connection, "on_headers_complete", head_then_hang_up)
    task = loop.create_task(pool.open_stream(stream, loop.time() + 5))
    with pytest.raises(asyncio.CancelledError):
        await task
    task = None
    # The stream's connection is not reused: the next request gets its own answer.
    resp = await pool.request(chat_request(port, orjson.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hello"}]})), loop.time() + 5)
    assert resp.status == 200 and resp.body.startswith(b"{"), resp.body[:160]
    assert orjson.loads(resp.body)["object"] == "chat.completion"
    pool.close()
