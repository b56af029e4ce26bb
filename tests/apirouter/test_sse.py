"""SSE framing and stream accounting: property tests against the spec's field rules and a
full JSON parse, and the in-band error event as the official openai SDK sees it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter._ssecore import plain_block, plain_events, raw_content_bytes
from apirouter.errors import RouterError
from apirouter.limits import estimate_tokens
from apirouter.sse import (
    _CONTENT,
    SSEEvent,
    SSEEventTooLarge,
    SSEScanner,
    StreamUsage,
    _content_bytes,
    _plain_block_py,
    _plain_events_py,
    _string_bytes,
    error_event,
    is_done,
)

ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
# Field values: anything but line ends (the only thing a value cannot hold).
VALUE = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                max_size=12).map(lambda s: s.encode())

Fields = tuple[bytes | None, bytes | None, bytes | None]


@st.composite
def sse_stream(draw: st.DrawFn) -> tuple[bytes, list[Fields]]:
    """A stream of events (data lines, event, id, comments, blank lines between events, mixed
    line ends) and the (data, event, id) each must parse to."""
    out = bytearray()
    expected: list[Fields] = []

    def line(text: bytes) -> None:
        end = draw(ENDS)
        if not text and out.endswith(b"\r") and end == b"\n":
            end = b"\r\n"  # CR then LF would be one line end, not a blank line
        out.extend(text + end)

    for _ in range(draw(st.integers(1, 5))):
        for _ in range(draw(st.integers(0, 2))):
            line(b"")  # blank lines between events dispatch nothing
        data: list[bytes] = []
        event = ident = None
        kinds = draw(st.lists(st.sampled_from(["data", "event", "id", "comment"]),
                              min_size=1, max_size=5))
        for kind in kinds:
            value = draw(VALUE)
            space = b" " if draw(st.booleans()) or value.startswith(b" ") else b""
            if kind == "comment":
                line(b":" + value)
                continue
            if kind == "data" and not value and draw(st.booleans()):
                line(b"data")  # a field name alone: an empty value
            else:
                line(kind.encode() + b":" + space + value)
            if kind == "data":
                data.append(value)
            elif kind == "event":
                event = value
            elif b"\0" not in value:
                ident = value
        line(b"")
        expected.append((b"\n".join(data) if data else None, event, ident))
    return bytes(out), expected


def fields(events: list[SSEEvent]) -> list[Fields]:
    return [(e.data, e.event, e.id) for e in events]


@given(sse_stream())
@settings(max_examples=300, deadline=None)
def test_events_split_at_every_byte_boundary_are_the_same(
        case: tuple[bytes, list[Fields]]) -> None:
    stream, expected = case
    whole = SSEScanner()
    events = whole.feed(stream)
    assert fields(events) == expected
    assert b"".join(e.raw for e in events) == stream and whole.pending == b""
    for cut in range(1, len(stream)):
        s = SSEScanner()
        parts = s.feed(stream[:cut]) + s.feed(stream[cut:])
        assert fields(parts) == expected
        assert b"".join(e.raw for e in parts) + s.pending == stream


@given(sse_stream(), st.lists(st.integers(1, 7), min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_events_fed_in_small_pieces_are_the_same(case: tuple[bytes, list[Fields]],
                                                 sizes: list[int]) -> None:
    stream, expected = case
    s, got, at, i = SSEScanner(), [], 0, 0
    while at < len(stream):
        n = sizes[i % len(sizes)]
        got += s.feed(stream[at:at + n])
        at, i = at + n, i + 1
    assert fields(got) == expected
    assert b"".join(e.raw for e in got) + s.pending == stream
    assert s.pending in (b"", b"\n")  # the LF of a CRLF cut after its CR, at the very end


def test_crlf_lf_and_cr_streams_give_the_same_events() -> None:
    lf = b': ping\n\nevent: delta\nid: 7\ndata: {"a":\ndata:  1}\n\ndata: [DONE]\n\n'
    parsed = [fields(SSEScanner().feed(lf.replace(b"\n", end)))
              for end in (b"\n", b"\r\n", b"\r")]
    assert parsed[0] == parsed[1] == parsed[2] == [
        (None, None, None), (b'{"a":\n 1}', b"delta", b"7"), (b"[DONE]", None, None)]
    assert is_done(SSEScanner().feed(lf)[-1]) and not is_done(SSEScanner().feed(lf)[0])


def test_an_unfinished_event_stays_pending() -> None:
    s = SSEScanner()
    assert s.feed(b"data: 1\n\ndata: 2\n") == [SSEEvent(b"data: 1\n\n", b"1")]
    assert s.pending == b"data: 2\n"
    assert s.feed(b"\n") == [SSEEvent(b"data: 2\n\n", b"2")]


def test_an_oversized_event_raises_however_it_arrives() -> None:
    s = SSEScanner(max_event_bytes=64)
    assert len(s.feed(b"data: " + b"x" * 56 + b"\n\n")) == 1  # exactly 64 bytes
    with pytest.raises(SSEEventTooLarge):
        SSEScanner(max_event_bytes=64).feed(b"data: " + b"x" * 57 + b"\n\n")
    s = SSEScanner(max_event_bytes=64)
    with pytest.raises(SSEEventTooLarge):
        for _ in range(20):
            s.feed(b"data: xxxx")  # never ends
    s = SSEScanner(max_event_bytes=64)
    with pytest.raises(SSEEventTooLarge):
        for _ in range(100):
            s.feed(b"\n")  # blank lines forever are buffered too


# -- accounting ---------------------------------------------------------------------------------

# Quotes, backslashes, line ends and non-ASCII often: what escapes look like in each encoder.
TEXT = st.text(st.sampled_from(list('a "\\/\n\té中😀'))
               | st.characters(blacklist_categories=("Cs",)), max_size=20)
FINISH = st.sampled_from([None, "stop", "length", "tool_calls"])
USAGE = st.builds(lambda p, c: {"prompt_tokens": p, "completion_tokens": c,
                                "total_tokens": p + c}, st.integers(0, 10**6),
                  st.integers(0, 10**6))


@st.composite
def chunk(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "c-1", "object": "chat.completion.chunk", "created": 1,
                           "model": draw(TEXT)}
    choices = []
    for i in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            delta: dict[str, Any] = {}
            for key in ("role", "content", "refusal", "reasoning_content"):
                if draw(st.booleans()):
                    delta[key] = draw(st.none() | TEXT)
            if draw(st.booleans()):
                delta["tool_calls"] = [{"index": 0, "id": draw(TEXT), "type": "function",
                                        "function": {"name": draw(TEXT),
                                                     "arguments": draw(TEXT)}}]
            choices.append({"index": i, "delta": delta, "logprobs": None,
                            "finish_reason": draw(FINISH)})
        else:
            choices.append({"index": i, "text": draw(TEXT), "finish_reason": draw(FINISH),
                            "logprobs": None})
    doc["choices"] = choices
    usage = draw(st.sampled_from(["absent", "null", "object"]))
    if usage != "absent":
        doc["usage"] = draw(USAGE) if usage == "object" else None
    return doc


def full_parse(docs: list[dict[str, Any]], prompt_bytes: int) -> dict[str, Any]:
    """What StreamUsage must find, from parsing every chunk."""
    content, usage = 0, None
    for doc in docs:
        for c in doc["choices"]:
            delta = c.get("delta", {})
            pieces = [c.get("text"), delta.get("content"), delta.get("refusal"),
                      delta.get("reasoning_content")]
            pieces += [t["function"]["arguments"] for t in delta.get("tool_calls", [])]
            content += sum(len(p.encode()) for p in pieces if p)
        if isinstance(doc.get("usage"), dict):
            usage = doc["usage"]
    if usage:
        result = (usage["prompt_tokens"], usage["completion_tokens"], False)
    else:
        result = (estimate_tokens(prompt_bytes, None, 0) if prompt_bytes else 0,
                  estimate_tokens(content, None, 0) if content else 0, True)
    return {"events": len(docs), "content_bytes": content, "usage": usage, "result": result}


ENCODERS = [orjson.dumps, lambda d: json.dumps(d).encode(),
            lambda d: json.dumps(d, ensure_ascii=False, indent=1).encode()]


@given(st.lists(chunk(), max_size=8), st.sampled_from(range(len(ENCODERS))),
       st.integers(0, 5000))
@settings(max_examples=300, deadline=None)
def test_usage_extraction_equals_a_full_parse(docs: list[dict[str, Any]], encoder: int,
                                              prompt_bytes: int) -> None:
    encode = ENCODERS[encoder]
    stream = b"".join(b"data: " + encode(d).replace(b"\n", b"\ndata: ") + b"\n\n"
                      for d in docs) + b"data: [DONE]\n\n"
    acc = StreamUsage(prompt_bytes)
    usage_only = [acc.add(e) for e in SSEScanner().feed(stream)]
    want = full_parse(docs, prompt_bytes)
    assert {"events": acc.events, "content_bytes": acc.content_bytes, "usage": acc.usage,
            "result": acc.result()} == want
    assert usage_only == [isinstance(d.get("usage"), dict) and not d["choices"]
                          for d in docs] + [False]


def test_in_band_errors_are_counted_events() -> None:
    acc = StreamUsage()
    usage_only = [acc.add(e) for e in SSEScanner().feed(
        b'data: {"error": {"message": "overloaded", "code": 1}}\n\n'
        b'data: {"choices": [], "note": "\\"usage\\": {"}\n\n')]
    assert usage_only == [False, False] and acc.events == 2 and acc.usage is None


async def test_the_openai_sdk_raises_the_error_event() -> None:
    """A real HTTP server streams two chunks and error_event(); the SDK raises APIError."""
    err = RouterError("BACKEND_TIMEOUT", details="stream idle")
    chunk0 = orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                           "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"},
                                                      "finish_reason": None}]})
    body = b"data: " + chunk0 + b"\n\n" + error_event(err, "req-1")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                                max_retries=0)
    got = []
    with pytest.raises(openai.APIError) as raised:
        async for c in await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True):
            got.append(c.choices[0].delta.content)
    assert got == ["hi"]
    assert "did not answer before the deadline (stream idle)" in raised.value.message
    assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "backend_timeout"
    assert raised.value.body["request_id"] == "req-1"
    await client.close()
    server.close()


# Pieces the content pattern is made of, and its near misses: keys with and without their
# quotes and colon, whitespace (line ends included), escapes, stray quotes.
_PIECES = [b'"', b'":', b":", b" ", b"\t", b"\n", b"\r", b"\\", b"\\\"", b"\\n", b"a", b"\xc3\xa9",
           b"content", b"text", b"arguments", b"refusal", b"reasoning_", b"reasoning_content",
           b'"content":"', b'"text": "', b'"arguments":\n"', b'{"delta":{"content":"hi"}}',
           b'"refusal":"', b'"reasoning_content":"', b'"reasoning_content": \r\n"',
           b'"content":"a"content":"b"', b"\x00", b"\xff", b"data: ", b"\n\n"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40))
def test_the_c_count_of_content_bytes_is_the_patterns(pieces: list[bytes]) -> None:
    # apirouter/_ssecore.c walks the bytes the way _CONTENT.findall does: the same strings,
    # or -1 when one of them holds an escape (the Python path decodes those).
    data = b"".join(pieces)
    found = _CONTENT.findall(data)
    expected = -1 if any(b"\\" in s for s in found) else sum(map(len, found))
    assert raw_content_bytes(data) == expected
    assert _content_bytes(data) == _content_bytes_by_pattern(data)


def _content_bytes_by_pattern(data: bytes) -> int:
    """sse._content_bytes as it was before its C part: the pattern alone."""
    found = _CONTENT.findall(data)
    joined = b"".join(found)
    if b"\\" not in joined:
        return len(joined)
    try:
        return len("".join(orjson.loads(b'["' + b'","'.join(found) + b'"]')).encode())
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return sum(map(_string_bytes, found))


# Pieces of a read as plain_block sees it: data lines, blank lines and the line ends around
# them (CR included), [DONE] and its near misses, usage keys null or not and their near misses,
# content strings with and without escapes, and bytes of no meaning.
_BLOCK_PIECES = [b"data:", b"data: ", b"data", b"dat", b"\n", b"\n\n", b"\n\n\n", b"\r",
                 b"\r\n", b":", b" ", b"x", b"\x00", b"\xff", b"[DONE]", b"[DONE", b"DONE]",
                 b'"usage":', b'"usage":null', b'"usage":nul', b'"usage": null', b'"usage":{',
                 b'"usage"', b"null", b'"content":"', b'"content":"ab"', b'"text":"\\n"',
                 b'"', b"\\", b'{"choices":[{"delta":{"content":"hi"}}],"usage":null}',
                 b"data: [DONE]\n\n", b'data: {"content":"a"}\n\n', b"\nxdata:", b"\n\ndata:"]


@settings(max_examples=4000, deadline=None)
@given(st.lists(st.sampled_from(_BLOCK_PIECES), max_size=30))
def test_the_c_plain_block_answers_as_its_python_reference(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert plain_block(data) == _plain_block_py(data)
    # And as a read of the common form: what the pieces make after a data line.
    framed = b"data: " + data
    assert plain_block(framed) == _plain_block_py(framed)
    for buf in (data, framed, framed + b"\n\n"):
        for limit in (0, len(buf) - 1, len(buf), 1 << 20):
            assert plain_events(buf, limit) == _plain_events_py(buf, limit)


def test_plain_block_finds_the_plain_run_of_a_mock_read() -> None:
    chunk = (b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}],"usage":null}\n\n')
    read = chunk * 14 + b'data: {"choices":[{"in'
    assert plain_block(read) == (len(chunk) * 14, 14, 5 * 14, False)
    # [DONE] or a usage object: the events before it, and the rest event by event.
    done = b"data: [DONE]\n\n"
    assert plain_block(chunk * 2 + done) == (len(chunk) * 2, 2, 10, True)
    used = chunk.replace(b'"usage":null', b'"usage":{"total_tokens":3}')
    assert plain_block(chunk * 3 + used + done) == (len(chunk) * 3, 3, 15, True)
    assert plain_block(used + chunk) == (0, 0, 0, True)
    # A line that is not a data line, whatever follows it: event by event.
    for odd in (b"data:a\nxdata:b\n\n", b"data:a\n\n\ndata:b\n\n", b"data:a\n\n: c\n\n"):
        assert plain_block(odd) is None and _plain_block_py(odd) is None, odd
    assert plain_block(chunk.replace(b"hello", b"he\\nllo")) == (len(chunk) + 2, 1, -1, False)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 20), st.integers(0, 300), st.sampled_from(
    [b"[DONE]", b'"usage":{}', b'"usage":nul', b'"usage":null', b'"content":"x"',
     b'"text":"a\\"b"', b'"', b"[", b"\n", b"\r"]))
def test_plain_block_agrees_wherever_a_mark_falls(events: int, at: int, mark: bytes) -> None:
    """A mock read with something plain_block looks for put at any byte: the C (which looks
    at 16 bytes at a time) answers as its reference at every offset."""
    chunk = (b'data: {"id":"c-1","choices":[{"index":0,"delta":{"content":"hello"}}],'
             b'"usage":null}\n\n')
    read = chunk * events + b'data: {"choices":[{"in'
    at = min(at, len(read))
    for data in (read[:at] + mark + read[at:], read[:at] + mark):
        assert plain_block(data) == _plain_block_py(data), data


def test_plain_events_takes_a_read_of_whole_plain_events_and_nothing_else() -> None:
    chunk = (b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}],"usage":null}\n\n')
    assert plain_events(chunk * 5, 1 << 20) == (5, 25)
    assert plain_events(chunk * 5, len(chunk) * 5 - 1) is None  # over the event limit
    assert plain_events(chunk * 5 + b"data: {", 1 << 20) is None  # a part of an event
    assert plain_events(chunk + b"data: [DONE]\n\n", 1 << 20) is None
    assert plain_events(chunk.replace(b"hello", b"he\\nllo"), 1 << 20) is None  # an escape
