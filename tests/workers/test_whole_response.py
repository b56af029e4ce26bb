"""A backend's whole buffered response taken in one C call (apirouter._wholecore): equal to its
Python reference (workers.upstream._whole_response_py), and a connection that uses it answers
exactly what it would with httptools alone (the response, the error, whether the connection
goes back to the pool), exchange after exchange, on any response, split into reads anywhere."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import workers.upstream as upstream
from apirouter._wholecore import whole_response
from tests.harness import FakeBackendTransport
from workers.upstream import (
    MAX_RESPONSE_BYTES,
    BackendPool,
    UpstreamResponse,
    _Connection,
    _whole_response_py,
)

NAMES = [b"Content-Type", b"content-type", b"CONTENT-TYPE", b"X-A", b"Connection",
         b"connection", b"Transfer-Encoding", b"Proxy-Connection", b"Upgrade", b"Keep-Alive",
         b"Content-Length", b"content-length", b"Bad Name", b"X{", b"", b"Content-Typ"]
SEPARATORS = [b": "] * 6 + [b":", b":  ", b":\t", b" : ", b": \t"]
VALUES = [b"application/json", b"text/plain; charset=utf-8", b"", b"close", b"keep-alive",
          b"chunked", b"x  ", b" x", b"a b", b"a\x7fb", b"a\tb", b"\xff", b"Upgrade", b"1",
          b"close, keep-alive", b"a\rb"]


@st.composite
def response(draw: st.DrawFn) -> bytes:
    """One response, mostly plain, often with what whole_response leaves to httptools or what
    httptools rejects."""
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    status = draw(st.sampled_from([200] * 6 + [201, 204, 304, 404, 429, 500, 503, 599, 101,
                                               100, 199, 600, 99]))
    reason = draw(st.sampled_from([b" OK"] * 6 + [b" ", b"", b" Not Found", b" O\x01K",
                                                  b" \xff", b"  x ", b" a\tb"]))
    eol = draw(st.sampled_from([b"\r\n"] * 12 + [b"\n"]))
    body = draw(st.binary(max_size=30) | st.sampled_from([b"{}", b'{"ok": true}']))
    lines = [b"%s %d%s" % (version, status, reason) if status >= 0 else b""]
    for name, sep, value in draw(st.lists(st.tuples(st.sampled_from(NAMES),
                                                    st.sampled_from(SEPARATORS),
                                                    st.sampled_from(VALUES)), max_size=4)):
        if name.lower() == b"content-length":
            value = draw(st.sampled_from([b"%d" % len(body), b"%d" % (len(body) + 1), value]))
        lines.append(name + sep + value)
    length = draw(st.sampled_from(["right"] * 6 + ["none", "more", "less", "zeros", "plus",
                                                   "twice", "space", "huge"]))
    n = len(body)
    value = {"right": b"%d" % n, "more": b"%d" % (n + 1), "less": b"%d" % max(n - 1, 0),
             "zeros": b"00%d" % n, "plus": b"+%d" % n, "twice": b"%d" % n, "space": b"%d " % n,
             "huge": b"9" * 20, "none": b""}[length]
    if length != "none":
        at = draw(st.integers(1, len(lines)))
        lines.insert(at, b"Content-Length: " + value)
        if length == "twice":
            lines.insert(at, b"content-length: " + value)
    extra = draw(st.sampled_from([b""] * 10 + [b"HTTP/1.1 200 OK\r\n", b"x", b"\r\n",
                                               b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]))
    return eol.join(lines) + eol + eol + body + extra


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [p for p in parts if p]


@settings(max_examples=3000, deadline=None)
@given(response() | st.binary(max_size=80), st.sampled_from([MAX_RESPONSE_BYTES, 2, 0]))
def test_the_c_whole_response_answers_as_its_python_reference(data: bytes, limit: int) -> None:
    assert (whole_response(data, limit, UpstreamResponse)
            == _whole_response_py(data, limit, UpstreamResponse))


def test_whole_response_takes_the_plain_form_and_leaves_the_rest() -> None:
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    assert whole_response(plain, 100, UpstreamResponse) == UpstreamResponse(
        200, [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")], b"{}",
        b"application/json")
    assert whole_response(b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n", 100,
                          UpstreamResponse) == UpstreamResponse(
        404, [(b"Content-Length", b"0")], b"", None)
    for other in (plain[:-1], plain + b"x", plain.replace(b"1.1", b"1.0"),
                  plain.replace(b"200", b"204"), plain.replace(b"2\r\n", b"02\r\n"),
                  plain.replace(b"Content-Type", b"Connection"),
                  plain.replace(b"Content-Type: application/json", b"Transfer-Encoding: x"),
                  plain.replace(b"json", b"json "), plain.replace(b"\r\n\r\n", b"\n\r\n")):
        assert whole_response(other, 100, UpstreamResponse) is None, other
    # over the size limit: httptools' error
    assert whole_response(plain, 1, UpstreamResponse) is None


def _answer(resp: UpstreamResponse | None, exc: BaseException | None) -> tuple[Any, ...]:
    if exc is not None:
        return ("error", type(exc).__name__, str(exc))
    assert resp is not None
    return ("ok", resp.status, resp.headers, resp.body, resp.header(b"content-type"),
            resp.header(b"Content-Type"), resp.header(b"x-a"))


def _exchanges(responses: list[list[bytes]], waiter: list[bool]) -> list[tuple[Any, ...]]:
    """Each response's reads on one connection, as long as it goes back to the pool: what each
    exchange answered, and the connection's state after it."""

    async def run() -> list[tuple[Any, ...]]:
        pool = BackendPool("http", "127.0.0.1", 1, 4, 1.0)
        conn = _Connection(pool)
        transport = FakeBackendTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool._open = 1
        pool._idle.append(conn)
        loop = asyncio.get_running_loop()
        out: list[tuple[Any, ...]] = []
        for parts, by_future in zip(responses, waiter, strict=False):
            if conn not in pool._idle:
                break
            answers: list[tuple[Any, ...]] = []
            if by_future:
                pool._idle.remove(conn)
                fut = conn.send(b"POST / HTTP/1.1\r\n\r\n", loop.time() + 60, False)
            else:
                started = pool.start(b"POST / HTTP/1.1\r\n\r\n", loop.time() + 60,
                                     lambda r, e, got=answers: got.append(_answer(r, e)))
                assert started is conn
            for part in parts:
                if transport.aborted:
                    break
                conn.data_received(part)
            if by_future:
                if fut.done():
                    answers.append(_answer(fut.result() if fut.exception() is None else None,
                                           fut.exception()))
                    conn.finished(fut)
                    pool._release(conn)
                else:
                    conn.finished(fut)  # abandoned: closes it
            out.append((answers, conn.keep_alive, transport.aborted, conn in pool._idle,
                        conn in pool._inflight))
        pool.close()
        return out

    return asyncio.run(run())


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(response(), st.lists(st.integers(0, 200), max_size=3)),
                min_size=1, max_size=4),
       st.lists(st.booleans(), min_size=4, max_size=4))
def test_a_connection_answers_what_httptools_alone_would(
        exchanges: list[tuple[bytes, list[int]]], waiter: list[bool]) -> None:
    responses = [_split(data, cuts) for data, cuts in exchanges]
    got = _exchanges(responses, waiter)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(upstream, "whole_response", lambda data, limit, cls: None)
        want = _exchanges(responses, waiter)
    assert got == want


def _chained(reads: list[bytes]) -> list[tuple[Any, ...]]:
    """Exchanges on one connection, each next one started inside the answer to the one before
    (as a pipelined client's next request is: FastProtocol._answered -> _next -> pool.start,
    inside the parser's on_message_complete while the rest of that read is still unparsed);
    what each answered."""

    async def run() -> list[tuple[Any, ...]]:
        pool = BackendPool("http", "127.0.0.1", 1, 4, 1.0)
        conn = _Connection(pool)
        conn.connection_made(FakeBackendTransport())  # type: ignore[arg-type]
        pool._open = 1
        pool._idle.append(conn)
        loop = asyncio.get_running_loop()
        got: list[tuple[Any, ...]] = []

        def then(resp: UpstreamResponse | None, exc: BaseException | None) -> None:
            got.append(_answer(resp, exc))
            if len(got) < len(reads):
                assert pool.start(b"POST / HTTP/1.1\r\n\r\n", loop.time() + 60, then) is conn

        assert pool.start(b"POST / HTTP/1.1\r\n\r\n", loop.time() + 60, then) is conn
        for read in reads:
            conn.data_received(read)
        pool.close()
        return got

    return asyncio.run(run())


def test_an_exchange_started_inside_the_parser_waits_for_it_to_rest() -> None:
    # The first read ends a response and begins another (a backend that sent more than it was
    # asked: the parser is mid-message once it returns); the exchange started in the first's
    # answer, while the parser still had that rest to take, must not take the next read whole
    # though it looks like a response: it is the body of the message the parser is in.
    inner = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    reads = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
             b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(inner),
             inner, b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(upstream, "whole_response", lambda data, limit, cls: None)
        want = _chained(reads)
    assert want[1][3] == inner and want[2][1] == 201
    assert _chained(reads) == want
