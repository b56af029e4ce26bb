"""The lean server's bounded failure modes, over raw sockets, against a real router.

- A reply that cannot be written (its head does not encode) still gets one answer: a 500
  from the error catalog, and the connection goes on serving. No input is known to do this
  today (backend ids are ASCII since the config refuses others), so the router's worker is
  started with a ``sitecustomize`` that makes the head of any reply from backend ``boom``
  carry a non-latin-1 value: the real encode fails, as it did for ``gpu-東京``.
- With ``client_eof_policy: answer``, a client that sends its requests and then half-closes
  (``shutdown(SHUT_WR)``, what ``printf ... | nc -q`` does) gets every request it sent
  completely answered, then a close; on a handed-off connection (aiohttp) too. An EOF inside
  a request just closes. (The default, cancel, takes the EOF as a hang-up: tests/e2e/
  test_client_disconnect.py and test_streaming.py hold that.)
- A client that never reads its stream: the stream cannot be held forever. After
  ``client_timeout_s`` with its socket full the client is disconnected, the backend
  connection closed (not pooled), and the request recorded as a client disconnect.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from tests.e2e.test_client_disconnect import _usage_records
from tests.harness import HOST, MockBackend, RawHttp, Router, raw_request, router_config, wait_for

USER = [{"role": "user", "content": "hi"}]
PROMPT = "a-prompt-that-must-not-be-logged"

# Loaded by every Python process the router starts (PYTHONPATH): the gunicorn master imports
# the lean server patched, and its workers fork from it.
_SITECUSTOMIZE = '''
import workers.fast_server as fs

_real_head = fs.response_head


def response_head(status_lines, status, date, content_type, framing, headers, keep_alive,
                  body):
    headers = [(k, v + "-\\u6771\\u4eac" if (k, v) == ("X-Router-Backend", "boom") else v)
               for k, v in headers]
    return _real_head(status_lines, status, date, content_type, framing, headers, keep_alive,
                      body)


fs.response_head = response_head
'''


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    mock = MockBackend("a")
    patch_dir = tempfile.mkdtemp(prefix="apirouter-test-sitecustomize-")
    with open(os.path.join(patch_dir, "sitecustomize.py"), "w") as f:
        f.write(_SITECUSTOMIZE)
    cfg = router_config({"a": mock.url, "boom": mock.url}, {"m": {"a": 1}, "boom": {"boom": 1}},
                        client_timeout_s=1.5, client_eof_policy="answer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", patch_dir)
        r = Router(cfg, workers=1)
    r.mock = mock  # type: ignore[attr-defined]
    yield r
    for p in (r, mock):
        p.stop()
        p.cleanup()


def chat(model: str = "m", rid: str | None = None, content: str = "hi", **extra: object
         ) -> bytes:
    headers = {"Content-Type": "application/json"}
    if rid is not None:
        headers["X-Request-ID"] = rid
    doc = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return raw_request("POST", "/v1/chat/completions", json.dumps(doc).encode(), headers)


# -- 1. a reply that cannot be written ---------------------------------------------------------


def test_a_reply_whose_head_cannot_be_encoded_gets_a_500_and_the_connection_goes_on(
        router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(chat("boom", "r-boom", PROMPT) + chat("m", "r-after"))
        got = c.read(2)
        assert [r.status for r in got] == [500, 200], got
        assert got[0].json()["error"]["code"] == "internal_error"
        assert got[0].headers["x-request-id"] == "r-boom"
        assert got[1].headers["x-request-id"] == "r-after"
        c.send(chat("boom", "r-boom-2"))  # the connection still serves
        assert [r.status for r in c.read(3)] == [500, 200, 500]
    with open(router.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "UnicodeEncodeError" in log  # logged: what failed, and where
    assert PROMPT not in log and "\u6771" not in log and "\\u6771" not in log


def test_a_stream_whose_head_cannot_be_encoded_gets_a_500(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(chat("boom", "s-boom", stream=True) + chat("m", "s-after", stream=True))
        got = c.read(2)
        assert [r.status for r in got] == [500, 200], got
        assert got[1].body.rstrip().endswith(b"data: [DONE]")


# -- 2. half-closed clients -------------------------------------------------------------------


def _half_close(c: RawHttp) -> None:
    c.sock.shutdown(socket.SHUT_WR)


def test_a_half_closed_client_gets_its_answer_then_a_close(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(chat(rid="h-1", mock={"latency_ms": 200}))  # answered after the EOF came
        _half_close(c)
        got = c.read(1)
        assert [r.status for r in got] == [200], got
        assert got[0].headers["x-request-id"] == "h-1"
        c.pump(5)
        assert c.closed and not c.reset


def test_pipelined_requests_then_a_half_close_are_all_answered(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(b"".join(chat(rid=f"hp-{i}") for i in range(4)))
        _half_close(c)
        got = c.read(4)
        assert [r.headers.get("x-request-id") for r in got] == [f"hp-{i}" for i in range(4)]
        assert {r.status for r in got} == {200}
        assert got[-1].headers["connection"] == "close"
        c.pump(5)
        assert c.closed and not c.reset and len(c.responses) == 4


def test_a_half_closed_client_gets_its_whole_stream(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(chat(rid="hs", stream=True, mock={"reply_tokens": 50, "event_interval_ms": 2}))
        _half_close(c)
        got = c.read(1)
        assert [r.status for r in got] == [200], got
        assert got[0].body.rstrip().endswith(b"data: [DONE]")
        c.pump(5)
        assert c.closed and not c.reset


def test_a_half_closed_client_of_a_handed_off_path_gets_its_answer(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(raw_request("GET", "/v1/nope", headers={"X-Request-ID": "ho"}))
        _half_close(c)
        got = c.read(1)
        assert [r.status for r in got] == [404], got
        c.pump(5)
        assert c.closed and not c.reset


def test_an_eof_inside_a_request_just_closes(router: Router) -> None:
    body = json.dumps({"model": "m", "messages": USER}).encode()
    for partial in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    b"%d\r\n\r\n%s" % (len(body), body[:10])):
        with RawHttp(router.port) as c:
            c.send(partial)
            _half_close(c)
            c.pump(5)
            assert c.closed and c.responses == []


# -- 3. a client that never reads its stream ---------------------------------------------------


def test_a_client_that_never_reads_its_stream_is_disconnected_and_accounted(
        router: Router) -> None:
    mock: MockBackend = router.mock  # type: ignore[attr-defined]
    before = mock.stats()["streams_aborted"]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few events
    s.settimeout(5)
    s.connect((HOST, router.port))
    try:
        # ~25 MB of events, as fast as the backend can write them: far more than the sockets
        # and the router's buffers hold.
        s.sendall(chat(rid="never-reads", stream=True, mock={"reply_tokens": 200_000}))
        wait_for(lambda: mock.stats()["streams_aborted"] > before, 15,
                 "the router to give up the stream of a client that reads nothing")
        # The client's connection was closed: what it can still read ends.
        read = 0
        try:
            while chunk := s.recv(1 << 20):
                read += len(chunk)
                assert read < 64 << 20
        except ConnectionResetError:
            pass
    finally:
        s.close()

    def record() -> dict[str, object] | None:
        return next((d for d in _usage_records(router.run_dir)
                     if d["request_id"] == "never-reads"), None)

    wait_for(lambda: record() is not None, 10, "the stream's usage record")
    rec = record()
    assert rec is not None and rec["status"] == 499 and rec["stream"] is True
    assert rec["error_code"] == "CLIENT_DISCONNECTED"
    assert rec["interruption"] == "client_disconnected"
    assert 0 < rec["events"] < 200_000  # type: ignore[operator]
    with open(router.log_path, encoding="utf-8", errors="replace") as f:
        assert "a client read nothing for 1.5 s: disconnecting it" in f.read()
    with RawHttp(router.port) as c:  # the worker serves on
        c.send(chat())
        assert [r.status for r in c.read(1)] == [200]
