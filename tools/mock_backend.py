"""The mock LLM backend: a real, fast HTTP/1.1 server speaking the OpenAI API.

It is the only thing the project mocks. Used by the demo, the tests and the benchmarks, so it is
built on a raw asyncio protocol with httptools (an aiohttp handler would saturate long before
the router does).

Endpoints: POST /v1/chat/completions (also ``stream: true`` as SSE), POST /v1/completions,
POST /v1/embeddings, GET /v1/models, GET /health, GET /mock/stats, POST /mock/config.

Behaviour (command line, or at run time through POST /mock/config with the same names):
``latency_ms``, ``jitter_ms``, ``error_rate`` (0..1) and ``error_status`` (e.g. 500), and
``fail_mode``: ``status`` (answer error_status), ``close`` (drop the connection unanswered) or
``hang`` (never answer). A request body may carry ``"mock": {...}`` with the same keys to
override them for that request alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import random
import signal
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import httptools
import orjson

log = logging.getLogger("apirouter.mock")

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            429: b"Too Many Requests", 500: b"Internal Server Error", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout"}


@dataclass(slots=True)
class Behaviour:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    fail_mode: str = "status"

    def updated(self, changes: dict[str, Any]) -> Behaviour:
        known = {f.name: f.type for f in fields(self)}
        current = asdict(self)
        for k, v in changes.items():
            if k not in known:
                raise ValueError(f"unknown behaviour setting {k!r}")
            current[k] = type(current[k])(v)
        b = Behaviour(**current)
        if not 0 <= b.error_rate <= 1 or b.fail_mode not in ("status", "close", "hang"):
            raise ValueError("error_rate must be in [0, 1]; fail_mode status|close|hang")
        return b


class MockState:
    def __init__(self, name: str, behaviour: Behaviour, models: list[str]) -> None:
        self.name = name
        self.behaviour = behaviour
        self.models = models
        self.requests = 0
        self.connections = 0
        self.ids = itertools.count(1)


def _words(messages: Any) -> int:
    n = 0
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                n += len(c.split())
    return max(n, 1)


def _reply_text(state: MockState, doc: dict[str, Any]) -> str:
    words = ["Hello", "from", state.name + "."] + "This is a mock completion for testing.".split()
    max_tokens = doc.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0:
        words = words[:max_tokens]
    return " ".join(words)


def _response(status: int, body: bytes, keep_alive: bool,
              content_type: bytes = b"application/json") -> bytes:
    return b"".join((b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        status, _REASONS.get(status, b"Status"), content_type, len(body)),
        b"" if keep_alive else b"Connection: close\r\n", b"\r\n", body))


def _error(status: int, message: str, keep_alive: bool) -> bytes:
    return _response(status, orjson.dumps({"error": {
        "message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}}),
        keep_alive)


class MockProtocol(asyncio.Protocol):
    def __init__(self, state: MockState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes, bool]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_error(400, "malformed HTTP request", False))
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        # Requests are answered in order (HTTP/1.1 pipelining) by one task per connection.
        self.queue.put_nowait((method, self.url, b"".join(self.body),
                               self.parser.should_keep_alive()))
        self.url = b""
        self.body = []

    async def _serve(self) -> None:
        while True:
            method, url, body, keep_alive = await self.queue.get()
            if not await self._answer(method, url, body, keep_alive):
                return
            if not keep_alive and self.transport is not None:
                self.transport.close()
                return

    async def _answer(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> bool:
        """Write one response; False when the connection was deliberately dropped."""
        st = self.state
        t = self.transport
        assert t is not None
        path = url.split(b"?", 1)[0]
        if method == b"GET":
            if path == b"/health":
                t.write(_response(200, b'{"status":"ok"}', keep_alive))
            elif path == b"/v1/models":
                t.write(_response(200, orjson.dumps({"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": st.name}
                    for m in st.models]}), keep_alive))
            elif path == b"/mock/stats":
                t.write(_response(200, orjson.dumps({
                    "name": st.name, "requests": st.requests, "connections": st.connections,
                    "behaviour": asdict(st.behaviour)}), keep_alive))
            else:
                t.write(_error(404, "no such path", keep_alive))
            return True
        if method != b"POST":
            t.write(_error(405, "method not allowed", keep_alive))
            return True
        try:
            doc = orjson.loads(body) if body else {}
            if not isinstance(doc, dict):
                raise ValueError("body must be an object")
            if path == b"/mock/config":
                st.behaviour = st.behaviour.updated(doc)
                t.write(_response(200, orjson.dumps(asdict(st.behaviour)), keep_alive))
                return True
            behaviour = st.behaviour.updated(doc["mock"]) if isinstance(doc.get("mock"),
                                                                         dict) else st.behaviour
        except (ValueError, TypeError, orjson.JSONDecodeError) as e:
            t.write(_error(400, f"bad request: {e}", keep_alive))
            return True
        st.requests += 1  # API calls only: stats and config calls are not counted
        delay = behaviour.latency_ms + random.uniform(0, behaviour.jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if behaviour.error_rate and random.random() < behaviour.error_rate:
            if behaviour.fail_mode == "close":
                t.abort()
                return False
            if behaviour.fail_mode == "hang":
                await asyncio.Event().wait()
            t.write(_error(behaviour.error_status, "injected failure", keep_alive))
            return True
        if path == b"/v1/chat/completions":
            if doc.get("stream") is True:
                self._stream_chat(doc, keep_alive)
            else:
                t.write(_response(200, self._chat(doc), keep_alive))
        elif path == b"/v1/completions":
            t.write(_response(200, self._completion(doc), keep_alive))
        elif path == b"/v1/embeddings":
            t.write(_response(200, self._embeddings(doc), keep_alive))
        else:
            t.write(_error(404, "no such path", keep_alive))
        return True

    def _usage(self, doc: dict[str, Any], text: str) -> dict[str, int]:
        prompt = _words(doc.get("messages")) if "messages" in doc else len(
            str(doc.get("prompt", "")).split()) or 1
        completion = len(text.split())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _chat(self, doc: dict[str, Any]) -> bytes:
        text = _reply_text(self.state, doc)
        return orjson.dumps({
            "id": f"chatcmpl-{self.state.name}-{next(self.state.ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": doc.get("model", "mock"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": self._usage(doc, text),
            "system_fingerprint": f"mock-{self.state.name}",
        })

    def _stream_chat(self, doc: dict[str, Any], keep_alive: bool) -> None:
        t = self.transport
        assert t is not None
        text = _reply_text(self.state, doc)
        cid = f"chatcmpl-{self.state.name}-{next(self.state.ids)}"
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": doc.get("model", "mock")}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        for i, word in enumerate(text.split()):
            events.append({**base, "choices": [{"index": 0, "delta": {
                "content": word if i == 0 else " " + word}, "finish_reason": None}]})
        final: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {},
                                                       "finish_reason": "stop"}]}
        if (doc.get("stream_options") or {}).get("include_usage"):
            final["usage"] = self._usage(doc, text)
        events.append(final)
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n")
        for ev in events:
            chunk = b"data: " + orjson.dumps(ev) + b"\n\n"
            t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        done = b"data: [DONE]\n\n"
        t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    def _completion(self, doc: dict[str, Any]) -> bytes:
        text = _reply_text(self.state, doc)
        return orjson.dumps({
            "id": f"cmpl-{self.state.name}-{next(self.state.ids)}", "object": "text_completion",
            "created": int(time.time()), "model": doc.get("model", "mock"),
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": self._usage(doc, text)})

    def _embeddings(self, doc: dict[str, Any]) -> bytes:
        inputs = doc.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(items):
            digest = hashlib.sha256(str(item).encode()).digest()
            data.append({"object": "embedding", "index": i,
                         "embedding": [round(b / 255.0, 6) for b in digest[:8]]})
        tokens = sum(len(str(x).split()) for x in items) or 1
        return orjson.dumps({"object": "list", "data": data, "model": doc.get("model", "mock"),
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def start_mock(host: str, port: int, *, name: str = "mock",
                     behaviour: Behaviour | None = None,
                     models: list[str] | None = None) -> tuple[asyncio.Server, MockState]:
    """Start a mock backend on the running loop (used in-process by tests and benches)."""
    state = MockState(name, behaviour or Behaviour(), models or ["mock-model"])
    server = await asyncio.get_running_loop().create_server(
        lambda: MockProtocol(state), host, port, reuse_address=True, backlog=1024)
    return server, state


def parse_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", default="127.0.0.1:9001", type=parse_bind, help="HOST:PORT")
    p.add_argument("--name", default="mock", help="name shown in responses")
    p.add_argument("--models", default="mock-model", help="comma-separated model ids")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--fail-mode", choices=("status", "close", "hang"), default="status")


def run(args: argparse.Namespace) -> int:
    import uvloop

    behaviour = Behaviour(args.latency_ms, args.jitter_ms, args.error_rate, args.error_status,
                          args.fail_mode).updated({})
    host, port = args.bind

    async def main() -> None:
        server, _ = await start_mock(host, port, name=args.name, behaviour=behaviour,
                                     models=[m for m in args.models.split(",") if m])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = server.sockets[0].getsockname()
        print(f"mock backend {args.name} listening on http://{bound[0]}:{bound[1]}", flush=True)
        await stop.wait()
        server.close()

    uvloop.run(main())
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="apirouter mock-backend")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
