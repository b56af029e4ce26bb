"""The mock backend through the official openai SDK and raw sockets: streams carry the same
text and usage as whole answers, and the stream controls cut, stall and count what they did."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest

from tests.harness import MockBackend
from tools.mock_backend import Behaviour, MockState, start_mock

HOST = "127.0.0.1"
MESSAGES: Any = [{"role": "user", "content": "say something nice"}]


@pytest.fixture
async def mock() -> AsyncIterator[tuple[openai.AsyncOpenAI, MockState]]:
    server, state = await start_mock(HOST, 0, name="m", models=["m1", "org/m2"])
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="k", max_retries=0)
    yield client, state
    await client.close()
    server.close()


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("tokens", [0, 40])
async def test_streamed_chat_equals_the_whole_answer(
        mock: tuple[openai.AsyncOpenAI, MockState], tokens: int) -> None:
    client, state = mock
    extra = {"mock": {"reply_tokens": tokens}}
    whole = await client.chat.completions.create(model="m1", messages=MESSAGES,
                                                 extra_body=extra)
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_body=extra)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == len(text.split()) == (tokens or 10)
    # role chunk + one per word + finish chunk + usage chunk + [DONE]
    assert len(chunks) == whole.usage.completion_tokens + 3
    assert state.streams == state.streams_completed == 1 and state.streams_active == 0


async def test_streamed_completion_equals_the_whole_answer(
        mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, _ = mock
    whole = await client.completions.create(model="m1", prompt="once upon a time", max_tokens=5)
    stream = await client.completions.create(model="m1", prompt="once upon a time", max_tokens=5,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    assert chunks[-1].usage == whole.usage
    # Without include_usage (or with omit_usage) no chunk carries usage.
    plain = await client.completions.create(model="m1", prompt="x", stream=True,
                                            extra_body={"mock": {"omit_usage": True}},
                                            stream_options={"include_usage": True})
    assert [c.usage async for c in plain] == [None] * 11  # 10 words and the finish chunk


async def test_embeddings_models_and_omitted_usage(
        mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, _ = mock
    emb = await client.embeddings.create(model="m1", input=["a b", "c"])  # SDK asks base64
    raw = await client.embeddings.create(model="m1", input="a b", encoding_format="float")
    assert [len(d.embedding) for d in emb.data] == [8, 8]
    assert emb.data[0].embedding == pytest.approx(raw.data[0].embedding, rel=1e-6)
    assert emb.usage.prompt_tokens == 3
    assert (await client.models.retrieve("org/m2")).id == "org/m2"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")
    bare = await client.chat.completions.create(model="m1", messages=MESSAGES,
                                                max_completion_tokens=3,
                                                extra_headers={"X-Mock-Omit-Usage": "true"})
    assert bare.usage is None and bare.choices[0].message.content == "Hello from m."


async def test_cut_stream_raises_in_the_sdk_after_k_events(
        mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, state = mock
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, extra_headers={"X-Mock-Cut-After": "4"})
    got = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 4
    assert state.streams_cut == 1 and state.streams_aborted == 0 and state.streams_active == 0


async def test_client_hanging_up_on_a_stall_is_counted(
        mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, state = mock
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True,
        extra_body={"mock": {"stall_after": 2}})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 2:
            break  # nothing more will come: hang up
    await stream.close()
    await _until(lambda: state.streams_aborted == 1)
    assert state.streams_stalled == 1 and state.aborted_by_peer == 1
    assert state.streams_active == 0 and state.streams_completed == 0


async def test_failures_before_the_first_event(
        mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, state = mock
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True,
            extra_body={"mock": {"error_rate": 1, "error_status": 429}})
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True,
            extra_body={"mock": {"error_rate": 1, "fail_mode": "close"}})
    assert state.streams == 0 and state.aborted_by_peer == 0


async def test_client_hanging_up_before_the_head_is_counted(
        mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, state = mock
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.1).chat.completions.create(
            model="m1", messages=MESSAGES, extra_body={"mock": {"latency_ms": 5000}})
    await _until(lambda: state.aborted_by_peer == 1)
    assert state.streams_aborted == 0


async def test_bad_overrides_are_a_400(mock: tuple[openai.AsyncOpenAI, MockState]) -> None:
    client, _ = mock
    for extra in ({"extra_body": {"mock": {"cut_afterr": 1}}},
                  {"extra_headers": {"X-Mock-Omit-Usage": "maybe"}}):
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m1", messages=MESSAGES,
                                                 **extra)  # type: ignore[call-overload]
    assert Behaviour().updated({"omit_usage": "1", "cut_after": "3"}).cut_after == 3


def test_command_line_sets_the_stream_defaults(
        mock_backend: Callable[..., MockBackend]) -> None:
    m = mock_backend("cli", "--reply-tokens", "6", "--event-interval-ms", "1", "--omit-usage")
    behaviour = m.stats()["behaviour"]
    assert behaviour["reply_tokens"] == 6 and behaviour["omit_usage"] is True
    client = openai.OpenAI(base_url=f"{m.url}/v1", api_key="k", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).split() == \
        "Hello from cli. This is a".split()
    assert all(c.usage is None for c in chunks)
    assert m.configure(cut_after=1)["cut_after"] == 1
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="mock-model", messages=MESSAGES, stream=True))
    assert orjson.loads(orjson.dumps(m.stats()))["streams_cut"] == 1
