"""OpenTelemetry end to end: a router exporting to a real OTLP/HTTP receiver started by the
test, a client's W3C traceparent continued, a span per request with GenAI attributes,
children for admission and each backend attempt, and the trace context sent on to the
backends (recorded by real HTTP backends)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from apirouter.keys import hash_key
from tests.e2e.conftest import post_json, request
from tests.harness import (
    HOST,
    MockBackend,
    OtlpReceiver,
    Router,
    send_reply,
    started,
    wait_for,
)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
USER = [{"role": "user", "content": "trace me"}]


class RecordingBackend:
    """An OpenAI-compatible backend that answers `status` and records each traceparent."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.traceparents: list[str | None] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, b'{"status":"ok"}')

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                backend.traceparents.append(self.headers.get("traceparent"))
                body = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": name}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                }).encode() if status == 200 else b'{"error": {"message": "down"}}'
                self._send(status, body)

            def _send(self, code: int, body: bytes) -> None:
                send_reply(self, code, body, "application/json")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def config(good: RecordingBackend, bad: RecordingBackend) -> dict[str, Any]:
    return {
        "server": {"request_timeout_s": 10},
        "backends": {"good": {"url": good.url}, "bad": {"url": bad.url}},
        "models": {"m": {"backends": ["good"]},
                   "flaky": {"backends": ["bad"], "fallbacks": ["m"]}},
        "keys": {"k": {"sha256": hash_key("ar-trace"), "org": "acme", "tier": "admin"}},
    }


@pytest.fixture
def backends() -> Iterator[tuple[RecordingBackend, RecordingBackend]]:
    good, bad = RecordingBackend("good"), RecordingBackend("bad", 503)
    yield good, bad
    good.stop()
    bad.stop()


@contextmanager
def routed(good: RecordingBackend, bad: RecordingBackend, receiver: OtlpReceiver
           ) -> Iterator[Router]:
    router = Router(config(good, bad), workers=1)
    try:
        yield router
    finally:
        router.stop()
        router.cleanup()
        receiver.stop()


def chat(router: Router, model: str) -> tuple[int, dict[str, str], Any]:
    return post_json(f"{router.url}/v1/chat/completions",
                     {"model": model, "messages": USER, "max_tokens": 16},
                     {"Authorization": "Bearer ar-trace",
                      "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})


def test_a_request_is_one_trace_continued_from_the_client_and_into_the_backends(
        backends: tuple[RecordingBackend, RecordingBackend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = backends
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "apirouter-e2e")
    with routed(good, bad, receiver) as router:
        status, headers, body = chat(router, "flaky")
        assert status == 200 and headers["X-Router-Decision"] == "FAILOVER", body

        def mine() -> list[dict[str, Any]]:
            return [s for s in receiver.received() if s["trace_id"] == CLIENT_TRACE]

        wait_for(lambda: len(mine()) >= 4, 15, "the request's spans at the OTLP receiver")
        spans = mine()
        (root,) = [s for s in spans if s["kind"] == 2]  # SERVER
        assert root["parent_span_id"] == CLIENT_SPAN
        assert root["name"] == "chat flaky"
        assert root["resource"]["service.name"] == "apirouter-e2e"
        a = root["attributes"]
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "flaky"
        assert a["gen_ai.request.max_tokens"] == 16
        assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 4
        assert a["apirouter.backend_id"] == "good"
        assert a["apirouter.decision_type"] == "FAILOVER"
        assert a["apirouter.attempts"] == 2
        assert a["apirouter.request_id"] == headers["X-Request-ID"]
        assert a["http.response.status_code"] == 200
        children = [s for s in spans if s["parent_span_id"] == root["span_id"]]
        admission = [s for s in children if s["name"] == "admission"]
        attempts = [s for s in children if s["kind"] == 3]  # CLIENT
        assert len(admission) == 1
        assert [s["attributes"]["apirouter.backend_id"] for s in attempts] == ["bad", "good"]
        assert attempts[0]["attributes"]["http.response.status_code"] == 503
        assert attempts[0]["attributes"]["error.type"]
        assert attempts[1]["attributes"]["http.response.status_code"] == 200
        # Each backend got the context of its own attempt span.
        assert bad.traceparents == [f"00-{CLIENT_TRACE}-{attempts[0]['span_id']}-01"]
        assert good.traceparents == [f"00-{CLIENT_TRACE}-{attempts[1]['span_id']}-01"]


def test_off_by_default_nothing_is_exported_and_nothing_is_propagated(
        backends: tuple[RecordingBackend, RecordingBackend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = backends
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    receiver = OtlpReceiver()
    with routed(good, bad, receiver) as router:
        assert chat(router, "m")[0] == 200
        assert good.traceparents == [None]
    # The router has stopped (an exporter would have flushed): nothing reached the receiver.
    assert receiver.received() == [] and receiver.requests == 0


def test_a_stream_span_carries_its_time_to_first_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with ExitStack() as stack:
        stack.callback(receiver.stop)
        mock = started(stack, MockBackend("s"))
        router = started(stack, Router({"server": {"auth_required": False},
                                        "backends": {"s": {"url": mock.url}},
                                        "models": {"m": {"backends": ["s"]}}}, workers=1))
        status, _, body = request(
            f"{router.url}/v1/chat/completions", "POST",
            json.dumps({"model": "m", "messages": USER, "stream": True}).encode(),
            {"Content-Type": "application/json",
             "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]")

        def root() -> list[dict[str, Any]]:
            return [s for s in receiver.received()
                    if s["trace_id"] == CLIENT_TRACE and s["kind"] == 2]

        wait_for(lambda: len(root()) == 1, 15, "the stream's span")
        a = root()[0]["attributes"]
        assert a["gen_ai.request.stream"] is True
        assert 0 < a["gen_ai.response.time_to_first_chunk"] < 10
        assert a["gen_ai.usage.output_tokens"] > 0
