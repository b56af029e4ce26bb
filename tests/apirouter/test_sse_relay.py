"""SSERelay, the stream relay's per-read step: whatever reads the stream arrives in, what it
passes on and what it accounts equal the event-by-event reference (SSEScanner.feed, then each
event through StreamUsage.add, [DONE] ending the stream, the usage-only chunk dropped unless
asked for) - for the common run it handles as one block and for every case it hands back to
the event-by-event path (CRLF, comments, multi-line data, usage, errors, [DONE], cuts)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.sse import SSERelay, SSEScanner, StreamUsage, is_done
from tests.apirouter.test_sse import ENCODERS, chunk

DONE = b"data: [DONE]\n\n"


def reference(pieces: list[bytes], keep_usage: bool) -> dict[str, Any]:
    """The relay event by event, as workers.streaming did it before SSERelay."""
    scanner, usage = SSEScanner(max_event_bytes=4096), StreamUsage(100)
    out, done = bytearray(), False
    try:
        for piece in pieces:
            for e in scanner.feed(piece):
                if is_done(e):
                    done = True
                    out += e.raw
                    break
                if usage.add(e) and not keep_usage:
                    continue
                out += e.raw
            if done:
                break
        error = None
    except ValueError as e:
        error = type(e)
    return state(bytes(out), done, usage, scanner, error)


def relayed(pieces: list[bytes], keep_usage: bool) -> dict[str, Any]:
    scanner, usage = SSEScanner(max_event_bytes=4096), StreamUsage(100)
    relay = SSERelay(scanner, usage, keep_usage)
    out = bytearray()
    try:
        for piece in pieces:
            out += relay.feed(piece)
            if relay.done:
                break
        error = None
    except ValueError as e:
        error = type(e)
    return state(bytes(out), relay.done, usage, scanner, error)


def state(out: bytes, done: bool, usage: StreamUsage, scanner: SSEScanner,
          error: type | None) -> dict[str, Any]:
    return {"out": out, "done": done, "events": usage.events,
            "content_bytes": usage.content_bytes, "usage": usage.usage, "result": usage.result(),
            "pending": scanner.pending if not done and error is None else None,
            "raised": error}


@st.composite
def stream(draw: st.DrawFn) -> bytes:
    """Mostly what OpenAI-compatible backends send (one data line per event, LF), with the
    cases the block path must hand over: usage and error objects, [DONE] (and events after
    it), comments, multi-line data, CRLF and CR line ends, a stream cut mid-event."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["chunk"] * 6 + ["usage", "error", "comment", "multi",
                                                     "done", "blank"]))
        if kind == "chunk":
            doc = draw(chunk())
            if draw(st.booleans()):
                doc.pop("usage", None)
            encode = ENCODERS[draw(st.integers(0, 1))]  # single line
            parts.append(b"data:" + draw(st.sampled_from([b" ", b""])) + encode(doc)
                         + b"\n\n")
        elif kind == "usage":
            parts.append(b'data: {"choices":[],"usage":{"prompt_tokens":%d,'
                         b'"completion_tokens":%d}}\n\n' % (draw(st.integers(0, 99)),
                                                            draw(st.integers(0, 99))))
        elif kind == "error":
            parts.append(b'data: {"error": {"message": "overloaded"}}\n\n')
        elif kind == "comment":
            parts.append(b": keep-alive\n\n")
        elif kind == "multi":
            parts.append(b"data: " + ENCODERS[2](draw(chunk())).replace(b"\n", b"\ndata: ")
                         + b"\n\n")
        elif kind == "done":
            parts.append(DONE)
        else:
            parts.append(b"\n")
    data = b"".join(parts)
    end = draw(st.sampled_from([b"\n"] * 4 + [b"\r\n", b"\r"]))
    if end != b"\n":
        data = data.replace(b"\n", end)
    if draw(st.booleans()):  # a stream that ends cleanly, else cut anywhere
        data += DONE.replace(b"\n", end)
    elif data:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@given(stream(), st.booleans())
@settings(max_examples=50, deadline=None)
def test_split_at_every_byte_boundary_the_relay_equals_the_reference(
        data: bytes, keep_usage: bool) -> None:
    for cut in range(len(data) + 1):
        pieces = [data[:cut], data[cut:]]
        assert relayed(pieces, keep_usage) == reference(pieces, keep_usage), cut


@given(stream(), st.lists(st.integers(1, 300), min_size=1, max_size=50), st.booleans())
@settings(max_examples=150, deadline=None)
def test_in_reads_of_any_size_the_relay_equals_the_reference(
        data: bytes, sizes: list[int], keep_usage: bool) -> None:
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at:at + sizes[i % len(sizes)]])
        at, i = at + sizes[i % len(sizes)], i + 1
    assert relayed(pieces, keep_usage) == reference(pieces, keep_usage)


def _chunk(content: str, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": content},
                                                  "finish_reason": finish}],
                                     "usage": None}) + b"\n\n"


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'


def test_several_events_in_one_read_pass_on_as_one_block() -> None:
    usage = StreamUsage()
    relay = SSERelay(SSEScanner(), usage, False)
    events = _chunk("a") + _chunk(' "b"\n') + _chunk("c", "stop")
    assert relay.feed(events + b"data: {") == events
    assert (usage.events, usage.content_bytes) == (3, 7)
    assert relay.scanner.pending == b"data: {" and not relay.done


def test_usage_then_done_in_one_read() -> None:
    for keep in (False, True):
        usage = StreamUsage()
        relay = SSERelay(SSEScanner(), usage, keep)
        head = _chunk("hi") + _chunk("", "stop")
        out = relay.feed(head + USAGE + DONE + _chunk("after [DONE]"))
        assert out == head + (USAGE if keep else b"") + DONE and relay.done
        assert usage.result() == (7, 3, False) and usage.events == 3


def test_crlf_events_are_relayed_whole() -> None:
    usage = StreamUsage()
    relay = SSERelay(SSEScanner(), usage, False)
    head = (_chunk("a") + _chunk("b")).replace(b"\n", b"\r\n")
    crlf = head + USAGE.replace(b"\n", b"\r\n")
    assert relay.feed(crlf[:-1]) == head
    assert relay.feed(crlf[-1:]) == b""  # the usage chunk, not asked for
    assert usage.result() == (7, 3, False) and usage.events == 3


def test_a_stream_cut_mid_event_passes_on_only_whole_events() -> None:
    usage = StreamUsage(400)
    relay = SSERelay(SSEScanner(), usage, False)
    whole = _chunk("abcd") + _chunk("efgh")
    assert relay.feed(whole + _chunk("ijkl")[:20]) == whole
    assert usage.events == 2 and usage.result() == (100, 2, True)
