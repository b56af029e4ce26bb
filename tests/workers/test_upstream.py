"""The upstream pool against real sockets: the mock backend, and raw servers that misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
import uvloop

from tools.mock_backend import Behaviour, MockState, start_mock
from workers import upstream
from workers.upstream import (
    STREAM_HIGH_WATER,
    BackendPool,
    BodyStream,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

HOST = "127.0.0.1"
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def chat_request(port: int, body: bytes = CHAT) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (port, len(body), body))


@pytest.fixture
async def mock() -> AsyncIterator[tuple[int, MockState]]:
    server, state = await start_mock(HOST, 0, name="up")
    yield server.sockets[0].getsockname()[1], state
    server.close()


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_keep_alive_reuses_one_connection(mock: tuple[int, MockState]) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 8, 1.0)
    for _ in range(20):
        resp = await pool.request(chat_request(port), deadline(5))
        assert resp.status == 200
        assert orjson.loads(resp.body)["object"] == "chat.completion"
    assert state.connections == 1 and pool.open_connections == 1
    pool.close()


async def test_concurrency_is_capped_by_max_connections(mock: tuple[int, MockState]) -> None:
    port, state = mock
    state.behaviour = Behaviour(latency_ms=20)
    pool = BackendPool("http", HOST, port, 3, 1.0)
    results = await asyncio.gather(*(pool.request(chat_request(port), deadline(5))
                                     for _ in range(12)))
    assert [r.status for r in results] == [200] * 12
    assert state.connections == 3
    pool.close()


async def test_connection_refused_is_a_connect_error() -> None:
    with __import__("socket").socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        pool = BackendPool("http", HOST, port, 4, 1.0)
        with pytest.raises(UpstreamConnectError):
            await pool.request(chat_request(port), deadline(2))
        assert pool.open_connections == 0


async def test_deadline_gives_timeout_and_frees_the_connection(
        mock: tuple[int, MockState]) -> None:
    port, state = mock
    state.behaviour = Behaviour(latency_ms=500)
    pool = BackendPool("http", HOST, port, 1, 1.0)
    with pytest.raises(UpstreamTimeout):
        await pool.request(chat_request(port), deadline(0.05))
    state.behaviour = Behaviour()
    resp = await pool.request(chat_request(port), deadline(2))  # the slot was given back
    assert resp.status == 200
    pool.close()


async def test_one_watch_timer_serves_every_deadline(mock: tuple[int, MockState]) -> None:
    """The pool watches all exchanges with one timer: a short deadline that arrives after a
    long one still fires on time, the long one is not cut by it, and an exchange that finished
    is never expired afterwards."""
    port, state = mock
    state.behaviour = Behaviour(latency_ms=300)
    pool = BackendPool("http", HOST, port, 4, 1.0)
    loop = asyncio.get_running_loop()
    long = asyncio.ensure_future(pool.request(chat_request(port), deadline(5)))
    await asyncio.sleep(0.01)  # the watch is armed for 5 s now
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await pool.request(chat_request(port), deadline(0.05))
    assert loop.time() - started < 0.25  # not the long exchange's deadline, nor its answer
    assert (await long).status == 200  # the long exchange was not cut by the short deadline
    state.behaviour = Behaviour()
    quick = await pool.request(chat_request(port), deadline(0.2))
    assert quick.status == 200
    await asyncio.sleep(0.3)  # its deadline passes after it finished: nothing happens
    again = await pool.request(chat_request(port), deadline(2))  # the connection is still fine
    assert again.status == 200 and not pool._inflight
    pool.close()


def test_the_watch_fires_once_for_a_deadline_between_clock_ticks() -> None:
    """uvloop's clock counts whole milliseconds and its timers round to the nearest one, so a
    deadline 0.4 ms past a tick is fired 0.4 ms before it. The watch must expire what it was
    armed for then, once, as the timer per exchange did - not find it not yet due and re-arm
    for it again and again (each time copying and scanning the set in flight) until the
    clock passes it."""

    class CountingPool(BackendPool):
        watch_runs = 0

        def _check_deadlines(self) -> None:
            self.watch_runs += 1
            super()._check_deadlines()

    async def timeouts(n: int) -> int:
        server, state = await start_mock(HOST, 0, name="up")
        port = server.sockets[0].getsockname()[1]
        state.behaviour = Behaviour(latency_ms=500)
        pool = CountingPool("http", HOST, port, 1, 1.0)
        for _ in range(n):
            with pytest.raises(UpstreamTimeout):
                await pool.request(chat_request(port), deadline(0.0504))
        pool.close()
        server.close()
        return pool.watch_runs

    assert uvloop.run(timeouts(5)) == 5


def test_the_stream_idle_timer_fires_once_for_a_deadline_between_clock_ticks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a stream's idle timeout: a backend that sends the head and then nothing
    is timed out by one run of the timer, not by a run every loop turn until uvloop's
    millisecond clock passes a deadline it fired for early."""
    runs = 0
    on_timer = BodyStream._on_timer

    def counting(self: BodyStream) -> None:
        nonlocal runs
        runs += 1
        on_timer(self)

    monkeypatch.setattr(BodyStream, "_on_timer", counting)

    async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(2)
        w.close()

    async def idle_timeouts(n: int) -> None:
        server, port = await raw_server(stall)
        pool = BackendPool("http", HOST, port, n, 1.0)
        for _ in range(n):
            _, body = await pool.open_stream(chat_request(port), deadline(5))
            assert body is not None
            body.watch_idle(0.0504)
            with pytest.raises(UpstreamTimeout):
                while await body.read():
                    pass
            body.close()
        pool.close()
        server.close()

    uvloop.run(idle_timeouts(5))
    assert runs == 5


async def raw_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       asyncio.Future[None]]) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(r: asyncio.StreamReader) -> None:
    head = await r.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await r.readexactly(length)


class ClosingBackend:
    """Answers "ok" after ``delay_s`` and closes, without saying Connection: close: a pooled
    connection to it is stale once the close arrives."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.served = 0

    async def handler(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.served += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        w.close()


async def test_stale_keep_alive_connection_is_retried_once() -> None:
    backend = ClosingBackend()
    server, port = await raw_server(backend.handler)  # type: ignore[arg-type]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    for _ in range(3):
        await asyncio.sleep(0.02)  # let the close arrive, or not: both must work
        resp = await pool.request(chat_request(port), deadline(2))
        assert resp.body == b"ok"
    assert backend.served == 3
    pool.close()
    server.close()


async def test_meanwhile_runs_once_while_the_backend_works_even_when_retried() -> None:
    """``meanwhile`` (work the response would otherwise wait for) runs once an exchange, with
    the request already written (a lone request's goes out at once) and its answer not in
    yet - also when a stale pooled connection makes the exchange start over."""
    seen: list[tuple[int, int]] = []  # (requests the backend has answered, bytes unwritten)
    backend = ClosingBackend(0.01)
    server, port = await raw_server(backend.handler)  # type: ignore[arg-type]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    for i in range(4):
        if i % 2:
            await asyncio.sleep(0.05)  # the close arrives first: a fresh connection
        # otherwise the closed connection may be taken from the pool: a retried exchange

        def meanwhile() -> None:
            conn = next(iter(pool._inflight))
            assert conn.transport is not None
            seen.append((backend.served, conn.transport.get_write_buffer_size()))

        resp, _ = await pool.exchange(chat_request(port), deadline(2), False, meanwhile)
        assert resp.body == b"ok"
        assert seen == [(k, 0) for k in range(i + 1)]
    assert backend.served == 4
    pool.close()
    server.close()


async def test_a_failing_meanwhile_is_logged_and_the_exchange_goes_on(
        mock: tuple[int, MockState], caplog: pytest.LogCaptureFixture) -> None:
    port, _ = mock
    pool = BackendPool("http", HOST, port, 2, 1.0)

    def meanwhile() -> None:
        raise ValueError("work ahead broke")

    resp, _ = await pool.exchange(chat_request(port), deadline(5), False, meanwhile)
    assert resp.status == 200
    assert "work done while a backend answers failed" in caplog.text
    assert pool.open_connections == 1 and len(pool._idle) == 1  # back in the pool
    pool.close()


async def test_garbage_and_hang_ups_are_protocol_errors() -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()

    async def hang_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.close()

    for handler in (garbage, hang_up):
        server, port = await raw_server(handler)  # type: ignore[arg-type]
        pool = BackendPool("http", HOST, port, 4, 1.0)
        with pytest.raises(UpstreamProtocolError):
            await pool.request(chat_request(port), deadline(2))
        pool.close()
        server.close()


async def test_a_backend_that_switches_protocols_answers_101_and_its_connection_closes(
        caplog: pytest.LogCaptureFixture) -> None:
    """httptools signals a 101 with Upgrade, after the message's end, by an exception that is
    not a parse error: the exchange has its 101 (a BACKEND_ERROR to the pipeline), the
    connection is not kept, and the read does not raise out of the protocol (the event loop's
    "data_received() call failed", which it logged as a fatal error)."""
    async def switch(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade"
                b"\r\n\r\nbytes of another protocol")
        await w.drain()
        await asyncio.sleep(1)

    server, port = await raw_server(switch)  # type: ignore[arg-type]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    resp = await pool.request(chat_request(port), deadline(2))
    assert resp.status == 101
    await asyncio.sleep(0.05)
    assert pool.open_connections == 0 and not pool._idle
    assert "data_received" not in caplog.text
    pool.close()
    server.close()


async def test_chunked_response_is_reassembled() -> None:
    async def chunked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        await w.drain()

    server, port = await raw_server(chunked)  # type: ignore[arg-type]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    resp = await pool.request(chat_request(port), deadline(2))
    assert (resp.status, resp.body) == (200, b"abcdefg")
    pool.close()
    server.close()


def stream_request(port: int, events: int, interval_ms: float = 0) -> bytes:
    return chat_request(port, orjson.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "mock": {"reply_tokens": events, "event_interval_ms": interval_ms}}))


async def test_a_slow_stream_reader_pauses_the_backend_and_memory_stays_bounded(
        mock: tuple[int, MockState]) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    resp, body = await pool.open_stream(stream_request(port, 20_000), deadline(5))
    assert resp.status == 200 and body is not None
    await asyncio.sleep(0.3)  # the reader is busy elsewhere; the mock keeps writing
    conn = body._conn
    assert conn.transport is not None and not conn.transport.is_reading()
    assert body._size <= STREAM_HIGH_WATER + 256 * 1024  # one socket read past the mark
    received = 0
    while chunk := await body.read():
        received += len(chunk)
    body.close()
    assert received > STREAM_HIGH_WATER and state.streams_completed == 1
    assert pool._idle == [conn]  # read to its end: the connection goes back to the pool


async def test_a_read_with_push_hands_each_read_to_it_until_it_answers_false(
        mock: tuple[int, MockState]) -> None:
    """read(push): the reads that arrive while it waits go to push, inside the connection's
    callback; once push answers False the reader is woken and reads pile up for read() again
    (up to the high-water mark); nothing is lost or reordered on the way."""
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    resp, body = await pool.open_stream(stream_request(port, 20_000), deadline(5))
    assert resp.status == 200 and body is not None
    got: list[bytes] = []  # in order: what was pushed, and what read() returned
    pushed = 0

    def push(data: bytes) -> bool:
        nonlocal pushed
        assert data
        got.append(data)
        pushed += len(data)
        return pushed < 64 * 1024

    while pushed < 64 * 1024:
        chunk = await body.read(push)  # what was buffered already, or b"" once push said no
        assert chunk or pushed >= 64 * 1024
        got.append(chunk)
    await asyncio.sleep(0.3)  # no push any more: the reads pile up to the high-water mark
    conn = body._conn
    assert conn.transport is not None and not conn.transport.is_reading()
    while chunk := await body.read():
        got.append(chunk)
    body.close()
    assert state.streams_completed == 1 and pool._idle == [conn]
    events = b"".join(got).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 20_000 + 4
    assert all(e.startswith(b"data: {") for e in events[:-2])


async def test_a_push_that_takes_every_read_still_stops_at_the_high_water_mark(
        mock: tuple[int, MockState]) -> None:
    """What push passed on counts toward the high-water mark until the reader runs again (a
    loop turn's writes may wait before the client's socket says it is full): the read that
    crosses it stays in the body, reading pauses, and the reader is woken with it."""
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    resp, body = await pool.open_stream(stream_request(port, 20_000), deadline(5))
    assert resp.status == 200 and body is not None
    got: list[bytes] = []
    pushed = 0

    def push(data: bytes) -> bool:
        nonlocal pushed
        got.append(data)
        pushed += len(data)
        return True  # a client that never fills: only the mark stops it

    woken = 0
    while chunk := await body.read(push):
        got.append(chunk)
        woken += 1
        assert pushed <= woken * STREAM_HIGH_WATER  # never more than the mark between reads
    body.close()
    assert state.streams_completed == 1
    assert pushed > STREAM_HIGH_WATER and woken >= pushed // (STREAM_HIGH_WATER + 256 * 1024)
    events = b"".join(got).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 20_000 + 4


async def test_an_abandoned_stream_closes_its_connection_and_deadlines_fire(
        mock: tuple[int, MockState]) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    _, body = await pool.open_stream(stream_request(port, 1000, interval_ms=20), deadline(5))
    assert body is not None
    body.watch_idle(0.01)  # events come every 20 ms: the stream counts as stalled
    with pytest.raises(UpstreamTimeout):
        while await body.read():
            pass
    body.close()
    await asyncio.sleep(0.1)
    assert pool.open_connections == 0 and not pool._idle
    assert state.aborted_by_peer == 1


# Found in review (issue 14): the client's hang-up (its connection's task cancelled) and the
# backend's response head can be handled in the same event-loop turn: the head resolves the
# exchange's future, then the cancel lands before the task resumes, and
# ``BackendPool.exchange`` sees CancelledError with a future that is done, not cancelled. The
# backend is still streaming the body on that connection: it must not go back to the pool, or
# the next request on it is answered with the rest of another client's stream.
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
