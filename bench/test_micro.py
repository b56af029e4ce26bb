"""Microbenchmarks of the per-request building blocks (pytest-benchmark).

    pytest bench --benchmark-only            # measure
    pytest bench --benchmark-disable         # run each once as a test (CI does this)
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from apirouter.errors import RouterError, native_body, openai_body
from apirouter.request_ids import RequestIds
from apirouter.routing import choose, failover_order
from apirouter.shm import TableReader, TableWriter
from apirouter.table import Backend, Limits, Route, RoutingTable, decode_table, encode_table
from apirouter.validation import parse_chat, parse_inference_request
from bench.overhead import BODY

CHAT = BODY.encode()
NATIVE = orjson.dumps({"model": "bench-model", "messages": orjson.loads(CHAT)["messages"],
                       "max_tokens": 16})


def _table(n_models: int = 50) -> RoutingTable:
    backends = {f"b{i}": Backend(f"b{i}", "http", "127.0.0.1", 9000 + i, "", None, i, "/health")
                for i in range(8)}
    routes = {f"m{i}": Route(f"m{i}", ("b0", "b1", "b2"), (5, 3, 1)) for i in range(n_models)}
    return RoutingTable(0.0, "bench", Limits(1 << 20, 60.0, 2.0, 256, 30.0, 3), backends, routes)


@pytest.fixture(scope="module")
def segment() -> Iterator[TableReader]:
    writer = TableWriter(f"apirouter-{os.getpid()}-bench", 1 << 20)
    writer.publish(encode_table(_table()))
    reader = TableReader(writer.name)
    yield reader
    reader.close()
    writer.close()


def test_table_generation_check(benchmark: BenchmarkFixture, segment: TableReader) -> None:
    """What every request pays to learn whether the table changed."""
    assert benchmark(segment.generation) == 2


def test_table_read_and_decode(benchmark: BenchmarkFixture, segment: TableReader) -> None:
    """What a worker pays once per published generation."""
    table = benchmark(lambda: decode_table(segment.read()[1]))
    assert len(table.routes) == 50


def test_chat_request_decode(benchmark: BenchmarkFixture) -> None:
    assert benchmark(parse_chat, CHAT).model == "bench-model"


def test_native_request_decode(benchmark: BenchmarkFixture) -> None:
    assert benchmark(parse_inference_request, NATIVE).model == "bench-model"


def test_weighted_choice(benchmark: BenchmarkFixture) -> None:
    """The first choice for a request, all backends healthy (the common case)."""
    table = _table()
    route = table.routes["m1"]
    rnd = random.random
    assert benchmark(lambda: choose(table, route, rnd()))[0] in {"b0", "b1", "b2"}


def test_failover_order(benchmark: BenchmarkFixture) -> None:
    """Computed only after a failed attempt."""
    table = _table()
    assert benchmark(failover_order, table, table.routes["m1"], ["b0"])[0][0] == "b1"


def test_request_id(benchmark: BenchmarkFixture) -> None:
    ids = RequestIds()
    assert benchmark(ids.accept, None).startswith("req_")


@pytest.mark.parametrize("render", [native_body, openai_body])
def test_error_render(benchmark: BenchmarkFixture, render: object) -> None:
    err = RouterError("MODEL_NOT_FOUND", "model 'x' is not routed", field="model")
    assert benchmark(render, err, "req-1")


# -- usage hand-off: what a worker spends per request to account for it --------------------

_RECORD_ARGS = dict(kind="request", request_id="req_0123456789ab00000001", ts_start=1.7e9,
                    ts_end=1.7e9 + 0.01, endpoint="/v1/chat/completions", key_id="key-1",
                    org="acme", model="gpt-4o-mini", backend_id="mock-a",
                    decision_type="WEIGHTED", attempts=1, status=200, error_code=None,
                    prompt_tokens=12, completion_tokens=30, cost_micro=4200, backend_s=0.008,
                    table_generation=7, worker_pid=4242)


def test_usage_record_encode(benchmark: BenchmarkFixture) -> None:
    from apirouter.usage import usage_record

    raw = benchmark(lambda: usage_record(**_RECORD_ARGS))  # type: ignore[arg-type]
    assert len(raw) < 600


@pytest.fixture
def usage_ring() -> Iterator[tuple[object, object]]:
    from apirouter.shm import segment_name
    from apirouter.usage_ring import (
        RingConsumer,
        RingProducer,
        create_usage_segment,
        unlink_segment,
    )

    name = segment_name(str(os.getpid()), f"benchusage{random.random():.9f}"[:48])
    shm = create_usage_segment(name, 1, 1 << 20)
    prod, cons = RingProducer(shm, 0), RingConsumer(shm, 0)
    yield prod, cons
    prod.release()
    cons.release()
    shm.close()
    unlink_segment(shm)


def test_usage_ring_put(benchmark: BenchmarkFixture, usage_ring: tuple[object, object]) -> None:
    """One record into the ring; the consumer empties it whenever it fills (not timed apart:
    a drain every ~2,000 puts, as the supervisor's 50 ms tick would at 40k req/s)."""
    from apirouter.usage import usage_record

    prod, cons = usage_ring
    raw = usage_record(**_RECORD_ARGS)  # type: ignore[arg-type]

    def put() -> None:
        if not prod.put(raw):  # type: ignore[attr-defined]
            _, pos = cons.peek(1 << 30)  # type: ignore[attr-defined]
            cons.commit(pos)  # type: ignore[attr-defined]
            prod.put(raw)  # type: ignore[attr-defined]

    benchmark(put)


# -- streaming: what the router spends per SSE event it passes through --------------------------

def _stream_events(n: int) -> list[bytes]:
    """n content chunks as the mock (and OpenAI, with include_usage) send them, one per read."""
    from tools.mock_shapes import stream_payloads

    doc = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}
    text = " ".join(["token"] * n)
    return [b"data: " + p + b"\n\n"
            for p in stream_payloads("bench", 1, doc, text, True, True)][1:n + 1]


def test_sse_scan_per_event(benchmark: BenchmarkFixture) -> None:
    """Boundary search and fields of one ~200-byte chunk arriving in its own read."""
    from apirouter.sse import SSEScanner

    scanner, chunk = SSEScanner(), _stream_events(1)[0]
    assert benchmark(scanner.feed, chunk)[0].raw == chunk


def test_sse_scan_and_account_per_event(benchmark: BenchmarkFixture) -> None:
    """The same, plus StreamUsage: the whole per-event cost of a streamed token."""
    from apirouter.sse import SSEScanner, StreamUsage

    scanner, acc, chunk = SSEScanner(), StreamUsage(), _stream_events(1)[0]

    def one() -> None:
        for e in scanner.feed(chunk):
            acc.add(e)

    benchmark(one)
    assert acc.content_bytes == 5 * acc.events


def test_sse_scan_per_event_batched(benchmark: BenchmarkFixture) -> None:
    """64 events in one read (a fast backend outrunning the router), per call."""
    from apirouter.sse import SSEScanner

    scanner, batch = SSEScanner(), b"".join(_stream_events(64))
    assert len(benchmark(scanner.feed, batch)) == 64


def test_sse_relay_per_read(benchmark: BenchmarkFixture) -> None:
    """What the stream relay does with one 64-event read (workers.streaming): pass on the
    complete events and account them (SSERelay's block path), per call."""
    from apirouter.sse import SSERelay, SSEScanner, StreamUsage

    batch = b"".join(_stream_events(64))
    relay = SSERelay(SSEScanner(), StreamUsage(), False)
    assert benchmark(relay.feed, batch) == batch
    # Accounted once per call (a fresh relay: the benchmark's calls add up in its own)
    once = SSERelay(SSEScanner(), StreamUsage(), False)
    assert once.feed(batch) == batch
    assert (once.usage.events, once.usage.content_bytes) == (64, 6 * 64 - 1)


def test_upstream_stream_read(benchmark: BenchmarkFixture) -> None:
    """A backend's read of 64 events, one chunk of the chunked encoding each, through the
    upstream connection into its BodyStream (workers.upstream), per call."""
    import asyncio

    from workers.upstream import _Connection

    body = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in _stream_events(64))

    class Transport:
        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    async def run() -> None:
        class Pool:
            _loop = asyncio.get_running_loop()

        conn = _Connection(Pool())  # type: ignore[arg-type]
        conn.transport = Transport()  # type: ignore[assignment]
        conn._want_stream = True
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        stream = conn.stream
        assert stream is not None
        stream.watch_idle(30)

        def one() -> None:
            conn.data_received(body)
            stream._chunks, stream._size = [], 0

        benchmark(one)
        assert stream._timer is not None
        stream._timer.cancel()

    asyncio.run(run())


_WRK_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
             b"Content-Length: %d\r\nContent-Type: application/json\r\n"
             b"Authorization: Bearer sk-bench-0123456789abcdef\r\n\r\n")
_SDK_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\n"
             b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
             b"Accept: application/json\r\nContent-Type: application/json\r\n"
             b"User-Agent: OpenAI/Python 1.52.0\r\nX-Stainless-Lang: python\r\n"
             b"X-Stainless-Package-Version: 1.52.0\r\nX-Stainless-OS: Linux\r\n"
             b"X-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
             b"X-Stainless-Runtime-Version: 3.11.2\r\n"
             b"Authorization: Bearer sk-bench-0123456789abcdef\r\n"
             b"X-Stainless-Async: false\r\nContent-Length: %d\r\n\r\n")


@pytest.mark.parametrize("head", [_WRK_HEAD, _SDK_HEAD], ids=["wrk-4-headers", "sdk-15-headers"])
@pytest.mark.parametrize("whole", [True, False], ids=["one-call", "httptools"])
def test_lean_server_request_parse(benchmark: BenchmarkFixture, head: bytes,
                                   whole: bool) -> None:
    """A whole request read → queued to be answered: the one-call path (gunicorn_h1c) against
    httptools' per-header callbacks (workers.fast_server._take_whole)."""
    from tests.workers.test_fast_server_whole import _feed, _Slow
    from workers.fast_server import FastProtocol

    data = head % len(CHAT) + CHAT
    p = _feed(FastProtocol if whole else _Slow, [])

    def parse() -> None:
        p.data_received(data)
        p.queue.clear()

    benchmark(parse)
    p.data_received(data)
    assert len(p.queue) == 1 and not p.failed
