"""Streaming end to end with the official openai SDK against a real router and mock backends:
the same text and usage as without streaming, failover before the first byte only, in-band
errors for broken streams, client disconnects that cancel the backend, and settlement of
tokens and budgets from streamed usage (reported or estimated). Both servers are exercised:
the lean one, and aiohttp on a connection handed to it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from apirouter.keys import hash_key
from apirouter.usage import schema
from tests.e2e.conftest import request
from tests.harness import MockBackend, Router, wait_for

USER = [{"role": "user", "content": "hello there"}]
KEY, OPS = "ar-stream-1", "ar-stream-ops"
BULK = "ar-stream-bulk"  # limits that never bind: long streams


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Router, dict[str, MockBackend]]]:
    mocks = {"a": MockBackend("a"),
             "broken": MockBackend("broken", "--error-rate", "1", "--error-status", "500"),
             "dropper": MockBackend("dropper", "--error-rate", "1", "--fail-mode", "close"),
             "late": MockBackend("late", "--first-event-ms", "5000")}
    cfg = {
        "server": {"request_timeout_s": 10, "stream_idle_timeout_s": 0.5},
        "backends": {"a": {"url": mocks["a"].url},
                     "broken": {"url": mocks["broken"].url},
                     "dropper": {"url": mocks["dropper"].url},
                     "late": {"url": mocks["late"].url, "first_event_timeout_s": 0.3}},
        "models": {"m": {"backends": ["a"], "price": {"prompt_per_1k": 1.0,
                                                      "completion_per_1k": 2.0}},
                   "fo-status": {"backends": ["broken"], "fallbacks": ["m"]},
                   "fo-drop": {"backends": ["dropper"], "fallbacks": ["m"]},
                   "fo-late": {"backends": ["late"], "fallbacks": ["m"]}},
        "keys": {"k1": {"sha256": hash_key(KEY), "org": "acme", "tier": "admin",
                        "tpm": 4000, "tpm_burst": 4000},
                 "ops": {"sha256": hash_key(OPS), "org": "ops", "scopes": ["admin"]},
                 "bulk": {"sha256": hash_key(BULK), "org": "bulk", "tier": "admin",
                          "rpm": 10**9, "tpm": 10**12}},
        "budgets": {"key:k1": {"period": "day", "tokens": 100_000_000}},
    }
    router = Router(cfg, workers=1)
    yield router, mocks
    for p in (router, *mocks.values()):
        p.stop()
        p.cleanup()


def sdk(router: Router, *, aiohttp: bool = False) -> openai.OpenAI:
    """A client; with ``aiohttp`` its one connection is first handed to aiohttp's server."""
    http = httpx.Client(limits=httpx.Limits(max_connections=1), timeout=10)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=KEY, max_retries=0,
                           http_client=http)
    if aiohttp:
        assert client.models.retrieve("m").id == "m"  # not a hot path: the hand-off
    return client


def record(router: Router, request_id: str) -> dict[str, Any]:
    path = f"{router.url}/v1/audit/requests/{request_id}"
    auth = {"Authorization": f"Bearer {OPS}"}
    wait_for(lambda: request(path, headers=auth)[0] == 200, 5, f"audit record {request_id}")
    doc: dict[str, Any] = json.loads(request(path, headers=auth)[2])
    jsonschema.validate(doc, schema())
    return doc


def budget_tokens(router: Router) -> int:
    status, _, body = request(f"{router.url}/v1/admin/budgets",
                              headers={"Authorization": f"Bearer {OPS}"})
    assert status == 200
    used: int = json.loads(body)["budgets"][0]["tokens"]["used"]
    return used


def chat_stream(client: openai.OpenAI, rid: str, model: str = "m", usage: bool = True,
                **extra: Any) -> tuple[str, Any, int]:
    stream = client.chat.completions.create(
        model=model, messages=USER, stream=True, extra_headers={"X-Request-ID": rid},
        stream_options={"include_usage": True} if usage else openai.NOT_GIVEN, **extra)
    text, got, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            got = chunk.usage
    return text, got, chunks


@pytest.mark.parametrize("aiohttp", [False, True], ids=["lean", "aiohttp"])
def test_chat_stream_equals_the_whole_answer(env: tuple[Router, dict[str, MockBackend]],
                                             aiohttp: bool) -> None:
    router, _ = env
    client = sdk(router, aiohttp=aiohttp)
    whole = client.chat.completions.create(model="m", messages=USER)
    rid = f"chat-{aiohttp}"
    text, usage, _ = chat_stream(client, rid)
    assert text == whole.choices[0].message.content and text
    assert usage is not None and whole.usage is not None
    assert usage.model_dump() == whole.usage.model_dump()
    doc = record(router, rid)
    assert doc["stream"] is True and doc["interruption"] is None and doc["error_code"] is None
    assert doc["events"] > 2 and doc["ttft_ms"] > 0 and "usage_estimated" not in doc
    assert (doc["prompt_tokens"], doc["completion_tokens"]) == (usage.prompt_tokens,
                                                                usage.completion_tokens)
    assert doc["cost_micro"] > 0


def test_usage_chunk_only_when_the_client_asked(env: tuple[Router, dict[str, MockBackend]]
                                                ) -> None:
    router, _ = env
    text, usage, _ = chat_stream(sdk(router), "no-usage-asked", usage=False)
    assert text and usage is None  # the backend was asked for it; the client did not get it
    doc = record(router, "no-usage-asked")
    assert doc["completion_tokens"] > 0 and "usage_estimated" not in doc


def test_completions_stream_and_whole_agree_sync_and_async(
        env: tuple[Router, dict[str, MockBackend]]) -> None:
    router, _ = env
    client = sdk(router)
    whole = client.completions.create(model="m", prompt="say hi", max_tokens=20)
    stream = client.completions.create(model="m", prompt="say hi", max_tokens=20, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.usage for c in chunks if c.usage][0] == whole.usage

    async def run() -> tuple[str, str, Any]:
        ac = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=KEY, max_retries=0)
        try:
            text = ""
            async for c in await ac.completions.create(model="m", prompt="say hi",
                                                       max_tokens=20, stream=True):
                text += c.choices[0].text if c.choices else ""
            chat = ""
            usage = None
            async for ch in await ac.chat.completions.create(
                    model="m", messages=USER, stream=True,
                    stream_options={"include_usage": True}):
                chat += ch.choices[0].delta.content or "" if ch.choices else ""
                usage = ch.usage or usage
            return text, chat, usage
        finally:
            await ac.close()

    text, chat, usage = asyncio.run(run())
    assert text == whole.choices[0].text
    whole_chat = client.chat.completions.create(model="m", messages=USER)
    assert chat == whole_chat.choices[0].message.content and usage == whole_chat.usage


@pytest.mark.parametrize("aiohttp", [False, True], ids=["lean", "aiohttp"])
def test_cut_and_stalled_streams_raise_and_are_recorded(
        env: tuple[Router, dict[str, MockBackend]], aiohttp: bool) -> None:
    router, mocks = env
    client = sdk(router, aiohttp=aiohttp)
    for how, reason in (("cut_after", "cut"), ("stall_after", "idle_timeout")):
        rid = f"{how}-{aiohttp}"
        with pytest.raises(openai.APIError) as e:
            chat_stream(client, rid, extra_body={"mock": {how: 3}})
        assert "stream_interrupted" in str(e.value.body) or reason in e.value.message
        doc = record(router, rid)
        assert doc["error_code"] == "STREAM_INTERRUPTED" and doc["interruption"] == reason
        assert doc["events"] == 3 and doc["backend_id"] == "a" and doc["status"] == 200
    status, _, body = request(f"{router.url}/metrics")
    assert b'router_streams_interrupted_total{backend_id="a",reason="cut"}' in body


@pytest.mark.parametrize("model", ["fo-status", "fo-drop", "fo-late"])
def test_failover_before_the_first_byte_is_invisible(
        env: tuple[Router, dict[str, MockBackend]], model: str) -> None:
    router, _ = env
    rid = f"failover-{model}"
    text, usage, _ = chat_stream(sdk(router), rid, model=model)
    assert text.startswith("Hello from a") and usage is not None
    doc = record(router, rid)
    assert doc["attempts"] == 2 and doc["backend_id"] == "a"
    assert doc["decision_type"] == "FAILOVER" and doc["interruption"] is None


def test_client_disconnect_cancels_the_backend_and_settles_what_was_streamed(
        env: tuple[Router, dict[str, MockBackend]]) -> None:
    router, mocks = env
    client = sdk(router)
    before, aborted = budget_tokens(router), mocks["a"].stats()["streams_aborted"]
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, max_tokens=3000,
        extra_headers={"X-Request-ID": "hang-up"},
        extra_body={"mock": {"reply_tokens": 500, "event_interval_ms": 20}})
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()  # the client hangs up mid-stream
    wait_for(lambda: mocks["a"].stats()["streams_aborted"] == aborted + 1, 5,
             "the mock to see its connection closed")
    doc = record(router, "hang-up")
    assert doc["interruption"] == "client_disconnected" and doc["status"] == 499
    assert doc["error_code"] == "CLIENT_DISCONNECTED"
    assert doc["usage_estimated"] is True and 0 < doc["completion_tokens"] < 100
    # The reservation (3000 completion tokens) settled to what was streamed.
    wait_for(lambda: budget_tokens(router) == before + doc["total_tokens"], 5, "settlement")
    # A 3000-token reservation would not fit the 4000 TPM twice; settled, many do.
    for i in range(3):
        text, _, _ = chat_stream(client, f"after-hang-up-{i}", max_tokens=3000)
        assert text


def test_tokens_and_budget_settle_from_reported_and_estimated_usage(
        env: tuple[Router, dict[str, MockBackend]]) -> None:
    router, _ = env
    client = sdk(router)
    before = budget_tokens(router)
    _, usage, _ = chat_stream(client, "settle-reported", max_tokens=3000)
    assert usage is not None
    wait_for(lambda: budget_tokens(router) == before + usage.total_tokens, 5, "settlement")
    before = budget_tokens(router)
    text, none, _ = chat_stream(client, "settle-estimated", max_tokens=3000,
                                extra_body={"mock": {"omit_usage": True}})
    assert text and none is None
    doc = record(router, "settle-estimated")
    assert doc["usage_estimated"] is True and doc["completion_tokens"] > 0
    wait_for(lambda: budget_tokens(router) == before + doc["total_tokens"], 5, "estimate")
    # Settled each time, so the 4000 TPM admits one 3000-token reservation after another.
    for i in range(3):
        assert chat_stream(client, f"tpm-{i}", max_tokens=3000)[0]


def test_embeddings_completions_and_model_lookup(env: tuple[Router, dict[str, MockBackend]]
                                                 ) -> None:
    router, _ = env
    client = sdk(router)
    emb = client.embeddings.create(model="m", input=["one", "two"],
                                   extra_headers={"X-Request-ID": "emb-1"})
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    doc = record(router, "emb-1")
    assert doc["endpoint"] == "/v1/embeddings" and doc["prompt_tokens"] == emb.usage.prompt_tokens
    comp = client.completions.create(model="m", prompt="hi",
                                     extra_headers={"X-Request-ID": "comp-1"})
    assert comp.choices[0].text and record(router, "comp-1")["endpoint"] == "/v1/completions"
    assert client.models.retrieve("m").owned_by == "apirouter"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="m", input=[])
    assert e.value.param == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=5)  # type: ignore[arg-type]
    assert e.value.param == "prompt"


def test_a_client_that_hangs_up_before_the_answer_cancels_the_backend_request(
        env: tuple[Router, dict[str, MockBackend]]) -> None:
    """Not streaming: the hang-up cancels the request's task; the backend connection closes."""
    router, mocks = env
    before = mocks["a"].stats()
    aborted, requests = before["aborted_by_peer"], before["requests"]
    body = json.dumps({"model": "m", "messages": USER, "mock": {"latency_ms": 3000}}).encode()
    s = socket.create_connection(("127.0.0.1", router.port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nX-Request-ID: gone-early\r\nAuthorization: Bearer " + KEY.encode()
              + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: mocks["a"].stats()["requests"] == requests + 1, 5,
             "the request to reach the mock")
    s.close()
    wait_for(lambda: mocks["a"].stats()["aborted_by_peer"] == aborted + 1, 5,
             "the mock to see its connection closed")
    doc = record(router, "gone-early")
    assert doc["status"] == 499 and doc["error_code"] == "CLIENT_DISCONNECTED"
    assert "stream" not in doc


def test_a_hang_up_on_a_connection_aiohttp_serves_cancels_the_backend_stream(
        env: tuple[Router, dict[str, MockBackend]]) -> None:
    router, mocks = env
    client = sdk(router, aiohttp=True)
    aborted = mocks["a"].stats()["streams_aborted"]
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, extra_headers={"X-Request-ID": "aio-hang-up"},
        extra_body={"mock": {"reply_tokens": 500, "event_interval_ms": 20}})
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()
    wait_for(lambda: mocks["a"].stats()["streams_aborted"] == aborted + 1, 5,
             "the mock to see its connection closed")
    assert record(router, "aio-hang-up")["interruption"] == "client_disconnected"


def test_a_slow_reader_gets_the_whole_stream_in_order(
        env: tuple[Router, dict[str, MockBackend]]) -> None:
    """A client whose socket fills (~4.5 MB read 4 KB at a time, slowly): the relay's
    writes wait for it (workers.streaming: the reads pushed from the backend's callback stop,
    the relay task takes over and resumes pushing once the client drained), and every event
    arrives once, in order, [DONE] last."""
    router, _ = env
    body = json.dumps({"model": "m", "messages": USER, "stream": True,
                       "stream_options": {"include_usage": True},
                       "mock": {"reply_tokens": 20_000}}).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", router.port))
    got = bytearray()
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nX-Request-ID: slow-reader\r\nAuthorization: Bearer "
                  + BULK.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        while not got.endswith(b"\r\n0\r\n\r\n"):
            chunk = s.recv(4096)
            assert chunk, "the router closed the stream early"
            got += chunk
            time.sleep(0.0005)
    finally:
        s.close()
    head, _, chunked = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    data = bytearray()
    while True:
        size, _, chunked = chunked.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        data += chunked[:n]
        chunked = chunked[n + 2:]
    events = bytes(data).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    words = [json.loads(e[6:])["choices"] for e in events[:-2]]
    doc = record(router, "slow-reader")
    assert doc["interruption"] is None and doc["status"] == 200
    assert doc["events"] == len(words) and words[-1] == []  # the usage chunk, asked for
    text = "".join(c[0]["delta"].get("content") or "" for c in words if c)
    assert len(text.split()) == 20_000
