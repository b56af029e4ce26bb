"""The lean server's two parsers agree: requests that arrive whole in the common form are
parsed in one call (``FastProtocol._take_whole``, gunicorn_h1c), everything else by httptools.

The differential test feeds the same bytes, cut at the same places, to a protocol with the
fast path and to one without it, and requires the same observable result: the same requests
queued to be answered (endpoint, request id, body, keep-alive, credential, signature fields,
traceparent), the same refusals, the same hand-offs to aiohttp. Hostile and odd forms (bare
LF, folded headers, repeated or malformed Content-Length, Transfer-Encoding, Expect, Upgrade,
control bytes, other versions, unknown paths, bodies cut short or too long) are generated so
that any request the fast path takes differently from httptools fails here. The unit tests
below it pin that the fast path really takes the common forms (else the differential test
would pass with a fast path that never runs).
"""

from __future__ import annotations

import types
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.keys import hash_key
from workers.context import Signed
from workers.endpoints import ENDPOINTS
from workers.fast_server import MAX_HEADERS, FastProtocol, FastServer

LIMIT = 4096  # max_body_bytes of the table the protocols under test read
CHAT = b"/v1/chat/completions"


class _Slow(FastProtocol):
    whole_requests = False  # httptools only


def _server(signing: bool = True, tracing: bool = True) -> Any:
    """What a FastProtocol reads of its server: the hot routes, a table's limits (as
    FastServer.adopt keeps them), request ids, the catalog's refusal (here as a comparable
    tuple) and the turn's writes. The parsers are the real ones; no socket is needed to
    compare what they queue. With ``signing`` and ``tracing`` (some key signs, tracing is on)
    the signature headers and the trace context are read, so compared too."""
    limits = types.SimpleNamespace(max_body_bytes=LIMIT, client_eof_policy="cancel",
                                   client_timeout_s=30.0)
    view = types.SimpleNamespace(table=types.SimpleNamespace(limits=limits))
    pipeline = types.SimpleNamespace(
        tables=types.SimpleNamespace(current=lambda: view),
        ids=types.SimpleNamespace(accept=lambda rid: "rid"),
        error_reply=lambda err, rid, openai: ("refused", err.code, err.status))
    return types.SimpleNamespace(
        routes={(e.method.encode(), e.path.encode()): e for e in ENDPOINTS if e.hot},
        view=view, max_body_bytes=LIMIT, signing=signing, tracing=tracing,
        loop=types.SimpleNamespace(time=lambda: 0.0), pipeline=pipeline, closing=False,
        connections=set(), writes=types.SimpleNamespace(write=lambda t, data: None,
                                                        flush=lambda: None))


class _Transport:
    """What the protocol calls on its transport; a paused one receives nothing more."""

    def __init__(self) -> None:
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def _observed(p: FastProtocol) -> tuple[Any, ...]:
    items: list[Any] = list(p.queue)  # requests, or ("refused", code, status) from _server()
    queued = [item if item[0] == "refused" else (item[0].path, *item[2:]) for item in items]
    return (queued, p.failed, p.pending_handoff, p.in_message, p.closing)


def _feed(cls: type[FastProtocol], pieces: list[bytes]) -> FastProtocol:
    p = cls(_server())
    t = _Transport()
    p.connection_made(t)  # type: ignore[arg-type]
    p.busy = True  # nothing is answered: the queue shows what was parsed
    for piece in pieces:
        if t.paused or t.closed:  # the kernel keeps the rest (or the connection is gone)
            break
        p.data_received(piece)
    return p


def _both(pieces: list[bytes]) -> tuple[FastProtocol, FastProtocol]:
    fast, slow = _feed(FastProtocol, pieces), _feed(_Slow, pieces)
    assert _observed(fast) == _observed(slow)
    return fast, slow


# -- the generator ------------------------------------------------------------------------------

_NAMES = [b"Host", b"Content-Length", b"content-length", b"Authorization", b"authorization",
          b"X-API-Key", b"X-Request-ID", b"X-Signature", b"X-Signature-Nonce",
          b"X-Signature-Timestamp", b"traceparent", b"Connection", b"Expect",
          b"Transfer-Encoding", b"Upgrade", b"Content-Type", b"Bad Name", b"X:Colon", b"",
          b"X-\xffName", b"Keep-Alive", b"Proxy-Connection"]
_VALUES = [b"close", b"keep-alive", b"Keep-Alive", b"upgrade", b"close, keep-alive",
           b"100-continue", b"chunked", b"gzip, chunked", b"identity", b"Bearer k-1",
           b"  spaced  ", b"a\x00b", b"a\x7fb", b"\xff\xfe", b"12", b"0", b"-1", b"1 2", b"+5",
           b"abc", b"", b"websocket", b"h2c", b"a\tb", b"00-0af7651916cd43dd8448eb211c80319c-"
           b"b7ad6b7169203331-01"]

_PLAIN = [b"Authorization: Bearer k-1", b"authorization: Bearer k-2", b"X-API-Key: k-3",
          b"X-Request-ID: r-1", b"x-request-id: r-2", b"X-Signature: ff",
          b"X-Signature-Nonce: abcdefgh", b"X-Signature-Timestamp: 1", b"traceparent: " +
          _VALUES[-1], b"Connection: close", b"Connection: keep-alive", b"Host: h",
          b"Content-Type: application/json", b"User-Agent: t/1", b"Accept: */*"]


_ROUTED = [(b"POST", CHAT), (b"POST", CHAT + b"?x=1"), (b"POST", b"/v1/completions"),
           (b"POST", b"/v1/embeddings"), (b"GET", b"/v1/models"), (b"GET", b"/v1/status/healthz")]


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    """Half of them in the common form (what the fast path takes), half odd in some way."""
    body = draw(st.binary(max_size=40) | st.just(b'{"model":"m","messages":[]}'))
    headers: list[bytes] = []
    if draw(st.booleans()):
        method, target = draw(st.sampled_from(_ROUTED))
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
        eol = b"\r\n"
        if method == b"GET":
            body = b""
        if body or draw(st.booleans()):
            headers.append(b"Content-Length: %d" % len(body))
        headers += draw(st.lists(st.sampled_from(_PLAIN), max_size=6))
        if draw(st.integers(0, 3)) == 0:  # one odd header among plain ones
            headers.append(draw(st.sampled_from(_NAMES)) + b": " + draw(st.sampled_from(_VALUES)))
        headers = draw(st.permutations(headers))
    else:
        method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"post", b"PO ST", b"GET\x00"]))
        target = draw(st.sampled_from([
            CHAT, CHAT + b"?x=1", b"/v1/completions", b"/v1/models", b"/v1/status/healthz",
            b"/v1/status/readyz", b"/v1/models/a/b", b"/metrics", b"/admin/keys", b"*",
            b"http://h" + CHAT, CHAT + b"#f", b"/v1/chat/\x01completions", CHAT + b"\xff", b"",
            b"/v1/chat/completions/", CHAT + b"?q=\xff", CHAT + b"?a#\xe9"]))
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0",
                                        b"HTTP/1.1 ", b"http/1.1", b"HTTP/0.9"]))
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]))
        if draw(st.booleans()):
            headers.append(b"Content-Length: %d" % (len(body) + draw(st.sampled_from(
                [0, 0, -1, 1]))))
        for _ in range(draw(st.integers(0, 5))):
            line = draw(st.sampled_from(_NAMES)) + \
                draw(st.sampled_from([b": ", b":", b" : ", b":\t"])) + \
                draw(st.sampled_from(_VALUES))
            if draw(st.integers(0, 9)) == 0:
                line += b"\r\n folded"
            headers.insert(draw(st.integers(0, len(headers))), line)
    head = b"%s %s %s" % (method, target, version)
    tail = draw(st.sampled_from([b""] * 6 + [b"\r\n", b"\n", b"\r\n\r\n"]))  # stray line ends
    return eol.join([head, *headers]) + eol + eol + body + tail


@st.composite
def _stream(draw: st.DrawFn) -> list[bytes]:
    data = b"".join(draw(st.lists(_request(), min_size=1, max_size=3)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3))
                  if draw(st.booleans()) else [])
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@settings(max_examples=1500, deadline=None)
@given(_stream())
def test_the_fast_path_and_httptools_queue_the_same_requests(pieces: list[bytes]) -> None:
    _both(pieces)


# -- the fast path takes the common forms --------------------------------------------------------

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'


def _post(extra: bytes = b"", body: bytes = BODY, target: bytes = CHAT,
          version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST %s %s\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer sk-test-1\r\n%s\r\n"
            % (target, version, len(body), extra)) + body


SDK_HEADERS = (b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
               b"Accept: application/json\r\nUser-Agent: OpenAI/Python 1.52.0\r\n"
               b"X-Stainless-Lang: python\r\nX-Stainless-OS: Linux\r\n"
               b"X-Request-ID: my-id-1\r\ntraceparent: "
               b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n")


def test_common_requests_are_taken_whole_and_queued_as_httptools_would() -> None:
    cases = [
        _post(),
        _post(SDK_HEADERS),
        _post(b"X-API-Key: k2\r\nX-Signature-Timestamp: 1\r\nX-Signature-Nonce: abcdefgh\r\n"
              b"X-Signature: ff\r\n", target=CHAT + b"?a=b"),
        _post(b"Connection: Keep-Alive\r\n", version=b"HTTP/1.0"),
        _post(b"Connection: close\r\n"),
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n",
        _post() + _post(SDK_HEADERS) + b"GET /v1/status/healthz HTTP/1.1\r\n\r\n",
    ]
    for data in cases:
        fast, slow = _both([data])
        assert fast.queue and fast.chunks == [], data  # taken without httptools
        assert slow.chunks != [] or slow.queue


def test_a_repeated_credential_header_counts_once_first_value_first() -> None:
    data = _post(b"Authorization: Bearer second\r\nX-Request-ID: a\r\nX-Request-ID: b\r\n")
    fast, _ = _both([data])
    (item,) = fast.queue
    assert isinstance(item, tuple) and item[2] == b"a" and item[6] == hash_key("sk-test-1")


def test_signature_and_trace_headers_are_read_only_when_something_reads_them() -> None:
    """No key signs, tracing off (FastServer.adopt, FastServer's ``tracing``): both parsers
    queue the request without its signature fields and trace context; on, with them."""
    data = _post(b"X-Signature-Timestamp: 1\r\nX-Signature-Nonce: abcdefgh\r\n"
                 b"X-Signature: ff\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-"
                 b"b7ad6b7169203331-01\r\n")
    for signing, tracing in ((False, False), (True, False), (False, True), (True, True)):
        for cls in (FastProtocol, _Slow):
            p = cls(_server(signing, tracing))
            p.connection_made(_Transport())  # type: ignore[arg-type]
            p.busy = True
            p.data_received(data)
            (item,) = p.queue
            assert isinstance(item, tuple)
            assert (item[7] is not None) == signing and (item[8] is not None) == tracing
            if signing:
                assert item[7] == Signed("POST", CHAT.decode(), "1", "abcdefgh", "ff")


def test_a_table_signs_while_one_of_its_keys_requires_signatures() -> None:
    def view(auth: bool, *hmac: bool) -> Any:
        keys = {str(i): types.SimpleNamespace(hmac_required=h) for i, h in enumerate(hmac)}
        return types.SimpleNamespace(table=types.SimpleNamespace(
            auth_required=auth, keys=keys,
            limits=types.SimpleNamespace(max_body_bytes=7)))
    server = types.SimpleNamespace()
    for v, signing in ((view(True), False), (view(True, False, False), False),
                       (view(True, False, True), True), (view(False, True), False)):
        FastServer.adopt(server, v)  # type: ignore[arg-type]
        assert server.view is v and server.signing is signing and server.max_body_bytes == 7


def test_what_the_fast_path_leaves_to_httptools() -> None:
    left = [
        _post(b"Expect: 100-continue\r\n"),
        _post(b"Upgrade: h2c\r\nConnection: Upgrade\r\n"),
        _post(b"Connection: keep-alive, Upgrade\r\n"),
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        _post(body=b"x" * (LIMIT + 1)),
        _post()[:-5],  # the body is still coming
        _post()[:40],  # so is the head
        b"POST /admin/keys HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # not a hot endpoint
        b"GET /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",  # GET body
        _post(b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))),
        _post(b"X-Big: " + b"v" * 40_000 + b"\r\n"),
        _post(target=CHAT + b"?q=\xff"),  # llhttp refuses obs-text in a target
        _post(b"Proxy-Connection: close\r\n"),  # llhttp reads it as Connection
    ]
    for data in left:
        p = FastProtocol(_server())
        p.busy = True
        assert p._take_whole(data) == 0, data
        _both([data])
    # A whole request followed by one that is not: the first is taken, the rest parsed.
    data = _post() + _post(b"Expect: 100-continue\r\n")
    p = FastProtocol(_server())
    p.busy = True
    assert p._take_whole(data) == len(_post())
    fast, _ = _both([data])
    assert len(fast.queue) == 2


def test_line_ends_after_a_request_that_closes_are_skipped_as_httptools_does() -> None:
    closing = _post(b"Connection: close\r\n")
    for pieces in ([closing + b"\r\n"], [closing, b"\r\n"], [closing + b"\n\r\n"]):
        fast, _ = _both(pieces)
        assert len(fast.queue) == 1 and not fast.failed
    for pieces in ([closing + b"\r\nX"], [closing, b"GET / HTTP/1.1\r\n\r\n"]):
        fast, _ = _both(pieces)
        assert fast.failed  # anything else after it is refused
    # Proxy-Connection closes like Connection (llhttp), so what follows is refused there too.
    fast, _ = _both([_post(b"Proxy-Connection: close\r\n") +
                     b"GET /v1/models HTTP/1.1\r\n\r\n"])
    assert fast.failed
