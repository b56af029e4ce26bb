"""Server-Sent Events as a streaming proxy needs them: find event boundaries in bytes as they
arrive, keep each event's exact bytes for pass-through, and read only what accounting needs.

``SSEScanner.feed`` takes whatever the socket gave (split at any byte) and returns the events
it completed. Lines may end in LF, CRLF or CR (mixed, as the spec allows); an event ends at a
blank line. Each event carries its raw bytes - concatenated, they are exactly the bytes fed,
so forwarding them changes nothing - and its fields: ``data`` (multi-line data joined with
LF; None when the event has no data field, e.g. a ``: keep-alive`` comment), ``event`` and
``id``. Blank lines before an event belong to its raw bytes; so does the LF of a CRLF that
arrived in the next read after its CR had already ended an event (the previous event's raw
then ends in CR: still exact in sum, and the same fields wherever the input is split). An
event (or the unfinished rest of one) larger than ``max_event_bytes`` raises
``SSEEventTooLarge``: a hostile backend cannot grow the buffer.

``StreamUsage`` accumulates what settling a stream needs - the usage block, finish reasons,
the content bytes streamed (for an estimate when the backend reports no usage) and an in-band
error - from substring checks; only a chunk that carries a usage object or an error is parsed
as JSON. ``error_event`` renders an in-band error in OpenAI's shape, which the openai SDK
raises as ``APIError`` (a data object with an ``error`` key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from apirouter.errors import RouterError, openai_body
from apirouter.limits import estimate_tokens

DEFAULT_MAX_EVENT_BYTES = 1 << 20

# A blank line: a line end right after a line end. Atomic groups keep "\r\n" one line end.
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_ENDS = b"\r\n"
# The string values that become completion tokens, in chat and text completion chunks.
_CONTENT_KEYS = (b'"content":', b'"text":', b'"arguments":', b'"refusal":',
                 b'"reasoning_content":')
_USAGE_KEY = b'"usage":'
_FINISH_KEY = b'"finish_reason":'
_ERROR_KEY = b'"error":'
_DONE = b"[DONE]"


class SSEEventTooLarge(ValueError):
    """One event (or the unfinished rest of one) exceeds the scanner's ``max_event_bytes``."""


@dataclass(slots=True)
class SSEEvent:
    raw: bytes  # exactly as received, the blank line that ends it included
    data: bytes | None  # data lines joined with LF; None without any data field
    event: bytes | None = None
    id: bytes | None = None


def _parse_fields(raw: bytes, block: bytes) -> SSEEvent:
    """The fields of one event's lines (``block``: the event without its final line ends)."""
    if block.startswith(b"data:") and b"\n" not in block and b"\r" not in block:
        # The common case: one data line.
        return SSEEvent(raw, block[6:] if block[5:6] == b" " else block[5:])
    data: list[bytes] = []
    event = ident = None
    for line in block.splitlines():
        if not line or line[0] == 0x3A:  # blank line before the event, or a ": comment"
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value
        elif name == b"id" and b"\0" not in value:
            ident = value
    return SSEEvent(raw, b"\n".join(data) if data else None, event, ident)


class SSEScanner:
    """Incremental event splitter for one stream."""

    __slots__ = ("max_event_bytes", "_buf", "_scan")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = b""
        self._scan = 0  # where in _buf a blank line may still start

    @property
    def pending(self) -> bytes:
        """Bytes fed that do not complete an event yet (discarded at the end of a stream)."""
        return self._buf

    def feed(self, data: bytes) -> list[SSEEvent]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            events, start = self._scan_any(buf)
        else:
            events, start = self._scan_lf(buf)
        rest = buf[start:] if start else buf
        if len(rest) > self.max_event_bytes:
            raise SSEEventTooLarge(f"an unfinished SSE event of {len(rest)} bytes exceeds "
                                   f"the limit of {self.max_event_bytes}")
        self._buf = rest
        # A blank line not found yet ends at least one byte past what is buffered, so it
        # starts at most 3 bytes before the end ("\r\n\r\n").
        self._scan = max(0, len(rest) - 3)
        return events

    def _event(self, buf: bytes, start: int, end: int, block_end: int) -> SSEEvent:
        if end - start > self.max_event_bytes:
            raise SSEEventTooLarge(f"an SSE event of {end - start} bytes exceeds the limit "
                                   f"of {self.max_event_bytes}")
        return _parse_fields(buf[start:end], buf[start:block_end])

    def _scan_lf(self, buf: bytes) -> tuple[list[SSEEvent], int]:
        """The common case, LF line ends only: a blank line is "\n\n"."""
        events: list[SSEEvent] = []
        start = 0
        at = buf.find(b"\n\n", self._scan)
        while at >= 0:
            if buf[start] == 0x0A:  # blank lines before an event: they go with its raw bytes
                first = start
                while first < at and buf[first] == 0x0A:
                    first += 1
                if first >= at:
                    at = buf.find(b"\n\n", at + 1)
                    continue
            if at + 2 - start > self.max_event_bytes:
                self._event(buf, start, at + 2, at)  # raises
            if buf.startswith(b"data:", start) and buf.find(b"\n", start, at) < 0:
                # The common case: one data line.
                skip = 6 if buf[start + 5:start + 6] == b" " else 5
                events.append(SSEEvent(buf[start:at + 2], buf[start + skip:at]))
            else:
                events.append(_parse_fields(buf[start:at + 2], buf[start:at]))
            start = at + 2
            at = buf.find(b"\n\n", start)
        return events, start

    def _scan_any(self, buf: bytes) -> tuple[list[SSEEvent], int]:
        """Any mix of LF, CRLF and CR line ends."""
        events: list[SSEEvent] = []
        start = 0
        search = _BLANK_LINE.search
        m = search(buf, self._scan)
        while m is not None:
            end = m.end()
            if buf[start:m.start()].strip(_LINE_ENDS):
                events.append(self._event(buf, start, end, m.start()))
                start = end
            # else: blank lines before an event; they go with its raw bytes.
            m = search(buf, end)
        return events, start


def is_done(event: SSEEvent) -> bool:
    """The ``data: [DONE]`` sentinel that ends an OpenAI stream (tested as the SDK does)."""
    return event.data is not None and event.data.startswith(_DONE)


def _value_at(data: bytes, at: int) -> int:
    """Where the value after a ``"key":`` ending at ``at`` starts (past any whitespace)."""
    while data[at:at + 1] in (b" ", b"\n", b"\t", b"\r"):
        at += 1
    return at


# The keys are found by substring search, no JSON parse: inside a JSON string a quote is
# escaped, so ``"key":`` cannot come from a string's content.

def _has_object(data: bytes, key: bytes) -> bool:
    """Whether some ``"key":`` has an object (not null) for its value."""
    at = data.find(key)
    while at >= 0:
        at = _value_at(data, at + len(key))
        if data[at:at + 1] == b"{":
            return True
        at = data.find(key, at)
    return False


def _string_end(data: bytes, at: int) -> int:
    """The closing quote of the JSON string whose opening quote is at ``at`` (or the end)."""
    end = data.find(b'"', at + 1)
    while end > 0 and data[end - 1] == 0x5C:  # a backslash: count the run before the quote
        run = 1
        while data[end - 1 - run] == 0x5C:
            run += 1
        if run % 2 == 0:
            break
        end = data.find(b'"', end + 1)
    return end if end > 0 else len(data)


def _content_bytes(data: bytes) -> int:
    """UTF-8 bytes of the text the chunk adds (content, text, tool call arguments, refusal,
    reasoning)."""
    n = 0
    for key in _CONTENT_KEYS:
        at = data.find(key)
        while at >= 0:
            at += len(key)
            if data[at:at + 1] != b'"':
                at = _value_at(data, at)
            if data[at:at + 1] == b'"':  # else null, or logprobs' "content": [...]
                end = _string_end(data, at)
                if b"\\" in data[at:end]:
                    try:
                        n += len(orjson.loads(data[at:end + 1]).encode())
                    except (orjson.JSONDecodeError, UnicodeEncodeError):
                        n += end - at - 1
                else:
                    n += end - at - 1
                at = end
            at = data.find(key, at)
    return n


def _finish_reasons(data: bytes) -> list[str]:
    out = []
    at = data.find(_FINISH_KEY)
    while at >= 0:
        at = _value_at(data, at + len(_FINISH_KEY))
        if data[at:at + 1] == b'"':
            end = _string_end(data, at)
            out.append(data[at + 1:end].decode("utf-8", "replace"))
            at = end
        at = data.find(_FINISH_KEY, at)
    return out


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


class StreamUsage:
    """What one stream consumed, fed event by event.

    ``result()`` is (prompt_tokens, completion_tokens, estimated): the backend's usage block
    when it sent one (the last one wins: some backends send running totals), else an estimate
    from the request's prompt bytes and the content bytes streamed, ~4 bytes a token as in
    ``apirouter.limits.estimate_tokens``.
    """

    __slots__ = ("prompt_bytes", "events", "content_bytes", "finish_reasons", "usage", "error")

    def __init__(self, prompt_bytes: int = 0) -> None:
        self.prompt_bytes = prompt_bytes
        self.events = 0  # data events other than [DONE]
        self.content_bytes = 0
        self.finish_reasons: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # an in-band error the backend sent

    def add(self, event: SSEEvent) -> bool:
        """Account one event. True when it is a usage-only chunk (no choices): the one to drop
        when the client did not ask for usage."""
        data = event.data
        if data is None or data.startswith(_DONE):
            return False
        self.events += 1
        self.content_bytes += _content_bytes(data)
        if _FINISH_KEY in data:
            reasons = _finish_reasons(data)
            if reasons:
                self.finish_reasons += reasons
        usage_only = False
        if _has_object(data, _USAGE_KEY) or _has_object(data, _ERROR_KEY):
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                return False
            if isinstance(doc, dict):
                if isinstance(doc.get("usage"), dict):
                    self.usage = doc["usage"]
                    usage_only = not doc.get("choices")
                if isinstance(doc.get("error"), dict):
                    self.error = doc["error"]
        return usage_only

    def result(self) -> tuple[int, int, bool]:
        usage = self.usage or {}
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        estimated = prompt is None or completion is None
        if prompt is None:
            prompt = estimate_tokens(self.prompt_bytes, None, 0) if self.prompt_bytes else 0
        if completion is None:
            completion = estimate_tokens(self.content_bytes, None, 0) \
                if self.content_bytes else 0
        return prompt, completion, estimated


def error_event(err: RouterError, request_id: str) -> bytes:
    """An in-band error event ``data: {"error": {...}}`` in OpenAI's error shape."""
    return b"data: " + openai_body(err, request_id) + b"\n\n"
