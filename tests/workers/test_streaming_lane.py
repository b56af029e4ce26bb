"""workers.streaming's _Lane (PlainChunks.relay, written straight to the client's transport)
against the relay without it: for a stream fed to the backend connection read by read, split
anywhere, several reads in one loop turn or one a turn, with a client whose socket fills up or
not, under TurnWrites' lone-request or batched mode, the client is sent the same bytes and the
stream is settled with the same usage either way."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import streaming
from workers.fast_server import _Stream
from workers.turn_writes import turn_writes
from workers.upstream import BackendPool

HOST = "127.0.0.1"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
FIRST = b'data: {"choices":[{"delta":{"content":"first"}}],"usage":null}\n\n'
EVENTS = [b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
          b'data: {"choices":[{"delta":{"content":"a b"}}]}\n\n', b"data: x\n\n",
          b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n',
          b'data: {"content":"a\\nb"}\n\n', b"data: y\r\n\r\n", b": ping\n\n", b"data: {"]
DONE = b"data: [DONE]\n\n"
ENDINGS = [DONE + b"", b""]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class FakeTransport:
    def __init__(self, proto: FakeClient) -> None:
        self.proto = proto
        self.written = bytearray()
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written += data
        self.proto.wrote(len(data))


class FakeClient:
    """What _Stream and _Lane use of FastProtocol: a client whose socket is 'full' once
    ``capacity`` bytes were written since the test last drained it (0: never full)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self.transport: FakeTransport | None = FakeTransport(self)
        self.server = SimpleNamespace(writes=turn_writes(loop), loop=loop)
        self.writing_paused = False
        self.closing = False
        self.queue: list[Any] = []
        self.last_active = 0.0
        self.capacity = capacity
        self.buffered = 0
        self.drained: asyncio.Future[None] | None = None
        self.loop = loop

    def wrote(self, n: int) -> None:
        self.buffered += n
        if self.capacity and self.buffered > self.capacity:
            self.writing_paused = True

    def drain_socket(self) -> None:
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)

    async def drain(self) -> None:
        if self.writing_paused and self.transport is not None:
            if self.drained is None or self.drained.done():
                self.drained = self.loop.create_future()
            await self.drained

    def write_head(self, status: int, headers: Any, content_type: str, keep_alive: bool,
                   chunked: bool) -> None:
        assert self.transport is not None
        self.server.writes.write(self.transport, b"HEAD\r\n")


async def _relay_one(turns: list[list[bytes]], lane_on: bool, chunked: bool, capacity: int,
                     serving: int, include_usage: bool, hang_up: tuple[int, int] | None = None
                     ) -> tuple[bytes, tuple[Any, ...], int]:
    loop = asyncio.get_running_loop()
    hold_open = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + chunk(FIRST))
        await writer.drain()
        await hold_open.wait()
        writer.close()

    server = await asyncio.start_server(backend, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    target = SimpleNamespace(pool=pool, first_event_s=5.0, idle_s=5.0,
                             backend=SimpleNamespace(index=0))
    _resp, held = await streaming.hold(
        target,  # type: ignore[arg-type]
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        loop.time() + 5)
    assert held is not None
    client = FakeClient(loop, capacity)
    writes = client.server.writes
    writes.serving = serving
    sink = _Stream(client, True, chunked)  # type: ignore[arg-type]
    settled: list[tuple[Any, ...]] = []
    ctx = SimpleNamespace(
        fwd=SimpleNamespace(backend_id="b", decision_type="direct"),
        request=SimpleNamespace(include_usage=include_usage), sink=sink, body=b"{}",
        ticket=None, request_id="r1", started=0.0, ttft_s=None)
    lanes = 0
    real_open = streaming._open_lane

    def open_lane(*a: Any) -> Any:
        if not lane_on:
            return None
        take = real_open(*a)
        if take is None:
            return None

        def counted(data: bytes) -> bool:
            nonlocal lanes
            took = take(data)
            lanes += took
            return took
        return counted

    def settle(p: Any, c: Any, backend_id: str, index: int, usage: Any,
               interruption: str | None) -> None:
        settled.append((usage.events, usage.content_bytes, usage.usage, interruption))

    saved = streaming._open_lane, streaming._settle
    streaming._open_lane, streaming._settle = open_lane, settle  # type: ignore[assignment]
    try:
        task = asyncio.create_task(streaming.relay(None, ctx, held))  # type: ignore[arg-type]
        conn = held.body._conn
        for _ in range(20):
            await asyncio.sleep(0)
        t = client.transport
        for i, turn in enumerate(turns):
            for j, read in enumerate(turn):  # the reads of one loop turn: no task step between
                if hang_up == (i, j):  # the client hangs up (abort: closing, then lost)
                    t.closing = True
                if hang_up == (i - 1, j) and client.transport is not None:
                    client.transport = None  # connection_lost: the request is cancelled
                    task.cancel()
                if conn.transport is None or conn.transport.is_closing():
                    break
                conn.data_received(read)
            for _ in range(5):
                await asyncio.sleep(0)
            client.drain_socket()
            for _ in range(5):
                await asyncio.sleep(0)
        for attempt in range(400):
            if task.done():
                break
            if attempt == 20:
                held.body.fail(streaming.UpstreamProtocolError("the end of the test"))
            client.drain_socket()
            await asyncio.sleep(0.001 if attempt > 20 else 0)
        try:
            await asyncio.wait_for(task, 1)
        except asyncio.CancelledError:
            assert hang_up is not None
        writes.flush()
    finally:
        streaming._open_lane, streaming._settle = saved  # type: ignore[assignment]
        hold_open.set()
        held.body.close()
        server.close()
        pool.close()
        writes.serving = 0
    return bytes(t.written), settled[0], lanes


def _both(turns: list[list[bytes]], chunked: bool, capacity: int, serving: int,
          include_usage: bool, hang_up: tuple[int, int] | None = None
          ) -> tuple[tuple[bytes, tuple[Any, ...], int], ...]:
    got = []
    for lane_on in (True, False):
        loop = uvloop.new_event_loop()
        try:
            got.append(loop.run_until_complete(_relay_one(
                turns, lane_on, chunked, capacity, serving, include_usage, hang_up)))
        finally:
            loop.close()
    return tuple(got)


@st.composite
def stream_turns(draw: st.DrawFn) -> list[list[bytes]]:
    """The rest of a stream's chunked body after its first event, split into reads anywhere
    (mostly at chunk boundaries), the reads grouped into loop turns."""
    chunks = []
    for _ in range(draw(st.integers(0, 10))):
        data = b"".join(draw(st.lists(st.sampled_from(EVENTS[:3] * 4 + EVENTS[3:]),
                                      min_size=1, max_size=3)))
        chunks.append(chunk(data))
    ending = draw(st.sampled_from([chunk(DONE) + b"0\r\n\r\n", b"0\r\n\r\n",
                                   chunk(DONE), b""]))
    chunks.append(ending)
    body = b"".join(chunks)
    bounds = [0]
    for c in chunks:
        bounds.append(bounds[-1] + len(c))
    cuts = sorted(set(draw(st.lists(st.sampled_from(bounds) | st.integers(0, len(body)),
                                    max_size=12))))
    reads = [r for r in (body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)],
                                                   strict=True)) if r]
    turns: list[list[bytes]] = []
    i = 0
    while i < len(reads):
        n = draw(st.integers(1, 3))
        turns.append(reads[i:i + n])
        i += n
    return turns


@settings(max_examples=150, deadline=None)
@given(stream_turns(), st.booleans(), st.sampled_from([0, 0, 60, 200]),
       st.sampled_from([1, 3]), st.booleans())
def test_the_lane_sends_and_counts_what_the_relay_without_it_does(
        turns: list[list[bytes]], chunked: bool, capacity: int, serving: int,
        include_usage: bool) -> None:
    with_lane, without = _both(turns, chunked, capacity, serving, include_usage)
    assert with_lane[0] == without[0]
    assert with_lane[1] == without[1]


def test_the_lane_is_taken_for_whole_plain_events() -> None:
    e = EVENTS[0]
    turns = [[chunk(e)], [chunk(e * 2)], [chunk(e), chunk(e)], [chunk(DONE) + b"0\r\n\r\n"]]
    for serving in (1, 3):
        with_lane, without = _both(turns, True, 0, serving, False)
        assert with_lane[:2] == without[:2]
        assert with_lane[2] == 4 and without[2] == 0
        assert with_lane[0] == b"HEAD\r\n" + b"".join(
            chunk(x) for x in (FIRST, e, e * 2, e, e, DONE)) + b"0\r\n\r\n"


@settings(max_examples=100, deadline=None)
@given(stream_turns(), st.booleans(), st.tuples(st.integers(0, 4), st.integers(0, 2)))
def test_a_client_hanging_up_between_reads_is_settled_alike(
        turns: list[list[bytes]], chunked: bool, hang_up: tuple[int, int]) -> None:
    # A lone request (TurnWrites writes at once on both ways). Batched, the lane's direct
    # write sends a read that the queued write would have dropped when the client's transport
    # began closing later in the same turn (an abort drops both; a close sends the lane's):
    # the same bytes up to the turn of the hang-up, the same usage.
    with_lane, without = _both(turns, chunked, 0, 1, True, hang_up)
    assert with_lane[0] == without[0]
    assert with_lane[1] == without[1]
