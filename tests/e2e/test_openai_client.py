"""The official openai client against the router, unchanged: success and every error class."""

from __future__ import annotations

import time

import openai
import pytest

from tests.e2e.conftest import Deployment, request

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(deployment: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0,
                         timeout=10)


def test_chat_completion_with_router_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-ok", messages=USER)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Hello from a")
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-router-backend"] == "a"
    assert float(raw.headers["x-router-latency-ms"]) > 0
    assert raw.headers["x-request-id"].startswith("req_")


def test_incoming_request_id_is_honoured(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-ok", messages=USER, extra_headers={"X-Request-ID": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"


def test_models_list(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"gpt-ok", "gpt-split", "gpt-slow", "gpt-broken", "gpt-down"}


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=USER)
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_invalid_messages_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-ok", messages=[])
    assert e.value.code == "invalid_request" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-ok",
                                       messages=[{"role": "wizard", "content": "x"}])  # type: ignore[misc,list-item]
    assert e.value.param == "messages[0].role"


def test_backend_500_is_bad_gateway(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="gpt-broken", messages=USER)
    assert e.value.status_code == 502 and e.value.code == "backend_error"


def test_backend_timeout_is_gateway_timeout_within_the_deadline(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="gpt-slow", messages=USER)
    assert e.value.status_code == 504 and e.value.code == "backend_timeout"
    assert time.monotonic() - started < 2.5  # the backend's 0.5 s timeout, not its 3 s latency


def test_backend_down_is_service_unavailable(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="gpt-down", messages=USER)
    assert e.value.status_code == 503 and e.value.code == "backend_unavailable"


def test_oversized_body_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gpt-ok",
                                       messages=[{"role": "user", "content": "x" * 70_000}])
    assert e.value.status_code == 413 and e.value.code == "payload_too_large"


def test_malformed_json_wrong_method_and_unknown_path(deployment: Deployment) -> None:
    status, _, body = request(f"{deployment.url}/v1/chat/completions", "POST", b"{not json",
                              {"Content-Type": "application/json"})
    assert status == 400 and b'"invalid_request"' in body
    status, headers, _ = request(f"{deployment.url}/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST"
    status, _, body = request(f"{deployment.url}/v1/chat/nothing", "POST", b"{}")
    assert status == 404 and b'"not_found"' in body
