"""The mock LLM backend: a real, fast HTTP/1.1 server speaking the OpenAI API.

It is the only thing the project mocks. Used by the demo, the tests and the benchmarks, so it is
built on a raw asyncio protocol with httptools (an aiohttp handler would saturate long before
the router does).

Endpoints: POST /v1/chat/completions and POST /v1/completions (both also ``stream: true`` as
Server-Sent Events in OpenAI's chunk shape, ending ``data: [DONE]``, with a last usage chunk
when ``stream_options.include_usage`` is set), POST /v1/embeddings, GET /v1/models,
GET /v1/models/{id}, GET /health, GET /mock/stats, POST /mock/config.

Behaviour (the ``Behaviour`` fields; command line ``--latency-ms``..., at run time through
POST /mock/config with the same names): ``latency_ms`` before the response head, ``jitter_ms``,
``error_rate`` (0..1) and ``error_status`` (e.g. 500), and ``fail_mode``: ``status`` (answer
error_status), ``close`` (drop the connection unanswered) or ``hang`` (never answer) - all of
these before the first byte; ``reply_tokens`` (N words, so N content events when streamed; 0 =
the default sentence), ``first_event_ms`` (after the head), ``event_interval_ms`` (between
events), ``cut_after`` (close the connection after K events, mid chunked body; -1 = never),
``stall_after`` (send nothing more after K events, holding the connection open until the peer
closes it; -1 = never), ``omit_usage`` (no usage block, streamed or not). Events are counted
as written: for chat the role chunk, then one per word, the finish chunk, the usage chunk,
``[DONE]``. A request overrides any of them for itself with a body key ``"mock": {...}``
(passes through the router) or ``X-Mock-Cut-After: 3``-style headers (direct calls). The
bodies themselves are tools/mock_shapes.py: a stream carries exactly the text and usage of the
non-streaming answer to the same request.

GET /mock/stats counts, besides requests and connections: ``streams`` started,
``streams_completed``, ``streams_cut`` and ``streams_stalled`` by the mock, ``streams_active``,
``aborted_by_peer`` (a client closed its connection while a request was being answered:
during the latency, mid-stream, or in a stall or hang) and ``streams_aborted`` (those after the
head of a stream).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import signal
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import unquote

import httptools
import orjson

from tools import mock_shapes

log = logging.getLogger("apirouter.mock")

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            429: b"Too Many Requests", 500: b"Internal Server Error", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout"}
_FAIL_MODES = ("status", "close", "hang")
_HEADER_PREFIX = b"x-mock-"


def _setting(kind: type, value: Any) -> Any:
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"not a boolean: {value!r}")
        return value.lower() in ("1", "true", "yes")
    return kind(value)


@dataclass(slots=True)
class Behaviour:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    fail_mode: str = "status"
    reply_tokens: int = 0
    first_event_ms: float = 0.0
    event_interval_ms: float = 0.0
    cut_after: int = -1
    stall_after: int = -1
    omit_usage: bool = False

    def updated(self, changes: dict[str, Any]) -> Behaviour:
        current = asdict(self)
        for k, v in changes.items():
            if k not in current:
                raise ValueError(f"unknown behaviour setting {k!r}")
            current[k] = _setting(type(current[k]), v)
        b = Behaviour(**current)
        if not 0 <= b.error_rate <= 1 or b.fail_mode not in _FAIL_MODES:
            raise ValueError("error_rate must be in [0, 1]; fail_mode status|close|hang")
        if not 0 <= b.reply_tokens <= 1_000_000:
            raise ValueError("reply_tokens must be in [0, 1000000]")
        return b


class MockState:
    def __init__(self, name: str, behaviour: Behaviour, models: list[str]) -> None:
        self.name = name
        self.behaviour = behaviour
        self.models = models
        self.requests = 0
        self.connections = 0
        self.streams = 0
        self.streams_completed = 0
        self.streams_cut = 0
        self.streams_stalled = 0
        self.streams_active = 0
        self.aborted_by_peer = 0
        self.streams_aborted = 0
        self.ids = itertools.count(1)

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "requests": self.requests, "connections": self.connections,
                "streams": self.streams, "streams_completed": self.streams_completed,
                "streams_cut": self.streams_cut, "streams_stalled": self.streams_stalled,
                "streams_active": self.streams_active, "aborted_by_peer": self.aborted_by_peer,
                "streams_aborted": self.streams_aborted, "behaviour": asdict(self.behaviour)}


def _response(status: int, body: bytes, keep_alive: bool,
              content_type: bytes = b"application/json") -> bytes:
    return b"".join((b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        status, _REASONS.get(status, b"Status"), content_type, len(body)),
        b"" if keep_alive else b"Connection: close\r\n", b"\r\n", body))


def _error(status: int, message: str, keep_alive: bool, err_type: str = "mock_error",
           code: str | None = None) -> bytes:
    return _response(status, orjson.dumps({"error": {
        "message": message, "type": err_type, "param": None, "code": code or f"mock_{status}"}}),
        keep_alive)


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class MockProtocol(asyncio.Protocol):
    def __init__(self, state: MockState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.overrides: dict[str, str] = {}
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes, bool, dict[str, str]]] = \
            asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.answering = False  # a request is being answered (API calls only)
        self.streaming = False  # ...and its stream's head is out
        self.dropping = False  # the mock itself is closing the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.state
        if self.streaming:
            st.streams_active -= 1
        if self.answering and not self.dropping:
            st.aborted_by_peer += 1
            st.streams_aborted += self.streaming
        self.answering = self.streaming = False
        self.writable.set()
        if self.worker is not None:
            self.worker.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_error(400, "malformed HTTP request", False))
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name.startswith(_HEADER_PREFIX):
            key = name[len(_HEADER_PREFIX):].decode("latin-1").replace("-", "_")
            self.overrides[key] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        # Requests are answered in order (HTTP/1.1 pipelining) by one task per connection.
        self.queue.put_nowait((method, self.url, b"".join(self.body),
                               self.parser.should_keep_alive(), self.overrides))
        self.url = b""
        self.body = []
        self.overrides = {}

    async def _serve(self) -> None:
        while True:
            method, url, body, keep_alive, overrides = await self.queue.get()
            if not await self._answer(method, url, body, keep_alive, overrides):
                return
            if not keep_alive and self.transport is not None:
                self.transport.close()
                return

    def _drop(self, flush: bool = False) -> None:
        """Close the connection unanswered (``flush``: after what was written so far)."""
        self.dropping = True
        assert self.transport is not None
        if flush:
            self.transport.close()
        else:
            self.transport.abort()

    def _get(self, path: bytes, keep_alive: bool) -> bytes:
        st = self.state
        if path == b"/health":
            return _response(200, b'{"status":"ok"}', keep_alive)
        if path == b"/mock/stats":
            return _response(200, orjson.dumps(st.stats()), keep_alive)
        if path == b"/v1/models":
            return _response(200, orjson.dumps({"object": "list", "data": [
                mock_shapes.model_object(m, st.name) for m in st.models]}), keep_alive)
        if path.startswith(b"/v1/models/"):
            model = unquote(path[len(b"/v1/models/"):].decode("latin-1"))
            if model in st.models:
                return _response(200, orjson.dumps(mock_shapes.model_object(model, st.name)),
                                 keep_alive)
            return _error(404, f"The model '{model}' does not exist", keep_alive,
                          "invalid_request_error", "model_not_found")
        return _error(404, "no such path", keep_alive)

    async def _answer(self, method: bytes, url: bytes, body: bytes, keep_alive: bool,
                      overrides: dict[str, str]) -> bool:
        """Write one response; False when the connection was deliberately dropped."""
        st = self.state
        t = self.transport
        assert t is not None
        path = url.split(b"?", 1)[0]
        if method == b"GET":
            t.write(self._get(path, keep_alive))
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
            behaviour = st.behaviour
            if isinstance(doc.get("mock"), dict):
                behaviour = behaviour.updated(doc["mock"])
            if overrides:
                behaviour = behaviour.updated(overrides)
        except (ValueError, TypeError, orjson.JSONDecodeError) as e:
            t.write(_error(400, f"bad request: {e}", keep_alive))
            return True
        st.requests += 1  # API calls only: stats and config calls are not counted
        self.answering = True
        try:
            return await self._api(path, doc, behaviour, keep_alive)
        finally:
            self.answering = False

    async def _api(self, path: bytes, doc: dict[str, Any], behaviour: Behaviour,
                   keep_alive: bool) -> bool:
        t = self.transport
        assert t is not None
        delay = behaviour.latency_ms + random.uniform(0, behaviour.jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if behaviour.error_rate and random.random() < behaviour.error_rate:
            if behaviour.fail_mode == "close":
                self._drop()
                return False
            if behaviour.fail_mode == "hang":
                await asyncio.Event().wait()
            t.write(_error(behaviour.error_status, "injected failure", keep_alive))
            return True
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            text = mock_shapes.reply_text(self.state.name, doc, behaviour.reply_tokens)
            if doc.get("stream") is True:
                return await self._stream(path, doc, text, behaviour, keep_alive)
            shape = mock_shapes.chat_body if path == b"/v1/chat/completions" else \
                mock_shapes.completion_body
            t.write(_response(200, shape(self.state.name, next(self.state.ids), doc, text,
                                         not behaviour.omit_usage), keep_alive))
        elif path == b"/v1/embeddings":
            t.write(_response(200, mock_shapes.embeddings_body(doc, not behaviour.omit_usage),
                              keep_alive))
        else:
            t.write(_error(404, "no such path", keep_alive))
        return True

    async def _stream(self, path: bytes, doc: dict[str, Any], text: str, b: Behaviour,
                      keep_alive: bool) -> bool:
        """Write an SSE stream event by event, pausing while the peer's window is full."""
        t = self.transport
        assert t is not None
        st = self.state
        opts = doc.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True \
            and not b.omit_usage
        events = mock_shapes.stream_payloads(st.name, next(st.ids), doc, text,
                                             path == b"/v1/chat/completions", with_usage)
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n")
        st.streams += 1
        st.streams_active += 1
        self.streaming = True
        if b.first_event_ms > 0:
            await asyncio.sleep(b.first_event_ms / 1000)
        for sent, data in enumerate(events):
            if sent == b.cut_after:
                st.streams_cut += 1
                st.streams_active -= 1
                self.streaming = False
                self._drop(flush=True)
                return False
            if sent == b.stall_after:
                st.streams_stalled += 1
                await asyncio.Event().wait()  # until the peer hangs up
            if sent and b.event_interval_ms > 0:
                await asyncio.sleep(b.event_interval_ms / 1000)
            if t.is_closing():
                return False
            t.write(_chunk(data))
            if not self.writable.is_set():
                await self.writable.wait()
        t.write(b"0\r\n\r\n")
        st.streams_completed += 1
        st.streams_active -= 1
        self.streaming = False
        return True


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
    defaults = Behaviour()
    for f in fields(Behaviour):  # one flag per behaviour setting, named after it
        flag, default = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        elif f.name == "fail_mode":
            p.add_argument(flag, choices=_FAIL_MODES, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)


def run(args: argparse.Namespace) -> int:
    import uvloop

    behaviour = Behaviour().updated({f.name: getattr(args, f.name) for f in fields(Behaviour)})
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
