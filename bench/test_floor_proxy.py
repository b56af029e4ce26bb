"""bench.floor_proxy: it forwards what the benchmarks send to the backend and back, over
keep-alive connections both sides, and answers what it does not measure with a clear 400."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest

from bench.overhead import BODY
from bench.procs import HOST, FloorProxy, MockBackend


@pytest.fixture(scope="module")
def floor() -> Iterator[tuple[MockBackend, FloorProxy]]:
    mock = MockBackend("floor", "--models", "bench-model")
    try:
        proxy = FloorProxy(f"{HOST}:{mock.port}")
        try:
            yield mock, proxy
        finally:
            proxy.stop()
            proxy.cleanup()
    finally:
        mock.stop()
        mock.cleanup()


def test_requests_go_to_the_backend_and_its_answers_come_back(
        floor: tuple[MockBackend, FloorProxy]) -> None:
    mock, proxy = floor
    before = mock.stats()
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=5)
    try:
        for _ in range(3):  # one client connection, kept alive
            conn.request("POST", "/v1/chat/completions", BODY,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
            assert doc["object"] == "chat.completion" and doc["model"] == "bench-model"
        # The backend's own refusal passes through with its status.
        conn.request("GET", "/v1/models/nope")
        resp = conn.getresponse()
        assert resp.status == 404 and "error" in json.loads(resp.read())
    finally:
        conn.close()
    after = mock.stats()
    assert after["requests"] - before["requests"] == 3  # (the mock counts completions)
    # Four exchanges, one at a time: one upstream connection carried them all (the other
    # new connection is the second stats request's own).
    assert after["connections"] - before["connections"] == 2


def test_what_it_does_not_measure_is_refused_with_a_400(
        floor: tuple[MockBackend, FloorProxy]) -> None:
    _, proxy = floor
    for request in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                    b"GARBAGE\r\n\r\n",  # malformed: answered at once, not waited on
                    b"POST /v1/chat/completions HTTP/1.1\r\nBad Name: x\r\n\r\n"):
        with socket.create_connection((HOST, proxy.port), timeout=5) as s:
            s.sendall(request)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), request
