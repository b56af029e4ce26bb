"""A stream's chunked framing taken off in C (apirouter._ssecore.PlainChunks): equal to its
Python reference (workers.upstream._PlainChunksPy), and the connection that uses it hands the
stream what httptools alone would have, read by read, on any framing, split anywhere."""

from __future__ import annotations

import asyncio

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter._ssecore import PlainChunks
from apirouter.sse import SSERelay, SSEScanner, StreamUsage
from tests.harness import FakeBackendTransport
from workers.upstream import BackendPool, _Connection, _PlainChunksPy

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


@st.composite
def chunk(draw: st.DrawFn) -> bytes:
    """One chunk, mostly plain, sometimes framed in ways PlainChunks does not take (or that
    are broken)."""
    data = draw(st.binary(max_size=40) | st.sampled_from(
        [b"data: x\n\n", b"\r\n", b"0\r\n\r\n", b"1\r\n"]))
    size = b"%x" % len(data)
    form = draw(st.sampled_from(["plain"] * 8 + ["upper", "zeros", "ext", "space", "lf",
                                                  "bad_crlf", "short", "long", "junk"]))
    if form == "upper":
        size = size.upper()
    elif form == "zeros":
        size = b"00" + size
    elif form == "ext":
        return size + b";name=value\r\n" + data + b"\r\n"
    elif form == "space":
        return size + b" \r\n" + data + b"\r\n"
    elif form == "lf":
        return size + b"\n" + data + b"\r\n"
    elif form == "bad_crlf":
        return size + b"\r\n" + data + draw(st.sampled_from([b"\n", b"xx", b"\r\r", b"\rx"]))
    elif form == "short":  # the data runs into the next chunk's size line
        return size + b"\r\n" + data[:-1] + b"\r\n" if data else b"1\r\n\r\n"
    elif form == "long":
        return b"1" * 16 + b"\r\n" + data + b"\r\n"
    elif form == "junk":
        return draw(st.binary(max_size=8))
    return size + b"\r\n" + data + b"\r\n"


ENDINGS = [b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"000\r\n\r\n", b"0;x=1\r\n\r\n",
           b"0\r\n\r\nHTTP/1.1 200 OK\r\n", b"0\r\n", b"", b"0\r\n\r\nzz"]


@st.composite
def reads(draw: st.DrawFn) -> list[bytes]:
    """A chunked body, split into reads anywhere."""
    body = b"".join(draw(st.lists(chunk(), max_size=10))) + draw(st.sampled_from(ENDINGS))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def _through(chunks: PlainChunks | _PlainChunksPy, parts: list[bytes]
             ) -> list[tuple[bytes | None, bytes | None, bytes | None]]:
    got: list[tuple[bytes | None, bytes | None, bytes | None]] = []
    for part in parts:
        out = chunks.feed(part)
        got.append((out, chunks.head, chunks.rest))
        if out is None:
            break
    return got


@settings(max_examples=3000, deadline=None)
@given(reads())
def test_the_c_plain_chunks_answer_as_their_python_reference(parts: list[bytes]) -> None:
    assert _through(PlainChunks(), parts) == _through(_PlainChunksPy(), parts)


def test_plain_chunks_take_plain_framing_and_stop_at_anything_else() -> None:
    c = PlainChunks()
    assert c.feed(b"5\r\nhello\r\nA\r\n0123") == b"hello0123"
    assert c.feed(b"456789\r") == b"456789"
    assert c.feed(b"\n1") == b""  # a size line begun: carried to the next read
    assert c.feed(b"f\r\n" + b"x" * 31 + b"\r\n0\r\n\r\n") is None
    assert (c.head, c.rest) == (b"x" * 31, b"0\r\n\r\n")
    c = PlainChunks()
    assert c.feed(b"2\r\nab\r\n2;ext\r\ncd\r\n") is None
    assert (c.head, c.rest) == (b"ab", b"2;ext\r\ncd\r\n")
    c = PlainChunks()
    assert c.feed(b"2\r\nab\r\n1") == b"ab"
    assert c.feed(b"\r\nc\r\n0\r\n\r\n") is None  # the last chunk: the parser's
    assert (c.head, c.rest) == (b"c", b"0\r\n\r\n")
    c = PlainChunks()
    assert c.feed(b"2\r\nabX\n") is None  # data not followed by CRLF: broken
    assert (c.head, c.rest) == (b"ab", None)


def _by_connection(parts: list[bytes]) -> tuple[list[tuple[bytes, bool]], bool, bool]:
    """What a stream's connection hands the stream, read by read, and whether the body ended
    and whether the connection failed."""

    async def run() -> tuple[list[tuple[bytes, bool]], bool, bool]:
        pool = BackendPool("http", "127.0.0.1", 1, 4, 1.0)
        conn = _Connection(pool)
        transport = FakeBackendTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        fut = conn.send(b"GET / HTTP/1.1\r\n\r\n", loop.time() + 60, True)
        got: list[tuple[bytes, bool]] = []
        for part in parts:
            if transport.aborted:
                break
            conn.data_received(part)
            stream = conn.stream
            if stream is None:
                continue
            body = b"".join(stream._chunks)
            stream._chunks = []
            stream._size = 0
            got.append((body, stream.done))
        assert fut.done()
        stream = conn.stream
        done = stream is not None and stream.done
        pool.close()
        return got, done, transport.aborted

    return asyncio.run(run())


class _Reference:
    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _by_httptools(parts: list[bytes]) -> tuple[list[tuple[bytes, bool]], bool, bool]:
    ref = _Reference()
    got: list[tuple[bytes, bool]] = []
    failed = False
    for part in parts:
        try:
            ref.parser.feed_data(part)
        except httptools.HttpParserError:
            failed = True
        got.append((b"".join(ref.body), ref.done))
        ref.body = []
        if failed:
            break
    return got, ref.done, failed


@settings(max_examples=1500, deadline=None)
@given(reads(), st.integers(0, len(HEAD)), st.booleans())
def test_a_streams_connection_hands_on_what_httptools_alone_would(
        parts: list[bytes], head_cut: int, head_alone: bool) -> None:
    # The head in the first read (as it mostly comes: PlainChunks takes the body), alone in it,
    # or cut anywhere (the parser takes everything).
    if head_alone:
        parts = [HEAD, *parts]
    elif head_cut < len(HEAD):
        parts = [HEAD[:head_cut], HEAD[head_cut:] + (parts[0] if parts else b""), *parts[1:]]
    else:
        parts = [HEAD + (parts[0] if parts else b""), *parts[1:]]
    parts = [p for p in parts if p]
    got, done, failed = _by_connection(parts)
    want, want_done, want_failed = _by_httptools(parts)
    # Reads before the stream began (a head cut in two) hand over nothing on either side.
    want = want[len(want) - len(got):] if len(want) > len(got) else want
    assert got == want
    assert (done, failed) == (want_done, want_failed)


_STREAM_204 = (b"HTTP/1.1 204 No Content\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def test_a_204_stream_answer_hands_nothing_after_its_head_to_the_stream() -> None:
    """A 204 has no body whatever its framing says: httptools ends the message at the head, so
    the bytes after it are not de-chunked into the stream (found by review: they were)."""
    for parts in ([_STREAM_204 + b"d\r\ndata: hello\n\n\r\n0\r\n\r\n"],
                  [_STREAM_204, b"d\r\ndata: hello\n\n\r\n", b"0\r\n\r\n"]):
        got, done, _failed = _by_connection(parts)
        want, want_done, _ = _by_httptools(parts)
        assert [body for body, _ in got] == [b""] * len(got), got
        assert [body for body, _ in want][-len(got):] == [b""] * len(got)
        assert done == want_done


# Chunks as a stream's backend writes them (an event or a few each, mostly plain), and the
# rest: a part of an event, [DONE], a usage object, an escape, CRLF line ends, a comment.
_EVENTS = [b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
           b'data: {"choices":[{"delta":{"content":"a b"}}]}\n\n', b"data: x\n\n",
           b"data: [DONE]\n\n", b'data: {"usage":{"prompt_tokens":1}}\n\n',
           b'data: {"content":"a\\nb"}\n\n', b"data: y\r\n\r\n", b": ping\n\n", b"data: {"]


@st.composite
def event_reads(draw: st.DrawFn) -> list[bytes]:
    """A chunked stream body of events, split into reads mostly at chunk boundaries."""
    chunks = []
    for _ in range(draw(st.integers(0, 8))):
        data = b"".join(draw(st.lists(st.sampled_from(_EVENTS), min_size=1, max_size=3)))
        chunks.append(b"%x\r\n%b\r\n" % (len(data), data))
    if draw(st.booleans()):
        chunks.append(draw(st.sampled_from(ENDINGS)))
    body = b"".join(chunks)
    bounds = [0]
    for c in chunks:
        bounds.append(bounds[-1] + len(c))
    cuts = sorted(set(draw(st.lists(st.sampled_from(bounds) | st.integers(0, len(body)),
                                    max_size=10))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def _relayed(chunks: PlainChunks | _PlainChunksPy, parts: list[bytes], limit: int,
             frame: bool) -> tuple[list[tuple[object, ...]], int, int]:
    """Each read through relay(), and feed() where relay() declines (as the connection does)."""
    usage = StreamUsage()
    chunks.open_relay(usage, limit, frame)
    got: list[tuple[object, ...]] = []
    for part in parts:
        out = chunks.relay(part)
        if out is not None:
            got.append(("relay", out))
            continue
        body = chunks.feed(part)
        got.append(("feed", body, chunks.head, chunks.rest))
        if body is None:
            break
    return got, usage.events, usage.content_bytes


@settings(max_examples=3000, deadline=None)
@given(event_reads() | reads(), st.sampled_from([1 << 20, 64, 7]), st.booleans())
def test_the_c_relay_answers_as_its_python_reference(parts: list[bytes], limit: int,
                                                     frame: bool) -> None:
    assert _relayed(PlainChunks(), parts, limit, frame) == \
        _relayed(_PlainChunksPy(), parts, limit, frame)


@settings(max_examples=1000, deadline=None)
@given(event_reads(), st.booleans())
def test_relay_passes_on_what_feed_and_the_sse_relay_would(parts: list[bytes],
                                                           frame: bool) -> None:
    """What relay() answers for a read is what feed() and SSERelay.feed (nothing buffered)
    make of it, counted alike; a read it declines is left as it came."""
    usage = StreamUsage()
    fast = PlainChunks()
    fast.open_relay(usage, 1 << 20, frame)
    slow = PlainChunks()
    want_usage = StreamUsage()
    relay = SSERelay(SSEScanner(), want_usage, True)
    for part in parts:
        body = slow.feed(part)
        out = fast.relay(part)
        if out is None:
            assert fast.feed(part) == body
            if body is None:
                break
            want_usage.events, want_usage.content_bytes = usage.events, usage.content_bytes
            relay.scanner.feed(b"")  # (nothing left buffered: the next read starts afresh)
            continue
        assert body is not None
        assert relay.scanner.pending == b""
        passed = relay.feed(body)
        assert passed == body
        assert out == (b"%x\r\n%b\r\n" % (len(body), body) if frame else body)
        assert (usage.events, usage.content_bytes) == \
            (want_usage.events, want_usage.content_bytes)
        relay = SSERelay(SSEScanner(), want_usage, True)


def test_relay_takes_whole_plain_events_and_declines_the_rest() -> None:
    ev = b'data: {"choices":[{"delta":{"content":"hello"}}]}\n\n'
    usage = StreamUsage()
    c = PlainChunks()
    c.open_relay(usage, 1 << 20, True)
    read = b"%x\r\n%b\r\n" % (len(ev), ev)
    assert c.relay(read * 3) == b"%x\r\n%b\r\n" % (len(ev) * 3, ev * 3)
    assert (usage.events, usage.content_bytes) == (3, 15)
    assert c.relay(read[:10]) is None  # a part of an event: feed() takes it, as it came
    assert c.feed(read[:10]) == ev[:6]
    assert c.relay(read[10:]) is None  # the rest of a chunk begun before: not at an event
    assert c.feed(read[10:]) == ev[6:]
    done = b"data: [DONE]\n\n"
    assert c.relay(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done)) is None  # the last chunk
    assert (usage.events, usage.content_bytes) == (3, 15)
    c = PlainChunks()
    c.open_relay(usage, 1 << 20, False)
    assert c.relay(read) == ev
