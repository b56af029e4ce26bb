"""Request decoding and validation: one pass over the body, clear errors naming the field.

Pure functions from bytes to what the router needs. Errors are RouterError with
INVALID_REQUEST or MISSING_FIELD, so a malformed request can only ever produce a 4xx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import msgspec
import orjson

from apirouter._usagecore import usage_pair
from apirouter.errors import RouterError
from apirouter.limits import MAX_REPORTED_TOKENS, reported_count

_Role = Literal["system", "user", "assistant", "tool", "developer", "function"]
_ROLES = frozenset(get_args(_Role))
MAX_TOKENS = 1_000_000  # the largest max_tokens accepted (apirouter/openapi.yaml says the same)
_NATIVE_FIELDS = frozenset(
    {"model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "metadata"})


# orjson refuses documents nested deeper than this (it stops parsing there, so a hostile
# 100k-deep body costs no more than a shallow one); the client is told the limit.
MAX_JSON_DEPTH = 1024


def decode_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise RouterError("INVALID_REQUEST", "the request body is empty; send a JSON object")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        detail = str(e)
        if detail.startswith("depth limit"):
            raise RouterError("INVALID_REQUEST", f"the request body is nested deeper than "
                                                 f"{MAX_JSON_DEPTH} levels") from None
        raise RouterError("INVALID_REQUEST", "the request body is not valid JSON",
                          details=detail) from None
    if not isinstance(doc, dict):
        raise RouterError("INVALID_REQUEST", "the request body must be a JSON object")
    return doc


def _model(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if model is None:
        raise RouterError("MISSING_FIELD", "'model' is required", field="model")
    if not isinstance(model, str) or not model:
        raise RouterError("INVALID_REQUEST", "'model' must be a non-empty string", field="model")
    return model


def _messages(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise RouterError("INVALID_REQUEST", "'messages' must be a non-empty array",
                          field="messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RouterError("INVALID_REQUEST", f"'messages[{i}]' must be an object",
                              field=f"messages[{i}]")
        role = m.get("role")
        if role is None:
            raise RouterError("MISSING_FIELD", f"'messages[{i}].role' is required",
                              field=f"messages[{i}].role")
        if not isinstance(role, str) or role not in _ROLES:
            raise RouterError("INVALID_REQUEST",
                              f"'messages[{i}].role' must be one of {sorted(_ROLES)}",
                              field=f"messages[{i}].role")


def _stream(doc: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, whether the client asked for the usage chunk) of an OpenAI request."""
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RouterError("INVALID_REQUEST", "'stream' must be a boolean", field="stream")
    options = doc.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise RouterError("INVALID_REQUEST", "'stream_options' must be an object",
                          field="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RouterError("INVALID_REQUEST", "'stream_options.include_usage' must be a boolean",
                          field="stream_options.include_usage")
    return bool(stream), bool(stream) and include


def _asking_for_usage(doc: dict[str, Any]) -> bytes:
    """The streamed request as sent to the backend: always asking for the usage chunk, which
    accounting needs whether or not the client wants it."""
    options = doc.get("stream_options") or {}
    return orjson.dumps({**doc, "stream_options": {**options, "include_usage": True}})


def _max_tokens(doc: dict[str, Any]) -> int | None:
    name = "max_completion_tokens" if "max_completion_tokens" in doc else "max_tokens"
    v: int | None = _number(doc, name, 1, MAX_TOKENS, integer=True)
    return v


def _chat_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """The field-by-field checks of a chat request (model, messages, roles)."""
    _model(doc)
    if "messages" not in doc:
        raise RouterError("MISSING_FIELD", "'messages' is required", field="messages")
    _messages(doc["messages"])
    return doc


def parse_chat_request(body: bytes) -> tuple[str, int | None]:
    """Validate an OpenAI chat-completions body; return (model, max_tokens)."""
    req = parse_chat(body)
    return req.model, req.max_tokens


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    model: str
    upstream_body: bytes  # the chat-completions body sent to the backend
    metadata: dict[str, str] | None
    max_tokens: int | None = None


def _number(doc: dict[str, Any], name: str, lo: float, hi: float, integer: bool = False) -> Any:
    """A number in [lo, hi]; for an integer field, JSON Schema's integers: 5 and 5.0 alike."""
    v = doc.get(name)
    if v is None:
        return None
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if integer and isinstance(v, float) and ok:
        ok = v.is_integer()
        v = int(v) if ok else v
    if not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise RouterError("INVALID_REQUEST", f"'{name}' must be {kind} from {lo:g} to {hi:g}",
                          field=name)
    return v


def parse_inference_request(body: bytes) -> InferenceRequest:
    """Validate a native /v1/inference body (schema: apirouter/openapi.yaml)."""
    doc = decode_json_object(body)
    unknown = doc.keys() - _NATIVE_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise RouterError("INVALID_REQUEST", f"unknown field '{name}'", field=name)
    model = _model(doc)
    has_messages, has_prompt = "messages" in doc, "prompt" in doc
    if has_messages == has_prompt:
        if has_messages:
            raise RouterError("INVALID_REQUEST", "send either 'messages' or 'prompt', not both",
                              field="prompt")
        raise RouterError("MISSING_FIELD", "'messages' (or 'prompt') is required",
                          field="messages")
    if has_prompt:
        prompt = doc["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise RouterError("INVALID_REQUEST", "'prompt' must be a non-empty string",
                              field="prompt")
        messages: list[Any] = [{"role": "user", "content": prompt}]
    else:
        _messages(doc["messages"])
        messages = doc["messages"]
    upstream: dict[str, Any] = {"model": model, "messages": messages}
    for name, lo, hi, integer in (("max_tokens", 1, MAX_TOKENS, True),
                                  ("temperature", 0, 2, False), ("top_p", 0, 1, False)):
        v = _number(doc, name, lo, hi, integer)
        if v is not None:
            upstream[name] = v
    stop = doc.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                          and all(isinstance(s, str) for s in stop))):
            raise RouterError("INVALID_REQUEST", "'stop' must be a string or up to 4 strings",
                              field="stop")
        upstream["stop"] = stop
    metadata = doc.get("metadata")
    if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= 16
            and all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                    for k, v in metadata.items())):
        raise RouterError("INVALID_REQUEST",
                          "'metadata' must be an object of up to 16 string values",
                          field="metadata")
    # Everything in `upstream` came from orjson.loads (which reads huge integers as floats),
    # so it always serializes again.
    return InferenceRequest(model, orjson.dumps(upstream), metadata, upstream.get("max_tokens"))


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    role: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def parse_chat_completion(body: bytes) -> Completion:
    """Read a backend's chat-completions response; anything malformed is BACKEND_ERROR."""
    try:
        doc = orjson.loads(body)
        choice = doc["choices"][0]
        msg = choice["message"]
        usage = doc.get("usage") or {}
        pt = int(usage.get("prompt_tokens", 0))
        ct = int(usage.get("completion_tokens", 0))
        return Completion(msg.get("content") or "", msg.get("role") or "assistant",
                          choice.get("finish_reason"), pt, ct,
                          int(usage.get("total_tokens", pt + ct)))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise RouterError("BACKEND_ERROR", "the backend returned a malformed completion") from None


_decode_members = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_encode_json = msgspec.json.Encoder().encode


def with_model(body: bytes, model: str) -> bytes:
    """The same request for another model (a fallback; only on failover). Only ``model`` is
    rewritten: every other member goes on byte for byte as the client sent it (msgspec's
    Raw), so what the router never read reaches the other backend unchanged — a number
    orjson would refuse (parse_chat lets one pass) or turn into a float included. The body
    was validated as a JSON object before; one nested deeper than msgspec goes (the
    interpreter's recursion limit; orjson reads 1024 levels but writes only 255) is refused
    as such, a 4xx, rather than failing the request."""
    try:
        members = _decode_members(body)
    except Exception:
        raise RouterError("INVALID_REQUEST", "the request body is nested too deeply to be "
                                             "sent to a fallback model") from None
    members["model"] = msgspec.Raw(_encode_json(model))
    return _encode_json(members)


# Spaces, then up to 25 digits ending where a JSON value ends.
_INT_VALUE = re.compile(rb" *([0-9]{1,25})[,} \n\r]")


def _int_after(body: bytes, key: bytes) -> int | None:
    """The integer after the last ``"key":`` in a JSON document. The usage block comes last,
    so a search from the end avoids a full parse; the pattern cannot come from inside a
    string (a quote there is escaped)."""
    at = body.rfind(key)
    if at < 0:
        return None
    m = _INT_VALUE.match(body, at + len(key))
    return int(m[1]) if m is not None else None


def usage_total_tokens(body: bytes) -> int | None:
    """total_tokens of an OpenAI-shaped response, if it says; for settling token buckets."""
    total = reported_count(_int_after(body, b'"total_tokens":'))
    if total is not None:
        return total
    try:
        usage = orjson.loads(body).get("usage") or {}
        return reported_count(usage.get("total_tokens"))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


# The usual usage block: the two counts side by side, prompt first (OpenAI, the mock).
_PROMPT_THEN_COMPLETION = re.compile(
    rb'"prompt_tokens": *([0-9]{1,10}) *, *"completion_tokens": *([0-9]{1,10})[,} \n\r]')


def _usage_pair_py(body: bytes) -> tuple[int, int] | None:
    """The usual usage block (the counts side by side after the last ``"prompt_tokens":``),
    read by one match, and no later completion count (the last of each is the one, as
    usage_counts reads them otherwise); None when the block is not that. The reference
    _usagecore.usage_pair is held to (tests/apirouter/test_usagecore.py)."""
    at = body.rfind(b'"prompt_tokens":')
    if at >= 0:
        m = _PROMPT_THEN_COMPLETION.match(body, at)
        if m is not None and body.find(b'"completion_tokens":', m.end()) < 0:
            pair = int(m[1]), int(m[2])
            if pair[0] <= MAX_REPORTED_TOKENS and pair[1] <= MAX_REPORTED_TOKENS:
                return pair
    return None


def usage_counts(body: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of an OpenAI-shaped response, if it reports them.
    Searched from the end first: a 50 KB completion costs ~50 µs to parse in full. The usual
    block is read by one C call (_usagecore.usage_pair, _usage_pair_py in C: ~60 bytecodes
    and six C calls a request fewer than the match it replaces, itself ~0.6 µs against ~1.0
    for a search per count)."""
    pair = usage_pair(body)
    if pair is not None:
        return pair
    prompt = reported_count(_int_after(body, b'"prompt_tokens":'))
    completion = reported_count(_int_after(body, b'"completion_tokens":'))
    if prompt is not None and completion is not None:
        return prompt, completion
    try:
        usage = orjson.loads(body).get("usage") or {}
        prompt = reported_count(usage["prompt_tokens"])
        completion = reported_count(usage["completion_tokens"])
        if prompt is None or completion is None:
            raise ValueError("not token counts")
        return prompt, completion
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        total = usage_total_tokens(body)
        return None if total is None else (total, 0)


@dataclass(slots=True)
class ProxyRequest:
    """What the pipeline needs from a request it forwards, whatever the endpoint. Made for
    every request: not frozen (a frozen dataclass's __init__ costs ~0.4 µs more); nothing
    assigns to it."""

    model: str
    max_tokens: int | None
    upstream_body: bytes | None = None  # None: the client's body goes to the backend as is
    stream: bool = False
    include_usage: bool = False  # streams: the client asked for the usage chunk


def _openai_request(doc: dict[str, Any], stream_allowed: bool = True) -> ProxyRequest:
    stream, include_usage = _stream(doc)
    if stream and not stream_allowed:
        raise RouterError("INVALID_REQUEST", "this endpoint does not stream", field="stream")
    return ProxyRequest(doc["model"], _max_tokens(doc),
                        _asking_for_usage(doc) if stream else None, stream, include_usage)


_Tokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]


class _ChatMessage(msgspec.Struct):
    role: _Role


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Chat(msgspec.Struct):
    """What the checks of a chat request read (_chat_doc, _openai_request), declared for
    msgspec, which checks a decoded document against it in C: ~0.3 µs where the Python checks
    take ~1.2 µs. A document it accepts is one they accept, with the same result; anything it
    refuses (or cannot say: an integral float, a stream to re-encode) goes through them, so
    every error still names its field (tests/apirouter/test_validation.py compares the two)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[_ChatMessage], msgspec.Meta(min_length=1)]
    max_tokens: _Tokens | None = None
    # Present (even null), it is the one read: UNSET tells absent from null.
    max_completion_tokens: _Tokens | None | msgspec.UnsetType = msgspec.UNSET
    stream: bool | None = None
    stream_options: _StreamOptions | None = None


_decode_chat = msgspec.json.Decoder(_Chat).decode


def parse_chat(body: bytes) -> ProxyRequest:
    """/v1/chat/completions: validated; forwarded unchanged unless it streams.

    An ASCII body that is not a stream is decoded and checked by msgspec in one pass: what
    the router does not read is skipped, not built (~0.7 µs against ~1.6 for orjson's
    document and a convert, for the bench's 300-byte body). Skipped strings are checked for
    escapes and control characters, not for UTF-8, hence ASCII only. Anything it refuses or
    cannot say goes the full way below, so every error is the same. One difference: a number
    too large for a double, in a field the router does not read, passes as sent (orjson
    refuses it; JSON allows either, RFC 8259 section 6)."""
    if body.isascii():
        try:
            chat: _Chat | None = _decode_chat(body)
        except Exception:  # refused, or too deep to say (RecursionError): the full way
            chat = None
        if chat is not None and not chat.stream:
            mct = chat.max_completion_tokens
            return ProxyRequest(chat.model, chat.max_tokens if mct is msgspec.UNSET else mct)
    doc = decode_json_object(body)
    try:
        chat = msgspec.convert(doc, _Chat)
    except msgspec.ValidationError:
        return _openai_request(_chat_doc(doc))
    if chat.stream:
        return _openai_request(doc)
    mct = chat.max_completion_tokens
    return ProxyRequest(chat.model, chat.max_tokens if mct is msgspec.UNSET else mct)


MAX_TOKEN_ID = 2**32 - 1


def _prompt(value: Any) -> None:
    """A completions prompt: a string, strings, token ids, or arrays of token ids."""
    def tokens(v: Any) -> bool:  # JSON Schema's integers: 5 and 5.0 alike
        return isinstance(v, list) and bool(v) and all(
            isinstance(t, int | float) and not isinstance(t, bool)
            and (isinstance(t, int) or t.is_integer()) and 0 <= t <= MAX_TOKEN_ID for t in v)
    if isinstance(value, str) or tokens(value):
        return
    if isinstance(value, list) and value and (all(isinstance(v, str) for v in value)
                                              or all(tokens(v) for v in value)):
        return
    raise RouterError("INVALID_REQUEST", "'prompt' must be a string, an array of strings, or "
                                         "token ids", field="prompt")


def parse_completion(body: bytes) -> ProxyRequest:
    """/v1/completions (OpenAI's legacy text completions)."""
    doc = decode_json_object(body)
    _model(doc)
    if "prompt" not in doc:
        raise RouterError("MISSING_FIELD", "'prompt' is required", field="prompt")
    _prompt(doc["prompt"])
    return _openai_request(doc)


def parse_embedding(body: bytes) -> ProxyRequest:
    """/v1/embeddings: ``input`` is a string, strings, or token ids."""
    doc = decode_json_object(body)
    model = _model(doc)
    if "input" not in doc:
        raise RouterError("MISSING_FIELD", "'input' is required", field="input")
    value = doc["input"]
    if isinstance(value, list) and not value:
        raise RouterError("INVALID_REQUEST", "'input' must not be empty", field="input")
    try:
        _prompt(value)
    except RouterError:
        raise RouterError("INVALID_REQUEST", "'input' must be a string, an array of strings, "
                                             "or token ids", field="input") from None
    if "stream" in doc:
        _openai_request(doc, stream_allowed=False)
    return ProxyRequest(model, None)


def parse_inference(body: bytes) -> ProxyRequest:
    """/v1/inference: validated and rewritten into a chat-completions body for the backend."""
    req = parse_inference_request(body)
    return ProxyRequest(req.model, req.max_tokens, req.upstream_body)
