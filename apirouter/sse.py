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

``StreamUsage`` accumulates what settling a stream needs - the events, the usage block and
the content bytes streamed (for an estimate when the backend reports no usage) - from pattern
searches; only a chunk that carries a usage object is parsed as JSON. (Nothing else is read
from the events: finish reasons and a backend's in-band error pass through to the client, and
the relay does not parse them.)

``SSERelay`` is what a proxy does with each read: it passes on the complete events as one
bytes object and accounts them. The common run - every event one ``data:`` line, LF line ends
- is taken as one block (``SSEScanner.feed_block``, ``StreamUsage.add_block``): counted, and
searched for content, by a few passes over the bytes in C, with no object per event; from an
event that may be [DONE] or carry a usage object on, and for any other read, it goes event by
event. The result is the same either way (tests/apirouter/
test_sse_relay.py checks it against the event-by-event path at every split).

``error_event`` renders an in-band error in OpenAI's shape, which the openai SDK
raises as ``APIError`` (a data object with an ``error`` key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from apirouter._ssecore import plain_block, plain_events, raw_content_bytes
from apirouter.errors import RouterError, openai_body
from apirouter.limits import estimate_tokens, reported_count

DEFAULT_MAX_EVENT_BYTES = 1 << 20

# A blank line: a line end right after a line end. Atomic groups keep "\r\n" one line end.
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_ENDS = b"\r\n"
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

    def feed_block(self, data: bytes) -> tuple[bytes, int] | None:
        """``feed`` for the common case, without an object per event: when every complete
        event in what is buffered is one ``data:`` line and its blank line, all LF, return
        them as one block of raw bytes and their count (b"" and 0 when none is complete yet).
        None, with nothing consumed, in any other case: ``feed`` then takes the same data."""
        buf = self._buf + data if self._buf else data
        if not buf.startswith(b"data:") or b"\r" in buf:
            return None
        end = buf.rfind(b"\n\n") + 2
        n = 0
        if end >= 2:
            block = buf[:end]
            n = block.count(b"\n\ndata:") + 1
            # The block begins with a data line and ends with a blank line; n - 1 line end
            # pairs are followed by one. With those pairs taken out, an LF left before the
            # last pair means a line that is not a data line followed by a blank line.
            # (Counting the LFs said the same, but bytes.count of one byte is a plain loop in
            # CPython 3.11, while replace and find search in C: 10.5 -> 4.1 µs for a read of
            # 18 mock events, 4.3 KB.)
            rest = block.replace(b"\n\ndata:", b"") if n > 1 else block
            if rest.find(b"\n", 0, len(rest) - 2) >= 0:
                return None
        else:
            end = 0
        taken = self._take_block(buf, end)
        return None if taken is None else (taken, n)

    def _take_block(self, buf: bytes, end: int, complete: bool = False) -> bytes | None:
        """Consume ``buf[:end]``, whole events (0: none complete yet), keeping the rest
        (``complete``: it holds whole events too, to be scanned from its start); None, with
        nothing consumed, when the block or the rest is over the event limit (``feed`` then
        raises or splits them)."""
        rest = len(buf) - end
        if end > self.max_event_bytes or rest > self.max_event_bytes:
            return None
        self._scan = 0 if complete else max(0, rest - 3)
        if not end:
            self._buf = buf
            return b""
        self._buf = buf[end:] if rest else b""
        return buf[:end] if rest else buf

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


def _special(block: bytes) -> int:
    """Where in ``block`` the first event that must be read whole (with a usage object or
    [DONE]) may be (-1: nowhere). Separate searches: each has a literal to look for."""
    at = block.find(_DONE)
    # Every "usage" key followed by null (OpenAI's chunks once usage is asked for, as the
    # router always asks): no usage object. Two counts in C instead of the pattern search,
    # 7.8 -> 2.5 µs for a read of 18 mock events.
    if block.count(b'"usage":') == block.count(b'"usage":null'):
        return at
    m = _USAGE_OBJECT.search(block, 0, at) if at >= 0 else _USAGE_OBJECT.search(block)
    return m.start() if m is not None else at


def _plain_block_py(buf: bytes) -> tuple[int, int, int, bool] | None:
    """What ``plain_block`` (apirouter/_ssecore.c) answers, in Python: None unless ``buf``
    begins with a data line and holds no CR; else (0, 0, 0, False) when no event is complete;
    else, for the whole events it begins with (up to its last blank line), None unless each
    is one data line and its blank line, and otherwise, for those before the first that holds
    [DONE] or a "usage": key not followed by null (all of them when none does), (where they
    end, how many, their content bytes or -1, whether one does). The reference its property
    test holds the C to."""
    if not buf.startswith(b"data:") or b"\r" in buf:
        return None
    end = buf.rfind(b"\n\n") + 2
    if end < 2:
        return 0, 0, 0, False
    block = buf[:end]
    n = block.count(b"\n\ndata:") + 1
    rest = block.replace(b"\n\ndata:", b"") if n > 1 else block
    if rest.find(b"\n", 0, len(rest) - 2) >= 0:
        return None
    special = block.find(_DONE)
    at = block.find(b'"usage":')
    while at >= 0 and (special < 0 or at < special):
        if block[at + 8:at + 12] != b"null":
            special = at
            break
        at = block.find(b'"usage":', at + 8)
    if special < 0:
        return end, n, raw_content_bytes(block), False
    end = block.rfind(b"\n", 0, special) + 1  # the start of the event it is in
    block = block[:end]
    return end, block.count(b"\n\n"), raw_content_bytes(block), True


def _plain_events_py(buf: bytes, max_bytes: int) -> tuple[int, int] | None:
    """What ``plain_events`` (apirouter/_ssecore.c) answers, in Python: (events, content bytes)
    when ``_plain_block_py`` finds ``buf`` to be whole events and nothing else, none of them
    [DONE] or with a usage object, the content counted (no escape), and ``buf`` is at most
    ``max_bytes``; else None. The reference its property test holds the C to."""
    got = _plain_block_py(buf)
    if got is None or len(buf) > max_bytes:
        return None
    end, n, content, special = got
    if end != len(buf) or special or content < 0:
        return None
    return n, content


def block_events(block: bytes) -> list[SSEEvent]:
    """The events of a block from ``SSEScanner.feed_block``: one data line each."""
    return [SSEEvent(line + b"\n\n", line[6:] if line[5:6] == b" " else line[5:])
            for line in block.split(b"\n\n")[:-1]]


class SSERelay:
    """What a streaming proxy passes on for each read from the backend: the complete events
    it finished, exactly as received, except a usage-only chunk the client did not ask for
    (``keep_usage`` False) and anything after [DONE]; every event is accounted in ``usage``.

    The common run of events is handled as one block (``SSEScanner.feed_block``,
    ``StreamUsage.add_block``); event by event from the first one that may be [DONE] or carry
    a usage object, and for any read that is not the common case. ``done`` is set once
    [DONE] has been passed on."""

    __slots__ = ("scanner", "usage", "keep_usage", "done")

    def __init__(self, scanner: SSEScanner, usage: StreamUsage, keep_usage: bool) -> None:
        self.scanner = scanner
        self.usage = usage
        self.keep_usage = keep_usage
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to pass on for ``data`` (raises SSEEventTooLarge as ``SSEScanner``).

        The usual read - whole events, each one ``data:`` line and its blank line, all LF,
        none [DONE] or with a usage object, nothing buffered before it - goes on as it came,
        counted in one C call (``plain_events``). Most others take one C call too
        (``plain_block``): when every complete event buffered is such a line, those before
        the first that is [DONE] or has a usage object go on as one block, counted (content
        -1: a string holds an escape; ``_content_bytes`` counts it), and only the rest event
        by event."""
        scanner = self.scanner
        if not scanner._buf:  # (then _scan is 0 too)
            whole = plain_events(data, scanner.max_event_bytes)
            if whole is not None:
                usage = self.usage
                usage.events += whole[0]
                usage.content_bytes += whole[1]
                return data
            buf = data
        else:
            buf = scanner._buf + data
        got = plain_block(buf)
        if got is not None:
            end, n, content, one_by_one = got
            if end == len(buf) and content >= 0 and not one_by_one \
                    and end <= scanner.max_event_bytes:
                scanner._buf = b""
                scanner._scan = 0
                usage = self.usage
                usage.events += n
                usage.content_bytes += content
                return buf
            block = scanner._take_block(buf, end, one_by_one)
            if block is not None:
                if n:
                    self.usage.add_block(block, n, content)
                if one_by_one:
                    return block + self._events(scanner.feed(b""))
                return block
        taken = scanner.feed_block(data)
        if taken is None:
            return self._events(scanner.feed(data))
        block, n = taken
        special = _special(block)
        if special < 0:
            if n:
                self.usage.add_block(block, n)
            return block
        start = block.rfind(b"\n\n", 0, special) + 2  # of the event it is in
        if start < 2:
            return self._events(block_events(block))
        head = block[:start]
        self.usage.add_block(head, head.count(b"\n\n"))
        return head + self._events(block_events(block[start:]))

    def _events(self, events: list[SSEEvent]) -> bytes:
        """The bytes to pass on for these events (each accounted)."""
        out = []
        for e in events:
            if is_done(e):
                self.done = True
                out.append(e.raw)
                break
            if self.usage.add(e) and not self.keep_usage:
                continue  # the usage chunk the client did not ask for
            out.append(e.raw)
        return b"".join(out)


def is_done(event: SSEEvent) -> bool:
    """The ``data: [DONE]`` sentinel that ends an OpenAI stream (tested as the SDK does)."""
    return event.data is not None and event.data.startswith(_DONE)


# The keys are found by pattern, no JSON parse: inside a JSON string a quote is escaped, so
# ``"key":`` cannot come from a string's content. A string value is matched up to its closing
# quote, or the end of its line when it has none (a value cannot span lines; the LF of
# multi-line data is JSON whitespace), a backslash escaping the next byte.
_WS = rb"[ \t\n\r]*"
_STRING = rb'"([^"\\\n]*(?:\\.?[^"\\\n]*)*)'
_CONTENT = re.compile(rb'"(?:content|text|arguments|refusal|reasoning_content)":' + _WS
                      + _STRING)
_USAGE_OBJECT = re.compile(rb'"usage":' + _WS + rb"\{")


def _string_bytes(raw: bytes) -> int:
    """UTF-8 bytes of a JSON string's value from its raw bytes between the quotes (the raw
    length where it does not decode)."""
    if b"\\" not in raw:
        return len(raw)
    try:
        return len(orjson.loads(b'"' + raw + b'"').encode())
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return len(raw)


def _content_bytes(data: bytes) -> int:
    """UTF-8 bytes of the text that ``data`` (one event's, or several whole events') adds:
    content, text, tool call arguments, refusal, reasoning."""
    raw = raw_content_bytes(data)  # the same search in C, while no string holds an escape
    if raw >= 0:
        return raw
    found = _CONTENT.findall(data)
    if not found:
        return 0
    joined = b"".join(found)
    if b"\\" not in joined:
        return len(joined)
    try:  # every string decoded in one call; one that does not decode is counted alone
        return len("".join(orjson.loads(b'["' + b'","'.join(found) + b'"]')).encode())
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return sum(map(_string_bytes, found))




_count = reported_count


class StreamUsage:
    """What one stream consumed, fed event by event.

    ``result()`` is (prompt_tokens, completion_tokens, estimated): the backend's usage block
    when it sent one (the last one wins: some backends send running totals), else an estimate
    from the request's prompt bytes and the content bytes streamed, ~4 bytes a token as in
    ``apirouter.limits.estimate_tokens``.
    """

    __slots__ = ("prompt_bytes", "events", "content_bytes", "usage")

    def __init__(self, prompt_bytes: int = 0) -> None:
        self.prompt_bytes = prompt_bytes
        self.events = 0  # data events other than [DONE]
        self.content_bytes = 0
        self.usage: dict[str, Any] | None = None

    def add(self, event: SSEEvent) -> bool:
        """Account one event. True when it is a usage-only chunk (no choices): the one to drop
        when the client did not ask for usage."""
        data = event.data
        if data is None or data.startswith(_DONE):
            return False
        self.events += 1
        self.content_bytes += _content_bytes(data)
        usage_only = False
        if _USAGE_OBJECT.search(data) is not None:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                return False
            if isinstance(doc, dict) and isinstance(doc.get("usage"), dict):
                self.usage = doc["usage"]
                usage_only = not doc.get("choices")
        return usage_only

    def add_block(self, block: bytes, events: int, content: int = -1) -> None:
        """Account ``events`` whole events at once, ``block`` their raw bytes: one data line
        each, none of them [DONE] or with a usage object (``SSERelay`` checks); ``content``
        their content bytes when counted already (-1: counted here)."""
        self.events += events
        self.content_bytes += content if content >= 0 else _content_bytes(block)

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
