"""The lean server's C part (apirouter/_httpcore.c) equals its Python references: a request
parsed by ``take_request`` is what ``workers.fast_server._take_request`` (picohttpparser) makes
of it, or it is left to that; a response head from ``response_head`` is ``_head_py``'s bytes,
or the same exception. The differential test (test_fast_server_whole) then holds the server
with both equal to httptools."""

from __future__ import annotations

import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter._httpcore import response_head, take_request
from tests.workers.test_fast_server_whole import SDK_HEADERS, _post, _request
from workers.endpoints import ENDPOINTS
from workers.fast_server import _CHUNKED, _LENGTH, _STATUS, _UNFRAMED, _head_py, _take_request

ROUTES = {(e.method.encode(), e.path.encode()): e for e in ENDPOINTS if e.hot}
VIEW = types.SimpleNamespace()  # (only handed through)
LIMIT = 4096


def _agree(data: bytes, start: int, signing: bool, tracing: bool) -> Any:
    args = (data, start, VIEW, ROUTES, LIMIT, signing, tracing)
    got = take_request(*args)
    ref = _take_request(*args)
    if got is not None:  # (None: left to the reference)
        assert (got or None) == ref, (data[start:], got, ref)
    return got


@settings(max_examples=3000, deadline=None)
@given(st.lists(_request(), min_size=1, max_size=3), st.integers(0, 2), st.booleans(),
       st.booleans())
def test_take_request_is_its_reference_or_leaves_the_request_to_it(
        requests: list[bytes], at: int, signing: bool, tracing: bool) -> None:
    data = b"".join(requests)
    start = len(b"".join(requests[:at]))
    _agree(data, min(start, len(data)), signing, tracing)
    for cut in (len(data) - 1, len(requests[0]) // 2):  # cut short
        _agree(data[:cut], 0, signing, tracing)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_take_request_on_any_bytes(data: bytes, signing: bool) -> None:
    _agree(b"POST /v1/chat/completions HTTP/1.1\r\n" + data, 0, signing, True)
    _agree(data, 0, signing, True)


def test_take_request_reads_the_common_forms_itself() -> None:
    """Taken in C, not left to the reference (else the test above passes with a C part that
    never answers)."""
    common = [_post(), _post(SDK_HEADERS), _post(b"Connection: Keep-Alive\r\n",
                                                 version=b"HTTP/1.0"),
              _post(b"Connection: close\r\n"), _post(target=b"/v1/chat/completions?a=b"),
              _post(b"X-API-Key: k2\r\nX-Request-ID: \r\n"),
              b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n"]
    for data in common:
        for signing in (False, True):
            got = _agree(data + b"GET", 0, signing, True)
            assert got and got[0] == len(data), data
    # Signed while some key signs: the reference builds its Signed.
    signed = _post(b"X-Signature: ff\r\n")
    assert take_request(signed, 0, VIEW, ROUTES, LIMIT, True, True) is None
    assert _agree(signed, 0, False, True)
    # Refused without the reference: what it would not take either.
    for data in (_post(b"Expect: 100-continue\r\n"), _post(b"Transfer-Encoding: chunked\r\n"),
                 _post(b"Connection: upgrade\r\n"), _post(target=b"/admin/keys"),
                 _post(body=b"x" * (LIMIT + 1)), _post()[:-1]):
        assert _agree(data, 0, False, True) is False, data


def test_take_request_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        take_request(b"GET", 4, VIEW, ROUTES, LIMIT, False, False)
    with pytest.raises(TypeError):
        take_request(b"GET", 0, VIEW)  # type: ignore[call-arg]
    assert take_request(bytearray(b"GET"), 0, VIEW, ROUTES, LIMIT, False,  # type: ignore[arg-type]
                        False) is None


_TEXT = st.text(alphabet=st.sampled_from("aZ09-: /\t;=\xe9\xff\u0100\u20ac"), max_size=12)
_HEADER = st.tuples(_TEXT, _TEXT) | st.sampled_from(
    [("X-A", "1"), ("Retry-After", "3"), ("x-request-id", "r-1")]) | st.one_of(
    st.tuples(_TEXT), st.tuples(_TEXT, _TEXT, _TEXT), st.lists(_TEXT, max_size=3),
    st.tuples(_TEXT, st.integers()), st.just(()))


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([200, 201, 400, 404, 429, 499, 500, 503, 599, 999, 42, True]),
       st.sampled_from([b"Tue, 01 Dec 2026 07:00:00 GMT", b"", bytearray(b"d")]),
       _TEXT | st.sampled_from(["application/json", "text/event-stream"]) | st.integers(),
       st.sampled_from([_LENGTH, _CHUNKED, _UNFRAMED, 7, -1]),
       st.lists(_HEADER, max_size=20) | st.just([("a", "b")] * 40),
       st.booleans(), st.binary(max_size=40))
def test_response_head_is_its_reference(status: int, date: bytes, content_type: str,
                                        framing: int, headers: list[tuple[str, str]],
                                        keep_alive: bool, body: bytes) -> None:
    try:
        expected: bytes | type[BaseException] = _head_py(
            status, date, content_type, framing, headers, keep_alive, body)
    except Exception as e:
        expected = type(e)
    try:
        got: bytes | type[BaseException] = response_head(
            _STATUS, status, date, content_type, framing, headers, keep_alive, body)
    except Exception as e:
        got = type(e)
    assert got == expected


def test_response_head_of_a_reply() -> None:
    head = response_head(_STATUS, 429, b"D", "application/json", _LENGTH,
                         [("Retry-After", "1"), ("X-RateLimit-Limit", "5")], True, b"{}")
    assert head == (b"HTTP/1.1 429 Too Many Requests\r\nServer: apirouter\r\nDate: D\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n"
                    b"Retry-After: 1\r\nX-RateLimit-Limit: 5\r\n\r\n{}")
    assert response_head(_STATUS, 200, b"D", "text/event-stream", _CHUNKED, [], False, b"") \
        == (b"HTTP/1.1 200 OK\r\nServer: apirouter\r\nDate: D\r\nContent-Type: "
            b"text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")


def test_take_request_takes_a_body_limit_past_ssize_t_as_its_reference_does() -> None:
    """max_body_bytes is any positive int the config accepts (10**19 passes parse_config and
    the table's encoding): the reference compares Python ints, so the C part must not raise
    (an OverflowError out of data_received closes every connection with no answer)."""
    data = _post()
    for limit in (2**63 - 1, 2**63, 10**19, 10**30):
        got = take_request(data, 0, VIEW, ROUTES, limit, False, True)
        assert got == _take_request(data, 0, VIEW, ROUTES, limit, False, True), limit


def test_response_head_holds_its_status_line_while_python_code_runs() -> None:
    """The status line is read from the dict before the content type is formatted (which runs
    Python code, as a join of the headers may): held, not borrowed, as _head_py holds it."""
    status_lines = {200: bytes(bytearray(b"HTTP/1.1 200 OK\r\n"))}  # (freed when replaced)

    class _Type:
        def __format__(self, spec: str) -> str:
            status_lines[200] = b"x"  # drops the only reference to the line read
            _junk = [bytes([65 + i % 26]) * 17 for i in range(64)]  # (reuses its memory)
            return "application/json"

    head = response_head(status_lines, 200, b"D", _Type(), _LENGTH, [], True, b"")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nServer: apirouter\r\n"), head
