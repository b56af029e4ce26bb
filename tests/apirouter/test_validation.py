from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apirouter.errors import RouterError
from apirouter.validation import (
    parse_chat_completion,
    parse_chat_request,
    parse_inference_request,
)

MSG = [{"role": "user", "content": "hi"}]


def err(fn: Any, body: bytes) -> RouterError:
    with pytest.raises(RouterError) as e:
        fn(body)
    return e.value


def test_chat_request_returns_model() -> None:
    assert parse_chat_request(orjson.dumps({"model": "m", "messages": MSG})) == ("m", None)
    assert parse_chat_request(orjson.dumps({"model": "m", "messages": MSG,
                                            "max_tokens": 9}))[1] == 9


@pytest.mark.parametrize(("doc", "code", "field"), [
    ({"messages": MSG}, "MISSING_FIELD", "model"),
    ({"model": 3, "messages": MSG}, "INVALID_REQUEST", "model"),
    ({"model": "m"}, "MISSING_FIELD", "messages"),
    ({"model": "m", "messages": []}, "INVALID_REQUEST", "messages"),
    ({"model": "m", "messages": ["x"]}, "INVALID_REQUEST", "messages[0]"),
    ({"model": "m", "messages": [{"content": "x"}]}, "MISSING_FIELD", "messages[0].role"),
    ({"model": "m", "messages": [{"role": "wizard"}]}, "INVALID_REQUEST", "messages[0].role"),
    ({"model": "m", "messages": MSG, "stream": "yes"}, "INVALID_REQUEST", "stream"),
    ({"model": "m", "messages": [{"role": {}, "content": "x"}]}, "INVALID_REQUEST",
     "messages[0].role"),
    ({"model": "m", "messages": [{"role": ["user"]}]}, "INVALID_REQUEST", "messages[0].role"),
    ({"model": "m", "messages": MSG, "max_tokens": 0}, "INVALID_REQUEST", "max_tokens"),
    ({"model": "m", "messages": MSG, "max_tokens": 2.5}, "INVALID_REQUEST", "max_tokens"),
    ({"model": "m", "messages": MSG, "max_completion_tokens": "9"}, "INVALID_REQUEST",
     "max_completion_tokens"),
])
def test_chat_request_errors_name_the_field(doc: dict[str, Any], code: str, field: str) -> None:
    e = err(parse_chat_request, orjson.dumps(doc))
    assert (e.code, e.field) == (code, field)


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b"null", b"\xff\xfe"])
def test_not_a_json_object_is_invalid_request(body: bytes) -> None:
    assert err(parse_chat_request, body).code == "INVALID_REQUEST"


def test_inference_prompt_becomes_a_user_message() -> None:
    req = parse_inference_request(orjson.dumps(
        {"model": "m", "prompt": "hello", "max_tokens": 5, "temperature": 0.5,
         "metadata": {"team": "a"}}))
    assert req.model == "m" and req.metadata == {"team": "a"}
    assert orjson.loads(req.upstream_body) == {
        "model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
        "temperature": 0.5}


@pytest.mark.parametrize(("doc", "code", "field"), [
    ({"model": "m"}, "MISSING_FIELD", "messages"),
    ({"model": "m", "prompt": "a", "messages": MSG}, "INVALID_REQUEST", "prompt"),
    ({"model": "m", "prompt": ""}, "INVALID_REQUEST", "prompt"),
    ({"model": "m", "prompt": "a", "max_tokens": 0}, "INVALID_REQUEST", "max_tokens"),
    ({"model": "m", "prompt": "a", "max_tokens": True}, "INVALID_REQUEST", "max_tokens"),
    ({"model": "m", "prompt": "a", "temperature": "hot"}, "INVALID_REQUEST", "temperature"),
    ({"model": "m", "prompt": "a", "stop": [1]}, "INVALID_REQUEST", "stop"),
    ({"model": "m", "prompt": "a", "metadata": {"k": 1}}, "INVALID_REQUEST", "metadata"),
    ({"model": "m", "prompt": "a", "colour": 1}, "INVALID_REQUEST", "colour"),
    ({"model": "m", "messages": [{"role": {}, "content": "x"}]}, "INVALID_REQUEST",
     "messages[0].role"),
    ({"model": "m", "messages": [{"role": []}]}, "INVALID_REQUEST", "messages[0].role"),
    ({"model": "m", "prompt": "a", "max_tokens": 1.5}, "INVALID_REQUEST", "max_tokens"),
    ({"model": "m", "prompt": "a", "max_tokens": 1_000_001}, "INVALID_REQUEST", "max_tokens"),
])
def test_inference_errors_name_the_field(doc: dict[str, Any], code: str, field: str) -> None:
    e = err(parse_inference_request, orjson.dumps(doc))
    assert (e.code, e.field) == (code, field)


def test_integral_floats_are_integers_as_json_schema_says() -> None:
    """openapi.yaml types max_tokens as integer, and 5.0 is one (schemathesis sends it)."""
    req = parse_inference_request(orjson.dumps({"model": "m", "prompt": "a",
                                                "max_tokens": 510509.0}))
    assert req.max_tokens == 510509
    assert orjson.loads(req.upstream_body)["max_tokens"] == 510509
    assert isinstance(orjson.loads(req.upstream_body)["max_tokens"], int)
    assert parse_chat_request(orjson.dumps({"model": "m", "messages": MSG,
                                            "max_completion_tokens": 7.0})) == ("m", 7)


@pytest.mark.parametrize("depth", [1025, 100_000])
def test_deep_nesting_is_refused_naming_the_limit(depth: int) -> None:
    body = b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}"
    for parse in (parse_chat_request, parse_inference_request):
        e = err(parse, body)
        assert e.code == "INVALID_REQUEST" and "nested deeper than 1024" in e.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "messages", "prompt", "role", "content", "max_tokens",
                         "stream", "stop", "metadata", "x"]), children, max_size=5),
    max_leaves=20)


@given(json_values)
def test_any_json_is_accepted_or_a_4xx(doc: Any) -> None:
    body = orjson.dumps(doc)
    for parse in (parse_chat_request, parse_inference_request):
        try:
            parse(body)
        except RouterError as e:
            assert 400 <= e.status < 500


@given(st.lists(json_values, min_size=1, max_size=3), json_values)
def test_any_role_or_message_shape_is_accepted_or_a_4xx(roles: list[Any], content: Any) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": r, "content": content}
                                                    for r in roles]})
    for parse in (parse_chat_request, parse_inference_request):
        try:
            parse(body)
        except RouterError as e:
            assert 400 <= e.status < 500


@given(st.binary(max_size=64))
def test_any_bytes_are_accepted_or_a_4xx(body: bytes) -> None:
    for parse in (parse_chat_request, parse_inference_request):
        try:
            parse(body)
        except RouterError as e:
            assert 400 <= e.status < 500


def test_backend_completion_parsing() -> None:
    c = parse_chat_completion(orjson.dumps({"choices": [{"message": {
        "role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3}}))
    assert (c.content, c.total_tokens) == ("ok", 5)
    for bad in (b"{}", b"[]", b"nope", b'{"choices": []}'):
        assert err(parse_chat_completion, bad).code == "BACKEND_ERROR"


@pytest.mark.parametrize(("body", "total"), [
    (b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}', 7),
    (b'{"usage":{"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}', 12),
    (b'{"usage": {"total_tokens": 5}\n}', 5),
    (b'{"choices": []}', None),
    (b'not json', None),
    (b'{"x": "\\"total_tokens\\": 99 in text", "usage": {"total_tokens": 3}}', 3),
])
def test_usage_total_tokens(body: bytes, total: int | None) -> None:
    from apirouter.validation import usage_total_tokens

    assert usage_total_tokens(body) == total


@settings(max_examples=200, deadline=None)
@given(content=st.text(max_size=200), prompt=st.integers(0, 10**9),
       completion=st.integers(0, 10**9), details=st.booleans(), indent=st.booleans())
def test_usage_counts_from_the_tail_agrees_with_a_full_parse(
        content: str, prompt: int, completion: int, details: bool, indent: bool) -> None:
    from apirouter.validation import usage_counts

    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": 3}
    doc = {"choices": [{"message": {"role": "assistant",
                                    "content": content + ' "prompt_tokens": 7 '}}],
           "usage": usage}
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else 0)
    assert usage_counts(body) == (prompt, completion)
    assert usage_counts(b'{"choices": []}') is None


# What a chat request's fields may hold, the awkward cases among valid ones: integral floats,
# bools where integers go, bounds, nulls, absent and present-but-null max_completion_tokens.
_token_values = st.sampled_from([None, 0, 1, 9, 5.0, 2.5, True, False, "9", 1_000_000, 1_000_001,
                                 2**70, -1, []]) | st.integers(-3, 2**40)
_roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "function",
                          "wizard", "", "User", None, 1, True, ["user"], {}])
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"])},
                                 optional={"content": json_values})
_odd_message = st.sampled_from([None, "x", 1, []]) | st.fixed_dictionaries(
    {}, optional={"role": _roles, "content": json_values})
_chat_fields = {
    "model": st.sampled_from(["m", "model-x", "", None, 3, ["m"]]),
    "messages": st.lists(_message, min_size=1, max_size=3)
    | st.sampled_from([[], None, "x", {}]) | st.lists(_odd_message, min_size=1, max_size=3),
    "max_tokens": _token_values,
    "max_completion_tokens": _token_values,
    "stream": st.sampled_from([None, True, False, 0, 1, "yes"]),
    "stream_options": st.sampled_from([None, {}, {"include_usage": True},
                                       {"include_usage": False}, {"include_usage": None},
                                       {"include_usage": "x"}, [], "x", {"other": 1}]),
    "temperature": json_values,
}
_VALID_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _outcome(parse: Any, body: bytes) -> Any:
    try:
        return parse(body)
    except RouterError as e:
        return (e.code, e.message, e.field)


def _one_field_off(name: str) -> Any:
    return st.tuples(st.just(name), _chat_fields[name])


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(_chat_fields)).flatmap(_one_field_off))
@example(("messages", [{"role": "wizard"}]))
@example(("messages", [{"role": "user"}, {"role": "User"}]))
@example(("messages", []))
@example(("model", ""))
@example(("max_tokens", 1_000_001))
@example(("max_completion_tokens", 0))
@example(("stream_options", {"include_usage": None}))
def test_chat_fast_check_agrees_on_valid_documents_with_one_field_off(
        field: tuple[str, Any]) -> None:
    """As below, on a valid document with one field set to something awkward: where the two
    checks part, it is nearly always over one field."""
    from apirouter.validation import _chat_doc, _openai_request, decode_json_object, parse_chat

    body = json.dumps({**_VALID_CHAT, field[0]: field[1]}).encode()
    assert _outcome(parse_chat, body) == _outcome(
        lambda b: _openai_request(_chat_doc(decode_json_object(b))), body)


@settings(max_examples=1500, deadline=None)
@given(st.fixed_dictionaries({}, optional=_chat_fields), st.booleans())
@example({"max_completion_tokens": None, "max_tokens": 5}, True)
@example({"max_completion_tokens": 7, "max_tokens": 5}, True)
@example({"max_completion_tokens": 5.0}, True)
@example({"max_tokens": 1_000_000, "stream": True, "stream_options": {"include_usage": True}},
         True)
def test_chat_fast_check_agrees_with_the_field_by_field_checks(
        fields: dict[str, Any], on_valid: bool) -> None:
    """parse_chat lets msgspec check the common case in C; whatever the document, the result
    (or the error, its message and field) is the one the Python checks give."""
    from apirouter.validation import _chat_doc, _openai_request, decode_json_object, parse_chat

    doc = {**_VALID_CHAT, **fields} if on_valid else fields
    body = json.dumps(doc).encode()  # (orjson cannot write integers past 64 bits)
    assert _outcome(parse_chat, body) == _outcome(
        lambda b: _openai_request(_chat_doc(decode_json_object(b))), body)


def test_usage_counts_takes_the_last_count_of_each_as_the_tail_search_does() -> None:
    from apirouter.validation import usage_counts

    # The one-match path (the counts side by side) steps aside when a later count follows.
    later = b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"x":{"completion_tokens":5}}'
    assert usage_counts(later) == (1, 5)
    assert usage_counts(b'{"usage":{"prompt_tokens":1, "completion_tokens":2}}') == (1, 2)
    # Beyond MAX_REPORTED_TOKENS a count is not one: the full parse gives up on it too.
    assert usage_counts(b'{"usage":{"prompt_tokens":1,"completion_tokens":9999999999}}') is None


def test_a_number_past_a_double_passes_where_the_router_does_not_read() -> None:
    """msgspec decodes chat bodies without building what the router does not read; such a
    number passes as sent (JSON allows it), also to a fallback model's backend: a failover
    rewrites the model alone and keeps every other member byte for byte."""
    from apirouter.validation import parse_chat, with_model

    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1e999}'
    assert parse_chat(body).model == "m"
    assert with_model(body, "n") == body.replace(b'"m"', b'"n"')
    big = b'{"model":"m","n":123456789012345678901234567890, "s":"\\u00e9"}'
    assert with_model(big, "a\"b") == b'{"model":"a\\"b","n":123456789012345678901234567890,' \
        b'"s":"\\u00e9"}'
    deep = b'{"model":"m","x":' + b"[" * 1020 + b"]" * 1020 + b"}"  # deeper than msgspec goes
    assert err(lambda b: with_model(b, "n"), deep).code == "INVALID_REQUEST"
    # Not ASCII: the full way, which refuses it as orjson does.
    assert err(parse_chat, body.replace(b'"x"', '"é"'.encode())).code == "INVALID_REQUEST"
    # Invalid UTF-8 in a string the router does not read: refused (msgspec would skip it).
    assert err(parse_chat, body.replace(b'"x"', b'"\xff"')).code == "INVALID_REQUEST"
