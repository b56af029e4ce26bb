"""HTTP/1.1 edge cases of the lean server, over raw sockets, against a real router."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.harness import HOST, MockBackend, Router, router_config

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    mock = MockBackend("a")
    cfg = router_config({"a": mock.url}, {"m": {"a": 1}}, max_body_bytes=4096,
                        keepalive_s=2, client_timeout_s=1.5)
    r = Router(cfg, workers=1)
    yield r
    for p in (r, mock):
        p.stop()
        p.cleanup()


def connect(r: Router) -> socket.socket:
    s = socket.create_connection((HOST, r.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def post(path: str = "/v1/chat/completions", body: bytes = CHAT, extra: str = "",
         version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Reader:
    """Reads complete responses (Content-Length framed) off a socket."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.s.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        self.s.settimeout(5)
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True


def test_keep_alive_serves_many_requests_on_one_connection(router: Router) -> None:
    with connect(router) as s:
        r = Reader(s)
        for i in range(5):
            s.sendall(post(extra=f"X-Request-ID: ka-{i}\r\n"))
            status, headers, body = r.response()
            assert status == 200 and headers["x-request-id"] == f"ka-{i}"
            assert headers["x-router-backend"] == "a"
            assert json.loads(body)["object"] == "chat.completion"


def test_pipelined_requests_are_answered_in_order(router: Router) -> None:
    with connect(router) as s:
        s.sendall(b"".join(post(extra=f"X-Request-ID: p-{i}\r\n") for i in range(6)))
        r = Reader(s)
        assert [r.response()[1]["x-request-id"] for _ in range(6)] == [f"p-{i}" for i in range(6)]


def test_chunked_body_and_expect_continue(router: Router) -> None:
    with connect(router) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        half = len(CHAT) // 2
        for part in (CHAT[:half], CHAT[half:]):
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        s.sendall(b"0\r\n\r\n")
        assert Reader(s).response()[0] == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_bodies_get_413_and_close(router: Router, chunked: bool) -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]})
    with connect(router) as s:
        if chunked:
            s.sendall(b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(big), big.encode()))
        else:
            s.sendall(post("/v1/inference", big.encode()))
        r = Reader(s)
        status, headers, body = r.response()
        assert status == 413 and json.loads(body)["error"]["error_code"] == "PAYLOAD_TOO_LARGE"
        assert headers["connection"] == "close" and r.closed()


def test_malformed_http_and_huge_headers_are_400(router: Router) -> None:
    for raw in (b"THIS IS NOT HTTP\r\n\r\n",
                post(extra="X-Big: " + "y" * 40_000 + "\r\n")):
        with connect(router) as s:
            s.sendall(raw)
            r = Reader(s)
            status, _, body = r.response()
            assert status == 400 and json.loads(body)["error"]["error_code"] == "INVALID_REQUEST"
            assert r.closed()


def test_connection_close_and_http_1_0_end_the_connection(router: Router) -> None:
    for raw in (post(extra="Connection: close\r\n"), post(version="1.0")):
        with connect(router) as s:
            s.sendall(raw)
            r = Reader(s)
            assert r.response()[0] == 200
            assert r.closed()


def test_other_paths_are_handed_to_aiohttp_mid_connection(router: Router) -> None:
    with connect(router) as s:
        r = Reader(s)
        s.sendall(post())
        assert r.response()[0] == 200  # served by the lean server
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = r.response()  # handed off: aiohttp answers
        assert status == 200 and b"router_requests_total" in body
        assert headers["server"].startswith("Python")
        s.sendall(post(extra="X-Request-ID: after\r\n"))  # and keeps the connection
        status, headers, _ = r.response()
        assert status == 200 and headers["x-request-id"] == "after"


def test_a_connection_task_ends_with_its_connection(router: Router) -> None:
    """One task answers a connection's requests (workers.fast_server): handed off to aiohttp,
    or closed while it waits for the next request, the connection ends it. A task left
    waiting would be collected pending (asyncio logs that) and hold its connection's state."""
    for _ in range(5):
        with connect(router) as s:
            r = Reader(s)
            s.sendall(post())
            assert r.response()[0] == 200
            s.sendall(b"GET /v1/status/nope HTTP/1.1\r\nHost: x\r\n\r\n")  # handed off
            assert r.response()[0] == 404
        with connect(router) as s:  # the client closes while its task waits
            r = Reader(s)
            s.sendall(post())
            assert r.response()[0] == 200
    # The worker's sweep collects the young generations once a second: let it run twice.
    time.sleep(2.5)
    with open(router.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "Task was destroyed but it is pending" not in log


def test_unknown_path_and_wrong_method_through_the_hand_off(router: Router) -> None:
    with connect(router) as s:
        r = Reader(s)
        s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = r.response()
        assert status == 404 and json.loads(body)["error"]["error_code"] == "NOT_FOUND"
        s.sendall(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = r.response()
        assert status == 405 and headers["allow"] == "POST"
        assert json.loads(body)["error"]["code"] == "method_not_allowed"


def test_a_hand_off_pipelined_behind_a_hot_request_is_refused_cleanly(router: Router) -> None:
    with connect(router) as s:
        s.sendall(post() + b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 200
        status, _, body = r.response()
        assert status == 400 and b"pipelined" in body
        assert r.closed()


def test_idle_connections_close_after_keepalive(router: Router) -> None:
    with connect(router) as s:
        r = Reader(s)
        s.sendall(post())
        assert r.response()[0] == 200
        started = time.monotonic()
        assert r.closed()
        assert time.monotonic() - started < 5


def test_slow_clients_get_408(router: Router) -> None:
    with connect(router) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        r = Reader(s)
        status, _, body = r.response()
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert r.closed()
